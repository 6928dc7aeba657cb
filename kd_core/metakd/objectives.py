"""Meta-KD's two training objectives, and the trainer that feeds them per-instance fields.

Both objectives plug into :class:`~kd_core.train.trainer.DistillTrainer` (checkpoints, exact
resume, accelerate/DDP, history) through its ``batch_targets`` hook: the objective receives a
dict with the batch's labels, domain ids and row numbers instead of bare labels.

* :class:`MetaTeacherObjective` - §3.2: ``mean_i t_i CE_i + γ1 L_DC`` with the prototype scores
  of Eq. 2, recomputed from a full no-grad pass at the start of every epoch (Eq. 1).
* :class:`WeightedDistillObjective` - §3.3: TinyBERT's intermediate matches, each averaged over
  instances with a per-instance weight. Weights of 1 give the plain TinyBERT objective (the
  baselines); :class:`MetaDistillObjective` weighs by the domain-expertise λ and adds the
  transferable-knowledge loss on the domain-aware representations (γ2).
* :class:`PredictionObjective` - TinyBERT's prediction-layer step, against cached teacher
  logits, weighted by λ for Meta-KD.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_core.config import LayerMapping, MatchSpec
from kd_core.metakd.core import (
    DomainCorruptionHead,
    class_prototypes,
    content_representation,
    corrupted_domain_labels,
    domain_corruption_loss,
    domain_expertise_weights,
    prototype_scores,
)
from kd_core.train.data import pad_batch
from kd_core.train.objective import MappingError, ModelShape, Objective, expand_recipe, term_name
from kd_core.train.trainer import DistillTrainer, _model_inputs


def tinybert_intermediate_matches(mapping: LayerMapping, student: ModelShape, teacher: ModelShape) -> list[MatchSpec]:
    """TinyBERT's embedding, attention and hidden matches (Eq. 7-9 of TinyBERT). The W_e/W_h
    projections are dropped when the widths agree: a student copied from teacher layers already
    lives in the teacher's space, and a fresh random projection would first have to learn the
    identity."""
    specs = expand_recipe("tinybert_intermediate", mapping, student.num_layers, teacher.num_layers)
    if student.hidden_size == teacher.hidden_size:
        specs = [spec.model_copy(update={"projection": None}) for spec in specs]
    return specs


@torch.no_grad()
def encode_content(model, examples: Sequence[dict], pad_token_id: int, device=None, batch_size: int = 64) -> Tensor:
    """``h(X)`` (:func:`content_representation` of the last layer) of every example, dropout off: ``[N, d]``."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    reps = []
    for start in range(0, len(examples), batch_size):
        batch = pad_batch(list(examples[start : start + batch_size]), pad_token_id)
        inputs = {k: v.to(device) for k, v in _model_inputs(batch).items()}
        out = model(**inputs, output_hidden_states=True)
        reps.append(content_representation(out.hidden_states[-1].float(), inputs["attention_mask"]))
    model.train(was_training)
    return torch.cat(reps)


class DomainBatchTrainer(DistillTrainer):
    """A DistillTrainer whose objective gets ``{"labels", "domains", "rows"}`` per batch.

    Examples carry ``domain`` (an index into the domain list) and ``row`` (their position in
    ``examples``). A :class:`MetaTeacherObjective` also gets its prototypes refreshed at the start
    of each epoch; they live in the objective's buffers, so checkpoints hold them and a resumed
    run continues with exactly the prototypes it had. ``initial_reps`` (``[N, d]``) stands in
    for the first pass when given: the pre-trained encoder's ``h(X)``, which is the same for
    every meta-teacher that starts from it, so the flow computes it once per domain.
    """

    initial_reps: Tensor | None = None

    def batch_targets(self, examples: list[dict], batch: dict[str, Tensor], device):
        targets = {
            "labels": batch["labels"].to(device),
            "domains": torch.as_tensor([ex["domain"] for ex in examples], device=device),
            "rows": torch.as_tensor([ex["row"] for ex in examples], device=device),
        }
        for field, key in (("score", "scores"), ("teacher_logits", "teacher_logits")):
            if field in examples[0]:
                targets[key] = torch.as_tensor([ex[field] for ex in examples], dtype=torch.float32, device=device)
        return targets

    @property
    def objective(self):
        return self.unwrapped.objective

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prototype_refresh = PrototypeRefresh()
        if isinstance(self.objective, MetaTeacherObjective):
            self.callbacks.insert(0, self.prototype_refresh)  # before any callback sees the step

    @property
    def prototype_refreshes(self) -> int:
        """Refreshes in this process (a resumed run counts from its resume point)."""
        return self.prototype_refresh.count

    def encode_all(self) -> Tensor:
        """``h(X)`` of every example under the current weights."""
        return encode_content(self.student, self.examples, self.pad_token_id, self.accelerator.device)

    def refresh_prototypes(self) -> None:
        """Eq. 1 from a full pass over the training rows, then every row's Eq. 2 score."""
        if self.step == 0 and self.initial_reps is not None:
            if self.initial_reps.shape[0] != len(self.examples):
                raise ValueError(f"initial_reps has {self.initial_reps.shape[0]} rows for {len(self.examples)} examples")
            reps = self.initial_reps.to(self.accelerator.device)
        else:
            reps = self.encode_all()
        objective = self.objective
        device = reps.device
        domains = torch.as_tensor([ex["domain"] for ex in self.examples], device=device)
        labels = torch.as_tensor([ex["labels"] for ex in self.examples], device=device)
        prototypes, counts = class_prototypes(reps, domains, labels, objective.num_domains, objective.num_classes)
        objective.prototypes.copy_(prototypes)
        objective.prototype_counts.copy_(counts)
        objective.instance_scores.copy_(prototype_scores(reps, domains, labels, prototypes, objective.alpha))


class PrototypeRefresh:
    """Trainer callback: a meta-teacher's prototypes and instance scores (Eq. 1-2) recomputed at
    the start of every epoch, and the step marked ``prototype_refresh``."""

    def __init__(self):
        self.count = 0

    def on_epoch_begin(self, trainer: DomainBatchTrainer, epoch: int) -> dict:
        trainer.refresh_prototypes()
        self.count += 1
        return {"prototype_refresh": 1.0}


class MetaTeacherObjective(Objective):
    """§3.2: ``L_T = mean_i t_i · CE(f(X_i), y_i) + γ1 · L_DC``.

    ``t_i`` (Eq. 2) is looked up by row from ``instance_scores``, which
    :meth:`DomainBatchTrainer.refresh_prototypes` fills each epoch; ``L_DC`` trains the
    :class:`DomainCorruptionHead` (and, through ``h(X)``, the encoder) against shuffled domain
    labels. The classifier head is the model's own (a ``*ForSequenceClassification``), so the
    meta-teacher stays a plain Hugging Face classifier for evaluation.

    ``normalize_scores`` divides the weights by their mean over the training rows: the cosines'
    level depends on the encoder (≈0.9 for BERT-base's mean-pooled states, ≈0.3 for MiniLM's),
    and under Adam only the ratio of the weighted cross-entropy to ``γ1 L_DC`` matters, so raw
    scores would silently turn γ1 into a different trade-off per encoder. The ranking of
    instances, which is the method, is unchanged; ``instance_scores`` keeps the raw t_i.
    """

    def __init__(self, shape: ModelShape, num_domains: int, num_classes: int, num_examples: int,
                 alpha: float, gamma1: float, dropout: float = 0.1, normalize_scores: bool = False):
        super().__init__([MatchSpec(feature="logits", loss="hard_cross_entropy")], shape, None)
        self.num_domains, self.num_classes = num_domains, num_classes
        self.alpha, self.gamma1, self.normalize_scores = alpha, gamma1, normalize_scores
        self.domain_head = DomainCorruptionHead(num_domains, shape.hidden_size, dropout)
        self.register_buffer("prototypes", torch.zeros(num_domains, num_classes, shape.hidden_size))
        self.register_buffer("prototype_counts", torch.zeros(num_domains, num_classes, dtype=torch.long))
        self.register_buffer("instance_scores", torch.ones(num_examples))

    def forward(self, student_out, teacher_out, targets: dict) -> tuple[Tensor, dict[str, Tensor]]:
        labels, domains = targets["labels"], targets["domains"]
        scores = self.instance_scores[targets["rows"]]
        if self.normalize_scores:
            scores = scores / self.instance_scores.mean().clamp_min(1e-6)
        cross_entropy = F.cross_entropy(student_out.logits.float(), labels.long(), reduction="none")
        weighted = (scores * cross_entropy).mean()
        content = content_representation(student_out.hidden(student_out.num_layers).float(), student_out.attention_mask)
        _, domain_logits = self.domain_head(content, domains)
        corruption = domain_corruption_loss(domain_logits, corrupted_domain_labels(domains))
        total = weighted + self.gamma1 * corruption
        terms = {
            "logits:prototype_weighted_cross_entropy": weighted.detach(),
            "domain:corruption_cross_entropy": corruption.detach(),
            "prototype_weight": scores.mean().detach(),
        }
        return total, terms


class WeightedDistillObjective(Objective):
    """TinyBERT's task-distillation matches, each a per-instance weighted mean.

    Term j is ``mean_i w_i · l_ij`` with ``l_ij`` the loss's per-example values
    (``reduction="none"``: their plain mean is the scalar loss), so with ``w ≡ 1`` this is exactly
    :class:`~kd_core.train.objective.Objective`. The weights come from :meth:`instance_weights`
    (ones here).
    """

    def __init__(self, specs: list[MatchSpec], student: ModelShape, teacher: ModelShape):
        super().__init__(specs, student, teacher)
        lacking = [spec.loss for spec, loss in zip(self.specs, self.losses) if not loss.per_example]
        if lacking:
            raise MappingError(f"losses {sorted(set(lacking))} give no per-example values; "
                               f"per-instance weighting needs losses registered with per_example=True")

    def instance_weights(self, student_out, teacher_out, targets: dict) -> Tensor:
        return torch.ones(student_out.attention_mask.shape[0], device=student_out.attention_mask.device)

    def weighted_terms(self, student_out, teacher_out, weights: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        mask = student_out.attention_mask
        total, terms = None, {}
        for spec, loss in zip(self.specs, self.losses):
            s_feat = student_out.feature(spec.feature, spec.student_layer).float()
            t_feat = teacher_out.feature(spec.feature, spec.teacher_layer).float()
            kwargs = dict(spec.params)
            if spec.projection:
                kwargs["projection"] = self.projections[spec.projection]
            per_example = loss.fn(s_feat, t_feat, attention_mask=mask, reduction="none", **kwargs)
            terms[term_name(spec)] = per_example.mean().detach()
            value = spec.weight * (weights * per_example).mean()
            total = value if total is None else total + value
        return total, terms

    def forward(self, student_out, teacher_out, targets=None) -> tuple[Tensor, dict[str, Tensor]]:
        weights = self.instance_weights(student_out, teacher_out, targets)
        return self.weighted_terms(student_out, teacher_out, weights)


class DomainAwareProjection(nn.Module):
    """The student's side of the transferable-knowledge loss: its own domain embeddings and dense
    layer (the meta-teacher's ``h_d`` form), then ``W_d`` into the teacher's width."""

    def __init__(self, num_domains: int, student_hidden: int, teacher_hidden: int):
        super().__init__()
        self.domain_embeddings = nn.Embedding(num_domains, student_hidden)
        self.dense = nn.Linear(student_hidden, student_hidden)
        self.to_teacher = nn.Linear(student_hidden, teacher_hidden)

    def forward(self, content: Tensor, domains: Tensor) -> Tensor:
        aware = torch.tanh(self.dense(content + self.domain_embeddings(domains.long())))
        return self.to_teacher(aware)


class MetaDistillObjective(WeightedDistillObjective):
    """§3.3 meta-distillation: every TinyBERT term weighted per instance by the domain-expertise
    weight ``λ_i`` - from the meta-teacher's live probability of the gold class and the instance's
    Eq. 2 score ``t_i`` as the meta-teacher last computed it (``targets["scores"]``; EasyNLP
    likewise reads precomputed scores) - plus ``γ2 · mean_i λ_i MSE(W_d h_d^S, h_d^T)``, the
    transferable-knowledge loss on the domain-aware representations.

    The meta-teacher's corruption head is frozen here; the student's
    :class:`DomainAwareProjection` is a projection (saved beside the student, unused at inference).
    """

    TRANSFER = "domain_aware:transfer_mse"

    def __init__(self, specs: list[MatchSpec], student: ModelShape, teacher: ModelShape,
                 teacher_head: DomainCorruptionHead, gamma2: float):
        super().__init__(specs, student, teacher)
        self.teacher_head = teacher_head
        for param in self.teacher_head.parameters():
            param.requires_grad_(False)
        self.teacher_head.eval()
        self.gamma2 = gamma2
        num_domains = teacher_head.domain_embeddings.num_embeddings
        self.projections["domain_aware"] = DomainAwareProjection(num_domains, student.hidden_size, teacher.hidden_size)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher_head.eval()  # frozen: no dropout on the teacher side
        return self

    def forward(self, student_out, teacher_out, targets: dict) -> tuple[Tensor, dict[str, Tensor]]:
        labels, domains, scores = targets["labels"], targets["domains"], targets["scores"]
        mask = student_out.attention_mask
        with torch.no_grad():
            teacher_content = content_representation(teacher_out.hidden(teacher_out.num_layers).float(), mask)
            weights = domain_expertise_weights(teacher_out.logits, labels, scores)
            teacher_aware = self.teacher_head.domain_aware(teacher_content, domains)
        total, terms = self.weighted_terms(student_out, teacher_out, weights)
        student_content = content_representation(student_out.hidden(student_out.num_layers).float(), mask)
        student_aware = self.projections["domain_aware"](student_content, domains)
        transfer = (student_aware - teacher_aware).pow(2).mean(dim=-1)  # [B]
        total = total + self.gamma2 * (weights * transfer).mean()
        terms[self.TRANSFER] = transfer.mean().detach()
        terms["lambda"] = weights.mean().detach()
        terms["prototype_score"] = scores.mean().detach()
        return total, terms


class PredictionObjective(Objective):
    """TinyBERT's prediction-layer step (Eq. 10 soft cross-entropy at ``temperature``) against
    teacher logits cached with the examples (``targets["teacher_logits"]``): the teacher's forward
    ran once in its own stage, so this step costs only the student's. With ``weighted`` each
    instance counts ``λ_i`` (from those logits and ``targets["scores"]``), else 1.
    """

    def __init__(self, student: ModelShape, teacher: ModelShape, temperature: float, weighted: bool):
        spec = MatchSpec(feature="logits", loss="soft_cross_entropy", params={"temperature": temperature})
        super().__init__([spec], student, teacher)
        self.temperature, self.weighted = temperature, weighted

    @property
    def needs_teacher(self) -> bool:  # the logits come with the batch
        return False

    def forward(self, student_out, teacher_out, targets: dict) -> tuple[Tensor, dict[str, Tensor]]:
        teacher_logits = targets["teacher_logits"]
        per_example = self.losses[0].fn(student_out.logits.float(), teacher_logits, reduction="none",
                                        temperature=self.temperature)
        terms = {term_name(self.specs[0]): per_example.mean().detach()}
        if self.weighted:
            weights = domain_expertise_weights(teacher_logits, targets["labels"], targets["scores"])
            terms["lambda"] = weights.mean().detach()
        else:
            weights = torch.ones_like(per_example)
        return (weights * per_example).mean(), terms


def attach_rows(examples: Sequence[dict], domains: Sequence[int]) -> list[dict]:
    """Examples with their ``domain`` index and ``row`` position (what DomainBatchTrainer reads)."""
    if len(examples) != len(domains):
        raise ValueError(f"{len(examples)} examples but {len(domains)} domain ids")
    return [{**ex, "domain": int(d), "row": i} for i, (ex, d) in enumerate(zip(examples, domains))]
