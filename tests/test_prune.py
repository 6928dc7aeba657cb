"""student.init 'pruned': Minitron-style importance pruning of BERT, RoBERTa and MPNet teachers.

Every expectation is derived independently of kd_core.models.prune: by construction (units made
dead on purpose), or by a NumPy forward pass written here from the teacher's weights and the
kept indices.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import transformers as tf

from kd_core.config import LayerMapping, PipelineConfig, StudentConfig
from kd_core.models.prune import PruneError, collect_importance, plan_pruning, prune_model
from kd_core.models.student import build_student, calibration_batches, init_projections_from_channels
from kd_core.train.objective import MappingError, map_layers

ARCHS = {
    "bert": (tf.BertConfig, tf.BertModel, tf.BertForSequenceClassification),
    "roberta": (tf.RobertaConfig, tf.RobertaModel, tf.RobertaForSequenceClassification),
    "mpnet": (tf.MPNetConfig, tf.MPNetModel, tf.MPNetForSequenceClassification),
}


def toy_config(arch, layers=3, hidden=48, heads=4, intermediate=96, **extra):
    config_cls = ARCHS[arch][0]
    return config_cls(vocab_size=120, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=intermediate, max_position_embeddings=40, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, num_labels=3, pad_token_id=1, **extra)


def toy_model(arch, head=False, seed=0, **sizes):
    torch.manual_seed(seed)
    config = toy_config(arch, **sizes)
    model = (ARCHS[arch][2] if head else ARCHS[arch][1])(config).eval()
    with torch.no_grad():  # non-trivial LayerNorms, so slicing them is really tested
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    return model


def toy_batches(seed=1, batches=2, batch=4, length=11):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        ids = torch.randint(3, 120, (batch, length), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 7:] = 0
        mask[2, 4:] = 0
        ids[mask == 0] = 1  # padding id
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def shrink(config, **sizes):
    names = {"layers": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
             "intermediate": "intermediate_size"}
    data = config.to_dict()
    data.update({names[k]: v for k, v in sizes.items()})
    return type(config).from_dict(data)


# ---- 1. the teacher's own shape is the identity --------------------------------------------------
@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("head", [False, True])
def test_pruning_to_the_teachers_shape_reproduces_the_teacher(arch, head, one_thread):
    teacher = toy_model(arch, head=head)
    student, plan = prune_model(teacher, teacher.config, toy_batches())
    batch = toy_batches(seed=7)[0]
    with torch.no_grad():
        t_out, s_out = teacher(**batch), student.eval()(**batch)
    field = "logits" if head else "last_hidden_state"
    assert torch.equal(getattr(t_out, field), getattr(s_out, field))
    assert plan.layers == [1, 2, 3] and len(plan.hidden) == 48


# ---- 2. importance known by construction --------------------------------------------------------
def _blocks(model):
    return model.base_model.encoder.layer


def _attn(arch, block):
    return block.attention.attn if arch == "mpnet" else block.attention.self


def _q_k_v(arch, block):
    a = _attn(arch, block)
    return (a.q, a.k, a.v) if arch == "mpnet" else (a.query, a.key, a.value)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_dead_units_are_exactly_the_ones_dropped(arch, one_thread):
    """Channels zeroed in every LayerNorm, FFN neurons with no input, heads with no value, and Q/K
    dims with no query carry no activation: pruning must drop exactly those."""
    teacher = toy_model(arch, layers=2, hidden=48, heads=4, intermediate=96)
    dead_channels = [3, 17, 40, 41, 46, 5]
    dead_ffn = {0: [0, 9, 50, 95], 1: [7, 8, 33, 60]}
    # MPNet keeps one head set for all layers (its relative bias is shared): kill the same heads in both
    dead_heads = {0: [1, 3], 1: [1, 3]} if arch == "mpnet" else {0: [1, 3], 1: [0, 2]}
    dead_qk_dims = [2, 5, 9]  # in every kept head: 12 dims -> 9
    with torch.no_grad():
        for module in teacher.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight[dead_channels] = 0
                module.bias[dead_channels] = 0
        for layer, block in enumerate(_blocks(teacher)):
            block.intermediate.dense.weight[dead_ffn[layer]] = 0
            block.intermediate.dense.bias[dead_ffn[layer]] = -30.0  # gelu(-30) is 0 in float32
            q, k, v = _q_k_v(arch, block)
            for h in dead_heads[layer]:
                v.weight[h * 12:(h + 1) * 12] = 0
                v.bias[h * 12:(h + 1) * 12] = 0
            for h in range(4):
                rows = [h * 12 + j for j in dead_qk_dims]
                q.weight[rows] = 0
                q.bias[rows] = 0
    target = shrink(teacher.config, layers=2, hidden=18, heads=2, intermediate=92)  # head size 9
    student, plan = prune_model(teacher, target, toy_batches())
    # 48 - 18 = 30 channels go: the 6 dead ones must be among them
    assert len(plan.hidden) == 18 and not set(dead_channels) & set(plan.hidden.tolist())
    for layer in range(2):
        assert sorted(set(range(96)) - set(plan.ffn[layer].tolist())) == dead_ffn[layer]
        assert sorted(plan.heads[layer].tolist()) == sorted(set(range(4)) - set(dead_heads[layer]))
        for dims in plan.qk_dims[layer]:
            assert sorted(set(range(12)) - set(dims.tolist())) == dead_qk_dims
    student(**toy_batches()[0])  # a working model of the target shape
    assert student.config.hidden_size == 18 and student.config.num_attention_heads == 2


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_a_layer_that_changes_nothing_is_the_one_dropped(arch, one_thread):
    """A post-LN block whose attention and FFN outputs are zero and whose LayerNorms are identity
    maps its (already normalised) input onto itself: block influence 1 - cos = 0."""
    teacher = toy_model(arch, layers=4)
    with torch.no_grad():
        for module in teacher.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        idle = _blocks(teacher)[2]  # teacher layer 3
        for linear in (idle.attention.output.dense, idle.output.dense):
            linear.weight.zero_()
            linear.bias.zero_()
    scores = collect_importance(teacher, toy_batches())
    assert scores.layer[2] < 1e-6 < scores.layer[[0, 1, 3]].min()
    plan = plan_pruning(scores, teacher.config, shrink(teacher.config, layers=3))
    assert plan.layers == [1, 2, 4]
    uniform = plan_pruning(scores, teacher.config, shrink(teacher.config, layers=3), layer_selection="uniform")
    assert uniform.layers == [int(round(x)) for x in np.linspace(1, 4, 3)]  # evenly spaced, first and last kept


# ---- 3. the pruned model equals a NumPy recomputation from the teacher's weights -----------------
def _np(t):
    return t.detach().double().numpy()


def _layer_norm(x, gamma, beta, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * gamma + beta


_erf = np.vectorize(math.erf)


def _gelu(x):
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def reference_forward(arch, teacher, plan, batch):
    """The student's last hidden state, computed from the teacher's weights and the kept indices
    with the teacher's own attention scale 1/sqrt(teacher head size)."""
    base = teacher.base_model
    ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
    hid = plan.hidden
    emb = base.embeddings
    if arch == "bert":
        positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    else:  # RoBERTa / MPNet: positions count non-padding tokens from padding_idx + 1
        pad = teacher.config.pad_token_id
        positions = np.cumsum(ids != pad, axis=1) * (ids != pad) + pad
    x = _np(emb.word_embeddings.weight)[ids][..., hid] + _np(emb.position_embeddings.weight)[positions][..., hid]
    if arch != "mpnet":
        x = x + _np(emb.token_type_embeddings.weight)[np.zeros_like(ids)][..., hid]
    eps = teacher.config.layer_norm_eps
    x = _layer_norm(x, _np(emb.LayerNorm.weight)[hid], _np(emb.LayerNorm.bias)[hid], eps)
    bias = None
    if arch == "mpnet":
        bias = _np(base.encoder.compute_position_bias(torch.zeros(*ids.shape, 1)))  # [B, H, T, T], teacher heads
    t_dh = teacher.config.hidden_size // teacher.config.num_attention_heads
    for position, t_layer in enumerate(plan.layers):
        block = base.encoder.layer[t_layer - 1]
        q_lin, k_lin, v_lin = _q_k_v(arch, block)
        o_lin = block.attention.attn.o if arch == "mpnet" else block.attention.output.dense
        ln1 = block.attention.LayerNorm if arch == "mpnet" else block.attention.output.LayerNorm
        heads = plan.heads[position]
        qk, vo = plan.rows("qk", position), plan.rows("vo", position)

        def lin(lin_module, rows, cols, inp):
            return inp @ _np(lin_module.weight)[np.ix_(rows, cols)].T + _np(lin_module.bias)[rows]

        b, t = ids.shape
        h, dh = len(heads), len(plan.qk_dims[position][0])
        q = lin(q_lin, qk, hid, x).reshape(b, t, h, dh).transpose(0, 2, 1, 3)
        k = lin(k_lin, qk, hid, x).reshape(b, t, h, dh).transpose(0, 2, 1, 3)
        v = lin(v_lin, vo, hid, x).reshape(b, t, h, dh).transpose(0, 2, 1, 3)
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(t_dh)
        if bias is not None:
            scores = scores + bias[:, heads]
        scores = np.where(mask[:, None, None, :] > 0, scores, -1e30)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(b, t, h * dh)
        attn_out = lin(o_lin, hid, vo, context)
        x = _layer_norm(x + attn_out, _np(ln1.weight)[hid], _np(ln1.bias)[hid], eps)
        ffn = plan.ffn[position]
        inner = _gelu(lin(block.intermediate.dense, ffn, hid, x))
        out = lin(block.output.dense, hid, ffn, inner)
        x = _layer_norm(x + out, _np(block.output.LayerNorm.weight)[hid], _np(block.output.LayerNorm.bias)[hid], eps)
    return x


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_pruned_model_equals_a_manual_recomputation_from_the_teacher(arch, one_thread):
    teacher = toy_model(arch, layers=4, hidden=48, heads=4, intermediate=96)
    target = shrink(teacher.config, layers=2, hidden=30, heads=3, intermediate=40)  # head size 12 -> 10
    student, plan = prune_model(teacher, target, toy_batches())
    assert plan.student_head_dim == 10 and len(plan.heads[0]) == 3
    batch = toy_batches(seed=5)[0]
    with torch.no_grad():
        got = student.eval()(**batch).last_hidden_state.double().numpy()
    want = reference_forward(arch, teacher, plan, batch)
    valid = batch["attention_mask"].numpy() > 0
    np.testing.assert_allclose(got[valid], want[valid], atol=2e-5, rtol=1e-4)
    if arch == "mpnet":  # one head set in every layer, and the shared bias table sliced on it
        assert all(np.array_equal(h, plan.heads[0]) for h in plan.heads)
        torch.testing.assert_close(student.encoder.relative_attention_bias.weight,
                                   teacher.encoder.relative_attention_bias.weight[:, plan.heads[0]])


def test_a_fine_tuned_teachers_head_is_sliced_on_the_kept_channels(one_thread):
    teacher = toy_model("roberta", head=True)
    target = shrink(teacher.config, layers=2, hidden=24, heads=2)
    student, plan = prune_model(teacher, target, toy_batches())
    hid = torch.as_tensor(plan.hidden)
    torch.testing.assert_close(student.classifier.dense.weight, teacher.classifier.dense.weight[hid][:, hid])
    torch.testing.assert_close(student.classifier.out_proj.weight, teacher.classifier.out_proj.weight[:, hid])
    torch.testing.assert_close(student.classifier.out_proj.bias, teacher.classifier.out_proj.bias)


# ---- the artifact: a normal HF model and Parquet tables --------------------------------------------
def test_build_student_writes_a_loadable_model_and_the_kept_units(tmp_path, one_thread):
    teacher = toy_model("bert", layers=4, hidden=64, heads=4, intermediate=128)
    rows = [{"input_ids": [2] + list(range(10, 10 + n)) + [3]} for n in range(3, 37)]
    cfg = StudentConfig(num_layers=2, hidden_size=24, num_heads=2, intermediate_size=50, init="pruned",
                        prune={"calibration_rows": 16, "seed": 3, "batch_size": 5}, dropout=0.0)
    student = build_student(teacher, cfg, calibration=rows, pad_token_id=0, plan_out=tmp_path / "pruning")
    student.save_pretrained(tmp_path / "model")
    loaded = tf.AutoModel.from_pretrained(tmp_path / "model").eval()
    batch = toy_batches()[0]
    torch.testing.assert_close(loaded(**batch).last_hidden_state, student.eval()(**batch).last_hidden_state)
    assert loaded.config.kd_init_layers == student.config.kd_init_layers
    import pandas as pd

    kept = pd.read_parquet(tmp_path / "pruning" / "kept.parquet")
    scores = pd.read_parquet(tmp_path / "pruning" / "scores.parquet")
    counts = kept.groupby("unit").size().to_dict()
    assert counts == {"layer": 2, "hidden": 24, "ffn": 2 * 50, "head": 2 * 2, "qk_dim": 2 * 2 * 12, "vo_dim": 2 * 2 * 12}
    assert sorted(kept[kept.unit == "hidden"]["index"]) == loaded.config.kd_init_hidden
    # the scores table has every teacher unit, and marks exactly the kept ones
    assert scores.groupby("unit").size()["ffn"] == 4 * 128 and scores.groupby("unit").size()["hidden"] == 64
    assert scores.kept.sum() == len(kept)
    # calibration: 16 of the 34 rows, seeded, in batches of 5
    batches = calibration_batches(rows, 16, 3, 5, 0)
    assert [len(b["input_ids"]) for b in batches] == [5, 5, 5, 1]


def test_channel_projection_init_makes_the_pruned_hidden_match_exact(one_thread):
    """At the teacher's own width the selection projection is the identity, so the hidden MSE of a
    pruned-to-shape student starts at exactly 0."""
    teacher = toy_model("bert", layers=2, hidden=64, heads=4, intermediate=128)
    rows = [{"input_ids": [2] + list(range(10, 10 + n)) + [3]} for n in range(3, 20)]
    cfg = StudentConfig(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128, init="pruned", dropout=0.0)
    student = build_student(teacher, cfg, calibration=rows, pad_token_id=0)
    projections = torch.nn.ModuleDict({"W_h": torch.nn.Linear(64, 64)})
    assert init_projections_from_channels(projections, student) == ["W_h"]
    torch.testing.assert_close(projections["W_h"].weight, torch.eye(64))
    narrow = build_student(teacher, cfg.model_copy(update={"hidden_size": 32, "num_heads": 2}), calibration=rows)
    proj = torch.nn.ModuleDict({"W_h": torch.nn.Linear(32, 64)})
    init_projections_from_channels(proj, narrow)
    x = torch.randn(3, 32)
    expected = torch.zeros(3, 64)
    expected[:, narrow.config.kd_init_hidden] = x
    torch.testing.assert_close(proj["W_h"](x), expected)


# ---- config errors, before any work -------------------------------------------------------------
@pytest.mark.parametrize("change, field", [
    ({"num_heads": 8}, "student.num_heads=8 exceeds the teacher's 4"),
    ({"num_layers": 5}, "student.num_layers=5 exceeds the teacher's 4"),
    ({"hidden_size": 96, "num_heads": 4}, "student.hidden_size=96 exceeds the teacher's 64"),
    ({"intermediate_size": 200}, "student.intermediate_size=200 exceeds the teacher's 128"),
    ({"hidden_size": 30, "num_heads": 4}, "student.hidden_size 30 is not divisible by student.num_heads 4"),
    ({"hidden_size": 64, "num_heads": 2}, "student head size 32"),
])
def test_an_impossible_shape_fails_when_the_stage_graph_is_built(change, field, tmp_path, monkeypatch):
    """The smoke teacher is tiny-random-bert (4 layers, hidden 64, 4 heads, FFN 128)."""
    from flows.profiles import load_profile
    from tasks.stages import dag_for

    monkeypatch.setenv("KD_HOME", str(tmp_path))
    overrides = {"student.init": "pruned", **{f"student.{k}": v for k, v in change.items()}}
    with pytest.raises(ValueError, match=field.replace("(", r"\(").replace(".", r"\.")):
        dag_for("tinybert-full", load_profile("smoke", overrides))


def test_pruning_an_unsupported_family_names_the_alternatives():
    config = tf.DistilBertConfig(vocab_size=50, dim=32, n_layers=2, n_heads=2, hidden_dim=64)
    teacher = tf.DistilBertModel(config)
    with pytest.raises(PruneError, match="supports teachers of type bert, roberta, mpnet"):
        prune_model(teacher, config, toy_batches())


def test_student_init_mapping_follows_the_layers_the_student_came_from():
    mapping = LayerMapping(strategy="student_init")
    assert map_layers(mapping, 3, 6, init_layers=[1, 4, 6]) == [1, 4, 6]
    with pytest.raises(MappingError, match="student.init teacher_layers or pruned"):
        map_layers(mapping, 3, 6)


def test_a_pruned_students_assistant_is_pruned_too(monkeypatch, tmp_path):
    from kd_core.stages.glue import assistant_config

    monkeypatch.setenv("KD_HOME", str(tmp_path))
    cfg = PipelineConfig(teacher="tiny-random-bert",
                         student={"num_layers": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64,
                                  "init": "pruned"})
    assistant = assistant_config(cfg)
    assert (assistant.num_layers, assistant.hidden_size, assistant.init) == (4, 32, "pruned")
    random_cfg = cfg.model_copy(update={"student": cfg.student.model_copy(update={"init": "random"})})
    assert assistant_config(random_cfg).init == "random"
