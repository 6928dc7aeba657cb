"""Extractive QA data: the dev-by-article split, sliding-window features and span post-processing.

Rows are the normalised SQuAD schema (``id, title, context, question, answers_text,
answers_start, is_impossible``, see :mod:`kd_core.data.schemas`).

Features follow the Hugging Face ``run_qa`` example: ``[CLS] question [SEP] context [SEP]``
windows of ``max_seq_length`` tokens over a long context, consecutive windows sharing
``doc_stride`` tokens (the fast tokenizer's ``stride``). A training window's labels are the
answer's start and end token positions, or the [CLS] position when the window does not hold the
whole answer (and for unanswerable questions). Post-processing scores every start/end pair among
the ``n_best`` starts and ends of each window of a question, keeps spans of at most
``max_answer_length`` tokens inside the context, and cuts the answer text out of the context
with the tokens' character offsets. For SQuAD v2.0 the null score is the smallest [CLS] score
over the windows, and ``na_score = null score - best span score``: a question is answered with
"" when its ``na_score`` exceeds the no-answer threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from kd_core.errors import UserError

DEV_ARTICLES_TRAIN = "dev-articles-train"
DEV_ARTICLES_EVAL = "dev-articles-eval"


class QADataError(UserError, ValueError):
    pass


# ---- the dev-by-article split --------------------------------------------------------------------
@dataclass(frozen=True)
class ArticleSplit:
    train: pd.DataFrame
    eval: pd.DataFrame
    train_titles: list[str]
    eval_titles: list[str]


def split_by_article(frame: pd.DataFrame, eval_fraction: float, seed: int, articles: int | None = None) -> ArticleSplit:
    """Split questions by article (``title``): no context of one part appears in the other.

    The titles are shuffled with ``seed`` (from their sorted order, so the file's order does not
    matter); the first ``articles`` of them are used (all by default), and ``eval_fraction`` of
    those, rounded half up and at least one, form the eval part. Row order is kept within a part.
    """
    if "title" not in frame.columns:
        raise QADataError("split_by_article needs SQuAD rows with a 'title' column")
    if not 0 < eval_fraction < 1:
        raise QADataError(f"eval_fraction must lie strictly between 0 and 1, got {eval_fraction}")
    titles = sorted(frame["title"].unique())
    order = [titles[i] for i in np.random.default_rng(seed).permutation(len(titles))]
    if articles is not None:
        if articles > len(order):
            raise QADataError(f"qa.articles={articles}, but the source holds only {len(order)} articles")
        order = order[:articles]
    if len(order) < 2:
        raise QADataError(f"a split by article needs at least 2 articles, got {len(order)}")
    n_eval = min(len(order) - 1, max(1, math.floor(eval_fraction * len(order) + 0.5)))
    eval_titles, train_titles = order[:n_eval], order[n_eval:]
    pick = lambda names: frame[frame["title"].isin(set(names))].reset_index(drop=True)  # noqa: E731
    return ArticleSplit(pick(train_titles), pick(eval_titles), sorted(train_titles), sorted(eval_titles))


def sample_questions(frame: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame:
    """At most ``limit`` questions, a seeded sample kept in the original order."""
    if limit is None or limit >= len(frame):
        return frame.reset_index(drop=True)
    return frame.sample(n=limit, random_state=seed).sort_index().reset_index(drop=True)


# ---- sliding-window features ---------------------------------------------------------------------
@dataclass
class QAFeatures:
    """One entry per window. ``inputs[i]`` is what the trainer and the predictor consume
    (``input_ids``, ``token_type_ids`` and, for training, ``labels = [start, end]``);
    ``offsets[i][t]`` is token t's character span in the context, None outside the context."""

    inputs: list[dict] = field(default_factory=list)
    example_index: list[int] = field(default_factory=list)  # row of the window's question in the frame
    offsets: list[list[tuple[int, int] | None]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.inputs)


def _check_tokenizer(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise QADataError(
            f"QA features need a fast tokenizer (offset mappings); {type(tokenizer).__name__} is slow. "
            "Load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    if getattr(tokenizer, "padding_side", "right") != "right":
        raise QADataError("QA features put the question first and the context second; use a right-padding tokenizer")


def truncate_questions(questions: Sequence[str], tokenizer, max_query_length: int) -> list[str]:
    """Each question cut after its first ``max_query_length`` tokens (at that token's end in the
    text), leading spaces removed: a very long question would otherwise leave no room for context."""
    questions = [q.lstrip() for q in questions]
    encoded = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    return [
        question if len(offsets) <= max_query_length else question[: offsets[max_query_length - 1][1]]
        for question, offsets in zip(questions, encoded["offset_mapping"])
    ]


def answer_token_span(offsets: Sequence[tuple[int, int] | None], start_char: int, end_char: int) -> tuple[int, int] | None:
    """Token positions (start, end) of the characters [start_char, end_char) in one window, or None
    when the window's context does not hold all of them."""
    context = [t for t, span in enumerate(offsets) if span is not None]
    if not context:
        return None
    first, last = context[0], context[-1]
    if not (offsets[first][0] <= start_char and offsets[last][1] >= end_char):
        return None
    start = max(t for t in context if offsets[t][0] <= start_char)  # the token the answer starts in
    end = min(t for t in context if offsets[t][1] >= end_char)  # the token it ends in
    return start, end


def build_features(
    frame: pd.DataFrame,
    tokenizer,
    max_seq_length: int,
    doc_stride: int,
    max_query_length: int = 64,
    with_labels: bool = True,
) -> QAFeatures:
    """Windows of every question of ``frame``; labels from the first gold answer (as run_qa)."""
    _check_tokenizer(tokenizer)
    if frame.empty:
        raise QADataError("no questions to build QA features from")
    questions = truncate_questions(frame["question"].astype(str).tolist(), tokenizer, max_query_length)
    contexts = frame["context"].astype(str).tolist()
    encoded = tokenizer(
        questions,
        contexts,
        truncation="only_second",
        max_length=max_seq_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    has_types = "token_type_ids" in encoded
    features = QAFeatures()
    texts = frame["answers_text"].tolist() if with_labels else None
    starts = frame["answers_start"].tolist() if with_labels else None
    impossible = frame["is_impossible"].tolist() if with_labels and "is_impossible" in frame else None
    for i, row in enumerate(encoded["overflow_to_sample_mapping"]):
        ids = encoded["input_ids"][i]
        sequence_ids = encoded.sequence_ids(i)
        offsets = [tuple(span) if seq == 1 else None for span, seq in zip(encoded["offset_mapping"][i], sequence_ids)]
        inputs = {"input_ids": ids}
        if has_types:
            inputs["token_type_ids"] = encoded["token_type_ids"][i]
        if with_labels:
            cls_index = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
            span = None
            if len(texts[row]) and not (impossible and impossible[row]):  # lists or arrays
                start_char = int(starts[row][0])
                span = answer_token_span(offsets, start_char, start_char + len(texts[row][0]))
            inputs["labels"] = list(span) if span is not None else [cls_index, cls_index]
        features.inputs.append(inputs)
        features.example_index.append(int(row))
        features.offsets.append(offsets)
    return features


# ---- post-processing -----------------------------------------------------------------------------
@dataclass(frozen=True)
class SpanPrediction:
    """The post-processed answer of one question.

    ``text``: the best span inside the context ("" when no window has a valid span);
    ``score``: its start + end logit; ``null_score``: the smallest [CLS] start + end logit over the
    question's windows; ``nbest``: the best (text, score) pairs, best first.
    """

    text: str
    score: float
    null_score: float
    nbest: tuple[tuple[str, float], ...] = ()

    @property
    def na_score(self) -> float:
        """null score - best span score: higher means more likely unanswerable (v2.0)."""
        return self.null_score - self.score

    def answer(self, no_answer_threshold: float | None = None) -> str:
        """The prediction: the span, or "" when a v2.0 threshold is given and na_score exceeds it."""
        if no_answer_threshold is not None and self.na_score > no_answer_threshold:
            return ""
        return self.text


def _top(values: np.ndarray, candidates: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` candidate positions with the highest values, best first (ties: lower position)."""
    order = np.argsort(-values[candidates], kind="stable")[:n]
    return candidates[order]


def postprocess_predictions(
    frame: pd.DataFrame,
    features: QAFeatures,
    start_logits: Sequence[np.ndarray],
    end_logits: Sequence[np.ndarray],
    n_best: int = 20,
    max_answer_length: int = 30,
    cls_index: int = 0,
) -> dict[str, SpanPrediction]:
    """``{question id: SpanPrediction}`` from per-window start/end logits (window i: length of
    ``features.inputs[i]["input_ids"]`` or longer, padding ignored).

    Starts and ends are the ``n_best`` best context tokens of each window; every pair with
    start <= end and at most ``max_answer_length`` tokens is a candidate, over all windows of a
    question.
    """
    if not (len(start_logits) == len(end_logits) == len(features)):
        raise QADataError(
            f"logits for {len(start_logits)}/{len(end_logits)} windows, but there are {len(features)} windows"
        )
    by_example: dict[int, list[int]] = {}
    for window, row in enumerate(features.example_index):
        by_example.setdefault(row, []).append(window)
    contexts = frame["context"].tolist()
    ids = frame["id"].tolist()
    predictions: dict[str, SpanPrediction] = {}
    for row in range(len(frame)):
        windows = by_example.get(row)
        if not windows:
            raise QADataError(f"question {ids[row]} has no window; build the features from the same rows")
        candidates: list[tuple[float, int, int]] = []  # (score, start char, end char)
        null_score = math.inf
        for window in windows:
            offsets = features.offsets[window]
            length = len(features.inputs[window]["input_ids"])
            start = np.asarray(start_logits[window], dtype=np.float64)[:length]
            end = np.asarray(end_logits[window], dtype=np.float64)[:length]
            null_score = min(null_score, float(start[cls_index] + end[cls_index]))
            context = np.asarray([t for t, span in enumerate(offsets[:length]) if span is not None])
            if context.size == 0:
                continue
            for s in _top(start, context, n_best):
                for e in _top(end, context, n_best):
                    if e < s or e - s + 1 > max_answer_length:
                        continue
                    candidates.append((float(start[s] + end[e]), offsets[s][0], offsets[e][1]))
        candidates.sort(key=lambda c: -c[0])  # stable: equal scores keep window, then start order
        nbest = tuple((contexts[row][a:b], score) for score, a, b in candidates[:n_best])
        text, score = nbest[0] if nbest else ("", -math.inf)
        predictions[ids[row]] = SpanPrediction(text=text, score=score, null_score=null_score, nbest=nbest)
    return predictions
