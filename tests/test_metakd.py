"""Meta-KD: prototype scores and λ against hand-computed values, the domain-corruption gradient,
per-instance weighted losses against the scalar ones and NumPy, few-shot subsampling, the
meta-teacher's epoch-wise prototype refresh and the flow's cache keys."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_bert

from kd_core.losses import attention_mse, hidden_mse, soft_cross_entropy
from kd_core.metakd.core import (
    DomainCorruptionHead,
    class_prototypes,
    content_representation,
    corrupted_domain_labels,
    domain_corruption_loss,
    domain_expertise_weights,
    prototype_scores,
    subsample_fraction,
)

R2 = math.sqrt(2.0)

# Toy batch: 2 domains x 2 classes, 2-d representations.
#   i  domain class  h          class prototypes (Eq. 1)
#   0    0     0    (2, 0)      p_0^0 = mean((2,0), (0,2)) = (1, 1)
#   1    0     0    (0, 2)
#   2    0     1    (0, 1)      p_0^1 = (0, 1)
#   3    1     0    (1, 0)      p_1^0 = (1, 0)
#   4    1     1    (1, 1)      p_1^1 = mean((1,1), (-1,1)) = (0, 1)
#   5    1     1    (-1, 1)
REPS = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [-1.0, 1.0]])
DOMAINS = torch.tensor([0, 0, 0, 1, 1, 1])
LABELS = torch.tensor([0, 0, 1, 0, 1, 1])
ALPHA = 0.6  # K = 2, so the other domain's weight is (1 - 0.6) / (2 - 1) = 0.4
# Eq. 2, t_i = 0.6 cos(h_i, own prototype) + 0.4 cos(h_i, other domain's prototype of its class):
#   t0 = 0.6 cos((2,0),(1,1)) + 0.4 cos((2,0),(1,0)) = 0.6/√2 + 0.4        = 0.8242640687
#   t1 = 0.6 cos((0,2),(1,1)) + 0.4 cos((0,2),(1,0)) = 0.6/√2 + 0          = 0.4242640687
#   t2 = 0.6 cos((0,1),(0,1)) + 0.4 cos((0,1),(0,1)) = 0.6 + 0.4           = 1.0
#   t3 = 0.6 cos((1,0),(1,0)) + 0.4 cos((1,0),(1,1)) = 0.6 + 0.4/√2        = 0.8828427125
#   t4 = 0.6 cos((1,1),(0,1)) + 0.4 cos((1,1),(0,1)) = 1/√2                = 0.7071067812
#   t5 = 0.6 cos((-1,1),(0,1)) + 0.4 cos((-1,1),(0,1)) = 1/√2              = 0.7071067812
EXPECTED_SCORES = [0.8242640687, 0.4242640687, 1.0, 0.8828427125, 0.7071067812, 0.7071067812]


def test_class_prototypes_are_per_domain_class_means():
    prototypes, counts = class_prototypes(REPS, DOMAINS, LABELS, num_domains=2, num_classes=2)
    expected = torch.tensor([[[1.0, 1.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]])
    assert torch.allclose(prototypes, expected)
    assert counts.tolist() == [[2, 1], [1, 2]]


def test_prototype_scores_match_hand_computed_values():
    prototypes, _ = class_prototypes(REPS, DOMAINS, LABELS, 2, 2)
    scores = prototype_scores(REPS, DOMAINS, LABELS, prototypes, ALPHA)
    assert scores.tolist() == pytest.approx(EXPECTED_SCORES, abs=1e-6)


def test_prototype_scores_average_the_other_domains_as_numpy_does():
    generator = torch.Generator().manual_seed(0)
    reps = torch.randn(30, 5, generator=generator)
    domains = torch.arange(30) % 3
    labels = (torch.arange(30) // 3) % 2
    prototypes, _ = class_prototypes(reps, domains, labels, 3, 2)
    scores = prototype_scores(reps, domains, labels, prototypes, alpha=0.3)
    r, p = reps.numpy(), prototypes.numpy()
    for i in range(30):
        k, m = int(domains[i]), int(labels[i])
        cos = [r[i] @ p[j, m] / (np.linalg.norm(r[i]) * np.linalg.norm(p[j, m])) for j in range(3)]
        expected = 0.3 * cos[k] + 0.7 / 2 * sum(cos[j] for j in range(3) if j != k)
        assert float(scores[i]) == pytest.approx(expected, abs=1e-5)


def test_domain_expertise_weight_matches_hand_computed_values():
    # λ = (1 + t) / (1 + exp((ŷ_gold - 1)^2)), ŷ_gold the teacher's probability of the gold class:
    #   i0: logits (ln 3, 0), gold 0 -> ŷ = 0.75, (0.75-1)^2 = 0.0625 -> (1 + 0.8242640687) / 2.0644944589 = 0.8836371833
    #   i2: logits (0, 0),    gold 1 -> ŷ = 0.5,  (0.5-1)^2 = 0.25     -> 2.0 / 2.2840254167            = 0.8756469982
    #   i3: logits (-50, 50), gold 0 -> ŷ = 0,    1                    -> 1.8828427125 / (1 + e)         = 0.5063743953
    #   i5: logits (-50, 50), gold 1 -> ŷ = 1,    0                    -> 1.7071067812 / 2               = 0.8535533906
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0], [-50.0, 50.0], [-50.0, 50.0]])
    labels = torch.tensor([0, 1, 0, 1])
    scores = torch.tensor([EXPECTED_SCORES[0], EXPECTED_SCORES[2], EXPECTED_SCORES[3], EXPECTED_SCORES[5]])
    weights = domain_expertise_weights(logits, labels, scores)
    assert weights.tolist() == pytest.approx([0.8836371833, 0.8756469982, 0.5063743953, 0.8535533906], abs=1e-6)


def test_content_representation_skips_cls_and_padding():
    # positions: [CLS]=(9,9), (1,2), (3,4), pad=(100,100) -> mean of (1,2),(3,4) = (2, 3)
    hidden = torch.tensor([[[9.0, 9.0], [1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert content_representation(hidden, torch.tensor([[1, 1, 1, 0]])).tolist() == [[2.0, 3.0]]


def test_corrupted_labels_permute_the_batch_domains():
    domains = torch.tensor([0, 0, 1, 2, 2, 2])
    corrupted = corrupted_domain_labels(domains, torch.Generator().manual_seed(3))
    assert sorted(corrupted.tolist()) == sorted(domains.tolist())  # same marginal, new pairing
    assert corrupted.tolist() != domains.tolist()


def test_domain_corruption_gradient_lowers_the_true_domain_logit():
    # dL_DC/dlogits = (softmax - onehot(z̃)) / B: where the corrupted label differs from the
    # instance's domain, the true domain's logit gets a positive gradient, so a descent step
    # lowers it and raises the corrupted one.
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]], requires_grad=True)  # instances of domains 0 and 1
    corrupted = torch.tensor([1, 0])  # both labels swapped
    domain_corruption_loss(logits, corrupted).backward()
    probs = torch.softmax(logits.detach(), dim=-1)
    expected = (probs - torch.eye(2)[corrupted]) / 2
    assert torch.allclose(logits.grad, expected)
    assert logits.grad[0, 0] > 0 and logits.grad[1, 1] > 0  # true domains pushed down
    assert logits.grad[0, 1] < 0 and logits.grad[1, 0] < 0  # corrupted targets pushed up


def _identifiability(corrupt: bool, steps: int = 300) -> float:
    """Mean probability the head gives an instance's true domain after training on domain-marked
    content with true (corrupt=False) or corrupted labels."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    head = DomainCorruptionHead(num_domains=2, hidden_size=4, dropout=0.0)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5)
    domains = torch.tensor([0, 1] * 16)
    content = torch.randn(32, 4, generator=generator) * 0.1 + torch.stack([domains.float() * 2 - 1] * 4, dim=1)
    for _ in range(steps):
        targets = corrupted_domain_labels(domains, generator) if corrupt else domains
        _, logits = head(content, domains)
        loss = domain_corruption_loss(logits, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        probs = torch.softmax(head(content, domains)[1], dim=-1)
    return float(probs[torch.arange(32), domains].mean())


def test_training_on_corrupted_labels_makes_the_domain_unidentifiable(one_thread):
    # The content and the added domain embedding both reveal the domain; true labels teach the
    # head to tell domains apart, corrupted (shuffled) ones drive it to chance (1/K = 0.5).
    assert _identifiability(corrupt=False) > 0.95
    assert abs(_identifiability(corrupt=True) - 0.5) < 0.05


# ---- per-example losses --------------------------------------------------------------------
def _toy_features(seed=0):
    generator = torch.Generator().manual_seed(seed)
    scores_s, scores_t = torch.randn(3, 2, 5, 5, generator=generator), torch.randn(3, 2, 5, 5, generator=generator)
    hidden_s, hidden_t = torch.randn(3, 5, 4, generator=generator), torch.randn(3, 5, 6, generator=generator)
    logits_s, logits_t = torch.randn(3, 2, generator=generator), torch.randn(3, 2, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    return scores_s, scores_t, hidden_s, hidden_t, logits_s, logits_t, mask


def test_per_example_losses_average_to_the_scalar_losses():
    scores_s, scores_t, hidden_s, hidden_t, logits_s, logits_t, mask = _toy_features()
    projection = torch.nn.Linear(4, 6)
    for m in (None, mask):
        assert torch.allclose(attention_mse(scores_s, scores_t, m, reduction="none").mean(), attention_mse(scores_s, scores_t, m))
        assert torch.allclose(hidden_mse(hidden_s, hidden_t, projection, m, reduction="none").mean(),
                              hidden_mse(hidden_s, hidden_t, projection, m))
    assert torch.allclose(soft_cross_entropy(logits_s, logits_t, 2.0, reduction="none").mean(), soft_cross_entropy(logits_s, logits_t, 2.0))


def test_weighted_losses_match_numpy():
    scores_s, scores_t, hidden_s, hidden_t, logits_s, logits_t, mask = _toy_features(1)
    weights = np.array([0.5, 2.0, 1.25])
    m = mask.numpy().astype(float)
    # attention: example i contributes B * sum over its valid (query, key) pairs and heads / (H * all valid pairs)
    sq = (scores_s.numpy() - scores_t.numpy()) ** 2
    pair = m[:, None, :, None] * m[:, None, None, :]
    per = 3 * (sq * pair).sum(axis=(1, 2, 3)) / (pair.sum() * 2)
    got = attention_mse(scores_s, scores_t, mask, reduction="none").numpy()
    assert np.allclose(got, per, atol=1e-5)
    assert np.mean(weights * got) == pytest.approx(np.mean(weights * per), abs=1e-5)
    # hidden (no projection, equal widths): B * sum over valid tokens x d / (valid tokens x d)
    hs, ht = hidden_s.numpy(), hidden_s.numpy() * 0.5 + 1
    sq = (hs - ht) ** 2
    per = 3 * (sq * m[..., None]).sum(axis=(1, 2)) / (m.sum() * 4)
    assert np.allclose(hidden_mse(hidden_s, torch.from_numpy(ht), None, mask, reduction="none").numpy(), per, atol=1e-5)
    # soft cross-entropy at temperature 2: -softmax(t/2) . log_softmax(s/2) per row
    s, t = logits_s.numpy() / 2, logits_t.numpy() / 2
    log_s = s - np.log(np.exp(s).sum(1, keepdims=True))
    p_t = np.exp(t) / np.exp(t).sum(1, keepdims=True)
    assert np.allclose(soft_cross_entropy(logits_s, logits_t, 2.0, reduction="none").numpy(), -(p_t * log_s).sum(1), atol=1e-6)


def test_weighted_objective_with_unit_weights_is_the_plain_objective(one_thread):
    from kd_core.config import LayerMapping
    from kd_core.metakd.objectives import WeightedDistillObjective, tinybert_intermediate_matches
    from kd_core.models.adaptors import ModelAdaptor
    from kd_core.train.objective import ModelShape, Objective

    teacher = tiny_bert(layers=4, hidden=32, heads=2, intermediate=64, head="sequence_classification", seed=1)
    student = tiny_bert(layers=2, hidden=32, heads=2, intermediate=64, head="sequence_classification", seed=2)
    s_shape, t_shape = ModelShape(2, 32, 2), ModelShape(4, 32, 2)
    specs = tinybert_intermediate_matches(LayerMapping(), s_shape, t_shape)
    assert [s.projection for s in specs] == [None] * len(specs)  # equal widths: no projections
    assert {s.feature for s in specs} == {"embeddings", "attention_scores", "hidden"}
    ids = torch.randint(1000, 2000, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4])
    with torch.no_grad():
        t_out = ModelAdaptor(teacher)(input_ids=ids, attention_mask=mask)
    s_out = ModelAdaptor(student)(input_ids=ids, attention_mask=mask)
    plain, plain_terms = Objective(specs, s_shape, t_shape)(s_out, t_out)
    weighted, weighted_terms = WeightedDistillObjective(specs, s_shape, t_shape)(s_out, t_out, {})
    assert torch.allclose(plain, weighted, atol=1e-6)
    assert plain_terms.keys() == weighted_terms.keys()


def test_prediction_objective_weighs_cached_logits_by_lambda():
    from types import SimpleNamespace

    from kd_core.metakd.objectives import PredictionObjective
    from kd_core.train.objective import ModelShape

    student = torch.tensor([[0.2, -0.1], [1.0, 0.5], [-0.3, 0.4]])
    teacher = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0], [-50.0, 50.0]])
    labels, scores = torch.tensor([0, 1, 1]), torch.tensor([0.2, 0.4, 0.6])
    out = SimpleNamespace(logits=student, attention_mask=torch.ones(3, 4))
    targets = {"teacher_logits": teacher, "labels": labels, "scores": scores}
    # soft CE per row: -softmax(t) . log_softmax(s); λ = (1 + t) / (1 + exp((p_gold - 1)^2)) as in the paper
    log_s = student.numpy() - np.log(np.exp(student.numpy()).sum(1, keepdims=True))
    p_t = np.exp(teacher.numpy() - teacher.numpy().max(1, keepdims=True))
    p_t /= p_t.sum(1, keepdims=True)
    per_row = -(p_t * log_s).sum(1)
    lam = (1 + scores.numpy()) / (1 + np.exp((p_t[[0, 1, 2], [0, 1, 1]] - 1) ** 2))
    plain, _ = PredictionObjective(ModelShape(2, 8, 2), ModelShape(4, 8, 2), 1.0, weighted=False)(out, None, targets)
    weighted, terms = PredictionObjective(ModelShape(2, 8, 2), ModelShape(4, 8, 2), 1.0, weighted=True)(out, None, targets)
    assert float(plain) == pytest.approx(per_row.mean(), abs=1e-6)
    assert float(weighted) == pytest.approx((lam * per_row).mean(), abs=1e-6)
    assert float(terms["lambda"]) == pytest.approx(lam.mean(), abs=1e-6)


# ---- few-shot data ---------------------------------------------------------------------------
def _rows(n, offset=0):
    frame = pd.DataFrame({"idx": range(n), "text_a": [f"review {offset + i}" for i in range(n)], "label": [i % 4 == 0 for i in range(n)]})
    return frame.astype({"label": int})


def test_subsample_is_stratified_and_seeded():
    rows = _rows(200)  # 50 positives, 150 negatives
    kept = subsample_fraction(rows, 0.2, seed=13)
    assert kept["label"].value_counts().to_dict() == {0: 30, 1: 10}
    assert kept.equals(subsample_fraction(rows, 0.2, seed=13))
    assert not kept.equals(subsample_fraction(rows, 0.2, seed=14))
    assert subsample_fraction(rows, 0.001, seed=13)["label"].value_counts().to_dict() == {0: 1, 1: 1}
    assert subsample_fraction(rows, 1.0, seed=13).equals(rows)


def test_fraction_subsamples_only_the_target_domain(tmp_path):
    from kd_core.config import PipelineConfig
    from kd_core.stages.metakd import training_rows

    dirs = {}
    for offset, domain in enumerate(["books", "dvd", "kitchen"]):
        dirs[domain] = tmp_path / domain
        dirs[domain].mkdir()
        _rows(100, offset * 1000).to_parquet(dirs[domain] / "train.parquet")
    cfg = PipelineConfig.model_validate({"meta_kd": {"domains": ["books", "dvd", "kitchen"], "subsample_seed": 5}})
    rows = training_rows(cfg, dirs, target="dvd", fraction=0.2)
    by_domain = rows.groupby("domain")["text_a"].apply(list).to_dict()
    assert by_domain[0] == _rows(100)["text_a"].tolist()  # books whole
    assert by_domain[2] == _rows(100, 2000)["text_a"].tolist()  # kitchen whole
    assert by_domain[1] == subsample_fraction(_rows(100, 1000), 0.2, 5)["text_a"].tolist()
    assert len(by_domain[1]) == 20


# ---- meta-teacher training -------------------------------------------------------------------
def test_meta_teacher_refreshes_prototypes_at_each_epoch_start(tmp_path, one_thread):
    from kd_core.config import TrainConfig
    from kd_core.metakd.objectives import DomainBatchTrainer, MetaTeacherObjective, attach_rows
    from kd_core.train.objective import ModelShape

    model = tiny_bert(layers=2, hidden=32, heads=2, intermediate=64, head="sequence_classification", dropout=0.1)
    generator = torch.Generator().manual_seed(0)
    examples = [{"input_ids": [101, *torch.randint(1000, 2000, (6,), generator=generator).tolist(), 102], "labels": i % 2}
                for i in range(32)]
    examples = attach_rows(examples, [i % 2 for i in range(32)])
    objective = MetaTeacherObjective(ModelShape(2, 32, 2), 2, 2, len(examples), alpha=0.5, gamma1=0.5)
    seen, prototypes, current = [], [], []
    original = DomainBatchTrainer.refresh_prototypes

    class Recording(DomainBatchTrainer):
        def refresh_prototypes(self):
            seen.append(self.step)
            original(self)
            prototypes.append(self.objective.prototypes.clone())
            current.append(class_prototypes(self.encode_all(), domains, domains, 2, 2)[0])

    domains = torch.tensor([i % 2 for i in range(32)])
    config = TrainConfig(max_steps=10, batch_size=8, learning_rate=1e-3, log_every=1)  # 4 steps an epoch
    trainer = Recording(None, model, objective, examples=examples, config=config, output_dir=tmp_path, pad_token_id=0)
    fresh = trainer.encode_all()
    trainer.initial_reps = fresh * 0 + torch.arange(32.0).unsqueeze(1)  # stands in for the step-0 pass only
    result = trainer.train()
    assert seen == [0, 4, 8]  # a full pass before steps 1, 5 and 9
    assert [row.get("prototype_refresh") == 1.0 for row in result.history].count(True) == 3
    assert torch.allclose(prototypes[0], class_prototypes(trainer.initial_reps, domains, domains, 2, 2)[0])
    # later epochs encode under the weights of that moment, which have moved since step 0
    for step in (1, 2):
        assert torch.allclose(prototypes[step], current[step], atol=1e-5)
        assert not torch.allclose(prototypes[step], class_prototypes(fresh, domains, domains, 2, 2)[0], atol=1e-4)
    assert objective.prototype_counts.tolist() == [[16, 0], [0, 16]]  # domain = label here
    assert 0 < float(objective.instance_scores.min()) and float(objective.instance_scores.max()) <= 1 + 1e-6


def test_cached_representations_follow_the_rows_by_domain_and_idx(tmp_path):
    from kd_core.stages.metakd import REPS_FILE, lookup_reps

    np.savez(tmp_path / REPS_FILE, **{"books/idx": np.array([7, 3, 5]), "books/reps": np.array([[7.0], [3.0], [5.0]]),
                                      "dvd/idx": np.array([3, 9]), "dvd/reps": np.array([[30.0], [90.0]])})
    rows = pd.DataFrame({"domain": [1, 0, 0, 1], "idx": [9, 5, 3, 3]})
    assert lookup_reps(tmp_path, rows, ["books", "dvd"]).squeeze(1).tolist() == [90.0, 5.0, 3.0, 30.0]


# ---- the flow's cache keys -----------------------------------------------------------------
def test_adding_a_seed_keeps_every_existing_node_section():
    from flows.profiles import load_profile
    from tasks.stages import dag_for

    one = dag_for("meta-kd", load_profile("smoke", {"meta_kd.seeds": [1]}))
    two = dag_for("meta-kd", load_profile("smoke", {"meta_kd.seeds": [1, 2]}))
    shared = [name for name in one if name != "report"]
    assert set(shared) < set(two)
    for name in shared:
        assert one[name].section(load_profile("smoke", {"meta_kd.seeds": [1]})) == \
            two[name].section(load_profile("smoke", {"meta_kd.seeds": [1, 2]})), name
    new = set(two) - set(one)
    assert "meta_distill@books/f0.5/s2" in new and not any(n.startswith(("finetune", "meta_teacher")) for n in new)


def test_node_sections_name_their_fraction_and_seed():
    from flows.profiles import load_profile
    from tasks.stages import dag_for

    cfg = load_profile("smoke")
    dag = dag_for("meta-kd", cfg)
    student = dag["meta_distill@books/f0.5/s2"].section(cfg)
    assert (student["target"], student["fraction"], student["seed"], student["subsample_seed"]) == ("books", 0.5, 2, 13)
    mixed = dag["finetune_mixed/f1.0"].section(cfg)
    assert mixed["fraction"] == 1.0 and mixed["target"] is None and "subsample_seed" not in mixed
    assert dag["meta_teacher@dvd/f0.5"].upstream == ("prepare_task@books", "prepare_task@dvd", "encode_domains")
    assert dag["meta_distill@dvd/f0.5/s1"].upstream == ("meta_teacher@dvd/f0.5", "prepare_task@dvd")
    each = load_profile("smoke", {"meta_kd.teacher_seeds": "each"})
    assert dag_for("meta-kd", each)["distill_single@books/f1.0/s2"].upstream[0] == "finetune_teacher@books/f1.0/s2"


def test_kd_stage_names_expand_to_the_per_domain_nodes():
    import pytest as _pytest

    from flows.profiles import load_profile
    from flows.single_stage import expand_stage_name
    from tasks.stages import dag_for

    stages = list(dag_for("meta-kd", load_profile("smoke", {"meta_kd.seeds": [1], "meta_kd.fractions": [1.0]})))
    # smoke: domains books, dvd; one fraction, one seed -> one meta_distill node per domain
    assert expand_stage_name("meta_distill", stages) == ["meta_distill@books/f1.0/s1", "meta_distill@dvd/f1.0/s1"]
    assert expand_stage_name("meta_distill@dvd", stages) == ["meta_distill@dvd/f1.0/s1"]
    assert expand_stage_name("meta_distill@dvd/f1.0/s1", stages) == ["meta_distill@dvd/f1.0/s1"]
    with _pytest.raises(ValueError, match="unknown stage 'meta_dist'"):
        expand_stage_name("meta_dist", stages)
