"""Structured pruning of a teacher into any smaller student shape (Minitron-style importance).

Importance comes from forward passes over a calibration sample, with no gradients
(Minitron, arXiv 2407.14679, §2): every score is a mean magnitude over the valid tokens of the
sample.

- **Layers:** block influence, 1 - cos(layer input, layer output) per token.
- **Residual channels:** |LayerNorm output| summed over every LayerNorm the student keeps (the
  embeddings' and both of each kept layer's); one index set serves the whole residual stream.
- **FFN neurons:** |intermediate activation| per layer.
- **Heads:** the L2 norm of each head's slice of the attention context (the O projection's input).
- **Head dims** (when the head size shrinks): Q/K dim j of head h scores mean|q_hj|·mean|k_hj|
  over each sequence (= the mean |q_tj k_sj| over its token pairs, its share of the scores);
  V/O dim j scores |context_hj|. Q and K keep the same dims, V and O the same dims.

The student is a normal Hugging Face model of the teacher's class: every weight is a slice of
the teacher's. Q is scaled by sqrt(dh_student / dh_teacher), so the kept dims' share of
Q·Kᵀ/sqrt(dh) keeps its teacher scale. Pruning to the teacher's own shape is the identity.
MPNet's relative attention bias is one table shared by every layer, so an MPNet student keeps
one head set for all layers (scores summed over the kept layers).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel

from kd_core.errors import UserError
from kd_core.models.adaptors import ModelAdaptor, _get_path
from kd_core.models.student import default_init_layers, teacher_sizes

__all__ = ["PRUNABLE_MODEL_TYPES", "PruneError", "ImportanceScores", "PrunePlan", "collect_importance",
           "plan_pruning", "apply_plan", "prune_model", "check_prunable"]


class PruneError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class _BlockSpec:
    o: str  # from a block: the attention output projection (its input is the attention context)
    ffn_in: str
    ffn_out: str
    ffn_act: str  # the module whose output is the FFN's activation
    shared_position_bias: str | None = None  # from the base model: a per-head table shared by all layers


_BLOCKS = {
    "bert": _BlockSpec("attention.output.dense", "intermediate.dense", "output.dense", "intermediate"),
    "roberta": _BlockSpec("attention.output.dense", "intermediate.dense", "output.dense", "intermediate"),
    "mpnet": _BlockSpec("attention.attn.o", "intermediate.dense", "output.dense", "intermediate",
                        shared_position_bias="encoder.relative_attention_bias"),
}
PRUNABLE_MODEL_TYPES = tuple(_BLOCKS)


def _spec(model_type: str) -> _BlockSpec:
    if model_type not in _BLOCKS:
        raise PruneError(f"student.init 'pruned' supports teachers of type {', '.join(PRUNABLE_MODEL_TYPES)}, "
                         f"not {model_type!r}; use init 'random' or 'teacher_layers' for this teacher")
    return _BLOCKS[model_type]


def check_prunable(teacher_config: PretrainedConfig, student_config: PretrainedConfig) -> None:
    """Fail before any work when the student shape cannot be cut out of the teacher."""
    _spec(teacher_config.model_type)
    t, s = teacher_sizes(teacher_config), teacher_sizes(student_config)
    fields = {"layers": "student.num_layers", "hidden": "student.hidden_size", "heads": "student.num_heads",
              "intermediate": "student.intermediate_size"}
    for key, name in fields.items():
        if s[key] > t[key]:
            raise PruneError(f"{name}={s[key]} exceeds the teacher's {t[key]}: pruning only removes units; "
                             f"set {name} <= {t[key]} or use init 'random'")
    if s["hidden"] % s["heads"]:
        raise PruneError(f"student.hidden_size {s['hidden']} is not divisible by student.num_heads {s['heads']}; "
                         f"pick a hidden size that is a multiple of the head count")
    if s["hidden"] // s["heads"] > t["hidden"] // t["heads"]:
        raise PruneError(f"student head size {s['hidden'] // s['heads']} (hidden_size / num_heads) exceeds the "
                         f"teacher's {t['hidden'] // t['heads']}; raise student.num_heads or lower student.hidden_size")
    t_pos, s_pos = getattr(teacher_config, "max_position_embeddings", 0), getattr(student_config, "max_position_embeddings", 0)
    if s_pos > t_pos:
        raise PruneError(f"student.max_position_embeddings={s_pos} exceeds the teacher's {t_pos}")


# ---- importance ---------------------------------------------------------------------------------
@dataclass
class ImportanceScores:
    """Mean magnitudes over the calibration tokens; layers are 0-based teacher blocks here."""

    layer: np.ndarray  # [L] block influence
    ln_embeddings: np.ndarray  # [D] |embedding LayerNorm output|
    ln_layers: np.ndarray  # [L, 2, D] |attention LN output|, |output LN output|
    ffn: np.ndarray  # [L, I]
    head: np.ndarray  # [L, H]
    qk_dim: np.ndarray  # [L, H, dh]
    vo_dim: np.ndarray  # [L, H, dh]
    tokens: int = 0

    def hidden(self, layers: Iterable[int]) -> np.ndarray:
        """Residual-channel importance over the LayerNorms of the embeddings and of ``layers``."""
        return self.ln_embeddings + self.ln_layers[list(layers)].sum(axis=(0, 1))


def _layer_norms(block: nn.Module) -> list[nn.LayerNorm]:
    norms = [m for m in block.modules() if isinstance(m, nn.LayerNorm)]
    if len(norms) != 2:
        raise PruneError(f"expected 2 LayerNorms in a {type(block).__name__}, found {len(norms)}")
    return norms


@torch.no_grad()
def collect_importance(model: PreTrainedModel, batches: Iterable[dict[str, Tensor]]) -> ImportanceScores:
    """Minitron's activation importance of every prunable unit of ``model`` over ``batches``."""
    spec = _spec(model.config.model_type)
    adaptor = ModelAdaptor(model)
    adaptor.remove_hooks()  # only its structure is used here
    base, blocks = model.base_model, adaptor.layers()
    n_layers, n_heads, dh = adaptor.num_layers, adaptor.num_heads, adaptor.head_dim
    d, inter = adaptor.hidden_size, _get_path(blocks[0], spec.ffn_in).out_features
    acc = {"layer": torch.zeros(n_layers, dtype=torch.float64), "ln_emb": torch.zeros(d, dtype=torch.float64),
           "ln": torch.zeros(n_layers, 2, d, dtype=torch.float64), "ffn": torch.zeros(n_layers, inter, dtype=torch.float64),
           "head": torch.zeros(n_layers, n_heads, dtype=torch.float64),
           "qk": torch.zeros(n_layers, n_heads, dh, dtype=torch.float64),
           "vo": torch.zeros(n_layers, n_heads, dh, dtype=torch.float64)}
    state: dict = {}

    def valid_sum(x: Tensor) -> Tensor:  # sum over valid tokens of [B,T,...]
        return (x * state["mask"].view(*state["mask"].shape, *([1] * (x.dim() - 2)))).sum(dim=(0, 1)).double()

    handles = []

    def on(module: nn.Module, fn, pre: bool = False):
        def observe(*args):  # a hook that returned a value would replace the module's input or output
            fn(*args)

        handles.append(module.register_forward_pre_hook(observe, with_kwargs=True) if pre
                       else module.register_forward_hook(observe))

    emb_ln = [m for m in base.embeddings.modules() if isinstance(m, nn.LayerNorm)]
    on(emb_ln[0], lambda _m, _a, out: acc["ln_emb"].add_(valid_sum(out.abs())))
    for i, block in enumerate(blocks):
        def block_in(_m, args, kwargs, i=i):
            state[("in", i)] = args[0] if args else kwargs["hidden_states"]

        def block_out(_m, _a, out, i=i):
            out = out[0] if isinstance(out, (tuple, list)) else out
            cos = nn.functional.cosine_similarity(state.pop(("in", i)).double(), out.double(), dim=-1)
            acc["layer"][i] += ((1 - cos) * state["mask"]).sum()

        on(block, block_in, pre=True)
        on(block, block_out)
        for j, norm in enumerate(_layer_norms(block)):
            on(norm, lambda _m, _a, out, i=i, j=j: acc["ln"][i, j].add_(valid_sum(out.abs())))
        # the FFN's activation: the output of BertIntermediate / MPNetIntermediate, act(dense(x))
        on(_get_path(block, spec.ffn_act), lambda _m, _a, out, i=i: acc["ffn"][i].add_(valid_sum(out.abs())))
        q_lin, k_lin, _ = adaptor.qkv(i + 1)

        def capture(name, i=i):
            def hook(_m, _a, out):
                state[(name, i)] = out
            return hook

        on(q_lin, capture("q"))
        on(k_lin, capture("k"))

        def context(_m, args, kwargs, i=i):
            ctx = (args[0] if args else kwargs["input"]).reshape(*state["mask"].shape, n_heads, dh)
            acc["head"][i] += valid_sum(ctx.norm(dim=-1))
            acc["vo"][i] += valid_sum(ctx.abs())
            mask = state["mask"][:, :, None, None]
            count = state["mask"].sum(dim=1)[:, None, None].clamp(min=1)
            q = state.pop(("q", i)).reshape(ctx.shape).abs()
            k = state.pop(("k", i)).reshape(ctx.shape).abs()
            mean_q, mean_k = (q * mask).sum(dim=1) / count, (k * mask).sum(dim=1) / count  # [B,H,dh]
            # the mean over token pairs of |q_tj k_sj|, weighted like the other scores by tokens
            acc["qk"][i] += (mean_q * mean_k * count).sum(dim=0).double()

        on(_get_path(block, spec.o), context, pre=True)

    tokens = 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            mask = batch["attention_mask"].to(torch.float32)
            state.clear()
            state["mask"] = mask
            tokens += int(mask.sum())
            kwargs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            if "token_type_ids" in kwargs and not hasattr(base.embeddings, "token_type_embeddings"):
                kwargs.pop("token_type_ids")
            model(**kwargs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if tokens == 0:
        raise PruneError("the calibration sample has no tokens; check student.prune.calibration_rows and the data")
    mean = {k: (v / tokens).numpy() for k, v in acc.items()}
    return ImportanceScores(mean["layer"], mean["ln_emb"], mean["ln"], mean["ffn"], mean["head"], mean["qk"],
                            mean["vo"], tokens)


# ---- the plan -----------------------------------------------------------------------------------
def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` highest-scoring indices, in index order; ties go to the lower index."""
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores, dtype=np.float64)))
    return np.sort(order[:k])


@dataclass
class PrunePlan:
    """Which teacher units the student keeps. Layers are 1-based teacher layers, in order."""

    layers: list[int]
    hidden: np.ndarray
    heads: list[np.ndarray]  # per kept layer: teacher head indices
    qk_dims: list[list[np.ndarray]]  # per kept layer, per kept head: dims within the head
    vo_dims: list[list[np.ndarray]]
    ffn: list[np.ndarray]
    teacher_head_dim: int
    scores: ImportanceScores | None = None
    layer_selection: str = "importance"

    @property
    def student_head_dim(self) -> int:
        return len(self.qk_dims[0][0])

    def rows(self, kind: str, position: int) -> np.ndarray:
        """Flat row indices into the teacher's Q/K (``qk``) or V (``vo``) output of a kept layer."""
        dims = self.qk_dims[position] if kind == "qk" else self.vo_dims[position]
        return np.concatenate([h * self.teacher_head_dim + d for h, d in zip(self.heads[position], dims)])

    def kept_frame(self) -> pd.DataFrame:
        """One row per kept unit: unit, student_layer (0: outside the blocks), teacher_layer, head, index."""
        records = [("layer", s + 1, t, -1, t) for s, t in enumerate(self.layers)]
        records += [("hidden", 0, 0, -1, int(i)) for i in self.hidden]
        for s, t in enumerate(self.layers):
            records += [("ffn", s + 1, t, -1, int(i)) for i in self.ffn[s]]
            for h_pos, h in enumerate(self.heads[s]):
                records.append(("head", s + 1, t, int(h), int(h)))
                records += [("qk_dim", s + 1, t, int(h), int(j)) for j in self.qk_dims[s][h_pos]]
                records += [("vo_dim", s + 1, t, int(h), int(j)) for j in self.vo_dims[s][h_pos]]
        return pd.DataFrame(records, columns=["unit", "student_layer", "teacher_layer", "head", "index"])

    def scores_frame(self) -> pd.DataFrame:
        """Every scored teacher unit with its score and whether it was kept."""
        sc = self.scores
        if sc is None:
            return pd.DataFrame(columns=["unit", "teacher_layer", "head", "index", "score", "kept"])
        kept = set(map(tuple, self.kept_frame()[["unit", "teacher_layer", "head", "index"]].itertuples(index=False)))
        hidden = sc.hidden([t - 1 for t in self.layers])
        records = [("layer", i + 1, -1, i + 1, float(v)) for i, v in enumerate(sc.layer)]
        records += [("hidden", 0, -1, i, float(v)) for i, v in enumerate(hidden)]
        for i in range(len(sc.layer)):
            records += [("ffn", i + 1, -1, j, float(v)) for j, v in enumerate(sc.ffn[i])]
            for h in range(sc.head.shape[1]):
                records.append(("head", i + 1, h, h, float(sc.head[i, h])))
                records += [("qk_dim", i + 1, h, j, float(v)) for j, v in enumerate(sc.qk_dim[i, h])]
                records += [("vo_dim", i + 1, h, j, float(v)) for j, v in enumerate(sc.vo_dim[i, h])]
        frame = pd.DataFrame(records, columns=["unit", "teacher_layer", "head", "index", "score"])
        frame["kept"] = [(u, t, h, i) in kept for u, t, h, i in
                         frame[["unit", "teacher_layer", "head", "index"]].itertuples(index=False)]
        return frame

    def write(self, out: Path) -> None:
        """kept.parquet and scores.parquet, so a user can see what was kept and why."""
        out.mkdir(parents=True, exist_ok=True)
        self.kept_frame().to_parquet(out / "kept.parquet", index=False)
        self.scores_frame().to_parquet(out / "scores.parquet", index=False)

    def summary(self) -> dict:
        return {"layers": list(self.layers), "layer_selection": self.layer_selection, "hidden": len(self.hidden),
                "heads": len(self.heads[0]), "head_dim": self.student_head_dim, "ffn": len(self.ffn[0]),
                "calibration_tokens": self.scores.tokens if self.scores else 0}


def plan_pruning(
    scores: ImportanceScores,
    teacher_config: PretrainedConfig,
    student_config: PretrainedConfig,
    layer_selection: Literal["importance", "uniform"] = "importance",
) -> PrunePlan:
    """Keep the most important units for ``student_config``'s shape (see the module docstring)."""
    check_prunable(teacher_config, student_config)
    t, s = teacher_sizes(teacher_config), teacher_sizes(student_config)
    if layer_selection == "importance":
        layers = [int(i) + 1 for i in _top(scores.layer, s["layers"])]
    elif layer_selection == "uniform":
        layers = default_init_layers(s["layers"], t["layers"])
    else:
        raise PruneError(f"student.prune.layers must be importance or uniform, got {layer_selection!r}")
    kept = [i - 1 for i in layers]
    t_dh, s_dh = t["hidden"] // t["heads"], s["hidden"] // s["heads"]
    shared_heads = _spec(teacher_config.model_type).shared_position_bias is not None
    if shared_heads:
        global_heads = _top(scores.head[kept].sum(axis=0), s["heads"])
        heads = [global_heads for _ in kept]
    else:
        heads = [_top(scores.head[i], s["heads"]) for i in kept]
    return PrunePlan(
        layers=layers,
        hidden=_top(scores.hidden(kept), s["hidden"]),
        heads=heads,
        qk_dims=[[_top(scores.qk_dim[i, h], s_dh) for h in hs] for i, hs in zip(kept, heads)],
        vo_dims=[[_top(scores.vo_dim[i, h], s_dh) for h in hs] for i, hs in zip(kept, heads)],
        ffn=[_top(scores.ffn[i], s["intermediate"]) for i in kept],
        teacher_head_dim=t_dh,
        scores=scores,
        layer_selection=layer_selection,
    )


# ---- slicing the weights ------------------------------------------------------------------------
_BLOCK_NAME = re.compile(r"^(?P<prefix>.*?\blayer)\.(?P<index>\d+)\.(?P<rest>.+)$")


def _index(t: Tensor, dim: int, idx: np.ndarray) -> Tensor:
    return t.index_select(dim, torch.as_tensor(idx, dtype=torch.long, device=t.device))


def _residual_axes(teacher: PreTrainedModel, d: int) -> dict[str, tuple[int, ...]]:
    """Per parameter outside the blocks, the axes that run along the residual stream: an
    embedding table's columns, a LayerNorm, and a Linear's side of size d (pooler, task heads)."""
    axes = {}
    for module_name, module in teacher.named_modules():
        prefix = module_name + "." if module_name else ""
        if isinstance(module, nn.Embedding):
            axes[prefix + "weight"] = (1,)
        elif isinstance(module, nn.LayerNorm):
            axes[prefix + "weight"] = axes[prefix + "bias"] = (0,)
        elif isinstance(module, nn.Linear):
            rows = module.out_features == d
            axes[prefix + "weight"] = tuple(a for a, on in ((0, rows), (1, module.in_features == d)) if on)
            axes[prefix + "bias"] = (0,) if rows else ()
    return axes


def apply_plan(teacher: PreTrainedModel, student: PreTrainedModel, plan: PrunePlan) -> PreTrainedModel:
    """Fill ``student`` (the student shape, same class as the teacher) with sliced teacher weights."""
    spec = _spec(teacher.config.model_type)
    t_sizes = teacher_sizes(teacher.config)
    adaptor = ModelAdaptor(teacher)
    adaptor.remove_hooks()
    t_blocks = adaptor.layers()
    t_state = teacher.state_dict()
    hidden = plan.hidden
    d = t_sizes["hidden"]
    q_scale = math.sqrt(plan.student_head_dim / plan.teacher_head_dim)
    base_prefix = teacher.base_model_prefix + "." if any(k.startswith(teacher.base_model_prefix + ".") for k in t_state) else ""
    # the paths of the per-block linears whose rows/columns follow heads, dims or FFN neurons
    q_lin, k_lin, v_lin = adaptor.qkv(1)
    block_names = {id(m): n for n, m in t_blocks[0].named_modules()}
    roles = {block_names[id(q_lin)]: ("qk", "hidden"), block_names[id(k_lin)]: ("qk", "hidden"),
             block_names[id(v_lin)]: ("vo", "hidden"), spec.o: ("hidden", "vo"),
             spec.ffn_in: ("ffn", "hidden"), spec.ffn_out: ("hidden", "ffn")}
    q_name = block_names[id(q_lin)]
    shared_bias = base_prefix + spec.shared_position_bias + ".weight" if spec.shared_position_bias else None

    outside = _residual_axes(teacher, d)
    picks = [{"hidden": hidden, "ffn": plan.ffn[position], "qk": plan.rows("qk", position), "vo": plan.rows("vo", position)}
             for position in range(len(plan.layers))]
    new_state = {}
    for name, s_tensor in student.state_dict().items():
        match = _BLOCK_NAME.match(name)
        if match and match["prefix"].endswith("encoder.layer"):
            position = int(match["index"])
            t_name = f"{match['prefix']}.{plan.layers[position] - 1}.{match['rest']}"
            module_path, param = match["rest"].rsplit(".", 1)
            tensor = t_state[t_name]
            role = roles.get(module_path)
            if role is None:  # a LayerNorm of the block
                tensor = _index(tensor, 0, hidden)
            else:
                row_role, col_role = role
                pick = picks[position]
                tensor = _index(tensor, 0, pick[row_role])
                if param == "weight":
                    tensor = _index(tensor, 1, pick[col_role])
                if module_path == q_name:
                    tensor = tensor * q_scale
        else:
            tensor = t_state[name]
            if name == shared_bias:
                tensor = _index(tensor, 1, plan.heads[0])
            else:
                for axis in outside.get(name, ()):
                    tensor = _index(tensor, axis, hidden)
            if tensor.shape != s_tensor.shape:  # a shorter position table of the student
                tensor = tensor[tuple(slice(0, n) for n in s_tensor.shape)]
        if tensor.shape != s_tensor.shape:
            raise PruneError(f"pruned {name} has shape {tuple(tensor.shape)}, the student needs {tuple(s_tensor.shape)}")
        new_state[name] = tensor.to(s_tensor.dtype).clone()
    student.load_state_dict(new_state, strict=True)
    return student


def prune_model(
    teacher: PreTrainedModel,
    student_config: PretrainedConfig,
    batches: Iterable[dict[str, Tensor]],
    layer_selection: Literal["importance", "uniform"] = "importance",
) -> tuple[PreTrainedModel, PrunePlan]:
    """Score ``teacher`` on ``batches``, plan the student shape, and cut the student out of it."""
    check_prunable(teacher.config, student_config)
    scores = collect_importance(teacher, batches)
    plan = plan_pruning(scores, teacher.config, student_config, layer_selection)
    student = type(teacher)(student_config)
    return apply_plan(teacher, student, plan), plan
