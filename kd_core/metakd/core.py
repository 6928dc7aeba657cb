"""The Meta-KD math (Pan et al., "Meta-KD: A Meta Knowledge Distillation Framework for Language
Model Compression across Domains", ACL 2021, arXiv 2012.01266), as pure tensor functions.

§3.2, meta-teacher learning:

* Eq. 1, class prototypes  ``p_k^m = mean{ h(X_i) : X_i in D_k, y_i = m }``  -> :func:`class_prototypes`
* Eq. 2, prototype scores  ``t_i = α cos(h_i, p_k^m) + (1-α)/(K-1) Σ_{k'≠k} cos(h_i, p_k'^m)``
  for instance i of domain k and class m -> :func:`prototype_scores`
* the instance-weighted cross-entropy ``L_T1 = mean_i t_i CE(f(X_i), y_i)`` and the
  domain-corrupted loss ``L_DC = mean_i CE(g(h_d(X_i)), z̃_i)`` on the domain-aware representation
  ``h_d(X_i) = tanh(W (h(X_i) + E_D[k_i]) + b)`` with corrupted domain labels z̃ -> :class:`DomainCorruptionHead`,
  :func:`corrupted_domain_labels`; the meta-teacher minimises ``L_T1 + γ1 L_DC``.

§3.3, meta-distillation:

* the domain-expertise weight ``λ_i = (1 + t_i) / (1 + exp((ŷ_i - 1)²))`` with ŷ_i the meta-teacher's
  probability of the gold class -> :func:`domain_expertise_weights`
* the transferable-knowledge loss ``MSE(W_d h_d^S(X_i), h_d^T(X_i))`` on the domain-aware
  representations, weighted by γ2 (in :mod:`kd_core.metakd.objectives`).

Where the paper leaves a choice open we follow EasyNLP's released implementation
(``easynlp/distillation/distill_metakd_application.py`` and the ``metakd`` example): ``h(X)`` is the
mean of the last layer's token states after ``[CLS]`` (we mask padding, EasyNLP averages it in);
the corrupted labels are the batch's domain ids, shuffled; λ's gold-class term is EasyNLP's
``1 / (exp(Σ((p - onehot)·onehot)²) + 1)``. Only Eq. 1 and Eq. 2 are cited by number: the
rest by the paper's section and symbol names.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def content_representation(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """``h(X)``: ``[B, d]`` mean of the token states after ``[CLS]``, over valid tokens only.

    ``hidden`` is the last layer's ``[B, T, d]``; ``attention_mask`` ``[B, T]`` 1/0.
    """
    if hidden.dim() != 3 or tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"content_representation: expected hidden [B, T, d] and mask [B, T], got "
            f"{tuple(hidden.shape)} and {tuple(attention_mask.shape)}"
        )
    mask = attention_mask[:, 1:].to(hidden.dtype).unsqueeze(-1)
    return (hidden[:, 1:] * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


def class_prototypes(reps: Tensor, domains: Tensor, labels: Tensor, num_domains: int, num_classes: int) -> tuple[Tensor, Tensor]:
    """Eq. 1: ``p_k^m``, the mean representation of domain k's class-m instances.

    Returns ``(prototypes [K, M, d], counts [K, M])``. A (domain, class) pair without instances
    keeps a zero prototype, whose cosine with anything is 0 (``F.cosine_similarity``'s eps).
    """
    if reps.dim() != 2 or domains.shape != reps.shape[:1] or labels.shape != reps.shape[:1]:
        raise ValueError(
            f"class_prototypes: expected reps [N, d], domains [N], labels [N]; got {tuple(reps.shape)}, "
            f"{tuple(domains.shape)}, {tuple(labels.shape)}"
        )
    cell = domains.long() * num_classes + labels.long()
    if len(cell) and (int(cell.min()) < 0 or int(cell.max()) >= num_domains * num_classes):
        raise ValueError(f"class_prototypes: a domain id is outside 0..{num_domains - 1} or a label outside 0..{num_classes - 1}")
    sums = torch.zeros(num_domains * num_classes, reps.shape[1], dtype=reps.dtype, device=reps.device)
    sums.index_add_(0, cell, reps)
    counts = torch.bincount(cell, minlength=num_domains * num_classes).to(reps.device)
    prototypes = sums / counts.clamp_min(1).to(reps.dtype).unsqueeze(1)
    return prototypes.view(num_domains, num_classes, -1), counts.view(num_domains, num_classes)


def prototype_scores(reps: Tensor, domains: Tensor, labels: Tensor, prototypes: Tensor, alpha: float) -> Tensor:
    """Eq. 2: ``t_i = α cos(h_i, p_{k_i}^{y_i}) + (1-α)/(K-1) Σ_{k'≠k_i} cos(h_i, p_{k'}^{y_i})``.

    How typical instance i is of its class, in its own domain (weight α) and across the other
    K-1 domains: transferable instances score high. ``prototypes`` is ``[K, M, d]``; returns ``[B]``.
    """
    num_domains = prototypes.shape[0]
    if num_domains < 2:
        raise ValueError("prototype_scores: Meta-KD needs at least 2 domains")
    same_class = prototypes[:, labels.long()]  # [K, B, d]: every domain's prototype of i's class
    cosines = F.cosine_similarity(reps.unsqueeze(0).to(same_class.dtype), same_class, dim=-1)  # [K, B]
    rows = torch.arange(reps.shape[0], device=reps.device)
    own = cosines[domains.long(), rows]
    others = (cosines.sum(dim=0) - own) / (num_domains - 1)
    return alpha * own + (1.0 - alpha) * others


def domain_expertise_weights(teacher_logits: Tensor, labels: Tensor, scores: Tensor) -> Tensor:
    """§3.3, the domain-expertise weight ``λ_i = (1 + t_i) / (1 + exp((ŷ_i - 1)²))``.

    ``ŷ_i`` is the meta-teacher's softmax probability of the gold class y_i and ``t_i`` the
    prototype score (Eq. 2): instances the meta-teacher gets right and finds transferable weigh
    most. With ŷ = 1 the factor is 1/2, with ŷ = 0 it is 1/(1+e).
    """
    probs = torch.softmax(teacher_logits.float(), dim=-1)
    gold = probs.gather(1, labels.long().view(-1, 1)).squeeze(1)
    return (1.0 + scores.float()) / (1.0 + torch.exp((gold - 1.0) ** 2))


def corrupted_domain_labels(domains: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """z̃: the batch's domain ids in a random order (EasyNLP's corruption). The label marginal of
    the batch is kept, the pairing with the instance is random."""
    order = torch.randperm(domains.shape[0], generator=generator, device="cpu").to(domains.device)
    return domains[order]


class DomainCorruptionHead(nn.Module):
    """The meta-teacher's sub-network for domain corruption (§3.2), with learnable domain embeddings.

    ``h_d(X_i) = tanh(W (h(X_i) + E_D[k_i]) + b)`` adds the instance's domain embedding to its
    content representation; a linear domain classifier reads ``dropout(h_d)``. Trained against
    corrupted domain labels (:func:`domain_corruption_loss`), it pushes the encoder toward
    representations from which the domain cannot be told apart; ``h_d`` is the domain-aware
    representation the students match (the transferable-knowledge loss).
    """

    def __init__(self, num_domains: int, hidden_size: int, dropout: float = 0.1):
        super().__init__()
        self.domain_embeddings = nn.Embedding(num_domains, hidden_size)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_domains)

    def domain_aware(self, content: Tensor, domains: Tensor) -> Tensor:
        return torch.tanh(self.dense(content + self.domain_embeddings(domains.long())))

    def forward(self, content: Tensor, domains: Tensor) -> tuple[Tensor, Tensor]:
        """``(h_d [B, d], domain_logits [B, K])``."""
        aware = self.domain_aware(content, domains)
        return aware, self.classifier(self.dropout(aware))


def domain_corruption_loss(domain_logits: Tensor, corrupted: Tensor) -> Tensor:
    """``L_DC``: cross-entropy of the domain classifier against the corrupted labels z̃ (mean)."""
    return F.cross_entropy(domain_logits.float(), corrupted.long())


# ---- few-shot data -----------------------------------------------------------------------------
def subsample_fraction(rows: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """Keep ``fraction`` of the rows, stratified by label (at least one row per label), seeded.

    The same (rows, fraction, seed) always keeps the same rows, in the input's order; 1.0 keeps
    them all. Stratifying keeps every class present, which Eq. 1 needs in each domain.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return rows.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for _, group in rows.groupby("label", sort=True):
        count = max(1, int(math.floor(fraction * len(group) + 0.5)))
        keep.extend(rng.choice(group.index.to_numpy(), size=count, replace=False).tolist())
    return rows.loc[sorted(keep)].reset_index(drop=True)
