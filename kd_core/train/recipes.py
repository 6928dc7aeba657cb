"""Recipes and layer mappings: which matches a distillation objective has, declared as data.

A recipe preset (``tinybert_intermediate``, ``minilm``, ...) expands into a list of
:class:`~kd_core.config.MatchSpec`, using a layer-mapping strategy. No torch here: the config
checks recipe names and mappings with it when it loads, before anything heavy is imported;
:class:`kd_core.train.objective.Objective` turns the specs into the loss module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kd_core.config import LayerMapping, MatchSpec
from kd_core.errors import UserError


class MappingError(UserError, ValueError):
    """An impossible student→teacher layer mapping."""


def map_layers(mapping: LayerMapping, student_layers: int, teacher_layers: int,
               init_layers: list[int] | None = None) -> list[int]:
    """Teacher layer (1-based) for each student layer m = 1..M; ``init_layers``: the layers the
    student was built from (strategy ``student_init``)."""
    m_count, n_count = student_layers, teacher_layers
    if mapping.strategy == "student_init":
        if not init_layers:
            raise MappingError("mapping.strategy 'student_init' needs a student built from teacher layers "
                               "(student.init teacher_layers or pruned); this student records none")
        mapping = LayerMapping(strategy="explicit", layers=list(init_layers))
    if m_count < 1 or n_count < 1:
        raise MappingError(f"need at least one layer (student {m_count}, teacher {n_count})")
    strategy = mapping.strategy
    if strategy != "explicit" and m_count > n_count:
        raise MappingError(
            f"mapping {strategy!r} needs student layers <= teacher layers, got student {m_count} "
            f"and teacher {n_count}; give mapping.strategy='explicit' with mapping.layers instead"
        )
    if strategy == "uniform":
        # g(m) = m·N/M (TinyBERT §3.1); round half up keeps g(M) = N for non-divisible depths.
        return [math.floor(m * n_count / m_count + 0.5) for m in range(1, m_count + 1)]
    if strategy == "last":
        return list(range(n_count - m_count + 1, n_count + 1))
    if strategy == "first":
        return list(range(1, m_count + 1))
    layers = list(mapping.layers or [])
    if len(layers) != m_count:
        raise MappingError(
            f"mapping.layers has {len(layers)} entries but the student has {m_count} layers; "
            f"give one teacher layer per student layer"
        )
    bad = [layer for layer in layers if not 1 <= layer <= n_count]
    if bad:
        raise MappingError(f"mapping.layers {bad} out of range: the teacher has layers 1..{n_count}")
    return layers


RECIPES: dict = {}  # name -> fn(mapped teacher layers, params) -> [MatchSpec]


def recipe(name: str):
    """Registers the decorated ``fn(mapped, params) -> list[MatchSpec]`` as recipe ``name``."""
    def register(fn):
        if name in RECIPES:
            raise ValueError(f"recipe {name!r} is registered twice")
        RECIPES[name] = fn
        return fn
    return register


@recipe("tinybert_intermediate")
def _recipe_tinybert_intermediate(mapped: list[int], params: dict) -> list[MatchSpec]:
    specs = [MatchSpec(feature="embeddings", loss="hidden_mse", student_layer=0, teacher_layer=0, projection="W_e")]
    for m, g in enumerate(mapped, start=1):
        specs.append(MatchSpec(feature="attention_scores", loss="attention_mse", student_layer=m, teacher_layer=g))
        specs.append(MatchSpec(feature="hidden", loss="hidden_mse", student_layer=m, teacher_layer=g, projection="W_h"))
    return specs


@recipe("tinybert_prediction")
def _recipe_tinybert_prediction(mapped: list[int], params: dict) -> list[MatchSpec]:
    if params.get("regression"):  # TinyBERT uses MSE between outputs for regression tasks
        return [MatchSpec(feature="logits", loss="logits_mse")]
    temperature = params.get("temperature", 1.0)
    return [MatchSpec(feature="logits", loss="soft_cross_entropy", params={"temperature": temperature})]


@recipe("minilm")
def _recipe_minilm(mapped: list[int], params: dict) -> list[MatchSpec]:
    # MiniLM §3.1: only the last student layer, against the last teacher layer (or a chosen one).
    student_last = len(mapped)
    teacher_layer = params.get("teacher_layer", mapped[-1])
    return [
        MatchSpec(feature="attention_probs", loss="minilm_attention_kl", student_layer=student_last, teacher_layer=teacher_layer),
        MatchSpec(feature="value", loss="minilm_value_relation_kl", student_layer=student_last, teacher_layer=teacher_layer),
    ]


@recipe("minilmv2")
def _recipe_minilmv2(mapped: list[int], params: dict) -> list[MatchSpec]:
    student_last = len(mapped)
    teacher_layer = params.get("teacher_layer", mapped[-1])
    heads = params.get("num_relation_heads")
    if heads is None:
        raise MappingError("recipe minilmv2 needs recipe_params.num_relation_heads (e.g. 12 or 48)")
    return [
        MatchSpec(
            feature=f"{kind}_merged",
            loss="minilmv2_relation_kl",
            student_layer=student_last,
            teacher_layer=teacher_layer,
            params={"num_relation_heads": heads},
        )
        for kind in ("query", "key", "value")
    ]


@recipe("finetune")
def _recipe_finetune(mapped: list[int], params: dict) -> list[MatchSpec]:
    loss = "regression_mse" if params.get("regression") else "hard_cross_entropy"
    return [MatchSpec(feature="logits", loss=loss)]


def _last_hidden_cosine(mapped: list[int], weight: float) -> MatchSpec:
    return MatchSpec(feature="hidden", loss="cosine", student_layer=len(mapped), teacher_layer=mapped[-1], weight=weight)


@recipe("distilbert")
def _recipe_distilbert(mapped: list[int], params: dict) -> list[MatchSpec]:
    # DistilBERT: soft targets (KL·T², weight 5) + cosine on the last hidden states (weight 1).
    # Its MLM term needs a teacher MLM head and labels; it lives in the task stages.
    # Regression heads have one output and no distribution: their soft target is the teacher's value.
    if params.get("regression"):
        logits = MatchSpec(feature="logits", loss="logits_mse", weight=params.get("alpha_ce", 5.0))
    else:
        logits = MatchSpec(feature="logits", loss="kl_div", weight=params.get("alpha_ce", 5.0),
                           params={"temperature": params.get("temperature", 2.0)})
    return [logits, _last_hidden_cosine(mapped, params.get("alpha_cos", 1.0))]


@recipe("distilbert_cosine")
def _recipe_distilbert_cosine(mapped: list[int], params: dict) -> list[MatchSpec]:
    # The part of DistilBERT's pre-training objective a bare encoder supports: no teacher MLM head
    # exists offline (minilm-l6 is a sentence encoder), so its soft targets come at the task stage.
    return [_last_hidden_cosine(mapped, params.get("alpha_cos", 1.0))]


@recipe("qa_finetune")
def _recipe_qa_finetune(mapped: list[int], params: dict) -> list[MatchSpec]:
    # Extractive QA: start/end cross-entropy against the gold token positions (labels [B, 2]).
    return [MatchSpec(feature="qa_logits", loss="qa_hard_cross_entropy")]


@recipe("qa_prediction")
def _recipe_qa_prediction(mapped: list[int], params: dict) -> list[MatchSpec]:
    # TinyBERT's prediction-layer step for QA: soft CE on the start and end distributions,
    # plus the gold positions when hard_weight > 0.
    specs = [MatchSpec(feature="qa_logits", loss="qa_soft_cross_entropy", params={"temperature": params.get("temperature", 1.0)})]
    if params.get("hard_weight", 0.0) > 0:
        specs.append(MatchSpec(feature="qa_logits", loss="qa_hard_cross_entropy", weight=params["hard_weight"]))
    return specs




def expand_recipe(
    recipe: str | None,
    mapping: LayerMapping,
    student_layers: int,
    teacher_layers: int,
    extra: list[MatchSpec] | None = None,
    params: dict | None = None,
    init_layers: list[int] | None = None,
) -> list[MatchSpec]:
    """Matches for a recipe preset plus any explicitly listed ones."""
    specs: list[MatchSpec] = []
    if recipe:
        if recipe not in RECIPES:
            raise MappingError(f"unknown recipe {recipe!r}; choose one of {', '.join(sorted(RECIPES))}")
        specs = RECIPES[recipe](map_layers(mapping, student_layers, teacher_layers, init_layers), dict(params or {}))
    return specs + list(extra or [])


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    num_heads: int


HIDDEN_FEATURES = {"embeddings", "hidden"}
HEADED_FEATURES = {"attention_scores", "attention_probs", "query", "key", "value"}
OUTPUT_FEATURES = {"logits", "qa_logits"}  # model outputs: no layer, comparable with labels


def term_name(spec: MatchSpec) -> str:
    if spec.feature in OUTPUT_FEATURES or spec.feature == "embeddings":
        return f"{spec.feature}:{spec.loss}"
    return f"{spec.feature}[{spec.student_layer}<-{spec.teacher_layer}]:{spec.loss}"
