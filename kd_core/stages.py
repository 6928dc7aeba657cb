"""The pipeline's stages as pure functions.

Each takes the resolved :class:`~kd_core.config.PipelineConfig`, its input artifact dirs and an
output dir (a staging dir of the artifact store), writes its files there and returns a small
JSON-able result for the manifest. Long stages checkpoint into ``work`` so that a killed run
resumes mid-stage. Prefect and MLflow live in ``tasks/``; nothing here imports them.
"""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from kd_core.config import FinetuneSection, GeneralDistillSection, LayerMapping, PipelineConfig, StudentConfig, TrainConfig
from kd_core.data.features import encode_examples
from kd_core.data.tasks import default_data_dir
from kd_core.errors import UserError
from kd_core.models.registry import load_model, load_tokenizer
from kd_core.train.recipes import ModelShape, expand_recipe

# torch, transformers' models and the trainer load inside the stage functions that compute: a run
# whose every stage is cached (keys, sections, lookups) never imports them (about 4 s)
if TYPE_CHECKING:
    from kd_core.train.objective import Objective
    from kd_core.train.trainer import DistillTrainer, TrainerCallback, TrainResult

MODEL_SUBDIR = "model"
CORPUS_SUBDIR = "corpus"  # the shards keep their own manifest; the store's sits one level up
PRUNING_SUBDIR = "pruning"  # kept.parquet and scores.parquet of a pruned student


class StageInputError(UserError, ValueError):
    pass


def data_root(cfg: PipelineConfig) -> Path:
    # the loaders' own rule (KD_DATA_DIR, ../shared/data, beside the repo): `kd run` and
    # `kd prepare-task` find the same data from any working directory
    root = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
    if not root.is_dir():
        raise StageInputError(f"data dir {root} does not exist; set data_dir in the profile or KD_DATA_DIR")
    return root


def _under(root: Path, path: str) -> Path:
    candidate = Path(path)
    return candidate if candidate.is_absolute() else root / candidate


def shape_of(model) -> ModelShape:
    from kd_core.models.adaptors import ModelAdaptor

    with ModelAdaptor(model) as adaptor:
        return ModelShape(adaptor.num_layers, adaptor.hidden_size, adaptor.num_heads)


def _history_frame(result: TrainResult) -> pd.DataFrame:
    return pd.DataFrame(result.history)


def _train_summary(result: TrainResult, world_size: int) -> dict:
    return {
        "steps": result.steps,
        "world_size": world_size,
        "resumed_from": result.resumed_from,
        "sequences_per_second": round(result.sequences_per_second, 3),
        "train_seconds": round(result.train_seconds, 3),
        "first_loss": result.history[0]["loss"] if result.history else None,
        "final_loss": result.final_loss,
    }


def _finish_training(trainer: DistillTrainer, result: TrainResult, tokenizer, out: Path) -> dict:
    trainer.save_student(out / MODEL_SUBDIR, tokenizer, atomic=False)  # rank 0 writes, all wait
    if trainer.accelerator.is_main_process:
        _history_frame(result).to_parquet(out / "history.parquet", index=False)
    return _train_summary(result, trainer.accelerator.num_processes)


def _untrained(out: Path, reason: str) -> dict:
    """The summary (and the empty loss history the report reads) of a training stage switched off."""
    pd.DataFrame({"step": pd.Series(dtype="int64"), "loss": pd.Series(dtype="float64")}).to_parquet(
        out / "history.parquet", index=False)
    return {"steps": 0, "untrained": reason}


# ---- corpus and general distillation ------------------------------------------------------------
def progress_of(callbacks: Sequence[TrainerCallback]):
    """One ``(done, total, unit)`` function for the callbacks that take progress events."""
    takers = [cb.on_progress for cb in callbacks if hasattr(cb, "on_progress")]

    def report(done: int, total: int, unit: str) -> None:
        for on_progress in takers:
            on_progress(done, total, unit)

    return report


def prepare_corpus(cfg: PipelineConfig, out: Path, callbacks: Sequence[TrainerCallback] = ()) -> dict:
    from kd_core.data.corpus import prepare_corpus as write_shards

    tokenizer = load_tokenizer(cfg.teacher)
    source = _under(data_root(cfg), cfg.corpus.path)
    manifest = write_shards(
        source, tokenizer, out / CORPUS_SUBDIR, cfg.corpus.max_seq_length, max_blocks=cfg.corpus.max_blocks, progress=False,
        on_progress=progress_of(callbacks),
    )
    return {k: v for k, v in manifest.items() if isinstance(v, (int, float, str))}


def distill_on_corpus(
    teacher_source: str | Path,
    student_cfg: StudentConfig,
    section: GeneralDistillSection,
    corpus_dir: Path,
    out: Path,
    work: Path,
    callbacks: Sequence[TrainerCallback] = (),
) -> dict:
    """General (task-agnostic) distillation of a student from any teacher on corpus blocks."""
    import torch

    from kd_core.models.student import build_student, init_layers_of, init_projections_from_channels
    from kd_core.train.objective import Objective
    from kd_core.train.trainer import DistillTrainer
    from kd_core.data.corpus import load_corpus_blocks

    tokenizer = load_tokenizer(teacher_source)
    teacher = load_model(teacher_source)
    blocks = load_corpus_blocks(corpus_dir / CORPUS_SUBDIR)
    torch.manual_seed(section.train.seed)
    student = build_student(teacher, student_cfg, calibration=blocks, pad_token_id=tokenizer.pad_token_id,
                            plan_out=out / PRUNING_SUBDIR)
    if not section.enabled:
        student.save_pretrained(out / MODEL_SUBDIR)
        tokenizer.save_pretrained(out / MODEL_SUBDIR)
        return _untrained(out, f"enabled=false: the student as initialised (init={student_cfg.init})")
    s_shape, t_shape = shape_of(student), shape_of(teacher)
    specs = expand_recipe(section.recipe, section.mapping, s_shape.num_layers, t_shape.num_layers, section.matches,
                          section.recipe_params, init_layers=init_layers_of(student))
    objective = Objective(specs, s_shape, t_shape)
    init_projections_from_channels(objective.projections, student)
    trainer = DistillTrainer(teacher, student, objective, blocks, section.train, work, tokenizer.pad_token_id, callbacks)
    return _finish_training(trainer, trainer.train(), tokenizer, out)


def general_distill(cfg: PipelineConfig, corpus_dir: Path, out: Path, work: Path, callbacks: Sequence[TrainerCallback] = ()) -> dict:
    return distill_on_corpus(cfg.teacher, cfg.student, cfg.general_distill, corpus_dir, out, work, callbacks)


def teacher_shape(teacher: str) -> dict[str, int]:
    """Depth, width and heads of a teacher, read from its config alone."""
    from transformers import AutoConfig

    from kd_core.models.registry import resolve_model
    from kd_core.models.student import teacher_sizes

    return teacher_sizes(AutoConfig.from_pretrained(resolve_model(teacher)))


def assistant_config(cfg: PipelineConfig) -> StudentConfig | None:
    """MiniLM §3.3: an assistant with the teacher's depth and the student's width, when the
    student is at most half the teacher in both (``minilm.assistant``: auto), or always/never."""
    mode = cfg.minilm.assistant
    sizes = teacher_shape(cfg.teacher)
    small = cfg.student.num_layers * 2 <= sizes["layers"] and cfg.student.hidden_size * 2 <= sizes["hidden"]
    if mode == "off" or (mode == "auto" and not small):
        return None
    # a pruned student gets a pruned assistant: teacher -> assistant -> student, each cut from the one above
    init = "pruned" if cfg.student.init == "pruned" else "random"
    return cfg.student.model_copy(update={"num_layers": sizes["layers"], "init": init, "init_layers": None})


def assistant_distill(cfg: PipelineConfig, corpus_dir: Path, out: Path, work: Path, callbacks: Sequence[TrainerCallback] = ()) -> dict:
    assistant = assistant_config(cfg)
    if assistant is None:
        raise StageInputError("this config needs no teacher assistant (minilm.assistant=auto and the student is large)")
    return distill_on_corpus(cfg.teacher, assistant, cfg.minilm, corpus_dir, out, work, callbacks)


def minilm_distill(cfg: PipelineConfig, corpus_dir: Path, out: Path, work: Path, callbacks: Sequence[TrainerCallback] = (), assistant_dir: Path | None = None) -> dict:
    teacher = assistant_dir / MODEL_SUBDIR if assistant_dir is not None else cfg.teacher
    return distill_on_corpus(teacher, cfg.student, cfg.minilm, corpus_dir, out, work, callbacks)


# ---- task data ---------------------------------------------------------------------------------
HOLDOUT_SPLIT = "holdout"


def prepare_task(cfg: PipelineConfig, out: Path) -> dict:
    """train.parquet and the eval split; with task.holdout_rows also holdout.parquet, rows taken out
    of train before train_limit applies. The files do not depend on whether eval_split is holdout
    or the official split, so a selection run on the holdout and the final run share every
    training artifact."""
    from kd_core.data.loaders import load_split, write_split
    from kd_core.data.tasks import get_task

    section = cfg.task
    spec = get_task(section.name)
    root = data_root(cfg)
    result = {"task": spec.name}
    train = load_split(spec, root, "train")
    frames = {}
    if section.holdout_rows:
        if section.holdout_rows >= len(train):
            raise StageInputError(f"task.holdout_rows={section.holdout_rows} leaves no training rows ({spec.name} "
                                  f"train has {len(train)}); lower task.holdout_rows")
        held = train.sample(n=section.holdout_rows, random_state=section.seed)
        frames[HOLDOUT_SPLIT] = held.sort_values("idx").reset_index(drop=True)
        train = train.drop(held.index).reset_index(drop=True)
    frames["train"] = _seeded_rows(train, section.train_limit, section.seed)
    official = "dev" if section.eval_split == HOLDOUT_SPLIT else section.eval_split
    frames[official] = _seeded_rows(load_split(spec, root, official), section.eval_limit, section.seed)
    for split in ("train", official, HOLDOUT_SPLIT):
        if split in frames:
            fingerprint = write_split(frames[split], out / f"{split}.parquet", spec, split)
            result[f"{split}_rows"] = len(frames[split])
            result[f"{split}_fingerprint"] = fingerprint
            result[f"{split}_empty_text_rows"] = empty = count_empty_texts(frames[split])
            if empty:
                logging.getLogger("kd_core.data").warning(
                    "%s %s: %d of %d rows have an empty text field; they are kept (the model sees only "
                    "[CLS] [SEP] for them)", spec.name, split, empty, len(frames[split]))
    return result


def count_empty_texts(frame: pd.DataFrame) -> int:
    """Rows whose first text, or second text where the task has one, is empty or whitespace."""
    empty = frame["text_a"].fillna("").str.strip() == ""
    if "text_b" in frame and frame["text_b"].notna().any():
        empty |= frame["text_b"].notna() & (frame["text_b"].fillna("").str.strip() == "")
    return int(empty.sum())


def _seeded_rows(frame: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame:
    """At most ``limit`` rows, a seeded sample kept in file order."""
    if limit is None or limit >= len(frame):
        return frame
    return frame.sample(n=limit, random_state=seed).sort_values("idx").reset_index(drop=True)


def _read_rows(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise StageInputError(f"expected task rows at {path}; rerun the upstream stage")
    return pd.read_parquet(path)


def _task_head_kwargs(spec) -> dict:
    if spec.is_regression:
        return {"num_labels": 1, "problem_type": "regression"}
    labels = list(spec.labels)
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
        "problem_type": "single_label_classification",
    }


def finetune(
    model_source: str | Path,
    section: FinetuneSection,
    cfg: PipelineConfig,
    task_dir: Path,
    out: Path,
    work: Path,
    callbacks: Sequence[TrainerCallback] = (),
) -> dict:
    """Supervised fine-tuning on the task's train rows (the trainer with a hard-label objective)."""
    import torch

    from kd_core.train.objective import Objective
    from kd_core.train.trainer import DistillTrainer
    from kd_core.data.tasks import get_task

    spec = get_task(cfg.task.name)
    tokenizer = load_tokenizer(model_source)
    train = section.train
    torch.manual_seed(train.seed)
    with quiet_transformers():
        model = load_model(model_source, head="sequence_classification", **_task_head_kwargs(spec))
    examples = encode_examples(_read_rows(task_dir / "train.parquet"), tokenizer, cfg.task.max_seq_length)
    shape = shape_of(model)
    specs = expand_recipe("finetune", LayerMapping(), shape.num_layers, shape.num_layers, params={"regression": spec.is_regression})
    trainer = DistillTrainer(None, model, Objective(specs, shape, None), examples, train, work, tokenizer.pad_token_id, callbacks)
    return _finish_training(trainer, trainer.train(), tokenizer, out)


def finetune_teacher(cfg: PipelineConfig, task_dir: Path, out: Path, work: Path, callbacks: Sequence[TrainerCallback] = ()) -> dict:
    return finetune(cfg.teacher, cfg.finetune_teacher, cfg, task_dir, out, work, callbacks)


def finetune_student(
    cfg: PipelineConfig,
    student_dir: Path,
    task_dir: Path,
    out: Path,
    work: Path,
    callbacks: Sequence[TrainerCallback] = (),
    teacher_dir: Path | None = None,
) -> dict:
    """The general student learns the task: fine-tuning, or (recipe ``distilbert``) distillation
    from the fine-tuned teacher on the task's train rows."""
    section = cfg.finetune_student
    if not section.needs_teacher:
        return finetune(student_dir / MODEL_SUBDIR, section, cfg, task_dir, out, work, callbacks)
    if teacher_dir is None:
        raise StageInputError(f"finetune_student.recipe={section.recipe!r} distils from the fine-tuned teacher; pass its artifact")
    from kd_core.data.tasks import get_task

    params = {**section.recipe_params, "regression": get_task(cfg.task.name).is_regression}
    return _distill_on_task(cfg, section.train, section.recipe, cfg.task_distill.mapping, params,
                            teacher_dir, student_dir, task_dir, out, work, callbacks)


def augment(cfg: PipelineConfig, task_dir: Path, out: Path, callbacks: Sequence[TrainerCallback] = ()) -> dict:
    from kd_core.augment import augment_frame, write_augmented
    from kd_core.data.tasks import get_task

    section = cfg.augment
    report = progress_of(callbacks)
    rows = _read_rows(task_dir / "train.parquet")
    if not section.enabled:
        shutil.copyfile(task_dir / "train.parquet", out / "train.parquet")
        return {"mode": "disabled", "rows": len(rows)}
    augmented, info = augment_frame(
        rows,
        n_aug=section.n_aug,
        p_t=section.p_t,
        k=section.k,
        mlm=section.mlm,
        vectors=section.vectors,
        seed=section.seed,
        progress=lambda done, total: report(done, total, "rows"),
    )
    # The file keeps the augmentation manifest, minus its timing: equal inputs must give equal bytes,
    # or a recomputed artifact would change every descendant's cache key.
    stable = {**info, "stats": {k: v for k, v in info.get("stats", {}).items() if k != "seconds"}}
    write_augmented(augmented, out / "train.parquet", get_task(cfg.task.name), "train", stable)
    return {"rows": len(augmented), "source_rows": len(rows), **{k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))}}


def prune_finetuned(cfg: PipelineConfig, teacher_dir: Path, task_dir: Path, out: Path) -> dict:
    """The student cut out of the fine-tuned teacher, head included, by importance on task train
    rows (CoFi / Extract-Then-Distill style: task distillation follows, without general distillation)."""
    from kd_core.models.student import build_student, init_layers_of
    from kd_core.data.tasks import get_task

    spec = get_task(cfg.task.name)
    tokenizer = load_tokenizer(teacher_dir / MODEL_SUBDIR)
    teacher = _load_classifier(teacher_dir / MODEL_SUBDIR, spec)
    rows = encode_examples(_read_rows(task_dir / "train.parquet"), tokenizer, cfg.task.max_seq_length)
    student = build_student(teacher, cfg.student, calibration=rows, pad_token_id=tokenizer.pad_token_id,
                            plan_out=out / PRUNING_SUBDIR)
    student.save_pretrained(out / MODEL_SUBDIR)
    tokenizer.save_pretrained(out / MODEL_SUBDIR)
    return {"init_layers": init_layers_of(student), "params": sum(p.numel() for p in student.parameters()),
            "calibration_rows": min(cfg.student.prune.calibration_rows, len(rows))}


# ---- task distillation ---------------------------------------------------------------------------
def _load_classifier(model_dir: Path, spec):
    from transformers import AutoModelForSequenceClassification

    from kd_core.evaluate.glue import check_label_order

    check_label_order(model_dir, spec)  # the head kwargs below would relabel a permuted head silently
    with quiet_transformers():  # an encoder dir gains a fresh head here, by design
        return AutoModelForSequenceClassification.from_pretrained(model_dir, **_task_head_kwargs(spec))


@contextmanager
def quiet_transformers():
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def _init_projections(objective: Objective, source_dir: Path) -> None:
    """Start from the projections learned one stage earlier, where they fit."""
    from kd_core.train.trainer import load_projections

    saved = load_projections(source_dir)
    for name, module in objective.projections.items():
        state = {k.split(".", 1)[1]: v for k, v in saved.items() if k.split(".", 1)[0] == name}
        if state and all(state[k].shape == v.shape for k, v in module.state_dict().items() if k in state):
            module.load_state_dict(state, strict=False)


def task_distill(
    cfg: PipelineConfig,
    step: str,
    teacher_dir: Path,
    student_dir: Path,
    data_dir: Path,
    out: Path,
    work: Path,
    callbacks: Sequence[TrainerCallback] = (),
) -> dict:
    """TinyBERT task distillation: ``intermediate`` (layers) then ``prediction`` (logits)."""
    from kd_core.data.tasks import get_task

    if step not in ("intermediate", "prediction"):
        raise StageInputError(f"task_distill step must be intermediate or prediction, got {step!r}")
    section = cfg.task_distill
    if step == "intermediate":
        if section.skip_intermediate:
            shutil.copytree(student_dir / MODEL_SUBDIR, out / MODEL_SUBDIR)
            return _untrained(out, "skip_intermediate=true: the student passed on as it came")
        return _distill_on_task(cfg, section.intermediate, section.recipe, section.mapping, section.recipe_params,
                                teacher_dir, student_dir, data_dir, out, work, callbacks)
    params = {"temperature": section.temperature, "regression": get_task(cfg.task.name).is_regression}
    return _distill_on_task(cfg, section.prediction, section.prediction_recipe, section.mapping, params,
                            teacher_dir, student_dir, data_dir, out, work, callbacks)


def _distill_on_task(
    cfg: PipelineConfig,
    train: TrainConfig,
    recipe: str,
    mapping,
    params: dict,
    teacher_dir: Path,
    student_dir: Path,
    data_dir: Path,
    out: Path,
    work: Path,
    callbacks: Sequence[TrainerCallback],
) -> dict:
    """Distil a fine-tuned teacher's task model into the student with ``recipe``'s matches."""
    import torch

    from kd_core.models.student import init_layers_of, init_projections_from_channels
    from kd_core.train.objective import Objective
    from kd_core.train.trainer import DistillTrainer
    from kd_core.data.tasks import get_task

    spec = get_task(cfg.task.name)
    tokenizer = load_tokenizer(teacher_dir / MODEL_SUBDIR)
    teacher = _load_classifier(teacher_dir / MODEL_SUBDIR, spec)
    torch.manual_seed(train.seed)
    student = _load_classifier(student_dir / MODEL_SUBDIR, spec)
    s_shape, t_shape = shape_of(student), shape_of(teacher)
    specs = expand_recipe(recipe, mapping, s_shape.num_layers, t_shape.num_layers, params=params,
                          init_layers=init_layers_of(student))
    objective = Objective(specs, s_shape, t_shape)
    init_projections_from_channels(objective.projections, student)
    _init_projections(objective, student_dir / MODEL_SUBDIR)  # learned ones, where an earlier stage saved them
    examples = encode_examples(_read_rows(data_dir / "train.parquet"), tokenizer, cfg.task.max_seq_length)
    # a hard-label recipe (the no-KD ablations) must not pay for the teacher's forward pass
    teacher = teacher if objective.needs_teacher else None
    trainer = DistillTrainer(teacher, student, objective, examples, train, work, tokenizer.pad_token_id, callbacks)
    return _finish_training(trainer, trainer.train(), tokenizer, out)


# ---- evaluation, benchmark, report ----------------------------------------------------------------
def evaluate(cfg: PipelineConfig, models: dict[str, Path], task_dir: Path, out: Path) -> dict:
    from kd_core.data.tasks import get_task
    from kd_core.evaluate.glue import evaluate_model, primary_score

    spec = get_task(cfg.task.name)
    rows = _read_rows(task_dir / f"{cfg.task.eval_split}.parquet")
    records = []
    for name, model_dir in models.items():
        tokenizer = load_tokenizer(model_dir / MODEL_SUBDIR)
        model = _load_classifier(model_dir / MODEL_SUBDIR, spec)
        examples = encode_examples(rows, tokenizer, cfg.task.max_seq_length)
        metrics = evaluate_model(model, examples, spec.metrics, spec.is_regression, tokenizer.pad_token_id)
        records.append({"model": name, "task": spec.name, "split": cfg.task.eval_split, "rows": len(rows),
                        "score": primary_score(metrics), **metrics})
    frame = pd.DataFrame(records)
    frame.to_parquet(out / "metrics.parquet", index=False)
    (out / "metrics.json").write_text(json.dumps(records, indent=2))
    return {f"{r['model']}_score": round(float(r["score"]), 4) for r in records}


def benchmark(cfg: PipelineConfig, models: dict[str, Path], out: Path) -> dict:
    """benchmark.parquet + benchmark.md of every model over cfg.benchmark's grid (kd_core.bench):
    the same inputs, one process, models interleaved within each repeat."""
    from kd_core.bench import BenchGrid, load_bench_model, run_benchmark, write_benchmark

    section = cfg.benchmark
    grid = BenchGrid.from_section(section)
    with quiet_transformers():  # a classifier dir loaded as a bare encoder: its head is expected to be unused
        loaded = [load_bench_model(name, path) for name, path in models.items()]
    frame = run_benchmark(loaded, grid)
    reference = "teacher" if "teacher" in models else next(iter(models))
    write_benchmark(frame, out, reference, title=f"{cfg.profile}: inference benchmark")
    headline = frame[(frame["variant"] == grid.variants[0]) & (frame["seq_len"] == section.seq_len) & (frame["status"] == "ok")]
    result = {}
    for row in headline.itertuples():
        if row.batch_size == section.batch_size:
            result[f"{row.model}_seq_per_s"] = round(float(row.seq_per_s), 2)
        if row.batch_size == section.latency_batch:
            result[f"{row.model}_latency_p50_ms"] = round(float(row.latency_p50_ms), 3)
    return result


def export(cfg: PipelineConfig, student_dir: Path, task_dir: Path, out: Path) -> dict:
    """The student as ONNX and ONNX int8 under ``out/<form>/`` (kd_core.export), with export.parquet
    and export.md: each form's parity with eager and its score on the evaluation split, and its
    speed beside eager."""
    from kd_core.data.tasks import get_task
    from kd_core.evaluate.glue import compute_metrics, primary_score
    from kd_core.export import TimingCell, export_forms, export_markdown

    spec = get_task(cfg.task.name)
    section = cfg.export
    tokenizer = load_tokenizer(student_dir / MODEL_SUBDIR)
    model = _load_classifier(student_dir / MODEL_SUBDIR, spec)
    rows = _read_rows(task_dir / f"{cfg.task.eval_split}.parquet")
    examples = encode_examples(rows, tokenizer, cfg.task.max_seq_length)
    labels = np.asarray([ex["labels"] for ex in examples])

    def score(logits: np.ndarray) -> float:
        predictions = logits[:, 0] if spec.is_regression else logits.argmax(-1)
        return primary_score(compute_metrics(spec.metrics, predictions, labels))

    cell = TimingCell(batch_size=section.batch_size, seq_len=section.seq_len, repeats=section.repeats,
                      threads=section.threads)
    frame = export_forms(model, tokenizer, student_dir / MODEL_SUBDIR, examples, spec.is_regression, out,
                         forms=section.forms, cell=cell, score=score)
    frame.insert(1, "split", cfg.task.eval_split)
    frame.to_parquet(out / "export.parquet", index=False)
    (out / "export.md").write_text(export_markdown(frame, f"{cfg.profile}: {spec.name} student, exported"))
    result = {}
    for row in frame.itertuples():
        result[f"{row.form}_score"] = round(float(row.score), 4)
        result[f"{row.form}_seq_per_s"] = round(float(row.seq_per_s), 2)
        if row.form != "eager":
            result[f"{row.form}_max_abs_logit_diff"] = float(row.max_abs_logit_diff)
            result[f"{row.form}_label_agreement"] = round(float(row.label_agreement), 6)
            result[f"{row.form}_speedup"] = round(float(row.speedup_vs_eager), 3)
            result[f"{row.form}_size_mb"] = round(float(row.size_mb), 3)
    return result


def report(
    cfg: PipelineConfig,
    eval_dir: Path,
    bench_dir: Path,
    out: Path,
    training: dict[str, Path] | None = None,
    reference: str = "teacher",
) -> dict:
    """report.md, pareto.png, loss_curves.png and summary.parquet of one flow run (kd_core.report)."""
    from kd_core.report import write_report

    histories = {}
    for stage, stage_dir in (training or {}).items():
        history = stage_dir / "history.parquet"
        if not history.is_file():
            raise StageInputError(f"training stage {stage} has no {history}; rerun it (kd stage {stage})")
        histories[stage] = pd.read_parquet(history)
    summary = write_report(
        out,
        f"{cfg.profile}: {cfg.task.name}",
        pd.read_parquet(_existing(eval_dir / "metrics.parquet")),
        pd.read_parquet(_existing(bench_dir / "benchmark.parquet")),
        histories,
        report_cells(cfg),
        reference,
    )
    result = {}
    for row in summary.itertuples():
        suffix = "" if row.split == cfg.task.eval_split else f"_{row.split}"
        result[f"{row.model}{suffix}_retention"] = round(float(row.retention), 2)
        if np.isfinite(row.speedup):
            result[f"{row.model}{suffix}_speedup"] = round(float(row.speedup), 3)
    return result


def report_cells(cfg: PipelineConfig):
    """The benchmark cells the report reads: eager (else the first variant measured) at the config's cells."""
    from kd_core.report import BenchmarkCells

    section = cfg.benchmark
    variant = "eager" if "eager" in section.variants else section.variants[0]
    return BenchmarkCells(section.batch_size, section.seq_len, section.latency_batch, variant)


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise StageInputError(f"expected {path}; rerun the upstream stage")
    return path

