"""Augmented splits as fingerprinted Parquet, and the task-level entry point.

The file holds the task's normalised columns (``idx, text_a, text_b, label``; see
``kd_core.data.schemas``) plus ``source_idx`` (the ``idx`` of the source row) and ``aug_id``
(0 = the source row itself when included, then 1..N_a). Its Parquet key-value metadata uses
the loaders' ``kd.*`` keys (so ``kd_core.data.loaders.read_split`` reads it) plus
``kd.augment``: a JSON manifest with the backend, the mode (``mlm+glove``, ``glove-only`` or
``nlpaug-<method>``), every setting, the models, the warnings and counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kd_core.errors import UserError

AUGMENT_KEY = "kd.augment"
EXTRA_FIELDS = [pa.field("source_idx", pa.int64(), nullable=False), pa.field("aug_id", pa.int64(), nullable=False)]


def augmented_schema(task) -> pa.Schema:
    from kd_core.data.schemas import schema_for
    from kd_core.data.tasks import get_task

    base = schema_for(get_task(task))
    if "text_a" not in base.names:
        raise ValueError(f"task {get_task(task).name} has no text_a/text_b columns to augment")
    return pa.schema(list(base) + EXTRA_FIELDS)


def table_fingerprint(frame, task) -> str:
    """The loaders' content fingerprint of a frame in the task's (augmented) schema."""
    from kd_core.data.schemas import fingerprint_table

    schema = augmented_schema(task) if "source_idx" in frame.columns else None
    if schema is None:
        from kd_core.data.loaders import dataframe_to_table

        return fingerprint_table(dataframe_to_table(frame, task))
    return fingerprint_table(pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False))


def write_augmented(frame, path: str | Path, task, split: str, manifest: dict[str, Any]) -> str:
    """Write atomically; return the content fingerprint (also stored as ``kd.fingerprint``)."""
    from kd_core.artifacts import atomic_file
    from kd_core.data.loaders import split_metadata
    from kd_core.data.schemas import fingerprint_table
    from kd_core.data.tasks import get_task

    spec = get_task(task)
    schema = augmented_schema(spec)
    table = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
    fingerprint = fingerprint_table(table)
    metadata = {
        **split_metadata(spec, split, table, fingerprint),
        "kd.mode": str(manifest.get("mode")),
        AUGMENT_KEY: json.dumps(manifest, sort_keys=True, default=str),
    }
    with atomic_file(path) as tmp:
        pq.write_table(table.replace_schema_metadata(metadata), tmp, compression="zstd")
    return fingerprint


def read_augmented(path: str | Path):
    """``(frame, manifest)``; the manifest gains ``fingerprint`` and ``num_rows``."""
    path = Path(path)
    table = pq.read_table(path)
    raw = table.schema.metadata or {}
    if AUGMENT_KEY.encode() not in raw:
        raise ValueError(f"{path}: no {AUGMENT_KEY} metadata; it was not written by kd augment")
    manifest = json.loads(raw[AUGMENT_KEY.encode()])
    manifest["fingerprint"] = raw.get(b"kd.fingerprint", b"").decode()
    manifest["num_rows"] = table.num_rows
    return table.replace_schema_metadata(None).to_pandas(), manifest



class AugmentError(UserError, ValueError):
    """Bad augmentation input or settings."""

@dataclass
class AugmentResult:
    path: Path
    rows_in: int
    rows_out: int
    fingerprint: str
    manifest: dict[str, Any]
    seconds: float


def source_columns(frame) -> tuple[list[int], list[str], list[str | None], list]:
    """(idx, text_a, text_b, label) of a normalised frame; a missing or NaN text_b is None."""
    missing = [c for c in ("idx", "text_a", "label") if c not in frame.columns]
    if missing:
        raise AugmentError(f"input frame lacks column(s) {missing}; expected idx, text_a, text_b, label")
    text_b = frame["text_b"].tolist() if "text_b" in frame.columns else [None] * len(frame)
    text_b = [None if (b is None or (isinstance(b, float) and b != b)) else b for b in text_b]
    return [int(i) for i in frame["idx"].tolist()], frame["text_a"].tolist(), text_b, frame["label"].tolist()


class AugmentedRows:
    """Output rows in the augmented schema: per source row, the original (aug_id 0) then its copies."""

    def __init__(self, include_original: bool, dedupe: bool):
        self.include_original = include_original
        self.dedupe = dedupe
        self.columns: dict[str, list] = {k: [] for k in ("text_a", "text_b", "label", "source_idx", "aug_id")}

    def add(self, text_a: str, text_b: str | None, label, source_idx: int, copies: list[tuple[str, str | None]]) -> None:
        rows = list(copies)
        if self.dedupe:
            seen, kept = {(text_a, text_b)}, []
            for row in rows:
                if row not in seen:
                    seen.add(row)
                    kept.append(row)
            rows = kept
        if self.include_original:
            rows = [(text_a, text_b)] + rows
        for aug_id, (a, b) in enumerate(rows, start=0 if self.include_original else 1):
            self.columns["text_a"].append(a)
            self.columns["text_b"].append(b)
            self.columns["label"].append(label)
            self.columns["source_idx"].append(source_idx)
            self.columns["aug_id"].append(aug_id)

    def __len__(self) -> int:
        return len(self.columns["text_a"])

    def frame(self, label_dtype):
        import numpy as np
        import pandas as pd

        cols = self.columns
        return pd.DataFrame(
            {
                "idx": np.arange(len(self), dtype=np.int64),
                "text_a": pd.Series(cols["text_a"], dtype=object),
                "text_b": pd.Series(cols["text_b"], dtype=object),
                "label": pd.Series(cols["label"], dtype=label_dtype),
                "source_idx": np.asarray(cols["source_idx"], dtype=np.int64),
                "aug_id": np.asarray(cols["aug_id"], dtype=np.int64),
            }
        )
