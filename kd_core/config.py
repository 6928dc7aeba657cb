"""Typed, validated configuration for distillation (pydantic v2).

Every field has a default so that a YAML profile only states what it changes. Errors name the
field and the fix, because these configs are written by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

FEATURES = (
    "embeddings",
    "hidden",
    "attention_scores",
    "attention_probs",
    "query",
    "key",
    "value",
    "query_merged",
    "key_merged",
    "value_merged",
    "logits",
)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class MatchSpec(StrictModel):
    """One term of the distillation objective, declared as data (TextBrewer's intermediate match).

    Layers are 1-based transformer layers; layer 0 of ``hidden`` is the embedding output.
    ``projection`` names a learnable linear map student-dim -> teacher-dim; matches that name
    the same projection share it (TinyBERT's W_h across layers, W_e for embeddings).
    """

    feature: str
    loss: str
    student_layer: int | None = None
    teacher_layer: int | None = None
    weight: float = 1.0
    projection: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("feature")
    @classmethod
    def _known_feature(cls, value: str) -> str:
        if value not in FEATURES:
            raise ValueError(f"unknown feature {value!r}; choose one of {', '.join(FEATURES)}")
        return value


class LayerMapping(StrictModel):
    """How student layers pick teacher layers.

    ``uniform``: g(m) = m·N/M (TinyBERT), rounded half up when M does not divide N.
    ``last``: the student's layers take the teacher's top M layers.
    ``first``: the teacher's bottom M layers.
    ``explicit``: ``layers[m-1]`` is the teacher layer for student layer m.
    """

    strategy: Literal["uniform", "last", "first", "explicit"] = "uniform"
    layers: list[int] | None = None

    @model_validator(mode="after")
    def _explicit_needs_layers(self) -> "LayerMapping":
        if self.strategy == "explicit" and not self.layers:
            raise ValueError("mapping.strategy 'explicit' needs mapping.layers, e.g. [3, 6, 9, 12]")
        return self


class StudentConfig(StrictModel):
    num_layers: int = Field(4, ge=1)
    hidden_size: int = Field(312, ge=8)
    num_heads: int | None = Field(None, ge=1, description="default: the teacher's head count")
    intermediate_size: int | None = Field(None, ge=1, description="default: 4 x hidden_size")
    vocab_size: int | None = Field(None, description="default: the teacher's; must equal it")
    max_position_embeddings: int | None = None
    init: Literal["random", "teacher_layers", "checkpoint"] = "random"
    init_layers: list[int] | None = Field(
        None, description="teacher layers (1-based) copied into the student for init=teacher_layers"
    )
    checkpoint: str | None = Field(None, description="model dir or alias for init=checkpoint")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _init_fields(self) -> "StudentConfig":
        if self.init == "checkpoint" and not self.checkpoint:
            raise ValueError("student.init 'checkpoint' needs student.checkpoint (a model dir or alias)")
        return self


class TrainConfig(StrictModel):
    max_steps: int = Field(1000, ge=1)
    batch_size: int = Field(32, ge=1, description="per-device micro-batch")
    grad_accum_steps: int = Field(1, ge=1)
    learning_rate: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    max_grad_norm: float | None = Field(1.0, description="clip threshold; null disables clipping")
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = "auto"
    seed: int = 42
    log_every: int = Field(10, ge=1)
    checkpoint_every: int | None = Field(None, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1)


class DistillConfig(StrictModel):
    teacher: str = "minilm-l6"
    student: StudentConfig = Field(default_factory=StudentConfig)
    recipe: str | None = Field("tinybert_intermediate", description="a preset that expands into matches")
    recipe_params: dict[str, Any] = Field(default_factory=dict, description="e.g. temperature, num_relation_heads")
    mapping: LayerMapping = Field(default_factory=LayerMapping)
    matches: list[MatchSpec] = Field(default_factory=list, description="extra or replacing matches")
    max_seq_length: int = Field(128, ge=8)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _has_objective(self) -> "DistillConfig":
        if not self.recipe and not self.matches:
            raise ValueError("set a recipe (e.g. tinybert_intermediate) or list matches explicitly")
        return self


def format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  {where}: {item['msg']}")
    return "\n".join(lines)


class ConfigError(ValueError):
    pass


def load_yaml_config(path: str | Path, model: type[BaseModel] = DistillConfig, overrides: dict | None = None):
    """Load a YAML file into ``model``, applying dotted ``overrides`` ({"train.max_steps": 5})."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of fields")
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path))) from None


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


# ---- the pipeline: one section per stage ------------------------------------------------------


class CorpusSection(StrictModel):
    path: str = Field("wikipedia_sample", description="relative to the data dir, or absolute")
    max_seq_length: int = Field(128, ge=8)
    max_blocks: int | None = Field(None, ge=1, description="cap on token blocks written")


class GeneralDistillSection(StrictModel):
    recipe: str = "tinybert_intermediate"
    recipe_params: dict[str, Any] = Field(default_factory=dict)
    mapping: LayerMapping = Field(default_factory=LayerMapping)
    matches: list[MatchSpec] = Field(default_factory=list)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(max_steps=1000, learning_rate=1e-4))


class MiniLMSection(GeneralDistillSection):
    """MiniLM / MiniLMv2 / DistilBERT-style general distillation, with MiniLM's teacher assistant."""

    recipe: str = "minilm"
    assistant: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: use one when the student is at most half the teacher in depth and width"
    )


class TaskSection(StrictModel):
    name: str = "sst2"
    max_seq_length: int = Field(64, ge=8)
    train_limit: int | None = Field(None, ge=1, description="first N training rows (after a seeded shuffle)")
    eval_limit: int | None = Field(None, ge=1)
    eval_split: str = "dev"
    seed: int = 13


class FinetuneSection(StrictModel):
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(max_steps=500, learning_rate=5e-5))


class AugmentSection(StrictModel):
    enabled: bool = True
    n_aug: int = Field(20, ge=1)
    p_t: float = Field(0.4, ge=0, le=1)
    k: int = Field(15, ge=1)
    mlm: str | None = Field(None, description="masked-LM model; null = GloVe-only (offline)")
    vectors: str | None = Field(None, description="word vectors; null = the offline GloVe package")
    seed: int = 42


class TaskDistillSection(StrictModel):
    recipe: str = "tinybert_intermediate"
    recipe_params: dict[str, Any] = Field(default_factory=dict)
    mapping: LayerMapping = Field(default_factory=LayerMapping)
    intermediate: TrainConfig = Field(default_factory=lambda: TrainConfig(max_steps=500, learning_rate=5e-5))
    prediction: TrainConfig = Field(default_factory=lambda: TrainConfig(max_steps=300, learning_rate=3e-5))
    temperature: float = Field(1.0, gt=0)
    skip_intermediate: bool = False


class MetaKDSection(StrictModel):
    """Meta-KD across domains (Pan et al., 2021); each domain is the task ``amazon-<domain>``."""

    domains: list[str] = Field(default_factory=lambda: ["books", "dvd", "electronics", "kitchen"], min_length=2)


class BenchmarkSection(StrictModel):
    batch_size: int = Field(32, ge=1)
    seq_len: int = Field(128, ge=8)
    repeats: int = Field(5, ge=1)
    threads: int | None = None


class PipelineConfig(StrictModel):
    """Everything one flow run needs; each stage's cache key hashes only its own section(s)."""

    profile: str = "custom"
    teacher: str = "minilm-l6"
    student: StudentConfig = Field(default_factory=StudentConfig)
    data_dir: str | None = Field(None, description="default: $KD_DATA_DIR")
    corpus: CorpusSection = Field(default_factory=CorpusSection)
    general_distill: GeneralDistillSection = Field(default_factory=GeneralDistillSection)
    task: TaskSection = Field(default_factory=TaskSection)
    finetune_teacher: FinetuneSection = Field(default_factory=FinetuneSection)
    minilm: MiniLMSection = Field(default_factory=MiniLMSection)
    finetune_student: FinetuneSection = Field(
        default_factory=lambda: FinetuneSection(train=TrainConfig(max_steps=500, learning_rate=1e-4))
    )
    augment: AugmentSection = Field(default_factory=AugmentSection)
    task_distill: TaskDistillSection = Field(default_factory=TaskDistillSection)
    meta_kd: MetaKDSection = Field(default_factory=MetaKDSection)
    benchmark: BenchmarkSection = Field(default_factory=BenchmarkSection)
    force: list[str] = Field(default_factory=list, description="stages to rerun even when cached")


def for_task(cfg: PipelineConfig, task: str) -> PipelineConfig:
    """The same config pointed at another task (one domain of a multi-domain flow)."""
    return cfg.model_copy(update={"task": cfg.task.model_copy(update={"name": task})})


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with a YAML value: ``train.max_steps=5``, ``force=["task_distill"]``."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from None
    return key.strip(), value
