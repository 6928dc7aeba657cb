"""Extractive-QA losses over span logits: ``[B, 2, T]``, start logits in row 0, end logits in row 1.

Both losses are the mean of a start term and an end term, each a distribution over the
sequence positions (the Hugging Face QA head's convention). Padded positions (attention mask 0)
are excluded from both distributions, so a batch's padding never changes the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import check_same_shape, token_mask, upcast

__all__ = ["qa_soft_cross_entropy", "qa_hard_cross_entropy"]


def _check_spans(logits: Tensor, what: str) -> None:
    if logits.dim() != 3 or logits.shape[1] != 2:
        raise ValueError(f"{what}: expected span logits [B, 2, T] (start, end), got {tuple(logits.shape)}")


def _masked(logits: Tensor, valid: Tensor | None) -> Tensor:
    if valid is None:
        return logits
    return logits.masked_fill(~valid[:, None, :], torch.finfo(logits.dtype).min)


def qa_soft_cross_entropy(
    student_logits: Tensor, teacher_logits: Tensor, attention_mask: Tensor | None = None, temperature: float = 1.0
) -> Tensor:
    """TinyBERT Eq. 10 on the start and on the end distribution, averaged:
    ``1/2 * sum_{s in start,end} mean_B CE(softmax(z_s^T / t), log_softmax(z_s^S / t))``.

    No ``t**2`` factor, as :func:`kd_core.losses.tinybert.soft_cross_entropy`.
    """
    _check_spans(student_logits, "qa_soft_cross_entropy")
    check_same_shape(student_logits, teacher_logits, "qa_soft_cross_entropy")
    if temperature <= 0:
        raise ValueError(f"qa_soft_cross_entropy: temperature must be > 0, got {temperature}")
    b, _, t = student_logits.shape
    valid = token_mask(attention_mask, b, t, "qa_soft_cross_entropy")
    # Mask after scaling: finfo.min / t for t < 1 would overflow to -inf and give 0 * inf = NaN.
    student = _masked(upcast(student_logits) / temperature, valid)
    teacher = _masked(upcast(teacher_logits) / temperature, valid)
    product = F.softmax(teacher, dim=-1) * F.log_softmax(student, dim=-1)
    if valid is not None:
        product = product.masked_fill(~valid[:, None, :], 0.0)
    return -product.sum(dim=-1).mean()


def qa_hard_cross_entropy(logits: Tensor, positions: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Cross-entropy of the start and end logits against the gold token positions ``[B, 2]``,
    averaged (the Hugging Face QA head's loss, without its clamping: positions must be valid)."""
    _check_spans(logits, "qa_hard_cross_entropy")
    b, _, t = logits.shape
    if tuple(positions.shape) != (b, 2):
        raise ValueError(
            f"qa_hard_cross_entropy: expected positions [B, 2] = {(b, 2)} (start, end), got {tuple(positions.shape)}"
        )
    positions = positions.long()
    if positions.numel() and (positions.min() < 0 or positions.max() >= t):
        raise ValueError(f"qa_hard_cross_entropy: positions must lie in 0..{t - 1}, got {positions.tolist()}")
    valid = token_mask(attention_mask, b, t, "qa_hard_cross_entropy")
    scores = _masked(upcast(logits), valid)
    start = F.cross_entropy(scores[:, 0, :], positions[:, 0])
    end = F.cross_entropy(scores[:, 1, :], positions[:, 1])
    return (start + end) / 2
