"""Plain text / WikiExtractor corpora packed into token blocks for general distillation.

Streams: files are read line by line and blocks are yielded as they fill, so memory stays
bounded whatever the corpus size.

- :func:`iter_documents` / :func:`pack_token_blocks`: documents of lines, chopped into blocks
  (what ``kd distill`` reads straight from text).
- :func:`split_sentences`, :func:`iter_sentence_documents`, :func:`pack_sentence_blocks`:
  documents of sentences packed into blocks at sentence boundaries (TinyBERT's pregenerated
  format, without masking).
- :func:`prepare_corpus` writes those blocks as tokenised Parquet shards plus a manifest;
  :func:`iter_corpus_blocks` / :func:`load_corpus_blocks` read them back for the trainer.
"""

from __future__ import annotations

import hashlib
import json
import re
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kd_core.data.schemas import CORPUS_SCHEMA
from kd_core.errors import UserError
from kd_core.stop import check_stop


class CorpusError(UserError, ValueError):
    pass


def corpus_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CorpusError(f"corpus path {path} does not exist; pass a text file or a folder of text files")
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise CorpusError(f"corpus folder {path} holds no files")
    return files


_BREAK = object()  # a document boundary in the line stream


def _iter_doc_lines(path: str | Path, progress: Callable[[int], object] | None = None) -> Iterator:
    """Content lines of the corpus, with ``_BREAK`` wherever a document may end."""
    for file in corpus_files(path):
        skip_title = False
        seen = pending = 0
        size = file.stat().st_size if progress is not None else 0
        with open(file, encoding="utf-8", errors="replace") as handle:
            for raw in handle:
                if progress is not None:
                    pending += len(raw)
                    if pending >= 1 << 16:
                        progress(pending)
                        seen, pending = seen + pending, 0
                line = raw.strip()
                if line.startswith("<doc ") or line.startswith("<doc>"):
                    yield _BREAK
                    skip_title = True
                elif line == "</doc>" or not line:
                    yield _BREAK
                elif skip_title:
                    skip_title = False
                else:
                    yield line
        if progress is not None:
            progress(max(size - seen, 0))  # characters <= bytes: settle to the file size
        yield _BREAK


def iter_documents(path: str | Path, progress: Callable[[int], object] | None = None) -> Iterator[list[str]]:
    """Documents as lists of non-empty lines.

    WikiExtractor output: ``<doc ...>`` / ``</doc>`` lines delimit documents and the line after
    ``<doc>`` repeats the title, which is dropped. Plain text: blank lines delimit documents.
    ``progress(n)``, when given, is told how many bytes of the files have been read (in steps of
    about 64 KiB; exact at each file's end).
    """
    doc: list[str] = []
    for item in _iter_doc_lines(path, progress):
        if item is _BREAK:
            if doc:
                yield doc
            doc = []
        else:
            doc.append(item)


def pack_token_blocks(
    tokenizer,
    documents: Iterable[list[str]],
    max_seq_length: int,
    max_blocks: int | None = None,
    min_tokens: int = 8,
) -> Iterator[dict]:
    """TinyBERT-style blocks ``[CLS] tokens... [SEP]`` of up to ``max_seq_length`` ids.

    Blocks do not cross documents; a document's tail shorter than ``min_tokens`` is dropped.
    """
    if max_seq_length < 8:
        raise CorpusError(f"max_seq_length {max_seq_length} is too small; use at least 8")
    body = max_seq_length - 2
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls_id is None or sep_id is None:
        raise CorpusError("the tokenizer has no [CLS]/[SEP] (or <s>/</s>) tokens")
    made = 0
    for doc in documents:
        check_stop("corpus preparation")
        # verbose=False: long lines are split into blocks below, so the >max-length warning is noise.
        encoded = tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"]
        buffer: list[int] = []
        for ids in encoded:
            buffer.extend(ids)
            while len(buffer) >= body:
                yield {"input_ids": [cls_id] + buffer[:body] + [sep_id]}
                buffer = buffer[body:]
                made += 1
                if max_blocks is not None and made >= max_blocks:
                    return
        if len(buffer) >= min_tokens:
            yield {"input_ids": [cls_id] + buffer + [sep_id]}
            made += 1
            if max_blocks is not None and made >= max_blocks:
                return


# ----------------------------------------------------------------------------------------------
# sentences, sentence-aware packing (TinyBERT's pregenerated format) and tokenised Parquet shards

_BOUNDARY = re.compile(r"([.!?…]+[\"'”’»)\]]*)\s+(?=[\"'“‘«(\[]?[A-Z0-9À-Ý])")
_ABBREVIATIONS = frozenset(
    """mr mrs ms dr prof sr jr st mt ft vs no nos fig figs vol vols ed eds inc ltd co corp dept univ gen col
    lt sgt capt cmdr gov sen rep rev hon pres jan feb mar apr jun jul aug sep sept oct nov dec approx ca
    cf e.g i.e al op pp ch sec art u.s u.k u.n a.m p.m b.c a.d""".split()
)


def _is_abbreviation(chunk: str) -> bool:
    words = chunk.split()
    if not words:
        return False
    word = words[-1].lstrip("\"'“‘«([").rstrip(".!?…\"'”’»)]")
    if not word:
        return False
    if word.lower() in _ABBREVIATIONS:
        return True
    # an initial ("J. R. R. Tolkien") or a dotted acronym ("U.S.A.")
    return (len(word) == 1 and word.isupper()) or bool(re.fullmatch(r"(?:[A-Za-z]\.)+[A-Za-z]", word))


def split_sentences(text: str) -> list[str]:
    """Split a paragraph into sentences with a regex: end punctuation, space, then a capital or digit.

    Abbreviations (``Dr.``, ``e.g.``, ``U.S.``) and initials (``J. Smith``) do not end a sentence.
    """
    sentences: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        if match.group(1)[0] == "." and _is_abbreviation(text[start : match.start(1) + 1]):
            continue
        sentence = text[start : match.end(1)].strip()
        if sentence:
            sentences.append(sentence)
        start = match.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def iter_sentence_documents(
    path: str | Path, progress: Callable[[int], object] | None = None
) -> Iterator[list[str]]:
    """Documents as lists of sentences (each line of :func:`iter_documents` split into sentences)."""
    for doc in iter_documents(path, progress=progress):
        sentences = [s for line in doc for s in split_sentences(line)]
        if sentences:
            yield sentences


def iter_sentences(path: str | Path, progress: Callable[[int], object] | None = None) -> Iterator[tuple[int, str]]:
    """``(doc_id, sentence)`` for every sentence, streaming: never a whole document in memory.

    ``doc_id`` counts the documents that hold sentences from 0, as :func:`iter_sentence_documents`
    enumerates them.
    """
    doc_id, started = 0, False
    for item in _iter_doc_lines(path, progress):
        if item is _BREAK:
            if started:
                doc_id, started = doc_id + 1, False
            continue
        for sentence in split_sentences(item):
            started = True
            yield doc_id, sentence


def pack_sentence_stream(
    tokenizer,
    sentences: Iterable[tuple[int, str]],
    max_seq_length: int,
    max_blocks: int | None = None,
    min_tokens: int = 8,
    chunk_sentences: int = 256,
) -> Iterator[dict]:
    """Pack a ``(doc_id, sentence)`` stream into blocks; see :func:`pack_sentence_blocks`.

    Sentences are tokenised ``chunk_sentences`` at a time (one fast-tokenizer call each), so
    memory is bounded by a chunk and a block, whatever the document and corpus sizes.
    """
    if max_seq_length < 8:
        raise CorpusError(f"max_seq_length {max_seq_length} is too small; use at least 8")
    body = max_seq_length - 2
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls_id is None or sep_id is None:
        raise CorpusError("the tokenizer has no [CLS]/[SEP] (or <s>/</s>) tokens")

    def blocks() -> Iterator[dict]:
        current: list[int] = []
        doc = None
        iterator = iter(sentences)
        while True:
            chunk = list(islice(iterator, chunk_sentences))
            if not chunk:
                break
            encoded = tokenizer([text for _, text in chunk], add_special_tokens=False, verbose=False)["input_ids"]
            for (doc_id, _), ids in zip(chunk, encoded):
                if doc_id != doc:
                    if len(current) >= min_tokens:
                        yield {"input_ids": [cls_id] + current + [sep_id], "doc_id": doc}
                    current, doc = [], doc_id
                if not ids:
                    continue
                if current and len(current) + len(ids) > body and len(ids) <= body:
                    yield {"input_ids": [cls_id] + current + [sep_id], "doc_id": doc}
                    current = []
                current.extend(ids)
                while len(current) > body:  # an over-long sentence: fill blocks, carry the rest
                    yield {"input_ids": [cls_id] + current[:body] + [sep_id], "doc_id": doc}
                    current = current[body:]
        if len(current) >= min_tokens:
            yield {"input_ids": [cls_id] + current + [sep_id], "doc_id": doc}

    return islice(blocks(), max_blocks)


def pack_sentence_blocks(
    tokenizer,
    documents: Iterable[list[str]],
    max_seq_length: int,
    max_blocks: int | None = None,
    min_tokens: int = 8,
) -> Iterator[dict]:
    """TinyBERT's pregenerated format without masking: ``[CLS] sentences... [SEP]`` blocks.

    Whole sentences of one document are packed greedily into blocks of up to ``max_seq_length``
    ids; a block never crosses documents. A sentence longer than a block's room fills the
    current block and flows on into the next ones. A document's last block shorter than
    ``min_tokens`` (without [CLS]/[SEP]) is dropped. Yields ``{"input_ids": [...], "doc_id": n}``,
    ``n`` the document's position in ``documents``.
    """
    stream = ((doc_id, sentence) for doc_id, doc in enumerate(documents) for sentence in doc)
    return pack_sentence_stream(tokenizer, stream, max_seq_length, max_blocks, min_tokens)


CORPUS_FORMAT = "kd-corpus-v1"
MANIFEST = "manifest.json"


class _ShardWriter:
    """Buffers at most ``shard_rows`` blocks as int32 arrays, then writes one Parquet shard."""

    def __init__(self, folder: Path, shard_rows: int, row_group_rows: int = 1024):
        self.folder, self.shard_rows, self.row_group_rows = folder, shard_rows, row_group_rows
        self.blocks: list[np.ndarray] = []
        self.doc_ids: list[int] = []
        self.shards: list[dict] = []
        self.digest = hashlib.sha256(CORPUS_FORMAT.encode())

    def add(self, input_ids: list[int], doc_id: int) -> None:
        block = np.asarray(input_ids, dtype=np.int32)
        self.blocks.append(block)
        self.doc_ids.append(doc_id)
        # per block, so the digest does not depend on how blocks are split into shards
        self.digest.update(np.array([doc_id, block.size], dtype=np.int64).tobytes())
        self.digest.update(block.tobytes())
        if len(self.blocks) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if not self.blocks:
            return
        lengths = np.fromiter((len(b) for b in self.blocks), dtype=np.int32, count=len(self.blocks))
        offsets = np.zeros(len(self.blocks) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        values = np.concatenate(self.blocks)
        doc_ids = np.asarray(self.doc_ids, dtype=np.int64)
        table = pa.Table.from_arrays(
            [pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)), pa.array(doc_ids)], schema=CORPUS_SCHEMA
        )
        name = f"shard-{len(self.shards):05d}.parquet"
        pq.write_table(table, self.folder / name, row_group_size=self.row_group_rows, compression="zstd")
        self.shards.append(
            {"file": name, "rows": len(self.blocks), "tokens": int(values.size),
             "first_doc": int(doc_ids[0]), "last_doc": int(doc_ids[-1])}
        )
        self.blocks, self.doc_ids = [], []


def prepare_corpus(
    path: str | Path,
    tokenizer,
    out_dir: str | Path,
    max_seq_length: int = 128,
    shard_rows: int = 8192,
    max_blocks: int | None = None,
    min_tokens: int = 8,
    overwrite: bool = False,
    progress: bool = True,
    on_progress: Callable[[int, int, str], None] | None = None,
) -> dict:
    """Stream a text / WikiExtractor corpus into tokenised Parquet shards; return the manifest.

    Documents are split into sentences and packed into blocks by :func:`pack_sentence_stream`.
    Shards (``shard-00000.parquet``..., columns ``input_ids`` list<int32> and ``doc_id``) are
    written as they fill, so memory holds one line, one chunk of sentences and at most
    ``shard_rows`` blocks, whatever the document and corpus sizes. With ``max_blocks`` the
    counts in the manifest cover the text read until the last block. Everything goes into a temporary sibling folder, ``manifest.json`` last,
    which is renamed to ``out_dir`` only when complete. ``tokenizer``: a tokenizer object, or a
    model alias / dir for :func:`kd_core.models.registry.load_tokenizer`. ``on_progress(done,
    total, unit)`` is called as blocks are written: blocks of ``max_blocks`` when it is set, else
    bytes of the corpus read.
    """
    from tqdm.auto import tqdm

    from kd_core import __version__
    from kd_core.artifacts import atomic_dir

    if shard_rows < 1:
        raise CorpusError(f"shard_rows must be positive, got {shard_rows}")
    files = corpus_files(path)
    if isinstance(tokenizer, (str, Path)):
        from kd_core.models.registry import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise CorpusError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    total_bytes = sum(f.stat().st_size for f in files)
    stats = {"documents": 0, "sentences": 0, "blocks": 0, "full_blocks": 0}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        writer = _ShardWriter(tmp, shard_rows)
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="corpus", disable=not progress, mininterval=1.0) as bar:

            def counted(stream):
                for doc_id, sentence in stream:
                    stats["documents"] = doc_id + 1
                    stats["sentences"] += 1
                    yield doc_id, sentence

            read = [0]

            def advance(n: int) -> None:
                read[0] += n
                bar.update(n)

            stream = counted(iter_sentences(path, progress=advance))
            for block in pack_sentence_stream(tokenizer, stream, max_seq_length, max_blocks, min_tokens):
                writer.add(block["input_ids"], block["doc_id"])
                stats["blocks"] += 1
                if on_progress is not None:
                    on_progress(*((stats["blocks"], max_blocks, "blocks") if max_blocks else (read[0], total_bytes, "bytes")))
                stats["full_blocks"] += len(block["input_ids"]) == max_seq_length
                if stats["blocks"] % 1000 == 0:
                    bar.set_postfix(blocks=stats["blocks"], refresh=False)
            writer.flush()
            if on_progress is not None:  # done, also when the text ran out before max_blocks
                on_progress(*((stats["blocks"], stats["blocks"], "blocks") if max_blocks else (total_bytes, total_bytes, "bytes")))
        if not stats["blocks"]:
            raise CorpusError(f"{path} yielded no token blocks (no text of at least {min_tokens} tokens)")
        manifest = {
            "format": CORPUS_FORMAT,
            "source": str(Path(path).resolve()),
            "source_files": len(files),
            "source_bytes": total_bytes,
            "tokenizer": getattr(tokenizer, "name_or_path", type(tokenizer).__name__),
            "vocab_size": len(tokenizer),
            "cls_token_id": tokenizer.cls_token_id,
            "sep_token_id": tokenizer.sep_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "packing": "sentences",
            "max_seq_length": max_seq_length,
            "min_tokens": min_tokens,
            "max_blocks": max_blocks,
            "shard_rows": shard_rows,
            "num_documents": stats["documents"],
            "num_sentences": stats["sentences"],
            "num_blocks": stats["blocks"],
            "num_full_blocks": stats["full_blocks"],
            "num_tokens": sum(s["tokens"] for s in writer.shards),
            "shards": writer.shards,
            "fingerprint": writer.digest.hexdigest(),
            "kd_core_version": __version__,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # last: marks the set complete
    return manifest


def read_corpus_manifest(out_dir: str | Path) -> dict:
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST
    if not path.is_file():
        if not out_dir.is_dir():
            raise CorpusError(f"prepared corpus {out_dir} does not exist; run `kd prepare-corpus` first")
        raise CorpusError(f"{out_dir} has no {MANIFEST}: not a prepared corpus, or its preparation did not finish")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != CORPUS_FORMAT:
        raise CorpusError(f"{path}: format {manifest.get('format')!r}, expected {CORPUS_FORMAT!r}")
    return manifest


def iter_corpus_blocks(out_dir: str | Path, batch_rows: int = 1024) -> Iterator[dict]:
    """Blocks of a prepared corpus in order, streaming: ``{"input_ids": [...], "doc_id": n}``."""
    out_dir = Path(out_dir)
    manifest = read_corpus_manifest(out_dir)
    for shard in manifest["shards"]:
        path = out_dir / shard["file"]
        if not path.is_file():
            raise CorpusError(f"{path} is listed in the manifest but missing")
        parquet = pq.ParquetFile(path)
        if parquet.metadata.num_rows != shard["rows"]:
            raise CorpusError(f"{path} has {parquet.metadata.num_rows} rows, the manifest says {shard['rows']}")
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=["input_ids", "doc_id"]):
            ids = batch.column(0).to_pylist()
            docs = batch.column(1).to_pylist()
            for block, doc in zip(ids, docs):
                yield {"input_ids": block, "doc_id": doc}


def load_corpus_blocks(out_dir: str | Path, limit: int | None = None) -> list[dict]:
    """The first ``limit`` blocks (all when None) of a prepared corpus, ready for the trainer."""
    return list(islice(iter_corpus_blocks(out_dir), limit))
