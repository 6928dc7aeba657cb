"""The distillation objective, built from declarative matches.

A recipe preset (``tinybert_intermediate``, ``minilm``, ...) expands into a list of
:class:`~kd_core.config.MatchSpec`, using a layer-mapping strategy. :class:`Objective` turns
those specs into a module that owns the learnable projections and computes the weighted sum of
loss terms from the student's and teacher's :class:`EncoderInternals`.
"""

from __future__ import annotations

import torch
from torch import nn

from kd_core.config import MatchSpec
from kd_core.losses import get_loss

# re-exported: callers import the recipe names from the objective too
from kd_core.train.recipes import (  # noqa: F401
    HEADED_FEATURES,
    HIDDEN_FEATURES,
    OUTPUT_FEATURES,
    RECIPES,
    MappingError,
    ModelShape,
    expand_recipe,
    map_layers,
    term_name,
)


class Objective(nn.Module):
    """Weighted sum of match terms; owns the projections (saved beside the student)."""

    def __init__(self, specs: list[MatchSpec], student: ModelShape, teacher: ModelShape | None):
        super().__init__()
        if not specs:
            raise MappingError("the objective has no matches")
        self.specs = list(specs)
        self.losses = [get_loss(spec.loss) for spec in self.specs]
        self.projections = nn.ModuleDict()
        for spec, loss in zip(self.specs, self.losses):
            self._validate(spec, loss, student, teacher)
            if spec.projection and spec.projection not in self.projections:
                self.projections[spec.projection] = nn.Linear(student.hidden_size, teacher.hidden_size)

    @property
    def needs_teacher(self) -> bool:
        return any(not loss.uses_labels for loss in self.losses)

    @property
    def needs_labels(self) -> bool:
        return any(loss.uses_labels for loss in self.losses)

    @staticmethod
    def _validate(spec: MatchSpec, loss, student: ModelShape, teacher: ModelShape | None) -> None:
        name = term_name(spec)
        if loss.uses_labels:
            if spec.feature not in OUTPUT_FEATURES:
                raise MappingError(f"match {name}: {spec.loss} compares logits with the labels; set feature 'logits' (or 'qa_logits')")
            return
        if teacher is None:
            raise MappingError(f"match {name}: {spec.loss} needs a teacher, and this objective has none")
        if spec.feature not in OUTPUT_FEATURES and spec.feature != "embeddings":
            low = 0 if spec.feature == "hidden" else 1
            for who, layer, shape in (("student", spec.student_layer, student), ("teacher", spec.teacher_layer, teacher)):
                if layer is None or not low <= layer <= shape.num_layers:
                    raise MappingError(
                        f"match {name}: {who}_layer must be in {low}..{shape.num_layers} for the {who}, got {layer}"
                    )
        if spec.projection and not loss.accepts_projection:
            raise MappingError(f"match {name}: loss {spec.loss!r} takes no projection")
        if spec.projection and spec.feature not in HIDDEN_FEATURES:
            raise MappingError(f"match {name}: projections apply to hidden states and embeddings only")
        if spec.feature in HIDDEN_FEATURES and not spec.projection and student.hidden_size != teacher.hidden_size:
            raise MappingError(
                f"match {name}: student hidden {student.hidden_size} != teacher hidden {teacher.hidden_size}; "
                f"set projection (e.g. 'W_h') on this match"
            )
        if spec.feature in HEADED_FEATURES and student.num_heads != teacher.num_heads:
            raise MappingError(
                f"match {name}: student has {student.num_heads} heads and the teacher {teacher.num_heads}; "
                f"{spec.loss} compares heads one to one, so set student.num_heads={teacher.num_heads} "
                f"or use the minilmv2 recipe, whose relation heads need no equal head counts"
            )

    def forward(self, student_out, teacher_out, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = student_out.attention_mask
        terms: dict[str, torch.Tensor] = {}
        total = None
        for spec, loss in zip(self.specs, self.losses):
            s_feat = student_out.feature(spec.feature, spec.student_layer).float()
            if loss.uses_labels:
                if labels is None:
                    raise ValueError(f"match {term_name(spec)} needs labels, and the batch has none")
                target = labels
            else:
                target = teacher_out.feature(spec.feature, spec.teacher_layer).float()
            kwargs = dict(spec.params)
            if spec.projection:
                kwargs["projection"] = self.projections[spec.projection]
            value = loss.fn(s_feat, target, attention_mask=mask, **kwargs)
            terms[term_name(spec)] = value.detach()
            weighted = spec.weight * value
            total = weighted if total is None else total + weighted
        return total, terms
