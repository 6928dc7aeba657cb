"""Load any task split into the normalised schema, and write/read it as fingerprinted Parquet.

Sources, detected per split file:

``glue_tsv``
    The original GLUE layout (``glue/SST-2/train.tsv`` ...), read with ``QUOTE_NONE`` as GLUE
    does: quotes are text. UTF-8 BOMs (MRPC) are dropped and CoLA's header-less 4-column rows
    are recognised.
``hf_export``
    A 🤗 ``glue/<task>`` export: ``train|validation|test`` as ``.csv``/``.tsv``/``.jsonl``/``.parquet``
    (or hub-style ``<split>-00000-of-00001.parquet`` shards) with the hub's columns
    (``sentence1, sentence2, label, idx``...), integer labels and -1 on test. Recognised by its
    ``idx`` column (TSV) or by its file names.
``amazon_tsv``
    The Blitzer reviews: tab-separated, CSV-quoted fields with embedded newlines.
``squad_json``
    SQuAD v1.1/v2.0 JSON.
``parquet``
    A split already in the normalised schema (as :func:`write_split` writes it).
``hub``
    ``datasets.load_dataset`` when online: pass ``data_dir="hub"``, or any folder lacking the
    files. Offline (``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1``) that is a clear error.

Bad input raises :class:`DataFormatError` naming the file, the line and the problem.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kd_core.artifacts import atomic_file
from kd_core.data.schemas import (
    CLASSIFICATION_SCHEMA,
    REGRESSION_SCHEMA,
    SCHEMA_NAMES,
    SQUAD_SCHEMA,
    UNLABELED,
    fingerprint_table,
    schema_for,
    schema_kind,
)
from kd_core.data.tasks import TaskSpec, default_data_dir, get_task
from kd_core.errors import UserError

FORMAT_VERSION = "1"
LAYOUTS = ("glue_tsv", "hf_export", "amazon_tsv", "squad_json", "parquet", "hub")


class DataFormatError(UserError, ValueError):
    """Malformed input: the message names the file, the line (or row) and the problem."""


class DataSourceError(UserError, ValueError):
    """No usable source for a task split: missing folder or file, or the hub while offline."""


# ----------------------------------------------------------------------------------------------
# original GLUE column names


@dataclass(frozen=True)
class _Columns:
    text: tuple[str, ...]
    label: str
    headerless: tuple[int, int, int] | None = None  # (fields per row, label position, text position)


_GLUE_COLUMNS = {
    "cola": _Columns(("sentence",), "label", headerless=(4, 1, 3)),
    "sst2": _Columns(("sentence",), "label"),
    "mrpc": _Columns(("#1 String", "#2 String"), "Quality"),
    "stsb": _Columns(("sentence1", "sentence2"), "score"),
    "qqp": _Columns(("question1", "question2"), "is_duplicate"),
    "mnli": _Columns(("sentence1", "sentence2"), "gold_label"),
    "mnli-mm": _Columns(("sentence1", "sentence2"), "gold_label"),
    "qnli": _Columns(("question", "sentence"), "label"),
    "rte": _Columns(("sentence1", "sentence2"), "label"),
    "wnli": _Columns(("sentence1", "sentence2"), "label"),
}
_AMAZON_COLUMNS = _Columns(("sentence",), "label")
_IDX_COLUMNS = ("idx", "index", "id")
_EXPORT_EXTS = ("parquet", "jsonl", "json", "csv", "tsv")


def is_unlabeled_split(split: str) -> bool:
    return split.startswith("test") and "labeled" not in split


def _offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(f, "").strip().lower() in ("1", "true", "yes", "on") for f in flags)


def _fail(where: str, problem: str) -> DataFormatError:
    return DataFormatError(f"{where}: {problem}")


# ----------------------------------------------------------------------------------------------
# records: (location, fields) from each kind of file


def _iter_delimited(path: Path, delimiter: str, quote_none: bool) -> Iterator[tuple[int, list]]:
    """(first physical line, fields) per record; blank lines are skipped."""
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    quoting = csv.QUOTE_NONE if quote_none else csv.QUOTE_MINIMAL
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, delimiter=delimiter, quoting=quoting, strict=not quote_none)
            previous = 0
            try:
                for fields in reader:
                    start, previous = previous + 1, reader.line_num
                    if fields:
                        yield start, fields
            except csv.Error as exc:
                raise _fail(f"{path}, line {reader.line_num}", f"malformed {'TSV' if delimiter == chr(9) else 'CSV'} ({exc})") from None
    except UnicodeDecodeError as exc:
        raise _fail(str(path), f"not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8-sig") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise _fail(f"{path}, line {number}", f"not valid JSON ({exc.msg}, column {exc.colno})") from None
            if not isinstance(record, dict):
                raise _fail(f"{path}, line {number}", "expected one JSON object per line")
            yield number, record


def _parquet_files(paths: Sequence[Path]) -> pa.Table:
    tables = []
    for path in paths:
        try:
            tables.append(pq.read_table(path))
        except (pa.ArrowInvalid, OSError) as exc:
            raise _fail(str(path), f"not a readable Parquet file ({exc})") from None
    try:
        return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    except pa.ArrowInvalid as exc:
        raise _fail(str(paths[0]), f"the Parquet shards have different columns ({exc})") from None


# ----------------------------------------------------------------------------------------------
# normalising records of one split


class _Builder:
    """Collects normalised rows of a classification/regression split."""

    def __init__(self, spec: TaskSpec, layout: str, path: Path | str, split: str):
        self.spec, self.layout, self.path, self.split = spec, layout, path, split
        self.idx: list[int] = []
        self.text_a: list[str] = []
        self.text_b: list[str | None] = []
        self.label: list = []
        self.label_map: dict[str, int] = {}
        if spec.labels is not None:
            self.label_map = {name: i for i, name in enumerate(spec.labels)}
            if layout in ("glue_tsv", "amazon_tsv") and spec.raw_labels:
                self.label_map.update({raw: i for i, raw in enumerate(spec.raw_labels)})
            else:  # hub-style integer labels, -1 for unlabeled rows
                self.label_map.update({str(i): i for i in range(len(spec.labels))})
                self.label_map[str(UNLABELED)] = UNLABELED

    def where(self, loc: str) -> str:
        return f"{self.path}, {loc}"

    def parse_label(self, value, loc: str):
        spec = self.spec
        if spec.is_regression:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                number = float(value)
            else:
                try:
                    number = float(str(value).strip())
                except ValueError:
                    raise _fail(self.where(loc), f"label {value!r} is not a number (task {spec.name} is a regression)") from None
            if self.layout not in ("glue_tsv",) and number == UNLABELED:
                return math.nan
            return number
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        key = str(value).strip() if value is not None else None
        if key is None or key not in self.label_map:
            expected = spec.raw_labels if self.layout in ("glue_tsv", "amazon_tsv") and spec.raw_labels else tuple(
                str(i) for i in range(len(spec.labels))
            )
            names = ", ".join(spec.labels)
            raise _fail(
                self.where(loc),
                f"unknown label {value!r} for task {spec.name}; expected one of {', '.join(expected)} ({names})",
            )
        return self.label_map[key]

    def parse_idx(self, value, loc: str) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            return int(str(value).strip())
        except ValueError:
            raise _fail(self.where(loc), f"index {value!r} is not an integer") from None

    def text(self, value, column: str, loc: str) -> str:
        if isinstance(value, str):
            return value
        raise _fail(self.where(loc), f"column {column!r} holds {value!r}, not text")

    def add(self, idx: int, a: str, b: str | None, label) -> None:
        self.idx.append(idx)
        self.text_a.append(a)
        self.text_b.append(b)
        self.label.append(label)

    def add_records(self, header: list[str], header_loc: str, records: Iterable[tuple[str, list]], text_options, label_col: str, sep: str):
        """Rows with a header: pick the text columns, the label (if any) and the index column."""
        spec, split = self.spec, self.split
        header = [str(h).strip() for h in header]
        position = {name: i for i, name in enumerate(header)}
        text_cols = next((opt for opt in text_options if all(c in position for c in opt)), None)
        if text_cols is None:
            wanted = text_options[0]
            missing = [c for c in wanted if c not in position]
            raise _fail(
                self.where(header_loc),
                f"missing column {missing[0]!r} (the header has: {', '.join(header)}); task {spec.name} needs {', '.join(wanted)}",
            )
        label_pos = position.get(label_col)
        if label_pos is None and not is_unlabeled_split(split):
            raise _fail(
                self.where(header_loc),
                f"missing column {label_col!r} (the header has: {', '.join(header)}); split {split!r} of {spec.name} must be labeled",
            )
        idx_pos = next((position[c] for c in _IDX_COLUMNS if c in position and c not in text_cols), None)
        text_pos = [position[c] for c in text_cols]
        width = len(header)
        unlabeled = math.nan if spec.is_regression else UNLABELED
        for row, (loc, fields) in enumerate(records):
            if len(fields) != width:
                raise _fail(self.where(loc), f"expected {width} {sep} fields as in the header, found {len(fields)}")
            a = self.text(fields[text_pos[0]], text_cols[0], loc)
            b = self.text(fields[text_pos[1]], text_cols[1], loc) if len(text_pos) > 1 else None
            label = self.parse_label(fields[label_pos], loc) if label_pos is not None else unlabeled
            idx = self.parse_idx(fields[idx_pos], loc) if idx_pos is not None else row
            self.add(idx, a, b, label)

    def table(self) -> pa.Table:
        schema = REGRESSION_SCHEMA if self.spec.is_regression else CLASSIFICATION_SCHEMA
        return pa.Table.from_pydict(
            {"idx": self.idx, "text_a": self.text_a, "text_b": self.text_b, "label": self.label}, schema=schema
        )


def _text_options(spec: TaskSpec) -> list[tuple[str, ...]]:
    if spec.is_pair:
        return [spec.text_fields, ("sentence1", "sentence2"), ("text_a", "text_b")]
    return [spec.text_fields, ("sentence",), ("text",), ("text_a",)]


def _header_and_rows(path: Path, records: Iterator[tuple[int, list]]):
    first = next(records, None)
    if first is None:
        raise _fail(f"{path}, line 1", "empty file (no header and no rows)")
    line, header = first
    return line, header


def _require_rows(builder: _Builder, loc: str) -> None:
    if not builder.idx:
        raise _fail(builder.where(loc), "empty file: a header but no rows")


def _read_glue_tsv(path: Path, spec: TaskSpec, split: str) -> pa.Table:
    columns = _GLUE_COLUMNS.get(spec.name) or _Columns(spec.text_fields, "label")
    builder = _Builder(spec, "glue_tsv", path, split)
    records = _iter_delimited(path, "\t", quote_none=True)
    line, header = _header_and_rows(path, records)
    stripped = [h.strip() for h in header]
    if columns.headerless and not set(columns.text) & set(stripped):
        width, label_pos, text_pos = columns.headerless
        for row, (number, fields) in enumerate(chain([(line, header)], records)):
            loc = f"line {number}"
            if len(fields) != width:
                raise _fail(
                    builder.where(loc),
                    f"expected {width} tab-separated fields (header-less {spec.name} rows: source, label, "
                    f"original label, sentence), found {len(fields)}",
                )
            builder.add(row, fields[text_pos], None, builder.parse_label(fields[label_pos], loc))
    else:
        text_options = list(dict.fromkeys([columns.text, spec.text_fields]))
        builder.add_records(
            header, f"line {line}", ((f"line {n}", f) for n, f in records), text_options, columns.label, "tab-separated"
        )
        _require_rows(builder, f"line {line + 1}")
    return builder.table()


def _read_amazon_tsv(path: Path, spec: TaskSpec, split: str) -> pa.Table:
    builder = _Builder(spec, "amazon_tsv", path, split)
    records = _iter_delimited(path, "\t", quote_none=False)
    line, header = _header_and_rows(path, records)
    builder.add_records(
        header, f"line {line}", ((f"line {n}", f) for n, f in records), _text_options(spec), _AMAZON_COLUMNS.label, "tab-separated"
    )
    _require_rows(builder, f"line {line + 1}")
    return builder.table()


def _read_export_delimited(path: Path, spec: TaskSpec, split: str, delimiter: str) -> pa.Table:
    builder = _Builder(spec, "hf_export", path, split)
    records = _iter_delimited(path, delimiter, quote_none=False)
    line, header = _header_and_rows(path, records)
    sep = "tab-separated" if delimiter == "\t" else "comma-separated"
    builder.add_records(header, f"line {line}", ((f"line {n}", f) for n, f in records), _text_options(spec), "label", sep)
    _require_rows(builder, f"line {line + 1}")
    return builder.table()


def _read_export_jsonl(path: Path, spec: TaskSpec, split: str) -> pa.Table:
    builder = _Builder(spec, "hf_export", path, split)
    records = _iter_jsonl(path)
    first = next(records, None)
    if first is None:
        raise _fail(f"{path}, line 1", "empty file (no records)")
    header = list(first[1])

    def rows():
        for number, record in chain([first], records):
            if list(record) != header and set(record) != set(header):
                raise _fail(
                    f"{path}, line {number}",
                    f"expected the fields {', '.join(header)} as in line {first[0]}, found {', '.join(record)}",
                )
            yield f"line {number}", [record[k] for k in header]

    builder.add_records(header, f"line {first[0]}", rows(), _text_options(spec), "label", "JSON")
    return builder.table()


def _columnar(table: pa.Table, spec: TaskSpec, split: str, where: str, layout: str = "hf_export") -> pa.Table:
    """A 🤗-style table (from Parquet or the hub) into the normalised schema."""
    builder = _Builder(spec, layout, where, split)
    header = table.column_names
    if table.num_rows == 0:
        raise _fail(f"{where}, row 0", "empty file: no rows")
    columns = [table.column(c).to_pylist() for c in header]
    rows = ((f"row {i}", [col[i] for col in columns]) for i in range(table.num_rows))
    builder.add_records(header, "schema", rows, _text_options(spec), "label", "")
    return builder.table()


def _is_normalized(names: Sequence[str], spec: TaskSpec) -> bool:
    return set(schema_for(spec).names) <= set(names)


def _from_normalized(table: pa.Table, spec: TaskSpec, where: str) -> pa.Table:
    return _conform(table.select(schema_for(spec).names), spec, where)


# ----------------------------------------------------------------------------------------------
# SQuAD


def _squad_where(path: Path, text: str, where: str, needles: Sequence[str]) -> str:
    for needle in needles:
        at = text.find(needle) if needle else -1
        if at >= 0:
            line = text.count("\n", 0, at) + 1
            column = at - (text.rfind("\n", 0, at) + 1) + 1
            return f"{path}, line {line}, column {column} ({where})"
    return f"{path} ({where})"


def _read_squad_json(path: Path, spec: TaskSpec, split: str) -> pa.Table:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _fail(str(path), f"not UTF-8 text (byte {exc.start})") from None
    if not text.strip():
        raise _fail(f"{path}, line 1", "empty file")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(f"{path}, line {exc.lineno}, column {exc.colno}", f"not valid JSON ({exc.msg})") from None
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise _fail(f"{path}, line 1", "missing column 'data': SQuAD JSON is {\"version\": ..., \"data\": [articles]}")
    if not document["data"]:
        raise _fail(f"{path}, line 1", "empty file: 'data' holds no articles")

    def need(obj, key, kind, where, needles):
        if not isinstance(obj, dict) or key not in obj:
            raise _fail(_squad_where(path, text, where, needles), f"missing column {key!r} in this {kind}")
        value = obj[key]
        if not isinstance(value, kind_types[key]):
            raise _fail(_squad_where(path, text, where, needles), f"{key!r} should be {kind_types[key].__name__}, found {value!r:.60}")
        return value

    kind_types = {"title": str, "paragraphs": list, "context": str, "qas": list, "id": str, "question": str,
                  "answers": list, "text": str, "answer_start": int}
    out = {name: [] for name in SQUAD_SCHEMA.names}
    for a, article in enumerate(document["data"]):
        title = article.get("title") if isinstance(article, dict) else None
        art_needles = [json.dumps(title)] if isinstance(title, str) else []
        title = need(article, "title", "article", f"data[{a}]", art_needles)
        for p, paragraph in enumerate(need(article, "paragraphs", "article", f"data[{a}]", art_needles)):
            p_where = f"data[{a}].paragraphs[{p}]"
            ctx = paragraph.get("context") if isinstance(paragraph, dict) else None
            p_needles = [json.dumps(ctx[:40])[:-1]] if isinstance(ctx, str) else []
            p_needles += art_needles
            context = need(paragraph, "context", "paragraph", p_where, p_needles)
            for q, qa in enumerate(need(paragraph, "qas", "paragraph", p_where, p_needles)):
                q_where = f"{p_where}.qas[{q}]"
                qid = qa.get("id") if isinstance(qa, dict) else None
                q_needles = [json.dumps(qid), json.dumps(qid, ensure_ascii=False)] if isinstance(qid, str) else []
                q_needles += p_needles
                qid = need(qa, "id", "question", q_where, q_needles)
                question = need(qa, "question", "question", q_where, q_needles)
                answers = need(qa, "answers", "question", q_where, q_needles)
                impossible = qa.get("is_impossible", False)
                if not isinstance(impossible, bool):
                    raise _fail(_squad_where(path, text, q_where, q_needles), f"'is_impossible' should be true/false, found {impossible!r}")
                texts, starts = [], []
                for n, answer in enumerate(answers):
                    texts.append(need(answer, "text", "answer", f"{q_where}.answers[{n}]", q_needles))
                    starts.append(need(answer, "answer_start", "answer", f"{q_where}.answers[{n}]", q_needles))
                if not answers and not impossible and spec.name == "squad":
                    raise _fail(_squad_where(path, text, q_where, q_needles), "a SQuAD v1.1 question without answers")
                for name, value in zip(
                    SQUAD_SCHEMA.names, (qid, title, context, question, texts, starts, bool(impossible or not answers))
                ):
                    out[name].append(value)
    return pa.Table.from_pydict(out, schema=SQUAD_SCHEMA)


def _squad_columnar(table: pa.Table, spec: TaskSpec, where: str) -> pa.Table:
    """The hub's SQuAD columns (id, title, context, question, answers{text, answer_start})."""
    missing = [c for c in ("id", "title", "context", "question", "answers") if c not in table.column_names]
    if missing:
        raise _fail(f"{where}, schema", f"missing column {missing[0]!r} (columns: {', '.join(table.column_names)})")
    if table.num_rows == 0:
        raise _fail(f"{where}, row 0", "empty file: no rows")
    out = {name: [] for name in SQUAD_SCHEMA.names}
    answers = table.column("answers").to_pylist()
    for column in ("id", "title", "context", "question"):
        out[column] = table.column(column).to_pylist()
    for i, answer in enumerate(answers):
        if not isinstance(answer, dict) or "text" not in answer or "answer_start" not in answer:
            raise _fail(f"{where}, row {i}", f"'answers' should hold text and answer_start lists, found {answer!r:.80}")
        out["answers_text"].append(list(answer["text"]))
        out["answers_start"].append([int(s) for s in answer["answer_start"]])
        out["is_impossible"].append(len(answer["text"]) == 0)
    return _conform(pa.Table.from_pydict(out), spec, where)


# ----------------------------------------------------------------------------------------------
# finding the file of a split


@dataclass(frozen=True)
class SplitSource:
    """Where a split comes from: the files, their layout, and a reader tag."""

    split: str
    layout: str
    paths: tuple[Path, ...]
    reader: str  # glue_tsv | amazon_tsv | squad_json | export_csv | export_tsv | export_jsonl | parquet | hub


def _peek_header(path: Path) -> list[str]:
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        return [h.strip() for h in handle.readline().rstrip("\r\n").split("\t")]


def _peek_json_kind(path: Path) -> str:
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        head = handle.read(4096).lstrip()
    first_key = re.match(r'\{\s*"([^"]*)"', head)
    if first_key and first_key.group(1) in ("data", "version"):  # {"version": ..., "data": [...]}
        return "squad"
    return "jsonl"


def _parquet_layout(path: Path, spec: TaskSpec) -> str:
    try:
        names = pq.read_schema(path).names
    except (pa.ArrowInvalid, OSError) as exc:
        raise _fail(str(path), f"not a readable Parquet file ({exc})") from None
    return "parquet" if _is_normalized(names, spec) else "hf_export"


def _task_folder(spec: TaskSpec, data_dir: Path) -> Path:
    """The folder of a task's files: ``data_dir/<folder>``, ``data_dir/<last part>``, or ``data_dir``."""
    tail = Path(spec.folder).name
    candidates = [data_dir / spec.folder, data_dir / tail]
    if spec.hf_config:
        candidates += [data_dir / spec.hf_config, data_dir / "glue" / spec.hf_config]
    for folder in candidates:
        if folder.is_dir():
            return folder
    return data_dir


def _split_candidates(spec: TaskSpec, folder: Path, split: str) -> Iterator[SplitSource]:
    stem = spec.splits[split]
    hub = spec.hf_splits.get(split, split)
    names = list(dict.fromkeys([split, stem, hub]))
    if spec.family == "squad":
        original = folder / stem
        if original.is_file():
            yield SplitSource(split, "squad_json", (original,), "squad_json")
    else:
        original = folder / f"{stem}.tsv"
        if original.is_file():
            header = _peek_header(original)
            if "idx" in header:
                yield SplitSource(split, "hf_export", (original,), "export_tsv")
            elif spec.family == "amazon":
                yield SplitSource(split, "amazon_tsv", (original,), "amazon_tsv")
            else:
                yield SplitSource(split, "glue_tsv", (original,), "glue_tsv")
    for name in names:
        for ext in _EXPORT_EXTS:
            path = folder / f"{name}.{ext}"
            if not path.is_file() or path == folder / f"{stem}.tsv":
                continue
            if ext == "parquet":
                yield SplitSource(split, _parquet_layout(path, spec), (path,), "parquet")
            elif ext in ("json", "jsonl"):
                if spec.family == "squad" and _peek_json_kind(path) == "squad":
                    yield SplitSource(split, "squad_json", (path,), "squad_json")
                else:
                    yield SplitSource(split, "hf_export", (path,), "export_jsonl")
            else:
                yield SplitSource(split, "hf_export", (path,), f"export_{ext}")
        for base in (folder, folder / "data"):
            shards = sorted(base.glob(f"{name}-*-of-*.parquet"))
            if shards:
                yield SplitSource(split, "hf_export", tuple(shards), "parquet")


def find_split_source(task: str | TaskSpec, data_dir: str | Path | None, split: str) -> SplitSource:
    """Which file (and layout) holds ``split`` of ``task`` under ``data_dir``; the hub when none does."""
    spec = get_task(task, data_dir if _is_local(data_dir) else None)
    split = spec.resolve_split(split)
    if not _is_local(data_dir):
        return SplitSource(split, "hub", (), "hub")
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if root.is_file():
        return _file_source(root, spec, split)
    folder = _task_folder(spec, root)
    found = next(_split_candidates(spec, folder, split), None)
    if found is not None:
        return found
    looked = _expected_files(spec, folder, split)
    if folder == root and (root / spec.folder) != root:
        looked = _expected_files(spec, root / spec.folder, split) + looked
    if spec.hf_path and not _offline():
        return SplitSource(split, "hub", (), "hub")
    raise DataSourceError(_no_source_message(spec, split, root, looked))


def _file_source(path: Path, spec: TaskSpec, split: str) -> SplitSource:
    ext = path.suffix.lower().lstrip(".")
    if ext == "parquet":
        return SplitSource(split, _parquet_layout(path, spec), (path,), "parquet")
    if ext in ("json", "jsonl"):
        if spec.family == "squad" and _peek_json_kind(path) == "squad":
            return SplitSource(split, "squad_json", (path,), "squad_json")
        return SplitSource(split, "hf_export", (path,), "export_jsonl")
    if ext == "csv":
        return SplitSource(split, "hf_export", (path,), "export_csv")
    if "idx" in _peek_header(path):
        return SplitSource(split, "hf_export", (path,), "export_tsv")
    if spec.family == "amazon":
        return SplitSource(split, "amazon_tsv", (path,), "amazon_tsv")
    return SplitSource(split, "glue_tsv", (path,), "glue_tsv")


def _expected_files(spec: TaskSpec, folder: Path, split: str) -> list[str]:
    stem = spec.splits[split]
    original = folder / (stem if spec.family == "squad" else f"{stem}.tsv")
    hub = spec.hf_splits.get(split, split)
    return [str(original), str(folder / f"{hub}.parquet|csv|jsonl")]


def _no_source_message(spec: TaskSpec, split: str, root: Path, looked: list[str]) -> str:
    what = "no split" if split == "any" else f"no {split!r} split"
    message = f"{what} of task {spec.name} under {root}: looked for {', '.join(looked)}."
    if spec.hf_path:
        message += (
            f" The hub ({spec.hf_path}"
            + (f", {spec.hf_config}" if spec.hf_config else "")
            + ") is not reachable offline (HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1): point --data-dir "
            f"(KD_DATA_DIR) at a local folder holding {spec.folder}/"
            + (f"{spec.splits[split]}" + ("" if spec.family == "squad" else ".tsv") if split in spec.splits else "")
            + " (original layout) or an export of the hub dataset"
            + (f" ({spec.hub_split(split)}.parquet/.csv/.jsonl)." if split in spec.splits else ".")
        )
    return message


def _is_local(data_dir) -> bool:
    if data_dir is None:
        return True
    text = str(data_dir)
    return not (text in ("hub", "hf") or text.startswith("hf:"))


# ----------------------------------------------------------------------------------------------
# the public loaders


def _read_source(spec: TaskSpec, source: SplitSource) -> pa.Table:
    split = source.split
    if source.reader == "hub":
        return _load_from_hub(spec, split)
    path = source.paths[0]
    if source.reader == "squad_json":
        return _read_squad_json(path, spec, split)
    if source.reader == "glue_tsv":
        return _read_glue_tsv(path, spec, split)
    if source.reader == "amazon_tsv":
        return _read_amazon_tsv(path, spec, split)
    if source.reader in ("export_csv", "export_tsv"):
        if spec.is_qa:
            raise _fail(str(path), "SQuAD is read from JSON, JSON lines or Parquet, not CSV/TSV")
        return _read_export_delimited(path, spec, split, "," if source.reader == "export_csv" else "\t")
    if source.reader == "export_jsonl":
        if spec.is_qa:
            records = [r for _, r in _iter_jsonl(path)]
            if not records:
                raise _fail(f"{path}, line 1", "empty file (no records)")
            return _squad_columnar(pa.Table.from_pylist(records), spec, str(path))
        return _read_export_jsonl(path, spec, split)
    if source.reader == "parquet":
        table = _parquet_files(source.paths)
        where = str(path) if len(source.paths) == 1 else f"{path} (+{len(source.paths) - 1} shards)"
        if source.layout == "parquet":
            return _from_normalized(table, spec, where)
        if spec.is_qa:
            return _squad_columnar(table, spec, where)
        return _columnar(table, spec, split, where)
    raise DataSourceError(f"no reader for {source}")  # pragma: no cover


def load_split_table(task: str | TaskSpec, data_dir: str | Path | None, split: str) -> tuple[pa.Table, SplitSource]:
    """The normalised Arrow table of a split and where it came from."""
    spec = get_task(task, data_dir if _is_local(data_dir) else None)
    source = find_split_source(spec, data_dir, split)
    return _read_source(spec, source), source


def load_split(task: str | TaskSpec, data_dir: str | Path | None, split: str) -> pd.DataFrame:
    """One split of a task in the normalised schema (see :mod:`kd_core.data.schemas`).

    ``data_dir``: the shared data folder (``glue/SST-2/...`` below it), the task's own folder,
    a single file, ``"hub"`` for ``datasets.load_dataset``, or None for ``$KD_DATA_DIR``.
    ``split``: ``train``, ``dev`` (or ``validation``; MNLI's ``dev`` is ``dev_matched``), ``test``...
    ``df.attrs`` records the task, split, source files and layout.
    """
    spec = get_task(task, data_dir if _is_local(data_dir) else None)
    table, source = load_split_table(spec, data_dir, split)
    df = table_to_pandas(table)
    df.attrs.update(
        {"task": spec.name, "split": source.split, "layout": source.layout, "source": [str(p) for p in source.paths]}
    )
    return df


def detect_layout(task: str | TaskSpec, data_dir: str | Path | None, split: str | None = None) -> str:
    """The layout of a task's files under ``data_dir`` (one of :data:`LAYOUTS`)."""
    spec = get_task(task, data_dir if _is_local(data_dir) else None)
    splits = [split] if split else available_splits(spec, data_dir) or list(spec.splits)
    return find_split_source(spec, data_dir, splits[0]).layout


def available_splits(task: str | TaskSpec, data_dir: str | Path | None) -> list[str]:
    """The task's splits that have a file under ``data_dir`` (all of them for the hub)."""
    spec = get_task(task, data_dir if _is_local(data_dir) else None)
    if not _is_local(data_dir):
        return list(spec.splits)
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    folder = _task_folder(spec, root)
    return [s for s in spec.splits if next(_split_candidates(spec, folder, s), None) is not None]


def _load_from_hub(spec: TaskSpec, split: str) -> pa.Table:
    if spec.hf_path is None:
        raise DataSourceError(
            f"task {spec.name} has no hub dataset; point --data-dir (KD_DATA_DIR) at a folder holding {spec.folder}/"
        )
    if _offline():
        raise DataSourceError(
            f"task {spec.name} ({split}) would come from the hub ({spec.hf_path}"
            + (f", {spec.hf_config}" if spec.hf_config else "")
            + "), but HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1 forbids the hub: point --data-dir (KD_DATA_DIR) "
            f"at a local folder holding {spec.folder}/ in the original layout, or an export of the hub dataset "
            f"({spec.hub_split(split)}.parquet/.csv/.jsonl)"
        )
    from datasets import load_dataset

    where = f"{spec.hf_path}:{spec.hf_config or ''}[{spec.hub_split(split)}]"
    try:
        dataset = load_dataset(spec.hf_path, spec.hf_config, split=spec.hub_split(split))
    except Exception as exc:  # noqa: BLE001 - hub failures come in many types
        raise DataSourceError(
            f"could not load {where} from the hub ({type(exc).__name__}: {exc}); point --data-dir at a local folder instead"
        ) from exc
    table = dataset.with_format("arrow")[:] if hasattr(dataset, "with_format") else pa.Table.from_pandas(dataset.to_pandas())
    if spec.is_qa:
        return _squad_columnar(table, spec, where)
    return _columnar(table, spec, split, where, layout="hub")


# ----------------------------------------------------------------------------------------------
# pandas <-> Arrow, writing and reading normalised Parquet


def table_to_pandas(table: pa.Table) -> pd.DataFrame:
    df = table.to_pandas()
    for column in ("answers_text", "answers_start"):
        if column in df.columns:
            df[column] = [v.tolist() if hasattr(v, "tolist") else list(v) for v in df[column]]
    return df


def _conform(table: pa.Table, spec: TaskSpec, where: str) -> pa.Table:
    """Cast to the task's schema and check nulls and label ranges."""
    schema = schema_for(spec)
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise _fail(where, f"missing column {missing[0]!r} (columns: {', '.join(table.column_names)})")
    table = table.select(schema.names)
    try:
        table = table.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise _fail(where, f"columns do not fit the {schema_kind(spec)} schema ({exc})") from None
    for field in schema:
        nulls = table.column(field.name).null_count
        if not field.nullable and nulls:
            raise _fail(where, f"column {field.name!r} has {nulls} null values")
    if spec.labels is not None:
        import pyarrow.compute as pc

        labels = table.column("label")
        if len(labels):
            low, high = pc.min(labels).as_py(), pc.max(labels).as_py()
            if low < UNLABELED or high >= len(spec.labels):
                raise _fail(where, f"label values {low}..{high} outside -1..{len(spec.labels) - 1} of task {spec.name}")
    return table


def dataframe_to_table(df: pd.DataFrame, task: str | TaskSpec) -> pa.Table:
    spec = get_task(task)
    schema = schema_for(spec)
    missing = [name for name in schema.names if name not in df.columns]
    if missing:
        raise DataFormatError(f"dataframe: missing column {missing[0]!r} (columns: {', '.join(map(str, df.columns))})")
    try:
        table = pa.Table.from_pandas(df[list(schema.names)], preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataFormatError(f"dataframe: columns do not fit the {schema_kind(spec)} schema ({exc})") from None
    if spec.is_regression:  # pandas NaN arrives as null; unlabeled regression rows are NaN
        import pyarrow.compute as pc

        position = table.column_names.index("label")
        label = pc.fill_null(table.column("label").cast(pa.float64()), math.nan)
        table = table.set_column(position, "label", label)
    return _conform(table.replace_schema_metadata(None), spec, "dataframe")


def split_metadata(spec: TaskSpec, split: str, table: pa.Table, fingerprint: str) -> dict[str, str]:
    """The ``kd.*`` Parquet key-value metadata every written split carries."""
    return {
        "kd.format_version": FORMAT_VERSION,
        "kd.task": spec.name,
        "kd.split": split,
        "kd.family": spec.family,
        "kd.schema": schema_kind(spec),
        "kd.labels": json.dumps(list(spec.labels) if spec.labels is not None else None),
        "kd.num_rows": str(table.num_rows),
        "kd.fingerprint": fingerprint,
    }


def write_table(table: pa.Table, path: str | Path, task: str | TaskSpec, split: str, extra: dict | None = None) -> str:
    spec = get_task(task)
    table = _conform(table, spec, str(path))
    fingerprint = fingerprint_table(table)
    metadata = split_metadata(spec, split, table, fingerprint)
    for key, value in (extra or {}).items():
        metadata[f"kd.{key}"] = value if isinstance(value, str) else json.dumps(value)
    with atomic_file(path) as tmp:
        pq.write_table(table.replace_schema_metadata(metadata), tmp, compression="zstd")
    return fingerprint


def write_split(df: pd.DataFrame, path: str | Path, task: str | TaskSpec, split: str) -> str:
    """Write a normalised split as Parquet, atomically; return its content fingerprint (sha256).

    The fingerprint, task, split, label names and row count go into the Parquet key-value
    metadata (keys ``kd.*``).
    """
    return write_table(dataframe_to_table(df, task), path, task, split)


def read_split_metadata(path: str | Path) -> dict:
    path = Path(path)
    try:
        raw = pq.read_schema(path).metadata or {}
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataFormatError(f"{path}: not a readable Parquet file ({exc})") from None
    meta = {}
    for key, value in raw.items():
        key = key.decode()
        if key.startswith("kd."):
            meta[key[3:]] = value.decode()
    if "fingerprint" not in meta:
        raise DataFormatError(f"{path}: no kd.fingerprint in the Parquet metadata; it was not written by write_split")
    meta["labels"] = json.loads(meta["labels"]) if "labels" in meta else None
    meta["num_rows"] = int(meta.get("num_rows", -1))
    return meta


def read_split(path: str | Path, verify: bool = False) -> tuple[pd.DataFrame, dict]:
    """``(df, metadata)`` of a split written by :func:`write_split`.

    ``verify=True`` recomputes the fingerprint and fails when the content does not match it.
    """
    path = Path(path)
    meta = read_split_metadata(path)
    table = pq.read_table(path).replace_schema_metadata(None)
    kind = meta.get("schema")
    if kind in SCHEMA_NAMES and table.column_names == SCHEMA_NAMES[kind].names:
        table = table.cast(SCHEMA_NAMES[kind])
    if verify:
        actual = fingerprint_table(table.replace_schema_metadata(None))
        if actual != meta["fingerprint"]:
            raise DataFormatError(f"{path}: content fingerprint {actual[:12]} does not match the stored {meta['fingerprint'][:12]}")
    return table_to_pandas(table), meta


def prepare_task(
    task: str | TaskSpec,
    data_dir: str | Path | None,
    out_dir: str | Path,
    splits: Sequence[str] | str | None = None,
) -> dict[str, tuple[Path, str]]:
    """Normalise splits of a task into ``out_dir/<split>.parquet``; ``{split: (path, fingerprint)}``.

    ``splits`` defaults to every split with a file under ``data_dir``. ``out_dir/manifest.json``
    (written last) lists the splits with their row counts and fingerprints.
    """
    spec = get_task(task, data_dir if _is_local(data_dir) else None)
    if isinstance(splits, str):
        splits = [splits]
    wanted = [spec.resolve_split(s) for s in splits] if splits else available_splits(spec, data_dir)
    if not wanted and spec.hf_path and not _offline():
        wanted = list(spec.splits)  # nothing local: the hub has them all
    if not wanted:
        root = Path(data_dir) if data_dir is not None else default_data_dir()
        folder = _task_folder(spec, root)
        folder = root / spec.folder if folder == root else folder
        looked = [f for s in spec.splits for f in _expected_files(spec, folder, s)[:1]]
        raise DataSourceError(_no_source_message(spec, "any", root, looked))
    out_dir = Path(out_dir)
    results: dict[str, tuple[Path, str]] = {}
    entries = {}
    for split in dict.fromkeys(wanted):
        table, source = load_split_table(spec, data_dir, split)
        path = out_dir / f"{split}.parquet"
        fingerprint = write_table(
            table, path, spec, split, extra={"layout": source.layout, "source": [str(p) for p in source.paths]}
        )
        results[split] = (path, fingerprint)
        entries[split] = {
            "file": path.name,
            "rows": table.num_rows,
            "fingerprint": fingerprint,
            "layout": source.layout,
            "source": [str(p) for p in source.paths],
        }
    manifest_path = out_dir / "manifest.json"
    manifest = {}
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            manifest = {}
        if manifest.get("task") != spec.name:
            manifest = {}
    manifest.update(
        {
            "format_version": FORMAT_VERSION,
            "task": spec.name,
            "family": spec.family,
            "schema": schema_kind(spec),
            "labels": list(spec.labels) if spec.labels is not None else None,
            "metrics": list(spec.metrics),
            "dev_splits": list(spec.dev_splits),
        }
    )
    manifest.setdefault("splits", {}).update(entries)
    with atomic_file(manifest_path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return results
