"""SQuAD exact match and F1 with the official answer normalisation, v2.0's has-answer / no-answer
breakdown and its no-answer threshold search, and batched span prediction for a QA model.

The definitions follow the official evaluation scripts (``evaluate-v1.1.py``, ``evaluate-v2.0.py``):
answers are lower-cased, stripped of punctuation and of the articles a/an/the, and their
whitespace collapsed; a prediction scores the maximum over the gold answers; F1 is over the
bag of normalised tokens. Scores are percentages, like the official output.
"""

from __future__ import annotations

import collections
import math
import re
import string
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from kd_core.train.data import pad_batch

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, drop the articles a/an/the, collapse whitespace (official order)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_tokens(text: str) -> list[str]:
    return normalize_answer(text).split() if text else []


def exact_match(prediction: str, gold: str) -> int:
    return int(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    """Token-bag F1; two empty answers agree (1.0), one empty answer scores 0 (v2.0's rule)."""
    pred, ref = answer_tokens(prediction), answer_tokens(gold)
    if not pred or not ref:
        return float(pred == ref)
    same = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def best_over_golds(metric: Callable[[str, str], float], prediction: str, golds: Sequence[str]) -> float:
    return max(metric(prediction, gold) for gold in golds)


def gold_answers(texts: Sequence[str]) -> list[str]:
    """The gold answers that survive normalisation, or [""] for an unanswerable question (v2.0)."""
    kept = [t for t in texts if normalize_answer(t)]
    return kept or [""]


def raw_scores(golds: Mapping[str, Sequence[str]], predictions: Mapping[str, str]) -> tuple[dict[str, int], dict[str, float]]:
    """Per-question exact match (0/1) and F1 (0..1) of ``predictions`` against ``golds``."""
    missing = [qid for qid in golds if qid not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} questions have no prediction, e.g. {missing[0]!r}")
    exact, f1s = {}, {}
    for qid, texts in golds.items():
        answers = gold_answers(texts)
        exact[qid] = int(best_over_golds(exact_match, predictions[qid], answers))
        f1s[qid] = float(best_over_golds(f1, predictions[qid], answers))
    return exact, f1s


def apply_no_answer_threshold(
    scores: Mapping[str, float], na_scores: Mapping[str, float], has_answer: Mapping[str, bool], threshold: float
) -> dict[str, float]:
    """A question whose na_score exceeds ``threshold`` is answered with "": it then scores 1 when it
    has no answer and 0 when it has one (the official ``apply_no_ans_threshold``)."""
    return {qid: float(not has_answer[qid]) if na_scores[qid] > threshold else score for qid, score in scores.items()}


def find_best_threshold(
    predictions: Mapping[str, str],
    scores: Mapping[str, float],
    na_scores: Mapping[str, float],
    has_answer: Mapping[str, bool],
) -> tuple[float, float]:
    """The official ``find_best_thresh``: (best score in %, its threshold).

    Start from "every question answered with ''" (one point per unanswerable question), then
    walk the questions by increasing na_score, letting each one keep its span: an answerable one
    gains its score, an unanswerable one with a non-empty span loses its point. The threshold is
    the na_score where the running total peaks first.

    Two departures keep the threshold reproducing its score under "answer '' when na_score >
    threshold": questions with equal na_scores are taken together, and when no threshold beats
    the start, the threshold is -inf (the official script reports 0.0 there, which answers
    every question with na_score <= 0).
    """
    current = best = float(sum(1 for qid in scores if not has_answer[qid]))
    threshold = -math.inf
    ordered = sorted((qid for qid in na_scores if qid in scores), key=lambda k: na_scores[k])
    for position, qid in enumerate(ordered):
        if has_answer[qid]:
            current += scores[qid]
        elif predictions[qid]:
            current -= 1.0
        tied_with_next = position + 1 < len(ordered) and na_scores[ordered[position + 1]] == na_scores[qid]
        if current > best and not tied_with_next:
            best, threshold = current, na_scores[qid]
    return 100.0 * best / len(scores), threshold


def _mean_percent(values: Mapping[str, float], qids: Sequence[str]) -> float:
    return 100.0 * sum(values[q] for q in qids) / len(qids) if qids else float("nan")


def squad_metrics(
    golds: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    na_scores: Mapping[str, float] | None = None,
    threshold: float = 0.0,
) -> dict[str, float]:
    """Exact match and F1 in %, with the has_ans / no_ans breakdown.

    Without ``na_scores`` (v1.1) the predictions are scored as they are. With them (v2.0),
    ``predictions`` are each question's best non-null span; a question is answered with "" when
    its na_score exceeds ``threshold`` (``exact_match``/``f1`` at that threshold), and
    ``best_exact``/``best_f1`` with their thresholds come from :func:`find_best_threshold`.
    """
    exact, f1s = raw_scores(golds, predictions)
    has_answer = {qid: bool(gold_answers(texts)[0]) for qid, texts in golds.items()}
    if na_scores is not None:
        exact_at = apply_no_answer_threshold(exact, na_scores, has_answer, threshold)
        f1_at = apply_no_answer_threshold(f1s, na_scores, has_answer, threshold)
    else:
        exact_at, f1_at = exact, f1s
    qids = list(golds)
    with_answer = [q for q in qids if has_answer[q]]
    without = [q for q in qids if not has_answer[q]]
    out = {
        "exact_match": _mean_percent(exact_at, qids),
        "f1": _mean_percent(f1_at, qids),
        "total": len(qids),
        "has_ans_exact": _mean_percent(exact_at, with_answer),
        "has_ans_f1": _mean_percent(f1_at, with_answer),
        "has_ans_total": len(with_answer),
        "no_ans_exact": _mean_percent(exact_at, without),
        "no_ans_f1": _mean_percent(f1_at, without),
        "no_ans_total": len(without),
    }
    if na_scores is not None:
        out["threshold"] = threshold
        out["best_exact"], out["best_exact_thresh"] = find_best_threshold(predictions, exact, na_scores, has_answer)
        out["best_f1"], out["best_f1_thresh"] = find_best_threshold(predictions, f1s, na_scores, has_answer)
    return out


# ---- prediction ---------------------------------------------------------------------------------
@torch.no_grad()
def predict_span_logits(model, inputs: list[dict], pad_token_id: int, batch_size: int = 64) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Start and end logits of a QA model for each window, trimmed to the window's length."""
    model.eval()
    device = next(model.parameters()).device
    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    for first in range(0, len(inputs), batch_size):
        chunk = inputs[first : first + batch_size]
        batch = pad_batch(chunk, pad_token_id)
        output = model(**{k: v.to(device) for k, v in batch.items() if k != "labels"})
        start, end = output.start_logits.float().cpu().numpy(), output.end_logits.float().cpu().numpy()
        for row, example in enumerate(chunk):
            length = len(example["input_ids"])
            starts.append(start[row, :length])
            ends.append(end[row, :length])
    return starts, ends
