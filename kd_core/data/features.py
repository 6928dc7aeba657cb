"""Normalised task rows -> token ids the trainer and evaluator consume."""

from __future__ import annotations

import math

import pandas as pd


def encode_examples(df: pd.DataFrame, tokenizer, max_seq_length: int, with_labels: bool = True) -> list[dict]:
    """Tokenise ``text_a`` (and ``text_b`` for pair tasks) into trainer examples.

    Rows without a label (-1, or NaN for regression) keep ``labels`` out only when
    ``with_labels`` is False; training sets must be labelled.
    """
    first = df["text_a"].astype(str).tolist()
    pairs = "text_b" in df and df["text_b"].notna().any()
    second = df["text_b"].fillna("").astype(str).tolist() if pairs else None
    encoded = tokenizer(first, second, truncation=True, max_length=max_seq_length, verbose=False)
    has_types = "token_type_ids" in encoded
    labels = df["label"].tolist() if with_labels and "label" in df else None
    examples = []
    for row in range(len(first)):
        example = {"input_ids": encoded["input_ids"][row]}
        if has_types:
            example["token_type_ids"] = encoded["token_type_ids"][row]
        if labels is not None:
            label = labels[row]
            if label is None or (isinstance(label, float) and math.isnan(label)) or label == -1:
                raise ValueError(f"row {row} (idx {df['idx'].iloc[row] if 'idx' in df else row}) has no label")
            example["labels"] = label
        examples.append(example)
    return examples
