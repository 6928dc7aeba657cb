"""Uniform access to the internals of BERT-family encoders, through forward hooks.

:class:`ModelAdaptor` wraps a Hugging Face model (bare encoder or one with a task head) of the
``bert``, ``roberta``, ``mpnet`` or ``distilbert`` family and returns, for each forward call, an
:class:`EncoderInternals` with the hidden states, the per-head queries/keys/values and (lazily)
the pre-softmax attention scores and the attention probabilities of every layer.

Nothing here forks a modeling file: forward hooks on the q/k/v ``nn.Linear`` submodules of each
self-attention module capture their outputs (still in the autograd graph, so a student can be
trained through them), and for MPNet a forward pre-hook captures the relative ``position_bias``
the encoder hands to every layer. The scores are recomputed from the captured q and k only when
asked for, because the sdpa/flash kernels never materialise them, and transformers 5 only ever
returns post-softmax probabilities (and only under ``attn_implementation="eager"``).

Layer indices are 1-based for transformer layers everywhere; ``hidden(0)`` is the embedding
output (the input of layer 1).
"""

from __future__ import annotations

import math
import operator
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["EncoderInternals", "ModelAdaptor", "SUPPORTED_MODEL_TYPES", "FEATURE_NAMES"]


@dataclass(frozen=True)
class _ArchSpec:
    layers_path: str  # from the base model to the nn.ModuleList of transformer blocks
    attention_path: str  # from a block to the self-attention module that owns q/k/v
    q: str
    k: str
    v: str
    position_bias: bool = False  # MPNet: a relative position bias is added to the scores
    divide_by_sqrt: bool = False  # MPNet computes QK^T / sqrt(dh); the others QK^T * dh**-0.5


_BERT = _ArchSpec("encoder.layer", "attention.self", "query", "key", "value")
_ARCHS: dict[str, _ArchSpec] = {
    "bert": _BERT,
    "roberta": _BERT,
    "mpnet": _ArchSpec("encoder.layer", "attention.attn", "q", "k", "v", position_bias=True, divide_by_sqrt=True),
    "distilbert": _ArchSpec("transformer.layer", "attention", "q_lin", "k_lin", "v_lin"),
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_ARCHS)

# Structures tried, in order, for a model_type not in _ARCHS (e.g. xlm-roberta, camembert, electra).
_BERT_LIKE_SPECS = (_BERT, _ARCHS["distilbert"])
# Same module layout as BERT, but the scores are not plain QK^T/sqrt(dh) (rotary / relative positions).
_NOT_BERT_LIKE = {"roformer", "esm", "nezha", "deberta", "deberta-v2", "albert", "funnel", "convbert"}

_LAYER_FEATURES = ("attention_scores", "attention_probs", "query", "key", "value") + tuple(
    f"{n}_merged" for n in ("query", "key", "value")
)
FEATURE_NAMES: tuple[str, ...] = ("embeddings", "hidden", *_LAYER_FEATURES, "logits", "qa_logits")


def _get_path(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


class EncoderInternals:
    """What one forward pass of a :class:`ModelAdaptor` captured.

    Tensors are views of what the model computed (not copies), so they carry gradients when the
    forward ran with grad enabled. Scores and probabilities are computed on first access and
    cached per layer; they are computed under whatever autocast/grad mode is active *at access
    time*, from q/k captured under the forward's mode.
    """

    def __init__(
        self,
        *,
        output,
        attention_mask: Tensor,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        model_type: str,
        hidden_states: tuple[Tensor, ...],
        queries: list[Tensor],
        keys: list[Tensor],
        values: list[Tensor],
        position_biases: list[Tensor | None],
        scaling: float,
        divide_by_sqrt: bool,
    ):
        self.output = output
        self.attention_mask = attention_mask
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.model_type = model_type
        self._hidden = hidden_states
        self._q, self._k, self._v = queries, keys, values
        self._position_bias = position_biases
        self._scaling = scaling
        self._divide_by_sqrt = divide_by_sqrt
        self._scores: dict[int, Tensor] = {}
        self._probs: dict[int, Tensor] = {}

    # -- index checks -------------------------------------------------------------------------
    def _check_layer(self, layer, low: int, what: str) -> int:
        if isinstance(layer, bool):
            raise ValueError(f"{what} needs an integer layer in {low}..{self.num_layers}, got {layer!r}")
        try:
            layer = operator.index(layer)  # int, numpy integer, 0-d integer tensor
        except TypeError:
            raise ValueError(f"{what} needs an integer layer in {low}..{self.num_layers}, got {layer!r}") from None
        if not low <= layer <= self.num_layers:
            raise ValueError(
                f"{what}: layer {layer} is out of range; valid layers are {low}..{self.num_layers} "
                f"({'0 = embedding output, ' if low == 0 else ''}1..{self.num_layers} = transformer layers)"
            )
        return layer

    # -- hidden states --------------------------------------------------------------------------
    def hidden(self, layer: int) -> Tensor:
        """[B,T,d]; layer 0 is the embedding output, i the output of transformer layer i."""
        return self._hidden[self._check_layer(layer, 0, "hidden")]

    def embeddings(self) -> Tensor:
        return self._hidden[0]

    # -- attention ------------------------------------------------------------------------------
    def _heads(self, merged: Tensor) -> Tensor:
        b, t, _ = merged.shape
        return merged.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def query(self, layer: int, merged: bool = False) -> Tensor:
        """[B,H,T,dh] (or [B,T,H*dh] with merged=True: the raw projection output)."""
        q = self._q[self._check_layer(layer, 1, "query") - 1]
        return q if merged else self._heads(q)

    def key(self, layer: int, merged: bool = False) -> Tensor:
        k = self._k[self._check_layer(layer, 1, "key") - 1]
        return k if merged else self._heads(k)

    def value(self, layer: int, merged: bool = False) -> Tensor:
        v = self._v[self._check_layer(layer, 1, "value") - 1]
        return v if merged else self._heads(v)

    def position_bias(self, layer: int) -> Tensor | None:
        """MPNet's relative position bias [B,H,T,T] added to that layer's scores; None for the others."""
        return self._position_bias[self._check_layer(layer, 1, "position_bias") - 1]

    def scores(self, layer: int) -> Tensor:
        """[B,H,T,T] pre-softmax Q·Kᵀ/sqrt(dh) (+ MPNet's position bias), padding mask NOT applied.

        float32 when q/k are float16/bfloat16 (autocast); otherwise the dtype of q/k.
        """
        layer = self._check_layer(layer, 1, "scores")
        cached = self._scores.get(layer)
        if cached is None:
            q, k = self.query(layer), self.key(layer)
            bias = self._position_bias[layer - 1]
            # Half-precision q/k (autocast) are upcast: scores/probs feed KD losses, and softmax/KL in
            # bf16 is too coarse. Autocast is disabled here or it would cast the matmul back down.
            with torch.autocast(device_type=q.device.type, enabled=False):
                if q.dtype in (torch.float16, torch.bfloat16):
                    q, k = q.float(), k.float()
                    bias = bias.float() if bias is not None else None
                raw = torch.matmul(q, k.transpose(-1, -2))
                cached = raw / math.sqrt(self.head_dim) if self._divide_by_sqrt else raw * self._scaling
                if bias is not None:
                    cached = cached + bias
            self._scores[layer] = cached
        return cached

    def probs(self, layer: int) -> Tensor:
        """[B,H,T,T] softmax over keys of :meth:`scores`, padded keys masked out (no dropout)."""
        layer = self._check_layer(layer, 1, "probs")
        cached = self._probs.get(layer)
        if cached is None:
            scores = self.scores(layer)
            keep = self.attention_mask.to(device=scores.device, dtype=torch.bool)[:, None, None, :]
            with torch.autocast(device_type=scores.device.type, enabled=False):
                cached = torch.softmax(scores.masked_fill(~keep, torch.finfo(scores.dtype).min), dim=-1)
            self._probs[layer] = cached
        return cached

    # -- head -----------------------------------------------------------------------------------
    @property
    def logits(self) -> Tensor | None:
        return getattr(self.output, "logits", None)

    @property
    def qa_logits(self) -> Tensor | None:
        """[B, 2, T]: a question-answering head's start (row 0) and end (row 1) logits."""
        start = getattr(self.output, "start_logits", None)
        end = getattr(self.output, "end_logits", None)
        return None if start is None or end is None else torch.stack((start, end), dim=1)

    # -- by name --------------------------------------------------------------------------------
    def feature(self, name: str, layer: int | None = None) -> Tensor:
        """Any captured feature by name; see FEATURE_NAMES."""
        if name == "embeddings":
            if layer not in (None, 0):
                raise ValueError(f"feature 'embeddings' takes no layer (or 0), got {layer!r}")
            return self.embeddings()
        heads = {"logits": ("logits", "a task head"), "qa_logits": ("start/end logits", "a question-answering head")}
        if name in heads:
            if layer is not None:
                raise ValueError(f"feature {name!r} takes no layer, got {layer!r}")
            value = getattr(self, name)
            if value is None:
                what, head = heads[name]
                raise ValueError(
                    f"feature {name!r} requested but the model output ({type(self.output).__name__}) has no {what}; "
                    f"use a model with {head}"
                )
            return value
        if name == "hidden":
            return self.hidden(layer)
        if name == "attention_scores":
            return self.scores(layer)
        if name == "attention_probs":
            return self.probs(layer)
        if name in ("query", "key", "value"):
            return getattr(self, name)(layer)
        if name in ("query_merged", "key_merged", "value_merged"):
            return getattr(self, name[: -len("_merged")])(layer, merged=True)
        raise ValueError(f"unknown feature {name!r}; valid features are {', '.join(FEATURE_NAMES)}")

    def __repr__(self) -> str:
        return (
            f"EncoderInternals(model_type={self.model_type!r}, num_layers={self.num_layers}, "
            f"num_heads={self.num_heads}, head_dim={self.head_dim}, batch={tuple(self.attention_mask.shape)})"
        )


class ModelAdaptor:
    """Hooks into a BERT/RoBERTa/MPNet/DistilBERT model (bare or with a head).

    ``adaptor(input_ids, attention_mask, token_type_ids, **model_kwargs)`` runs the model and
    returns an :class:`EncoderInternals`. Hooks only record while the adaptor's own forward runs,
    and each call gets a fresh record, so nothing accumulates across calls and calling the model
    directly is unaffected. Use :meth:`remove_hooks` (or ``with ModelAdaptor(m) as a:``) to
    detach; a later forward re-attaches them.
    """

    def __init__(self, model: nn.Module, *, allow_bert_like: bool = True):
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        base = getattr(model, "base_model", None)
        if config is None or base is None:
            raise ValueError(
                f"ModelAdaptor needs a Hugging Face PreTrainedModel (with .config and .base_model), got "
                f"{type(model).__name__}; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        spec = _ARCHS.get(model_type)
        if spec is None:
            spec = self._probe_bert_like(base, config) if allow_bert_like else None
            if spec is None:
                raise ValueError(
                    f"unsupported model_type {model_type!r} ({type(model).__name__}); supported model types: "
                    f"{', '.join(SUPPORTED_MODEL_TYPES)} (and encoders laid out exactly like BERT with plain "
                    "scaled dot-product attention)"
                )
            warnings.warn(
                f"ModelAdaptor: model_type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}; "
                "treating it as BERT-like (scores assume plain Q·Kᵀ/sqrt(dh) attention)",
                stacklevel=2,
            )
        elif not self._matches(base, spec):
            raise ValueError(
                f"model_type {model_type!r} but {type(base).__name__} does not have the expected "
                f"{spec.layers_path}[i].{spec.attention_path}.{{{spec.q},{spec.k},{spec.v}}} modules"
            )

        self.model = model
        self.model_type: str = model_type
        self._spec = spec
        self._base = base
        self._blocks: list[nn.Module] = list(_get_path(base, spec.layers_path))
        self._attn: list[nn.Module] = [_get_path(b, spec.attention_path) for b in self._blocks]
        first = self._attn[0]
        q_lin: nn.Linear = getattr(first, spec.q)
        self.num_layers: int = len(self._blocks)
        self.hidden_size: int = q_lin.in_features
        heads = getattr(first, "num_attention_heads", None) or getattr(first, "n_heads", None)
        if heads is None:
            heads = getattr(config, "num_attention_heads", None)
        self.num_heads: int = int(heads)
        self.head_dim: int = q_lin.out_features // self.num_heads
        scaling = getattr(first, "scaling", None)
        self._scaling: float = float(scaling) if scaling is not None else self.head_dim**-0.5
        self._has_token_types = hasattr(getattr(base, "embeddings", None), "token_type_embeddings")

        self._warned_detached = False
        self._handles: list = []
        self._record: dict | None = None
        self._install_hooks()

    # -- architecture detection -----------------------------------------------------------------
    @staticmethod
    def _matches(base: nn.Module, spec: _ArchSpec) -> bool:
        blocks = _get_path(base, spec.layers_path)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            return False
        for block in blocks:
            attn = _get_path(block, spec.attention_path)
            if attn is None or not all(isinstance(getattr(attn, n, None), nn.Linear) for n in (spec.q, spec.k, spec.v)):
                return False
        return True

    @classmethod
    def _probe_bert_like(cls, base: nn.Module, config) -> _ArchSpec | None:
        if getattr(config, "model_type", None) in _NOT_BERT_LIKE:
            return None
        if getattr(config, "position_embedding_type", "absolute") not in ("absolute", None):
            return None
        if any("rotary" in name for name, _ in base.named_modules()):
            return None
        for spec in _BERT_LIKE_SPECS:
            if cls._matches(base, spec):
                return spec
        return None

    # -- structure --------------------------------------------------------------------------------
    def layers(self) -> list[nn.Module]:
        """The transformer blocks, in order (index 0 is layer 1)."""
        return list(self._blocks)

    def embeddings(self) -> nn.Module:
        return self._base.embeddings

    def attention(self, layer: int) -> nn.Module:
        """The self-attention module of transformer layer ``layer`` (1-based), owner of q/k/v."""
        if not 1 <= layer <= self.num_layers:
            raise ValueError(f"layer {layer} out of range 1..{self.num_layers}")
        return self._attn[layer - 1]

    def qkv(self, layer: int) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        """The query, key and value nn.Linear of transformer layer ``layer`` (1-based)."""
        attn = self.attention(layer)
        return getattr(attn, self._spec.q), getattr(attn, self._spec.k), getattr(attn, self._spec.v)

    # -- hooks ------------------------------------------------------------------------------------
    def _install_hooks(self) -> None:
        ref = weakref.ref(self)  # hooks must not keep the adaptor alive (the model outlives it)

        # Each hook also checks that it fires on the module it was registered on: a deepcopy of the
        # model copies the hook dicts, and the copy must not write into this adaptor's record.
        def capture(kind: str, index: int, module: nn.Module):
            owner = weakref.ref(module)

            def hook(_module, _args, output):
                adaptor = ref()
                if adaptor is not None and adaptor._record is not None and _module is owner():
                    adaptor._record[kind][index] = _first(output)

            return hook

        def capture_bias(index: int, module: nn.Module):
            owner = weakref.ref(module)

            def pre_hook(_module, args, kwargs):
                adaptor = ref()
                if adaptor is not None and adaptor._record is not None and _module is owner():
                    bias = kwargs.get("position_bias")
                    if bias is None and len(args) > 2:  # MPNetAttention passes it positionally
                        bias = args[2]
                    adaptor._record["bias"][index] = bias

            return pre_hook

        def capture_input(module: nn.Module):
            owner = weakref.ref(module)

            def pre_hook(_module, args, kwargs):
                adaptor = ref()
                if adaptor is not None and adaptor._record is not None and _module is owner():
                    adaptor._record["in"] = args[0] if args else kwargs.get("hidden_states")

            return pre_hook

        for i, attn in enumerate(self._attn):
            for kind, name in (("q", self._spec.q), ("k", self._spec.k), ("v", self._spec.v)):
                linear = getattr(attn, name)
                self._handles.append(linear.register_forward_hook(capture(kind, i, linear)))
            if self._spec.position_bias:
                self._handles.append(attn.register_forward_pre_hook(capture_bias(i, attn), with_kwargs=True))
            # Fallback source of hidden states, used only if the model output has none.
            block = self._blocks[i]
            self._handles.append(block.register_forward_hook(capture("out", i, block)))
        first = self._blocks[0]
        self._handles.append(first.register_forward_pre_hook(capture_input(first), with_kwargs=True))

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> ModelAdaptor:
        return self

    def __exit__(self, *exc) -> None:
        self.remove_hooks()

    def __del__(self):
        try:
            self.remove_hooks()
        except Exception:
            pass

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                **model_kwargs) -> EncoderInternals:
        if not self._handles:
            self._install_hooks()
        if attention_mask is None:
            mask = torch.ones(input_ids.shape[:2], dtype=torch.long, device=input_ids.device)
        else:
            if attention_mask.shape != input_ids.shape[:2]:
                raise ValueError(
                    f"attention_mask must be [B,T] = {tuple(input_ids.shape[:2])}, got {tuple(attention_mask.shape)}"
                )
            mask = attention_mask
        kwargs = dict(model_kwargs)
        kwargs["output_hidden_states"] = True
        kwargs["return_dict"] = True
        if token_type_ids is not None and self._has_token_types:
            kwargs["token_type_ids"] = token_type_ids  # MPNet/DistilBERT have no token types: dropped

        n = self.num_layers
        self._record = {"q": [None] * n, "k": [None] * n, "v": [None] * n, "bias": [None] * n,
                        "out": [None] * n, "in": None}
        try:
            output = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            record = self._record
        finally:
            self._record = None

        missing = [i + 1 for i in range(n) if record["q"][i] is None or record["k"][i] is None]
        if missing:
            raise RuntimeError(f"ModelAdaptor: no q/k captured for layers {missing} of {type(self.model).__name__}")
        if self._spec.position_bias and any(b is None for b in record["bias"]):
            raise RuntimeError("ModelAdaptor: MPNet position_bias was not captured")

        if (
            not self._warned_detached
            and torch.is_grad_enabled()
            and self.qkv(1)[0].weight.requires_grad
            and not record["q"][0].requires_grad
        ):
            self._warned_detached = True
            warnings.warn(
                "ModelAdaptor: grad is enabled and the query weights require grad, but the captured q/k/v are "
                "detached, so losses on scores/probs/q/k/v will not train the model. Reentrant activation "
                "checkpointing does this; use activation_checkpointing_enable() with use_reentrant=False "
                "(the transformers default).",
                stacklevel=2,
            )

        hidden = getattr(output, "hidden_states", None)
        if hidden is None or len(hidden) != n + 1 or any(h is None for h in hidden):
            hidden = (record["in"], *record["out"])

        return EncoderInternals(
            output=output,
            attention_mask=mask,
            num_layers=n,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            model_type=self.model_type,
            hidden_states=tuple(hidden),
            queries=record["q"],
            keys=record["k"],
            values=record["v"],
            position_biases=record["bias"],
            scaling=self._scaling,
            divide_by_sqrt=self._spec.divide_by_sqrt,
        )

    __call__ = forward

    def __repr__(self) -> str:
        return (
            f"ModelAdaptor({type(self.model).__name__}, model_type={self.model_type!r}, num_layers={self.num_layers}, "
            f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, head_dim={self.head_dim})"
        )
