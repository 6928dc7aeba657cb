"""Typed, validated configuration for distillation (pydantic v2).

Every field has a default so that a YAML profile only states what it changes. Errors name the
field and the fix, because these configs are written by hand.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kd_core.errors import UserError
from kd_core.fingerprint import check_only

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
    "qa_logits",  # extractive QA: start and end logits stacked, [B, 2, T]
)


@check_only
def _known_recipe(value: str | None) -> str | None:
    from kd_core.train.recipes import RECIPES  # late: the recipes module imports this one

    if value is not None and value not in RECIPES:
        raise ValueError(f"unknown recipe {value!r}; choose one of {', '.join(sorted(RECIPES))}")
    return value


@check_only
def _known_loss(value: str) -> str:
    from kd_core.losses.registry import LOSSES

    if value not in LOSSES:
        raise ValueError(f"unknown loss {value!r}; choose one of {', '.join(sorted(LOSSES))}")
    return value


def _canonical_task(value: str) -> str:
    """``SST-2``, ``sst-2`` and ``sst2`` are one task, so one cache key: the registered name.
    Names only the data dir knows (extra Amazon domains) pass through; the stage graph checks them."""
    from kd_core.data.tasks import UnknownTaskError, get_task

    try:
        return get_task(value).name
    except UnknownTaskError:
        return value


# checked when the config loads, not minutes later when a stage expands the recipe
RecipeName = Annotated[str, AfterValidator(_known_recipe)]
LossName = Annotated[str, AfterValidator(_known_loss)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class MatchSpec(StrictModel):
    """One term of the distillation objective, declared as data (TextBrewer's intermediate match).

    Layers are 1-based transformer layers; layer 0 of ``hidden`` is the embedding output.
    ``projection`` names a learnable linear map student-dim -> teacher-dim; matches that name
    the same projection share it (TinyBERT's W_h across layers, W_e for embeddings).
    """

    feature: str
    loss: LossName
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
    ``student_init``: the teacher layer each student layer was copied or pruned from (recorded
    as ``kd_init_layers`` in the student's config by init teacher_layers / pruned).
    """

    strategy: Literal["uniform", "last", "first", "explicit", "student_init"] = "uniform"
    layers: list[int] | None = None

    @model_validator(mode="after")
    def _explicit_needs_layers(self) -> "LayerMapping":
        if self.strategy == "explicit" and not self.layers:
            raise ValueError("mapping.strategy 'explicit' needs mapping.layers, e.g. [3, 6, 9, 12]")
        return self


class PruneConfig(StrictModel):
    """student.init 'pruned': which teacher is cut down and the calibration sample that scores its units."""

    source: Literal["pretrained", "finetuned"] = Field(
        "pretrained",
        description="pretrained: prune the teacher, then general distillation; finetuned (tinybert-full): prune "
                    "the fine-tuned teacher and go straight to task distillation, without general distillation",
    )
    calibration_rows: int = Field(256, ge=1, description="corpus blocks (pretrained) or task train rows (finetuned)")
    seed: int = Field(0, description="which calibration rows are drawn")
    batch_size: int = Field(32, ge=1, description="calibration forward-pass batch")
    layers: Literal["importance", "uniform"] = Field(
        "importance", description="importance: the M layers of highest block influence; uniform: evenly spaced")


class StudentConfig(StrictModel):
    num_layers: int = Field(4, ge=1)
    hidden_size: int = Field(312, ge=8)
    num_heads: int | None = Field(None, ge=1, description="default: the teacher's head count")
    intermediate_size: int | None = Field(None, ge=1, description="default: 4 x hidden_size")
    vocab_size: int | None = Field(None, description="default: the teacher's; must equal it")
    max_position_embeddings: int | None = None
    init: Literal["random", "teacher_layers", "checkpoint", "pruned"] = "random"
    init_layers: list[int] | None = Field(
        None, description="teacher layers (1-based) copied into the student for init=teacher_layers"
    )
    checkpoint: str | None = Field(None, description="model dir or alias for init=checkpoint")
    prune: PruneConfig = Field(default_factory=PruneConfig, description="init=pruned: source and calibration")
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
    recipe: RecipeName | None = Field("tinybert_intermediate", description="a preset that expands into matches")
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


def format_validation_error(error: ValidationError, source: str, overrides: dict | None = None,
                            model: type[BaseModel] | None = None) -> str:
    """One line: each wrong field, named as the ``-p`` key that set it when one did, else as a
    field of ``source``; an unknown key lists the valid keys of its section."""
    problems = []
    for item in error.errors():
        parts = [str(part) for part in item["loc"]]
        where = ".".join(parts) or "(top level)"
        set_by = next((key for key in (overrides or {}) if where == key or where.startswith(key + ".")), None)
        label = f"-p {set_by}={(overrides or {})[set_by]}" if set_by else f"{source}: {where}"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden" and model is not None:
            valid = _fields_at(model, parts[:-1])
            close = difflib.get_close_matches(parts[-1], valid, n=1)
            hint = f"; did you mean {'.'.join(parts[:-1] + close)}?" if close else ""
            message = f"unknown key {where!r}{hint} valid keys there: {', '.join(valid)}"
        problems.append(f"{label}: {message}")
    return "invalid configuration: " + "; ".join(problems)


def _fields_at(model: type[BaseModel], path: list[str]) -> list[str]:
    """The field names of the section at ``path`` (``["task"]`` -> TaskSection's)."""
    import typing

    for part in path:
        field = model.model_fields.get(part)
        if field is None:
            return []
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return sorted(model.model_fields)


class ConfigError(UserError, ValueError):
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
        raise ConfigError(format_validation_error(exc, str(path), overrides, model)) from None


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
    enabled: bool = Field(True, description="false: the stage writes the student as initialised (the no-GD ablation)")
    recipe: RecipeName = "tinybert_intermediate"
    recipe_params: dict[str, Any] = Field(default_factory=dict)
    mapping: LayerMapping = Field(default_factory=LayerMapping)
    matches: list[MatchSpec] = Field(default_factory=list)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(max_steps=1000, learning_rate=1e-4))


class MiniLMSection(GeneralDistillSection):
    """MiniLM / MiniLMv2 / DistilBERT-style general distillation, with MiniLM's teacher assistant."""

    recipe: RecipeName = "minilm"
    assistant: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: use one when the student is at most half the teacher in depth and width"
    )

    @field_validator("assistant", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare on/off (`-p minilm.assistant=off`, `assistant: off`) as a boolean
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class TaskSection(StrictModel):
    name: Annotated[str, AfterValidator(_canonical_task)] = "sst2"
    max_seq_length: int = Field(64, ge=8)
    train_limit: int | None = Field(None, ge=1, description="first N training rows (after a seeded shuffle)")
    eval_limit: int | None = Field(None, ge=1)
    eval_split: str = Field("dev", description="dev, test, ... or holdout: the rows held out from train")
    holdout_rows: int | None = Field(
        None, ge=1, description="rows taken out of train (seeded) into holdout.parquet, for choosing settings without dev")
    seed: int = 13

    @model_validator(mode="after")
    def _holdout_needs_rows(self) -> "TaskSection":
        if self.eval_split == "holdout" and not self.holdout_rows:
            raise ValueError("task.eval_split 'holdout' needs task.holdout_rows (rows held out from train), e.g. 500")
        return self


class FinetuneSection(StrictModel):
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(max_steps=500, learning_rate=5e-5))


class StudentTaskSection(FinetuneSection):
    """How the general student learns the task: plain fine-tuning (MiniLM), or distillation from
    the fine-tuned teacher with a recipe (``distilbert``: soft CE x T^2 + last-hidden cosine)."""

    recipe: Literal["finetune", "distilbert"] = "finetune"
    recipe_params: dict[str, Any] = Field(default_factory=dict, description="e.g. temperature, alpha_ce, alpha_cos")

    @property
    def needs_teacher(self) -> bool:
        return self.recipe != "finetune"


class AugmentSection(StrictModel):
    enabled: bool = True
    n_aug: int = Field(20, ge=1)
    p_t: float = Field(0.4, ge=0, le=1)
    k: int = Field(15, ge=1)
    mlm: str | None = Field(None, description="masked-LM model; null = GloVe-only (offline)")
    vectors: str | None = Field(None, description="word vectors; null = the offline GloVe package")
    seed: int = 42


class TaskDistillSection(StrictModel):
    recipe: RecipeName = "tinybert_intermediate"
    recipe_params: dict[str, Any] = Field(default_factory=dict)
    mapping: LayerMapping = Field(default_factory=LayerMapping)
    intermediate: TrainConfig = Field(default_factory=lambda: TrainConfig(max_steps=500, learning_rate=5e-5))
    prediction: TrainConfig = Field(default_factory=lambda: TrainConfig(max_steps=300, learning_rate=3e-5))
    temperature: float = Field(1.0, gt=0)
    skip_intermediate: bool = Field(False, description="true: the intermediate step passes the student on untrained")
    prediction_recipe: Literal["tinybert_prediction", "distilbert", "finetune"] = Field(
        "tinybert_prediction",
        description="the prediction step's loss: soft CE on the teacher's logits, DistilBERT's, or hard labels (no KD)",
    )


class MetaKDSection(StrictModel):
    """Meta-KD across domains (Pan et al., ACL 2021); each domain is the task ``amazon-<domain>``.

    Per target domain, training fraction and seed the meta-kd flow distils three students with the
    same init, matches, steps and data: (a) from the single-domain teacher, (b) from a teacher
    fine-tuned on all domains mixed, (c) Meta-KD (meta-teacher, then meta-distillation). Teachers
    train with ``teacher_train`` (or ``finetune_teacher.train``) for ``teacher_epochs``; students
    in TinyBERT's two steps, ``distill`` (intermediate layers) then ``prediction`` (logits).
    Defaults of alpha/gamma1/gamma2 follow the paper's released scripts (EasyNLP).
    """

    domains: list[str] = Field(default_factory=lambda: ["books", "dvd", "electronics", "kitchen"], min_length=2)
    targets: list[str] | None = Field(None, description="domains that get students; null = every domain")
    fractions: list[float] = Field(default_factory=lambda: [1.0], min_length=1,
                                   description="target-domain training fractions; the other domains stay whole")
    seeds: list[int] = Field(default_factory=lambda: [13], min_length=1, description="one student per seed")
    subsample_seed: int = Field(13, description="which target rows a fraction keeps: the same rows for every seed")
    teacher_seeds: Literal["first", "each"] = Field(
        "first", description="first: one teacher per (fraction, target), trained with seeds[0]; each: one per seed"
    )
    teacher_train: TrainConfig | None = Field(None, description="every teacher's training; null: finetune_teacher.train")
    teacher_epochs: float | None = Field(
        1.0, gt=0, description="teacher steps = ceil(epochs x rows / batch); null: the train config's max_steps")
    teacher_min_steps: int = Field(1, ge=1, description="floor on teacher steps (few-shot single-domain teachers)")
    alpha: float = Field(0.5, ge=0, le=1, description="Eq. 2: weight of the own-domain prototype in the prototype score")
    gamma1: float = Field(0.5, ge=0, description="weight of the meta-teacher's domain-corruption loss")
    gamma2: float = Field(0.5, ge=0, description="weight of the students' transferable-knowledge loss")
    corruption_dropout: float = Field(0.1, ge=0, lt=1, description="dropout before the domain classifier")
    normalize_scores: bool = Field(
        True, description="meta-teacher: divide the prototype-score weights by their mean (keeps γ1's trade-off encoder-independent)"
    )
    student: StudentConfig = Field(
        default_factory=lambda: StudentConfig(num_layers=2, hidden_size=384, num_heads=12, intermediate_size=1536,
                                              init="teacher_layers"),
        description="built from the (pre-trained) teacher; init_layers null with teacher_layers = the mapped teacher layers",
    )
    mapping: LayerMapping = Field(default_factory=LayerMapping)
    distill: TrainConfig = Field(default_factory=lambda: TrainConfig(max_steps=200, batch_size=16, learning_rate=1e-4),
                                 description="students, step 1: embedding/attention/hidden matches (+ Meta-KD's transfer loss)")
    prediction: TrainConfig = Field(default_factory=lambda: TrainConfig(max_steps=200, batch_size=16, learning_rate=1e-4),
                                    description="students, step 2: soft cross-entropy on the teacher's logits")
    temperature: float = Field(1.0, gt=0, description="prediction-layer soft cross-entropy temperature")
    baselines: bool = Field(True, description="also distil (a) single-domain and (b) mixed-domain students")

    @model_validator(mode="after")
    def _consistent(self) -> "MetaKDSection":
        if len(set(self.domains)) != len(self.domains):
            raise ValueError(f"meta_kd.domains has duplicates: {self.domains}")
        unknown = [t for t in self.targets or [] if t not in self.domains]
        if unknown:
            raise ValueError(f"meta_kd.targets {unknown} are not in meta_kd.domains {self.domains}")
        bad = [f for f in self.fractions if not 0 < f <= 1]
        if bad:
            raise ValueError(f"meta_kd.fractions must lie in (0, 1], got {bad}")
        for name in ("fractions", "seeds"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"meta_kd.{name} has duplicates: {values}")
        return self

    @property
    def target_domains(self) -> list[str]:
        return list(self.targets) if self.targets else list(self.domains)


class QASection(StrictModel):
    """Extractive QA (SQuAD): where the rows come from, the sliding-window features, post-processing.

    ``source: dev-articles`` splits the official dev set by article (title) into a train part and
    an eval part, for machines that only hold dev-v1.1.json; every output names those parts
    (``dev-articles-train``, ``dev-articles-eval``). ``train-dev`` uses the official train and dev
    files. ``version_2`` picks SQuAD v2.0 (task squad_v2): unanswerable questions and a tuned
    no-answer threshold.
    """

    version_2: bool = False
    source: Literal["dev-articles", "train-dev"] = "dev-articles"
    eval_fraction: float = Field(0.5, gt=0, lt=1, description="share of articles in the eval part (dev-articles)")
    articles: int | None = Field(None, ge=2, description="use this many articles (seeded pick; dev-articles)")
    train_limit: int | None = Field(None, ge=1, description="at most N training questions (seeded)")
    eval_limit: int | None = Field(None, ge=1, description="at most N eval questions (seeded)")
    seed: int = 13
    max_seq_length: int = Field(384, ge=32)
    doc_stride: int = Field(128, ge=1, description="tokens shared by consecutive windows of a long context")
    max_query_length: int = Field(64, ge=4, description="question tokens kept")
    max_answer_length: int = Field(30, ge=1, description="longest answer span, in tokens")
    n_best: int = Field(20, ge=1, description="start and end candidates per window")
    eval_batch_size: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _window_fits(self) -> "QASection":
        room = self.max_seq_length - self.max_query_length - 3  # [CLS] question [SEP] context [SEP]
        if self.doc_stride >= room:
            raise ValueError(
                f"qa.doc_stride {self.doc_stride} must be below the context room of a window "
                f"(max_seq_length {self.max_seq_length} - max_query_length {self.max_query_length} - 3 = {room}); "
                f"lower doc_stride or raise max_seq_length"
            )
        return self

    @property
    def task_name(self) -> str:
        return "squad_v2" if self.version_2 else "squad"


class BenchmarkSection(StrictModel):
    """The benchmark stage's grid (kd_core.bench). batch_size x seq_len is the headline
    throughput cell the report uses, latency_batch x seq_len its latency; the lists widen the grid."""

    batch_size: int = Field(32, ge=1)
    seq_len: int = Field(128, ge=8)
    repeats: int = Field(5, ge=1)
    threads: int | None = None
    latency_batch: int = Field(1, ge=1)
    latency_repeats: int = Field(20, ge=1, description="repeats of the batch-latency_batch cells (p95 needs more)")
    variants: list[Literal["eager", "compile", "int8", "onnx"]] = Field(default_factory=lambda: ["eager"], min_length=1)
    batches: list[int] | None = Field(None, description="default: [latency_batch, batch_size]")
    seq_lens: list[int] | None = Field(None, description="default: [seq_len]")
    thread_counts: list[int] | None = Field(None, description="default: [threads], or torch's current setting")
    max_tokens: int | None = Field(None, ge=1, description="skip cells with batch x seq above this")
    cell_budget_s: float | None = Field(None, gt=0, description="skip a model in a cell estimated to take longer")
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["float32", "bfloat16"] = "float32"


class ExportSection(StrictModel):
    """The export stage (tinybert-full, minilm): the student as ONNX and ONNX int8, each checked
    against eager on the evaluation split and timed beside it, each registered in MLflow."""

    enabled: bool = Field(False, description="true: run the export stage after the benchmark")
    forms: list[Literal["onnx", "onnx_int8"]] = Field(default_factory=lambda: ["onnx", "onnx_int8"], min_length=1)
    batch_size: int = Field(32, ge=1, description="the timed batch")
    seq_len: int = Field(128, ge=8, description="the timed sequence length")
    repeats: int = Field(5, ge=1)
    threads: int | None = Field(None, ge=1, description="default: torch's current setting")


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
    finetune_student: StudentTaskSection = Field(
        default_factory=lambda: StudentTaskSection(train=TrainConfig(max_steps=500, learning_rate=1e-4))
    )
    augment: AugmentSection = Field(default_factory=AugmentSection)
    task_distill: TaskDistillSection = Field(default_factory=TaskDistillSection)
    meta_kd: MetaKDSection = Field(default_factory=MetaKDSection)
    qa: QASection = Field(default_factory=QASection)
    benchmark: BenchmarkSection = Field(default_factory=BenchmarkSection)
    export: ExportSection = Field(default_factory=ExportSection)
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
