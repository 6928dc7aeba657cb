"""GLUE metrics with their official definitions, and batched prediction for a model dir."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

from kd_core.train.data import pad_batch


def compute_metrics(metric_names, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``predictions``: class ids, or scores for regression. Values are in [0, 100] like GLUE."""
    out: dict[str, float] = {}
    for name in metric_names:
        if name == "accuracy":
            out[name] = 100.0 * float(np.mean(predictions == labels))
        elif name == "f1":
            out[name] = 100.0 * float(f1_score(labels, predictions))
        elif name == "matthews":
            out[name] = 100.0 * float(matthews_corrcoef(labels, predictions))
        elif name == "pearson":
            out[name] = 100.0 * float(pearsonr(predictions, labels)[0])
        elif name == "spearman":
            out[name] = 100.0 * float(spearmanr(predictions, labels)[0])
        else:
            raise ValueError(f"unknown metric {name!r}")
    return out


def primary_score(metrics: dict[str, float]) -> float:
    """One number per task: the mean of its metrics (GLUE's convention for MRPC, QQP, STS-B)."""
    return float(np.mean(list(metrics.values())))


@torch.no_grad()
def predict_logits(model, examples: list[dict], pad_token_id: int, batch_size: int = 64) -> np.ndarray:
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, len(examples), batch_size):
        batch = pad_batch(examples[start : start + batch_size], pad_token_id)
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        outputs.append(model(**inputs).logits.float().cpu().numpy())
    return np.concatenate(outputs)


def evaluate_model(model, examples: list[dict], metric_names, is_regression: bool, pad_token_id: int) -> dict[str, float]:
    logits = predict_logits(model, examples, pad_token_id)
    labels = np.asarray([ex["labels"] for ex in examples])
    predictions = logits[:, 0] if is_regression else logits.argmax(-1)
    return compute_metrics(metric_names, predictions, labels)
