"""Hard-label (ground-truth) task losses used alongside distillation, e.g. the
task-specific stage of TinyBERT or fine-tuning a distilled student."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ._common import upcast

__all__ = ["hard_cross_entropy", "regression_mse"]


def hard_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Classification cross-entropy: ``logits [B, C]``, integer ``labels [B]``
    (positions labelled -100 are ignored, as in Hugging Face heads)."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"hard_cross_entropy: expected logits [B, C] and labels [B], got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    return F.cross_entropy(upcast(logits), labels.long(), ignore_index=-100)


def regression_mse(predictions: Tensor, targets: Tensor) -> Tensor:
    """Regression MSE (e.g. STS-B): ``predictions [B]`` or ``[B, 1]``, ``targets [B]``."""
    if predictions.dim() == 2 and predictions.shape[-1] == 1:
        predictions = predictions.squeeze(-1)
    targets = targets.reshape(-1) if targets.dim() == 2 and targets.shape[-1] == 1 else targets
    if predictions.shape != targets.shape or predictions.dim() != 1:
        raise ValueError(
            f"regression_mse: expected predictions [B] or [B, 1] and targets [B], got "
            f"{tuple(predictions.shape)} and {tuple(targets.shape)}"
        )
    predictions = upcast(predictions)
    return F.mse_loss(predictions, targets.to(predictions.dtype))
