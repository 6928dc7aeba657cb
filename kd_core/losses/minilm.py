"""MiniLM / MiniLMv2 self-attention distillation losses.

* MiniLM (Wang et al., 2020, "MiniLM: Deep Self-Attention Distillation for
  Task-Agnostic Compression of Pre-Trained Transformers"):
  Eq. 6 attention-distribution transfer -> :func:`minilm_attention_kl`;
  Eq. 7-8 value-relation transfer       -> :func:`minilm_value_relation_kl`.
* MiniLMv2 (Wang et al., 2021, "MiniLMv2: Multi-Head Self-Attention Relation
  Distillation for Compressing Pretrained Transformers", Sec. 3.1): query/key/value
  self-attention relations over re-split relation heads -> :func:`minilmv2_relation_kl`.

All three are ``KL(teacher || student)`` of row distributions over keys, summed over
keys and averaged over (batch, head, valid query) rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import check_heads, token_mask, upcast

__all__ = ["minilm_attention_kl", "minilm_value_relation_kl", "minilmv2_relation_kl"]


def _mean_over_valid_rows(kl_rows: Tensor, query_valid: Tensor | None) -> Tensor:
    """Average ``[B, H, T]`` per-row KLs over rows whose query token is valid."""
    if query_valid is None:
        return kl_rows.mean()
    w = query_valid[:, None, :].to(kl_rows.dtype)  # [B, 1, T]
    count = w.sum() * kl_rows.shape[1]
    return (kl_rows * w).sum() / count.clamp_min(1)


def _relation_log_probs(x: Tensor, key_valid: Tensor | None) -> Tensor:
    """``log softmax(x x^T / sqrt(d))`` over keys for ``x`` of shape ``[B, H, T, d]``.

    Padded keys get the dtype minimum before the softmax (so they carry ~0 mass) and
    their log-prob is then set to 0: the KL term there is 0 * (0 - 0), which keeps both
    the value and the gradient finite (no -inf - -inf).
    """
    x = upcast(x)
    scores = torch.matmul(x, x.transpose(-1, -2)) / math.sqrt(x.shape[-1])
    if key_valid is None:
        return F.log_softmax(scores, dim=-1)
    keep = key_valid[:, None, None, :]  # [B, 1, 1, T]
    scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1).masked_fill(~keep, 0.0)


def _relation_kl(student_x: Tensor, teacher_x: Tensor, valid: Tensor | None) -> Tensor:
    """KL(teacher relation || student relation) for ``[B, H, T, d_s]`` / ``[B, H, T, d_t]``."""
    log_t = _relation_log_probs(teacher_x, valid)
    log_s = _relation_log_probs(student_x, valid)
    p_t = log_t.exp()
    if valid is not None:
        p_t = p_t.masked_fill(~valid[:, None, None, :], 0.0)
    kl_rows = (p_t * (log_t - log_s)).sum(dim=-1)  # [B, H, T]
    return _mean_over_valid_rows(kl_rows, valid)


def minilm_attention_kl(
    student_probs: Tensor, teacher_probs: Tensor, attention_mask: Tensor | None = None
) -> Tensor:
    """MiniLM Eq. 6: ``L_AT = 1/(A_h |x|) sum_a sum_t KL(A^T_{a,t} || A^S_{a,t})``.

    Args:
        student_probs, teacher_probs: ``[B, H, T, T]`` post-softmax attention
            distributions (each query row sums to 1 over keys). Padded keys are expected
            to already carry ~0 probability, as a masked softmax produces.
        attention_mask: optional ``[B, T]`` 1/0 mask; only rows of valid query tokens are
            averaged (total KL over valid (b, h, query) rows / their count).

    Teacher zeros contribute exactly 0 (0 * log 0 = 0); student probabilities are clamped
    to the dtype's smallest normal before the log so the result stays finite.

    Raises:
        ValueError: when head counts differ.
    """
    check_heads(student_probs, teacher_probs, "minilm_attention_kl")
    if student_probs.shape != teacher_probs.shape:
        raise ValueError(
            f"minilm_attention_kl: student shape {tuple(student_probs.shape)} != teacher "
            f"shape {tuple(teacher_probs.shape)}"
        )
    s = upcast(student_probs)
    t = upcast(teacher_probs)
    tiny = torch.finfo(s.dtype).tiny
    # Same log formula on both sides so student == teacher gives exactly 0.
    kl_rows = (t * (t.clamp_min(tiny).log() - s.clamp_min(tiny).log())).sum(dim=-1)
    b, _, q, _ = s.shape
    valid = token_mask(attention_mask, b, q, "minilm_attention_kl")
    return _mean_over_valid_rows(kl_rows, valid)


def minilm_value_relation_kl(
    student_values: Tensor, teacher_values: Tensor, attention_mask: Tensor | None = None
) -> Tensor:
    """MiniLM Eq. 7-8: value-relation transfer.

    ``VR = softmax(V V^T / sqrt(d_k))`` (Eq. 7) per head, and
    ``L_VR = 1/(A_h |x|) sum_a sum_t KL(VR^T_{a,t} || VR^S_{a,t})`` (Eq. 8).

    Args:
        student_values: ``[B, H, T, d_s]`` per-head values.
        teacher_values: ``[B, H, T, d_t]``; ``d_s`` and ``d_t`` may differ.
        attention_mask: optional ``[B, T]`` 1/0 mask. Padded keys are excluded from the
            softmax; only valid query rows are averaged.

    Raises:
        ValueError: when head counts differ.
    """
    check_heads(student_values, teacher_values, "minilm_value_relation_kl")
    b, _, t, _ = student_values.shape
    valid = token_mask(attention_mask, b, t, "minilm_value_relation_kl")
    return _relation_kl(student_values, teacher_values, valid)


def _split_relation_heads(x: Tensor, num_heads: int, who: str) -> Tensor:
    """``[B, T, hidden]`` -> ``[B, R, T, hidden / R]``."""
    if x.dim() != 3:
        raise ValueError(
            f"minilmv2_relation_kl: {who} input must be [B, T, hidden], got {tuple(x.shape)}"
        )
    b, t, hidden = x.shape
    if hidden % num_heads != 0:
        raise ValueError(
            f"minilmv2_relation_kl: {who} hidden size {hidden} is not divisible by "
            f"num_relation_heads={num_heads}"
        )
    return x.reshape(b, t, num_heads, hidden // num_heads).transpose(1, 2)


def minilmv2_relation_kl(
    student_x: Tensor,
    teacher_x: Tensor,
    num_relation_heads: int,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """MiniLMv2 (Sec. 3.1) self-attention relation distillation for one of Q-Q, K-K, V-V.

    Each concatenated ``[B, T, hidden]`` query/key/value tensor is split into ``R =
    num_relation_heads`` relation heads of size ``d_r = hidden / R`` (separately for
    student and teacher, so their head counts and widths may differ);
    ``R_{a} = softmax(x_a x_a^T / sqrt(d_r))`` and the loss is
    ``1/(R |x|) sum_a sum_t KL(R^T_{a,t} || R^S_{a,t})``.

    Args:
        attention_mask: optional ``[B, T]`` 1/0 mask: padded keys are excluded from the
            softmax and only valid query rows are averaged.

    Raises:
        ValueError: if either hidden size is not divisible by ``num_relation_heads``.
    """
    if (
        isinstance(num_relation_heads, bool)
        or not isinstance(num_relation_heads, int)
        or num_relation_heads < 1
    ):
        raise ValueError(
            "minilmv2_relation_kl: num_relation_heads must be a positive int, "
            f"got {num_relation_heads!r}"
        )
    s = _split_relation_heads(student_x, num_relation_heads, "student")
    t = _split_relation_heads(teacher_x, num_relation_heads, "teacher")
    if s.shape[0] != t.shape[0] or s.shape[2] != t.shape[2]:
        raise ValueError(
            f"minilmv2_relation_kl: batch/sequence sizes differ: student "
            f"{tuple(student_x.shape)}, teacher {tuple(teacher_x.shape)}"
        )
    valid = token_mask(attention_mask, s.shape[0], s.shape[2], "minilmv2_relation_kl")
    return _relation_kl(s, t, valid)
