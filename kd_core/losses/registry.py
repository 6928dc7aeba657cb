"""Name -> loss lookup so training code can pick distillation losses from config data.

Every registered ``fn`` has the same call signature::

    fn(student_feature, teacher_feature, attention_mask=None, **params) -> scalar Tensor

Unknown ``params`` raise ``TypeError`` (keyword-only arguments), so config typos fail loudly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor

from ._common import select_valid_positions
from .distilbert import cosine_embedding_loss, kl_divergence_loss
from .hard import hard_cross_entropy, regression_mse
from .minilm import minilm_attention_kl, minilm_value_relation_kl, minilmv2_relation_kl
from .qa import qa_hard_cross_entropy, qa_soft_cross_entropy
from .tinybert import attention_mse, hidden_mse, soft_cross_entropy

__all__ = ["LossSpec", "LOSSES", "get_loss", "register_loss"]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: ``fn(student, teacher, attention_mask=None, **params)``.

    ``accepts_projection`` tells the trainer whether a learnable student->teacher
    projection can be passed as ``projection=`` (only width-matching losses).
    ``uses_labels`` marks ground-truth losses: the trainer passes the batch labels in place
    of the teacher feature.
    ``per_example`` marks losses whose ``fn`` also takes ``reduction="none"`` and then returns
    ``[B]`` per-example terms whose mean is the scalar loss (per-instance weighting, Meta-KD).
    """

    name: str
    fn: Callable[..., Tensor]
    accepts_projection: bool = False
    uses_labels: bool = False
    per_example: bool = False

    def __call__(
        self,
        student_feature: Tensor,
        teacher_feature: Tensor,
        attention_mask: Tensor | None = None,
        **params: Any,
    ) -> Tensor:
        return self.fn(student_feature, teacher_feature, attention_mask, **params)


LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, **flags: bool):
    """Registers the decorated ``fn(student, teacher, attention_mask=None, **params)`` as loss
    ``name`` (``flags``: the :class:`LossSpec` switches); a config's ``loss:`` may then name it."""
    def register(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        LOSSES[name] = LossSpec(name, fn, **flags)
        return fn
    return register


# Adapters are module-level functions (not lambdas) so specs stay picklable; each registers itself.


@register_loss("attention_mse", per_example=True)
def _attention_mse(student, teacher, attention_mask=None, *, reduction="mean"):
    return attention_mse(student, teacher, attention_mask, reduction=reduction)


@register_loss("hidden_mse", accepts_projection=True, per_example=True)
def _hidden_mse(student, teacher, attention_mask=None, *, projection=None, reduction="mean"):
    return hidden_mse(student, teacher, projection=projection, attention_mask=attention_mask, reduction=reduction)


@register_loss("soft_cross_entropy", per_example=True)
def _soft_cross_entropy(student, teacher, attention_mask=None, *, temperature=1.0, reduction="mean"):
    if reduction == "none" and student.dim() != 2:
        raise ValueError("soft_cross_entropy: per-example values need sequence-level [B, C] logits")
    student = select_valid_positions(student, attention_mask)
    teacher = select_valid_positions(teacher, attention_mask)
    return soft_cross_entropy(student, teacher, temperature, reduction=reduction)


@register_loss("minilm_attention_kl")
def _minilm_attention_kl(student, teacher, attention_mask=None):
    return minilm_attention_kl(student, teacher, attention_mask)


@register_loss("minilm_value_relation_kl")
def _minilm_value_relation_kl(student, teacher, attention_mask=None):
    return minilm_value_relation_kl(student, teacher, attention_mask)


@register_loss("minilmv2_relation_kl")
def _minilmv2_relation_kl(student, teacher, attention_mask=None, *, num_relation_heads):
    return minilmv2_relation_kl(student, teacher, num_relation_heads, attention_mask)


@register_loss("cosine")
def _cosine(student, teacher, attention_mask=None):
    return cosine_embedding_loss(student, teacher, attention_mask)


@register_loss("kl_div")
def _kl_div(student, teacher, attention_mask=None, *, temperature=1.0):
    return kl_divergence_loss(student, teacher, temperature, attention_mask)


@register_loss("hard_cross_entropy", uses_labels=True)
def _hard_cross_entropy(student, labels, attention_mask=None):
    return hard_cross_entropy(student, labels)


@register_loss("regression_mse", uses_labels=True)
def _regression_mse(student, labels, attention_mask=None):
    return regression_mse(student, labels)


@register_loss("logits_mse")
def _logits_mse(student, teacher, attention_mask=None):
    # TinyBERT's prediction-layer loss for regression tasks (STS-B): MSE between the outputs.
    if student.shape != teacher.shape:
        raise ValueError(f"logits_mse: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ")
    return ((student.float() - teacher.float()) ** 2).mean()


@register_loss("qa_soft_cross_entropy")
def _qa_soft_cross_entropy(student, teacher, attention_mask=None, *, temperature=1.0):
    return qa_soft_cross_entropy(student, teacher, attention_mask, temperature)


@register_loss("qa_hard_cross_entropy", uses_labels=True)
def _qa_hard_cross_entropy(student, positions, attention_mask=None):
    return qa_hard_cross_entropy(student, positions, attention_mask)


def get_loss(name: str) -> LossSpec:
    """Return the registered :class:`LossSpec` for ``name``; ValueError lists known names."""
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}"
        ) from None
