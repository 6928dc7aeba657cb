"""Shared shape checks and masking helpers for the loss modules (internal)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "check_same_shape",
    "check_heads",
    "token_mask",
    "masked_mean",
    "upcast",
    "select_valid_positions",
]


def upcast(t: Tensor) -> Tensor:
    """Half-precision inputs are promoted to float32: softmax/log/KL in fp16/bf16 lose too much."""
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.float()
    return t


def check_same_shape(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{what}: student shape {tuple(student.shape)} != teacher shape {tuple(teacher.shape)}"
        )


def check_heads(student: Tensor, teacher: Tensor, what: str, *, relation_hint: bool = True) -> None:
    """Require ``[B, H, T, *]`` inputs with equal head counts H (dimension 1)."""
    if student.dim() != 4 or teacher.dim() != 4:
        raise ValueError(
            f"{what}: expected 4-D [B, H, T, *] tensors, got student {tuple(student.shape)} "
            f"and teacher {tuple(teacher.shape)}"
        )
    hs, ht = student.shape[1], teacher.shape[1]
    if hs != ht:
        hint = (
            " MiniLMv2 relations (minilmv2_relation_kl) do not need equal heads: they re-split "
            "the concatenated q/k/v into a chosen number of relation heads."
            if relation_hint
            else ""
        )
        raise ValueError(
            f"{what}: student has {hs} attention heads but teacher has {ht}; this loss needs "
            f"equal head counts.{hint}"
        )
    if student.shape[0] != teacher.shape[0] or student.shape[2] != teacher.shape[2]:
        raise ValueError(
            f"{what}: batch/sequence sizes differ: student {tuple(student.shape)}, "
            f"teacher {tuple(teacher.shape)}"
        )


def token_mask(attention_mask: Tensor | None, batch: int, seq_len: int, what: str) -> Tensor | None:
    """Validate a ``[B, T]`` 1/0 mask and return it as bool (or None)."""
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != (batch, seq_len):
        raise ValueError(
            f"{what}: attention_mask must have shape [B, T] = {(batch, seq_len)}, "
            f"got {tuple(attention_mask.shape)}"
        )
    return attention_mask != 0


def masked_mean(values: Tensor, weight: Tensor | None, denom: Tensor | None = None) -> Tensor:
    """``sum(values * weight) / denom`` (plain mean when weight is None).

    ``weight`` must broadcast against ``values``; ``denom`` defaults to the number of
    weighted elements. A zero denominator (everything padded) yields 0, not NaN, so one
    empty batch cannot poison a training run.
    """
    if weight is None:
        return values.mean()
    weight = weight.to(values.dtype)
    total = (values * weight).sum()
    if denom is None:
        denom = weight.expand_as(values).sum()
    return total / denom.clamp_min(1)


def select_valid_positions(logits: Tensor, attention_mask: Tensor | None) -> Tensor:
    """For token-level logits ``[B, T, C]`` keep only rows of valid tokens -> ``[N, C]``.

    Any other shape (e.g. sequence-level ``[B, C]``) is returned unchanged.
    """
    if attention_mask is None:
        return logits
    if logits.dim() == 3 and tuple(attention_mask.shape) == tuple(logits.shape[:2]):
        return logits[attention_mask != 0]
    if logits.dim() == 2:
        return logits
    raise ValueError(
        f"attention_mask shape {tuple(attention_mask.shape)} does not match token-level "
        f"logits {tuple(logits.shape)} (expected [B, T] for [B, T, C] logits)"
    )
