"""Tests for kd_core.losses.

Every formula is re-implemented independently in NumPy (float64, explicit per-example
loops that slice out the valid tokens) and compared with the torch code to 1e-6.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from kd_core.losses import (
    LOSSES,
    LossSpec,
    attention_mse,
    cosine_embedding_loss,
    distilbert_loss,
    get_loss,
    hard_cross_entropy,
    hidden_mse,
    kl_divergence_loss,
    masked_lm_loss,
    minilm_attention_kl,
    minilm_value_relation_kl,
    minilmv2_relation_kl,
    regression_mse,
    soft_cross_entropy,
)

TOL = 1e-6
B, H, T = 3, 2, 7
# Right padding, left padding and a hole in the middle: the mask semantics are per token.
MASK_NP = np.array(
    [
        [1, 1, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 1],
        [1, 0, 1, 1, 0, 1, 1],
    ],
    dtype=np.int64,
)


# ----------------------------------------------------------------------------- helpers


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def tt(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def mask_t() -> torch.Tensor:
    return tt(MASK_NP)


def valid_idx(mask: np.ndarray | None, b: int, n: int) -> np.ndarray:
    return np.arange(n) if mask is None else np.flatnonzero(mask[b])


def np_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_kl_row(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) of one distribution, with 0 * log 0 = 0."""
    total = 0.0
    for pi, qi in zip(p, q):
        if pi > 0:
            total += pi * math.log(pi / qi)
    return total


def np_masked_softmax_probs(scores: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Attention probabilities [B, H, T, T] with padded keys at exactly 0."""
    if mask is None:
        return np_softmax(scores)
    s = np.where(mask[:, None, None, :] == 1, scores, -np.inf)
    return np_softmax(s)


def np_relation(x: np.ndarray) -> np.ndarray:
    """softmax(x x^T / sqrt(d)) for x [n, d] (already restricted to valid tokens)."""
    d = x.shape[-1]
    scores = np.einsum("id,jd->ij", x, x) / math.sqrt(d)
    return np_softmax(scores)


# ------------------------------------------------------------------- NumPy references


def ref_attention_mse(s, t, mask=None):
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        idx = valid_idx(mask, b, s.shape[2])
        d = s[b][:, idx][:, :, idx] - t[b][:, idx][:, :, idx]
        total += float((d**2).sum())
        count += s.shape[1] * len(idx) ** 2
    return total / count


def ref_hidden_mse(s_proj, t, mask=None):
    total, count = 0.0, 0
    for b in range(s_proj.shape[0]):
        idx = valid_idx(mask, b, s_proj.shape[1])
        total += float(((s_proj[b, idx] - t[b, idx]) ** 2).sum())
        count += len(idx) * t.shape[-1]
    return total / count


def ref_soft_ce(s, t, temp):
    s2 = s.reshape(-1, s.shape[-1])
    t2 = t.reshape(-1, t.shape[-1])
    rows = []
    for si, ti in zip(s2, t2):
        p = np_softmax(ti / temp)
        logq = np_log_softmax(si / temp)
        rows.append(-float((p * logq).sum()))
    return float(np.mean(rows))


def ref_attention_kl(ps, pt, mask=None):
    total, count = 0.0, 0
    for b in range(ps.shape[0]):
        idx = valid_idx(mask, b, ps.shape[2])
        for h in range(ps.shape[1]):
            for q in idx:
                total += np_kl_row(pt[b, h, q, idx], ps[b, h, q, idx])
                count += 1
    return total / count


def ref_value_relation_kl(vs, vt, mask=None):
    total, count = 0.0, 0
    for b in range(vs.shape[0]):
        idx = valid_idx(mask, b, vs.shape[2])
        for h in range(vs.shape[1]):
            rs = np_relation(vs[b, h][idx])
            rt = np_relation(vt[b, h][idx])
            for q in range(len(idx)):
                total += np_kl_row(rt[q], rs[q])
                count += 1
    return total / count


def ref_minilmv2(xs, xt, r, mask=None):
    ds, dt = xs.shape[-1] // r, xt.shape[-1] // r
    total, count = 0.0, 0
    for b in range(xs.shape[0]):
        idx = valid_idx(mask, b, xs.shape[1])
        for a in range(r):
            rs = np_relation(xs[b][idx][:, a * ds : (a + 1) * ds])
            rt = np_relation(xt[b][idx][:, a * dt : (a + 1) * dt])
            for q in range(len(idx)):
                total += np_kl_row(rt[q], rs[q])
                count += 1
    return total / count


def ref_cosine(s, t, mask=None):
    vals = []
    for b in range(s.shape[0]):
        for i in valid_idx(mask, b, s.shape[1]):
            x, y = s[b, i], t[b, i]
            vals.append(1.0 - float(x @ y) / (np.linalg.norm(x) * np.linalg.norm(y)))
    return float(np.mean(vals))


def ref_kl_div(s, t, temp, mask=None):
    if mask is not None:
        s = np.concatenate([s[b, valid_idx(mask, b, s.shape[1])] for b in range(s.shape[0])])
        t = np.concatenate([t[b, valid_idx(mask, b, t.shape[1])] for b in range(t.shape[0])])
    s2 = s.reshape(-1, s.shape[-1])
    t2 = t.reshape(-1, t.shape[-1])
    rows = [np_kl_row(np_softmax(ti / temp), np_softmax(si / temp)) for si, ti in zip(s2, t2)]
    return float(np.mean(rows)) * temp**2


def ref_ce_hard(logits, labels):
    logits = logits.reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    vals = [
        -float(np_log_softmax(logits[i])[labels[i]]) for i in range(len(labels)) if labels[i] != -100
    ]
    return float(np.mean(vals))


# ------------------------------------------------------------- equality with NumPy


@pytest.mark.parametrize("masked", [False, True])
def test_attention_mse_matches_numpy(masked):
    g = rng(1)
    s, t = g.normal(size=(B, H, T, T)) * 2, g.normal(size=(B, H, T, T)) * 2
    mask = MASK_NP if masked else None
    got = attention_mse(tt(s), tt(t), mask_t() if masked else None).item()
    assert got == pytest.approx(ref_attention_mse(s, t, mask), abs=TOL)


@pytest.mark.parametrize("masked", [False, True])
def test_hidden_mse_with_projection_matches_numpy(masked):
    g = rng(2)
    s, t = g.normal(size=(B, T, 4)), g.normal(size=(B, T, 6))
    proj = nn.Linear(4, 6).double()
    w, bias = proj.weight.detach().numpy(), proj.bias.detach().numpy()
    s_proj = np.einsum("btd,ed->bte", s, w) + bias
    mask = MASK_NP if masked else None
    got = hidden_mse(tt(s), tt(t), projection=proj, attention_mask=mask_t() if masked else None)
    assert got.item() == pytest.approx(ref_hidden_mse(s_proj, t, mask), abs=TOL)


@pytest.mark.parametrize("masked", [False, True])
def test_hidden_mse_without_projection_matches_numpy(masked):
    g = rng(3)
    s, t = g.normal(size=(B, T, 5)), g.normal(size=(B, T, 5))
    mask = MASK_NP if masked else None
    got = hidden_mse(tt(s), tt(t), attention_mask=mask_t() if masked else None).item()
    assert got == pytest.approx(ref_hidden_mse(s, t, mask), abs=TOL)


@pytest.mark.parametrize("temp", [1.0, 2.5])
@pytest.mark.parametrize("shape", [(B, 4), (B, T, 4)])
def test_soft_cross_entropy_matches_numpy(temp, shape):
    g = rng(4)
    s, t = g.normal(size=shape) * 3, g.normal(size=shape) * 3
    got = soft_cross_entropy(tt(s), tt(t), temperature=temp).item()
    assert got == pytest.approx(ref_soft_ce(s, t, temp), abs=TOL)


@pytest.mark.parametrize("masked", [False, True])
def test_minilm_attention_kl_matches_numpy(masked):
    g = rng(5)
    mask = MASK_NP if masked else None
    ps = np_masked_softmax_probs(g.normal(size=(B, H, T, T)) * 2, mask)
    pt = np_masked_softmax_probs(g.normal(size=(B, H, T, T)) * 2, mask)
    got = minilm_attention_kl(tt(ps), tt(pt), mask_t() if masked else None).item()
    assert got == pytest.approx(ref_attention_kl(ps, pt, mask), abs=TOL)


@pytest.mark.parametrize("masked", [False, True])
def test_minilm_value_relation_kl_matches_numpy(masked):
    g = rng(6)
    vs, vt = g.normal(size=(B, H, T, 4)) * 1.5, g.normal(size=(B, H, T, 6)) * 1.5  # d_head differs
    mask = MASK_NP if masked else None
    got = minilm_value_relation_kl(tt(vs), tt(vt), mask_t() if masked else None).item()
    assert got == pytest.approx(ref_value_relation_kl(vs, vt, mask), abs=TOL)


@pytest.mark.parametrize("r", [1, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_minilmv2_relation_kl_matches_numpy(masked, r):
    g = rng(7)
    xs, xt = g.normal(size=(B, T, 12)) * 1.5, g.normal(size=(B, T, 18)) * 1.5  # widths differ
    mask = MASK_NP if masked else None
    got = minilmv2_relation_kl(tt(xs), tt(xt), r, mask_t() if masked else None).item()
    assert got == pytest.approx(ref_minilmv2(xs, xt, r, mask), abs=TOL)


@pytest.mark.parametrize("masked", [False, True])
def test_cosine_embedding_loss_matches_numpy(masked):
    g = rng(8)
    s, t = g.normal(size=(B, T, 5)), g.normal(size=(B, T, 5))
    mask = MASK_NP if masked else None
    got = cosine_embedding_loss(tt(s), tt(t), mask_t() if masked else None).item()
    assert got == pytest.approx(ref_cosine(s, t, mask), abs=TOL)


@pytest.mark.parametrize("temp", [1.0, 2.0])
@pytest.mark.parametrize("masked", [False, True])
def test_kl_divergence_loss_matches_numpy(masked, temp):
    g = rng(9)
    s, t = g.normal(size=(B, T, 6)) * 2, g.normal(size=(B, T, 6)) * 2
    mask = MASK_NP if masked else None
    got = kl_divergence_loss(tt(s), tt(t), temp, mask_t() if masked else None).item()
    assert got == pytest.approx(ref_kl_div(s, t, temp, mask), abs=TOL)


def test_masked_lm_loss_matches_numpy():
    g = rng(10)
    logits = g.normal(size=(B, T, 11)) * 2
    labels = g.integers(0, 11, size=(B, T))
    labels[g.random(size=(B, T)) < 0.5] = -100
    labels[0, 0] = 3  # at least one labelled position
    got = masked_lm_loss(tt(logits), tt(labels)).item()
    assert got == pytest.approx(ref_ce_hard(logits, labels), abs=TOL)


def test_masked_lm_loss_all_ignored_is_zero_not_nan():
    logits = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.full((2, 3), -100)
    loss = masked_lm_loss(logits, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_hard_losses_match_numpy():
    g = rng(11)
    logits, labels = g.normal(size=(5, 3)) * 2, g.integers(0, 3, size=5)
    assert hard_cross_entropy(tt(logits), tt(labels)).item() == pytest.approx(
        ref_ce_hard(logits, labels), abs=TOL
    )
    pred, target = g.normal(size=5), g.normal(size=5)
    expected = float(np.mean((pred - target) ** 2))
    assert regression_mse(tt(pred), tt(target)).item() == pytest.approx(expected, abs=TOL)
    assert regression_mse(tt(pred[:, None]), tt(target)).item() == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("masked", [False, True])
def test_distilbert_loss_matches_numpy(masked):
    g = rng(12)
    temp = 2.0
    s_logits, t_logits = g.normal(size=(B, 4)) * 2, g.normal(size=(B, 4)) * 2
    sh, th = g.normal(size=(B, T, 5)), g.normal(size=(B, T, 5))
    mlm_logits = g.normal(size=(B, T, 9))
    mlm_labels = g.integers(0, 9, size=(B, T))
    mlm_labels[:, ::2] = -100
    mask = MASK_NP if masked else None
    out = distilbert_loss(
        tt(s_logits),
        tt(t_logits),
        temp,
        student_hidden=tt(sh),
        teacher_hidden=tt(th),
        attention_mask=mask_t() if masked else None,
        mlm_logits=tt(mlm_logits),
        mlm_labels=tt(mlm_labels),
    )
    ce = ref_soft_ce(s_logits, t_logits, temp) * temp**2
    mlm = ref_ce_hard(mlm_logits, mlm_labels)
    cos = ref_cosine(sh, th, mask)
    assert set(out) == {"ce", "mlm", "cos", "total"}
    assert out["ce"].item() == pytest.approx(ce, abs=TOL)
    assert out["mlm"].item() == pytest.approx(mlm, abs=TOL)
    assert out["cos"].item() == pytest.approx(cos, abs=TOL)
    assert out["total"].item() == pytest.approx(5.0 * ce + 2.0 * mlm + 1.0 * cos, abs=TOL)


def test_distilbert_loss_omits_missing_parts():
    s, t = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    out = distilbert_loss(s, t, 2.0, alpha_ce=0.5)
    assert set(out) == {"ce", "total"}
    assert out["total"].item() == pytest.approx(0.5 * out["ce"].item(), abs=1e-12)
    h = torch.randn(3, 5, 6, dtype=torch.float64)
    out = distilbert_loss(s, t, 2.0, student_hidden=h, teacher_hidden=h + 1)
    assert set(out) == {"ce", "cos", "total"}


# --------------------------------------------------------------- student == teacher


def _same_input_cases():
    g = torch.Generator().manual_seed(13)
    scores = torch.randn(B, H, T, T, generator=g, dtype=torch.float64)
    hidden = torch.randn(B, T, 6, generator=g, dtype=torch.float64)
    values = torch.randn(B, H, T, 4, generator=g, dtype=torch.float64)
    probs = torch.softmax(scores.masked_fill(mask_t()[:, None, None, :] == 0, float("-inf")), -1)
    logits = torch.randn(B, T, 5, generator=g, dtype=torch.float64) * 3
    return {
        "attention_mse": (lambda x, m: attention_mse(x, x.clone(), m), scores),
        "hidden_mse": (lambda x, m: hidden_mse(x, x.clone(), attention_mask=m), hidden),
        "minilm_attention_kl": (lambda x, m: minilm_attention_kl(x, x.clone(), m), probs),
        "minilm_value_relation_kl": (lambda x, m: minilm_value_relation_kl(x, x.clone(), m), values),
        "minilmv2_relation_kl": (lambda x, m: minilmv2_relation_kl(x, x.clone(), 3, m), hidden),
        "cosine": (lambda x, m: cosine_embedding_loss(x, x.clone(), m), hidden),
        "kl_div": (lambda x, m: kl_divergence_loss(x, x.clone(), 2.0, m), logits),
    }


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name", list(_same_input_cases()))
def test_divergences_are_exactly_zero_when_student_equals_teacher(name, masked, dtype):
    fn, x = _same_input_cases()[name]
    out = fn(x.to(dtype), mask_t() if masked else None)
    assert out.item() == 0.0


@pytest.mark.parametrize("temp", [1.0, 3.0])
def test_soft_cross_entropy_at_equality_is_teacher_entropy_with_zero_grad(temp):
    g = rng(14)
    t = g.normal(size=(4, 5)) * 2
    p = np_softmax(t / temp)
    entropy = float(np.mean(-(p * np.log(p)).sum(axis=-1)))
    s = tt(t.copy()).requires_grad_(True)
    loss = soft_cross_entropy(s, tt(t), temperature=temp)
    assert loss.item() == pytest.approx(entropy, abs=TOL)
    loss.backward()
    assert s.grad.abs().max().item() < 1e-12


# -------------------------------------------------------------------- hand-derived


def test_hand_derived_two_class_case():
    # Teacher logits [0, ln 3] -> p = [1/4, 3/4]; student logits [0, 0] -> q = [1/2, 1/2].
    # soft CE = -(1/4 ln 1/2 + 3/4 ln 1/2) = ln 2                = 0.6931471805599453
    # KL(p||q) = 1/4 ln(1/2) + 3/4 ln(3/2) = 3/4 ln 3 - ln 2    = 0.1308120359411370
    # At T = 2 with teacher logits [0, 2 ln 3] the softened p is again [1/4, 3/4]:
    # kl_div = T^2 * KL = 4 * 0.1308120359411370                 = 0.5232481437645480
    # distilbert "ce" = T^2 * soft CE = 4 ln 2                   = 2.7725887222397811
    s = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    t1 = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    t2 = torch.tensor([[0.0, 2.0 * math.log(3.0)]], dtype=torch.float64)
    assert soft_cross_entropy(s, t1).item() == pytest.approx(0.6931471805599453, abs=1e-12)
    assert kl_divergence_loss(s, t1).item() == pytest.approx(0.1308120359411370, abs=1e-12)
    assert kl_divergence_loss(s, t2, 2.0).item() == pytest.approx(0.5232481437645480, abs=1e-12)
    assert distilbert_loss(s, t2, 2.0)["ce"].item() == pytest.approx(2.7725887222397811, abs=1e-12)


def test_hand_derived_cosine_and_attention_mse():
    # cos([1, 0], [1, 1]) = 1/sqrt(2) -> loss = 1 - 0.7071067811865476 = 0.2928932188134524
    s = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    t = torch.tensor([[[1.0, 1.0]]], dtype=torch.float64)
    assert cosine_embedding_loss(s, t).item() == pytest.approx(0.2928932188134524, abs=1e-12)
    # One head, T = 2, token 1 padded: only pair (0, 0) counts -> (3 - 0)^2 / 1 = 9.
    scores = torch.tensor([[[[3.0, 100.0], [100.0, 100.0]]]], dtype=torch.float64)
    out = attention_mse(scores, torch.zeros_like(scores), torch.tensor([[1, 0]]))
    assert out.item() == 9.0


# ---------------------------------------------------------------------- errors


def test_head_count_mismatch_errors():
    s4, t2 = torch.randn(1, 4, 3, 3), torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match=r"4 attention heads.*teacher has 2.*MiniLMv2"):
        attention_mse(s4, t2)
    with pytest.raises(ValueError, match=r"4 attention heads.*teacher has 2"):
        minilm_attention_kl(s4.softmax(-1), t2.softmax(-1))
    with pytest.raises(ValueError, match=r"4 attention heads.*teacher has 2"):
        minilm_value_relation_kl(torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8))


def test_minilmv2_heads_need_not_match_but_must_divide():
    # Student 12 = 3 x 4, teacher 18 = 3 x 6: fine even though widths differ.
    assert torch.isfinite(minilmv2_relation_kl(torch.randn(2, 5, 12), torch.randn(2, 5, 18), 3))
    with pytest.raises(ValueError, match=r"student hidden size 10 is not divisible by num_relation_heads=4"):
        minilmv2_relation_kl(torch.randn(2, 5, 10), torch.randn(2, 5, 16), 4)
    with pytest.raises(ValueError, match=r"teacher hidden size 18 is not divisible"):
        minilmv2_relation_kl(torch.randn(2, 5, 16), torch.randn(2, 5, 18), 4)


def test_hidden_dims_mismatch_without_projection_errors():
    with pytest.raises(ValueError, match=r"4 != teacher hidden size 6; add a projection"):
        hidden_mse(torch.randn(2, 3, 4), torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match=r"add a projection"):
        hidden_mse(torch.randn(2, 3, 4), torch.randn(2, 3, 6), projection=nn.Linear(4, 5))


def test_bad_mask_shape_errors():
    with pytest.raises(ValueError, match=r"attention_mask must have shape"):
        attention_mse(torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3), torch.ones(2, 4))


# -------------------------------------------------------------- gradients/numerics


def test_gradients_reach_projection():
    g = torch.Generator().manual_seed(15)
    s = torch.randn(B, T, 4, generator=g, dtype=torch.float64)
    t = torch.randn(B, T, 6, generator=g, dtype=torch.float64)
    proj = nn.Linear(4, 6).double()
    hidden_mse(s, t, projection=proj, attention_mask=mask_t()).backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    assert proj.bias.grad is not None and proj.bias.grad.abs().sum() > 0


def test_kl_numerics_finite_with_exact_teacher_zeros():
    g = torch.Generator().manual_seed(16)
    keep = mask_t()[:, None, None, :] == 1
    # Teacher has exact zeros on masked keys; the student puts tiny mass there.
    pt = torch.softmax(torch.randn(B, H, T, T, generator=g).masked_fill(~keep, float("-inf")), -1)
    assert (pt == 0).any()
    s_scores = torch.randn(B, H, T, T, generator=g).requires_grad_(True)
    loss = minilm_attention_kl(torch.softmax(s_scores, -1), pt, mask_t())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s_scores.grad).all()
    # Student with exact zeros too (also exact zeros where the teacher is not zero).
    ps = torch.softmax(torch.randn(B, H, T, T, generator=g).masked_fill(~keep, float("-inf")), -1)
    ps[0, 0, 0, 0] = 0.0
    assert torch.isfinite(minilm_attention_kl(ps, pt, mask_t()))

    # Relation losses on large-magnitude float32 inputs: masked keys underflow to 0 mass.
    for fn, s_shape, t_shape in (
        (minilm_value_relation_kl, (B, H, T, 4), (B, H, T, 6)),
        (lambda a, b, m: minilmv2_relation_kl(a, b, 2, m), (B, T, 8), (B, T, 12)),
    ):
        s = (torch.randn(s_shape, generator=g) * 100).requires_grad_(True)
        t = torch.randn(t_shape, generator=g) * 100
        loss = fn(s, t, mask_t())
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_fully_padded_example_is_ignored():
    g = torch.Generator().manual_seed(17)
    x = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    y = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    both = minilmv2_relation_kl(x, y, 2, mask)
    first_only = minilmv2_relation_kl(x[:1, :3], y[:1, :3], 2)
    assert both.item() == pytest.approx(first_only.item(), abs=1e-12)
    zero_mask = torch.zeros(2, 5)
    for v in (
        minilmv2_relation_kl(x, y, 2, zero_mask),
        hidden_mse(x, y, attention_mask=zero_mask),
        cosine_embedding_loss(x, y, zero_mask),
    ):
        assert v.item() == 0.0


# ------------------------------------------------------------------------ registry


def test_registry_names_and_projection_flag():
    assert set(LOSSES) == {
        "attention_mse",
        "hidden_mse",
        "soft_cross_entropy",
        "minilm_attention_kl",
        "minilm_value_relation_kl",
        "minilmv2_relation_kl",
        "cosine",
        "kl_div",
        "logits_mse",
        "hard_cross_entropy",
        "regression_mse",
        "qa_soft_cross_entropy",
        "qa_hard_cross_entropy",
    }
    for name, spec in LOSSES.items():
        assert isinstance(spec, LossSpec) and spec.name == name
        assert spec.accepts_projection == (name == "hidden_mse")
        assert spec.uses_labels == (name in ("hard_cross_entropy", "regression_mse", "qa_hard_cross_entropy"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        LOSSES["cosine"].accepts_projection = True  # type: ignore[misc]


def test_get_loss_unknown_lists_known_names():
    assert get_loss("kl_div") is LOSSES["kl_div"]
    with pytest.raises(ValueError, match=r"unknown loss 'nope'.*attention_mse.*minilmv2_relation_kl"):
        get_loss("nope")


def test_registry_uniform_signature_matches_direct_calls():
    g = torch.Generator().manual_seed(18)
    m = mask_t()
    scores = torch.randn(B, H, T, T, generator=g, dtype=torch.float64)
    probs_s = torch.softmax(scores, -1)
    probs_t = torch.softmax(torch.randn(B, H, T, T, generator=g, dtype=torch.float64), -1)
    hs = torch.randn(B, T, 4, generator=g, dtype=torch.float64)
    ht = torch.randn(B, T, 6, generator=g, dtype=torch.float64)
    ht4 = torch.randn(B, T, 4, generator=g, dtype=torch.float64)
    vs = torch.randn(B, H, T, 4, generator=g, dtype=torch.float64)
    vt = torch.randn(B, H, T, 6, generator=g, dtype=torch.float64)
    ls = torch.randn(B, T, 5, generator=g, dtype=torch.float64)
    lt = torch.randn(B, T, 5, generator=g, dtype=torch.float64)
    proj = nn.Linear(4, 6).double()
    cases = [
        ("attention_mse", (scores, scores * 0.5), {}, attention_mse(scores, scores * 0.5, m)),
        ("hidden_mse", (hs, ht), {"projection": proj}, hidden_mse(hs, ht, proj, m)),
        ("soft_cross_entropy", (ls, lt), {"temperature": 2.0}, soft_cross_entropy(ls[m == 1], lt[m == 1], 2.0)),
        ("minilm_attention_kl", (probs_s, probs_t), {}, minilm_attention_kl(probs_s, probs_t, m)),
        ("minilm_value_relation_kl", (vs, vt), {}, minilm_value_relation_kl(vs, vt, m)),
        ("minilmv2_relation_kl", (hs, ht), {"num_relation_heads": 2}, minilmv2_relation_kl(hs, ht, 2, m)),
        ("cosine", (hs, ht4), {}, cosine_embedding_loss(hs, ht4, m)),
        ("kl_div", (ls, lt), {"temperature": 2.0}, kl_divergence_loss(ls, lt, 2.0, m)),
    ]
    for name, (s, t), params, expected in cases:
        spec = get_loss(name)
        got = spec.fn(s, t, attention_mask=m, **params)
        assert got.dim() == 0, name
        assert got.item() == pytest.approx(expected.item(), abs=1e-12), name
        assert spec(s, t, m, **params).item() == pytest.approx(expected.item(), abs=1e-12), name
    # Config typos fail loudly instead of being ignored.
    with pytest.raises(TypeError):
        get_loss("cosine").fn(hs, ht4, None, temperature=2.0)
    with pytest.raises(TypeError):
        get_loss("attention_mse").fn(scores, scores, None, projection=proj)


def test_label_and_logit_registry_entries_match_numpy():
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(5, 3))
    labels = np.array([0, 2, 1, 1, 0])
    # cross-entropy: mean of -log softmax at the label
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    expected_ce = -log_probs[np.arange(5), labels].mean()
    got = LOSSES["hard_cross_entropy"](torch.tensor(logits), torch.tensor(labels))
    assert got.item() == pytest.approx(expected_ce, abs=1e-6)

    predictions, targets = rng.normal(size=(5, 1)), rng.normal(size=5)
    got = LOSSES["regression_mse"](torch.tensor(predictions), torch.tensor(targets))
    assert got.item() == pytest.approx(((predictions[:, 0] - targets) ** 2).mean(), abs=1e-6)

    teacher = rng.normal(size=(5, 1))
    got = LOSSES["logits_mse"](torch.tensor(predictions), torch.tensor(teacher))
    assert got.item() == pytest.approx(((predictions - teacher) ** 2).mean(), abs=1e-6)
    with pytest.raises(ValueError, match="differ"):
        LOSSES["logits_mse"](torch.zeros(5, 1), torch.zeros(5, 2))


def test_losses_and_recipes_register_themselves_once():
    """Each loss and recipe registers with a decorator beside its definition; a second
    registration under a taken name fails instead of replacing the first silently."""
    from kd_core.losses.registry import LOSSES, register_loss
    from kd_core.train.recipes import RECIPES, recipe

    assert LOSSES["hidden_mse"].accepts_projection and LOSSES["hard_cross_entropy"].uses_labels
    assert LOSSES["hidden_mse"].fn.__name__ == "_hidden_mse" and RECIPES["minilm"].__name__ == "_recipe_minilm"
    with pytest.raises(ValueError, match="loss 'hidden_mse' is registered twice"):
        register_loss("hidden_mse")(lambda s, t, attention_mask=None: s)
    with pytest.raises(ValueError, match="recipe 'minilm' is registered twice"):
        recipe("minilm")(lambda mapped, params: [])
    assert LOSSES["hidden_mse"].fn.__name__ == "_hidden_mse"  # the first stays
