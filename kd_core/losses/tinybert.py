"""TinyBERT distillation losses (Jiao et al., 2020, "TinyBERT: Distilling BERT for
Natural Language Understanding", Section 3.1).

* Eq. 7  attention-based distillation  -> :func:`attention_mse`
* Eq. 8  hidden-states distillation    -> :func:`hidden_mse`
* Eq. 9  embedding-layer distillation  -> :func:`hidden_mse` (same formula on embeddings)
* Eq. 10 prediction-layer distillation -> :func:`soft_cross_entropy`
"""

from __future__ import annotations

from typing import Callable, Literal

import torch.nn.functional as F
from torch import Tensor

from ._common import check_heads, check_same_shape, masked_mean, token_mask, upcast

__all__ = ["attention_mse", "hidden_mse", "soft_cross_entropy"]

Reduction = Literal["mean", "none"]


def _check_reduction(reduction: str, what: str) -> None:
    if reduction not in ("mean", "none"):
        raise ValueError(f"{what}: reduction must be 'mean' or 'none', got {reduction!r}")


def _per_example(sq: Tensor, weight: Tensor | None, denom: Tensor | None = None) -> Tensor:
    """``[B]`` per-example terms whose mean is ``masked_mean(sq, weight, denom)``.

    Example i contributes ``B * sum_i(sq * weight) / denom``: the normaliser stays batch-global
    (valid elements of the whole batch), so a weighted mean over examples with all weights 1 is
    exactly the ``mean`` reduction, and an example with more valid tokens weighs more, as there.
    """
    batch = sq.shape[0]
    if weight is None:
        return sq.reshape(batch, -1).mean(dim=1)
    weight = weight.to(sq.dtype)
    sums = (sq * weight).reshape(batch, -1).sum(dim=1)
    if denom is None:
        denom = weight.expand_as(sq).sum()
    return sums * batch / denom.clamp_min(1)


def attention_mse(
    student_scores: Tensor,
    teacher_scores: Tensor,
    attention_mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """TinyBERT Eq. 7: ``L_attn = 1/h * sum_i MSE(A_i^S, A_i^T)``.

    Args:
        student_scores, teacher_scores: ``[B, H, T, T]`` *pre-softmax* attention scores
            (``QK^T / sqrt(d_k)``) without the additive padding mask applied.
        attention_mask: optional ``[B, T]`` 1/0 token mask. A (query, key) pair counts
            only when both tokens are valid.
        reduction: ``"none"`` returns ``[B]`` per-example terms whose mean is the scalar (for
            per-instance weighting, e.g. Meta-KD's domain-expertise weights).

    Returns:
        Scalar: sum of squared differences over valid pairs of all heads divided by
        ``H * (number of valid pairs summed over the batch)``; plain mean without a mask.

    Raises:
        ValueError: when head counts differ (TinyBERT matches heads one-to-one).
    """
    _check_reduction(reduction, "attention_mse")
    check_heads(student_scores, teacher_scores, "attention_mse")
    check_same_shape(student_scores, teacher_scores, "attention_mse")
    b, h, t, _ = student_scores.shape
    valid = token_mask(attention_mask, b, t, "attention_mse")
    sq = (student_scores - teacher_scores).pow(2)
    if valid is None:
        return sq.mean() if reduction == "mean" else _per_example(sq, None)
    pair = valid[:, None, :, None] & valid[:, None, None, :]  # [B, 1, T, T]
    if reduction == "none":
        return _per_example(sq, pair, denom=pair.sum() * h)
    return masked_mean(sq, pair, denom=pair.sum() * h)


def hidden_mse(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    projection: Callable[[Tensor], Tensor] | None = None,
    attention_mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """TinyBERT Eq. 8 (and Eq. 9 for embeddings): ``MSE(H^S W_h, H^T)``.

    Args:
        student_hidden: ``[B, T, d_s]``.
        teacher_hidden: ``[B, T, d_t]``.
        projection: learnable map ``W_h`` (any callable, e.g. ``nn.Linear(d_s, d_t)``)
            applied to the student first; required when ``d_s != d_t``.
        attention_mask: optional ``[B, T]`` 1/0 mask; the mean then runs over valid
            tokens x ``d_t`` only.
        reduction: ``"none"`` returns ``[B]`` per-example terms whose mean is the scalar.

    Raises:
        ValueError: when the last dimensions differ after projection.
    """
    _check_reduction(reduction, "hidden_mse")
    projected = projection(student_hidden) if projection is not None else student_hidden
    if projected.shape[-1] != teacher_hidden.shape[-1]:
        raise ValueError(
            f"hidden_mse: student hidden size {projected.shape[-1]}"
            f"{' (after projection)' if projection is not None else ''} != teacher hidden "
            f"size {teacher_hidden.shape[-1]}; add a projection, e.g. "
            f"nn.Linear({projected.shape[-1]}, {teacher_hidden.shape[-1]})"
        )
    check_same_shape(projected, teacher_hidden, "hidden_mse")
    sq = (projected - teacher_hidden).pow(2)
    if attention_mask is None:
        return sq.mean() if reduction == "mean" else _per_example(sq, None)
    if teacher_hidden.dim() != 3:
        raise ValueError(
            f"hidden_mse: attention_mask needs [B, T, d] inputs, got {tuple(teacher_hidden.shape)}"
        )
    b, t, _ = teacher_hidden.shape
    valid = token_mask(attention_mask, b, t, "hidden_mse")
    if reduction == "none":
        return _per_example(sq, valid[..., None])
    return masked_mean(sq, valid[..., None])


def soft_cross_entropy(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, reduction: Reduction = "mean"
) -> Tensor:
    """TinyBERT Eq. 10: ``CE(z^T / t, z^S / t) = -softmax(z^T/t) . log_softmax(z^S/t)``.

    Logits are ``[B, C]`` or ``[..., C]``; the result is the mean over all leading
    positions (``reduction="none"``: the per-position values). No ``t**2`` factor is applied
    (TinyBERT uses t = 1).
    """
    _check_reduction(reduction, "soft_cross_entropy")
    check_same_shape(student_logits, teacher_logits, "soft_cross_entropy")
    if temperature <= 0:
        raise ValueError(f"soft_cross_entropy: temperature must be > 0, got {temperature}")
    s = upcast(student_logits) / temperature
    t = upcast(teacher_logits) / temperature
    per_row = -(F.softmax(t, dim=-1) * F.log_softmax(s, dim=-1)).sum(dim=-1)
    return per_row if reduction == "none" else per_row.mean()
