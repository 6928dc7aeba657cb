"""Arrow schemas of the normalised task splits, and the fingerprint of their content.

Every classification or regression task (GLUE, Amazon) normalises to one table per split:

========  ==========  ===========================================================
column    type        meaning
========  ==========  ===========================================================
idx       int64       the source file's own index column, else the row number (0-based)
text_a    string      first (or only) text
text_b    string      second text of a pair; null for single-sentence tasks
label     int64       index into ``TaskSpec.labels``; -1 when unlabeled (GLUE test)
label     float64     regression tasks (STS-B) instead; NaN when unlabeled
========  ==========  ===========================================================

SQuAD (extractive QA) has its own schema, one row per question: ``id, title, context,
question, answers_text, answers_start, is_impossible``.
"""

from __future__ import annotations

import hashlib
import json
import math

import pyarrow as pa

CLASSIFICATION_SCHEMA = pa.schema(
    [
        pa.field("idx", pa.int64(), nullable=False),
        pa.field("text_a", pa.string(), nullable=False),
        pa.field("text_b", pa.string(), nullable=True),
        pa.field("label", pa.int64(), nullable=False),
    ]
)

REGRESSION_SCHEMA = pa.schema(
    [
        pa.field("idx", pa.int64(), nullable=False),
        pa.field("text_a", pa.string(), nullable=False),
        pa.field("text_b", pa.string(), nullable=True),
        pa.field("label", pa.float64(), nullable=False),
    ]
)

SQUAD_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("title", pa.string(), nullable=False),
        pa.field("context", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("answers_text", pa.list_(pa.string()), nullable=False),
        pa.field("answers_start", pa.list_(pa.int64()), nullable=False),
        pa.field("is_impossible", pa.bool_(), nullable=False),
    ]
)

#: Token blocks of a prepared corpus (one row per block).
CORPUS_SCHEMA = pa.schema(
    [
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("doc_id", pa.int64(), nullable=False),
    ]
)

UNLABELED = -1

SCHEMA_NAMES = {"classification": CLASSIFICATION_SCHEMA, "regression": REGRESSION_SCHEMA, "squad": SQUAD_SCHEMA}


def schema_kind(spec) -> str:
    """``classification``, ``regression`` or ``squad`` for a TaskSpec."""
    if spec.family == "squad":
        return "squad"
    return "regression" if spec.is_regression else "classification"


def schema_for(spec) -> pa.Schema:
    return SCHEMA_NAMES[schema_kind(spec)]


def _canonical(value):
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def _type_name(data_type: pa.DataType) -> str:
    """A type's name without list item field names (Parquet reads ``list<item>`` back as ``list<element>``)."""
    if pa.types.is_list(data_type) or pa.types.is_large_list(data_type):
        return f"list<{_type_name(data_type.value_type)}>"
    return str(data_type)


def fingerprint_table(table: pa.Table, chunk_rows: int = 65536) -> str:
    """sha256 of a table's normalised content: column names, types and values, in order.

    Values are serialised as canonical JSON (NaN spelled out), so the digest depends on the data
    only: not on the Parquet writer, compression, row groups or pyarrow version.
    """
    digest = hashlib.sha256(b"kd-split-v1\n")
    for field in table.schema:
        digest.update(f"{field.name}:{_type_name(field.type)}\n".encode())
        column = table.column(field.name)
        for start in range(0, max(len(column), 1), chunk_rows):
            values = column.slice(start, chunk_rows).to_pylist()
            if pa.types.is_floating(field.type) or pa.types.is_list(field.type):
                values = [_canonical(v) for v in values]
            digest.update(json.dumps(values, ensure_ascii=False, separators=(",", ":")).encode())
        digest.update(b"\n")
    return digest.hexdigest()
