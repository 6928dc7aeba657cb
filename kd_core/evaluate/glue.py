"""GLUE metrics with their official definitions, the label-order check, and batched prediction.

The definitions are those of the GLUE benchmark (and of Hugging Face's ``glue`` metric, which
wraps the same scikit-learn and SciPy calls): accuracy; F1 of the positive class (label id 1:
``equivalent`` for MRPC, ``duplicate`` for QQP); Matthews correlation (CoLA); Pearson and
Spearman correlation (STS-B). Metric names are those a task declares in
:mod:`kd_core.data.tasks`. Values are in [-100, 100] like the GLUE leaderboard.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

from kd_core.errors import UserError
from kd_core.stop import check_stop
from kd_core.train.data import pad_batch


class LabelOrderError(UserError, ValueError):
    """A model dir's classifier rows follow another label order than the task's."""


def _checked(predictions, labels) -> tuple[np.ndarray, np.ndarray]:
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape or predictions.ndim != 1:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} must be two 1-d arrays of one length")
    if len(labels) == 0:
        raise ValueError("no rows to score: the evaluation split is empty")
    return predictions, labels


def accuracy(predictions, labels) -> float:
    predictions, labels = _checked(predictions, labels)
    return 100.0 * float(np.mean(predictions == labels))


def f1_positive(predictions, labels) -> float:
    """F1 of class 1 (GLUE's MRPC and QQP); 0 when there is no true or predicted positive."""
    predictions, labels = _checked(predictions, labels)
    return 100.0 * float(f1_score(labels, predictions, pos_label=1, average="binary", zero_division=0))


def matthews(predictions, labels) -> float:
    """Matthews correlation; 0 when a row or column of the confusion matrix is empty (constant predictions)."""
    predictions, labels = _checked(predictions, labels)
    return 100.0 * float(matthews_corrcoef(labels, predictions))


def _correlation(fn, predictions, labels) -> float:
    predictions, labels = _checked(np.asarray(predictions, dtype=np.float64), np.asarray(labels, dtype=np.float64))
    # A collapsed regressor (constant output) has no defined correlation; it scores 0, as MCC does,
    # instead of a NaN that would poison the mean score and the report's retention.
    if np.ptp(predictions) == 0 or np.ptp(labels) == 0:
        return 0.0
    return 100.0 * float(fn(predictions, labels)[0])


def pearson(predictions, labels) -> float:
    return _correlation(pearsonr, predictions, labels)


def spearman(predictions, labels) -> float:
    return _correlation(spearmanr, predictions, labels)


# Keys are the names tasks declare (kd_core.data.tasks); the short spellings are accepted too.
METRICS = {
    "accuracy": accuracy,
    "f1": f1_positive,
    "matthews_correlation": matthews,
    "matthews": matthews,
    "pearson": pearson,
    "spearmanr": spearman,
    "spearman": spearman,
}


def compute_metrics(metric_names, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``predictions``: class ids, or scores for regression."""
    out: dict[str, float] = {}
    for name in metric_names:
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; GLUE metrics: {', '.join(METRICS)}")
        out[name] = METRICS[name](predictions, labels)
    return out


def primary_score(metrics: dict[str, float]) -> float:
    """One number per task: the mean of its metrics (GLUE's convention for MRPC, QQP, STS-B)."""
    return float(np.mean(list(metrics.values())))


# ---- label order ---------------------------------------------------------------------------------
_GENERIC = re.compile(r"^LABEL_(\d+)$")


def _label_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def model_label_order(model_dir: str | Path) -> list[str] | None:
    """The label names of a model dir's classifier rows, in row order (None: the config names none)."""
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text())
    id2label = config.get("id2label")
    if not id2label:
        return None
    order = [id2label[k] for k in sorted(id2label, key=int)]
    # label2id, where given, must point each name back at its row; a hand-edited config may not
    label2id = config.get("label2id") or {}
    for row, name in enumerate(order):
        if name in label2id and int(label2id[name]) != row:
            raise LabelOrderError(
                f"{config_path}: id2label puts {name!r} at row {row} but label2id says {label2id[name]}; "
                f"make the two agree (id2label is the classifier's row order) and save the model again"
            )
    return order


def _has_classifier(model_dir: str | Path) -> bool:
    """Whether the dir was saved with a sequence-classification head (an encoder dir gets a fresh one)."""
    architectures = json.loads((Path(model_dir) / "config.json").read_text()).get("architectures")
    return not architectures or any(a.endswith("ForSequenceClassification") for a in architectures)


def check_label_order(model_dir: str | Path, spec) -> None:
    """Fail when ``model_dir``'s classifier follows a label order other than ``spec.labels``.

    Generic names ``LABEL_0..N`` in row order carry no order and pass, and so does a dir saved
    without a classification head (it gets a fresh one). Names are compared ignoring case and
    punctuation.
    """
    if spec.labels is None:  # regression and QA: no label order
        return
    order = model_label_order(model_dir)
    if order is None or not _has_classifier(model_dir):
        return
    generic = [_GENERIC.match(str(name)) for name in order]
    if all(generic):
        if all(int(m.group(1)) == row for row, m in enumerate(generic)):
            return
        problem = "its generic labels are permuted"
    elif [_label_key(n) for n in order] == [_label_key(n) for n in spec.labels]:
        return
    elif sorted(_label_key(n) for n in order) == sorted(_label_key(n) for n in spec.labels):
        problem = "it has the task's labels in another order"
    else:
        problem = "its labels are not the task's labels"
    raise LabelOrderError(
        f"label order mismatch in {model_dir}: {problem}. The model's classifier rows are "
        f"{list(order)}, the task {spec.name} expects {list(spec.labels)} (kd_core/data/tasks.py). "
        f"Scoring it would compare class ids of different meaning and score near zero. Fix: permute "
        f"the classifier's output rows (weight and bias) and id2label/label2id into the task's order and "
        f"save the model again, or fine-tune the teacher with this pipeline (finetune_teacher writes the task's order)."
    )


# ---- prediction ------------------------------------------------------------------------------------
@torch.no_grad()
def predict_logits(model, examples: list[dict], pad_token_id: int, batch_size: int = 64) -> np.ndarray:
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, len(examples), batch_size):
        check_stop("evaluation")
        batch = pad_batch(examples[start : start + batch_size], pad_token_id)
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        outputs.append(model(**inputs).logits.float().cpu().numpy())
    return np.concatenate(outputs)


def evaluate_model(model, examples: list[dict], metric_names, is_regression: bool, pad_token_id: int) -> dict[str, float]:
    logits = predict_logits(model, examples, pad_token_id)
    labels = np.asarray([ex["labels"] for ex in examples])
    predictions = logits[:, 0] if is_regression else logits.argmax(-1)
    return compute_metrics(metric_names, predictions, labels)
