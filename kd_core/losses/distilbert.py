"""DistilBERT distillation losses (Sanh et al., 2019, "DistilBERT, a distilled version
of BERT: smaller, faster, cheaper and lighter", Sec. 2-3).

The training objective is a linear combination of the distillation loss ``L_ce`` over
the soft targets (Hinton et al., 2015, with the ``T^2`` gradient-scale factor), the
masked-language-modelling loss ``L_mlm`` and the cosine embedding loss ``L_cos``
between student and teacher hidden states; :func:`distilbert_loss` combines them with
the weights of the reference implementation (5 / 2 / 1).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ._common import check_same_shape, masked_mean, select_valid_positions, token_mask, upcast
from .tinybert import soft_cross_entropy

__all__ = [
    "kl_divergence_loss",
    "cosine_embedding_loss",
    "masked_lm_loss",
    "distilbert_loss",
]


def kl_divergence_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """``T^2 * KL(softmax(z^T/T) || softmax(z^S/T))`` (Hinton et al., 2015; DistilBERT L_ce).

    Logits are ``[..., C]``; the KL is summed over classes and averaged over all leading
    positions (``batchmean``). For token-level ``[B, T, C]`` logits an ``[B, T]``
    ``attention_mask`` restricts the average to valid tokens. The ``T^2`` factor keeps
    gradient magnitudes independent of the temperature.
    """
    check_same_shape(student_logits, teacher_logits, "kl_divergence_loss")
    if temperature <= 0:
        raise ValueError(f"kl_divergence_loss: temperature must be > 0, got {temperature}")
    s = select_valid_positions(upcast(student_logits), attention_mask) / temperature
    t = select_valid_positions(upcast(teacher_logits), attention_mask) / temperature
    log_s = F.log_softmax(s, dim=-1)
    log_t = F.log_softmax(t, dim=-1)
    # Computed from log-probs on both sides so identical inputs give exactly 0.
    per_row = (log_t.exp() * (log_t - log_s)).sum(dim=-1)
    if per_row.numel() == 0:
        return per_row.sum()
    return per_row.mean() * temperature**2


def cosine_embedding_loss(
    student_hidden: Tensor, teacher_hidden: Tensor, attention_mask: Tensor | None = None
) -> Tensor:
    """DistilBERT ``L_cos``: mean over (valid) tokens of ``1 - cos(h^S_t, h^T_t)``.

    Equivalent to ``torch.nn.CosineEmbeddingLoss`` with target 1. Computed as
    ``0.5 * ||h^S/|h^S| - h^T/|h^T| ||^2``, which equals ``1 - cos`` for non-zero vectors,
    avoids cancellation near cos = 1 and is exactly 0 for identical inputs.
    Both hidden sizes must match (project the student first otherwise).
    """
    if student_hidden.shape[-1] != teacher_hidden.shape[-1]:
        raise ValueError(
            f"cosine_embedding_loss: student hidden size {student_hidden.shape[-1]} != teacher "
            f"hidden size {teacher_hidden.shape[-1]}; add a projection"
        )
    check_same_shape(student_hidden, teacher_hidden, "cosine_embedding_loss")
    s = F.normalize(upcast(student_hidden), dim=-1, eps=1e-12)
    t = F.normalize(upcast(teacher_hidden), dim=-1, eps=1e-12)
    per_token = 0.5 * (s - t).pow(2).sum(dim=-1)
    if attention_mask is None:
        return per_token.mean()
    if per_token.dim() != 2:
        raise ValueError(
            f"cosine_embedding_loss: attention_mask needs [B, T, d] inputs, got "
            f"{tuple(student_hidden.shape)}"
        )
    valid = token_mask(attention_mask, *per_token.shape, "cosine_embedding_loss")
    return masked_mean(per_token, valid)


def masked_lm_loss(mlm_logits: Tensor, mlm_labels: Tensor) -> Tensor:
    """DistilBERT ``L_mlm``: cross-entropy over positions whose label is not -100.

    ``mlm_logits`` is ``[..., V]`` and ``mlm_labels`` the matching ``[...]`` ids. Returns
    0 (still attached to the graph) when no position is labelled, instead of NaN.
    """
    if tuple(mlm_logits.shape[:-1]) != tuple(mlm_labels.shape):
        raise ValueError(
            f"masked_lm_loss: logits {tuple(mlm_logits.shape)} do not match labels "
            f"{tuple(mlm_labels.shape)} (expected logits [..., V] for labels [...])"
        )
    logits = upcast(mlm_logits).reshape(-1, mlm_logits.shape[-1])
    labels = mlm_labels.reshape(-1).long()
    if not bool((labels != -100).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, ignore_index=-100)


def distilbert_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 2.0,
    *,
    student_hidden: Tensor | None = None,
    teacher_hidden: Tensor | None = None,
    attention_mask: Tensor | None = None,
    mlm_logits: Tensor | None = None,
    mlm_labels: Tensor | None = None,
    alpha_ce: float = 5.0,
    alpha_mlm: float = 2.0,
    alpha_cos: float = 1.0,
) -> dict[str, Tensor]:
    """DistilBERT triple loss ``alpha_ce * L_ce + alpha_mlm * L_mlm + alpha_cos * L_cos``.

    * ``"ce"``: ``soft_cross_entropy(s, t, T) * T^2``. It differs from the KL form only by
      the teacher entropy, a constant w.r.t. the student, so gradients are identical.
      For token-level ``[B, T, C]`` logits, ``attention_mask`` restricts it to valid tokens.
    * ``"mlm"``: :func:`masked_lm_loss` when ``mlm_logits`` and ``mlm_labels`` are given.
    * ``"cos"``: :func:`cosine_embedding_loss` when both hidden states are given (masked
      with ``attention_mask``).
    * ``"total"``: weighted sum of the parts present.

    Parts whose inputs are None are omitted from the dict and from the total.
    """
    parts: dict[str, Tensor] = {}
    weights = {"ce": alpha_ce, "mlm": alpha_mlm, "cos": alpha_cos}
    if student_logits is not None and teacher_logits is not None:
        s = select_valid_positions(student_logits, attention_mask)
        t = select_valid_positions(teacher_logits, attention_mask)
        parts["ce"] = soft_cross_entropy(s, t, temperature) * temperature**2
    if mlm_logits is not None and mlm_labels is not None:
        parts["mlm"] = masked_lm_loss(mlm_logits, mlm_labels)
    if student_hidden is not None and teacher_hidden is not None:
        parts["cos"] = cosine_embedding_loss(student_hidden, teacher_hidden, attention_mask)
    if not parts:
        raise ValueError("distilbert_loss: no loss part has its inputs (all None)")
    total = sum(weights[k] * v for k, v in parts.items())
    return {**parts, "total": total}
