"""The GLUE flows' stages (tinybert-full, minilm): corpus, general distillation, task data,
teacher fine-tuning, augmentation, pruning, task distillation, evaluation, benchmark, export and
report. Each is ``fn(cfg, io) -> dict`` (:mod:`kd_core.stages.common`); its docstring names the
input roles it reads.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd

from kd_core.config import FinetuneSection, GeneralDistillSection, LayerMapping, PipelineConfig, StudentConfig, TrainConfig
from kd_core.data.features import encode_examples
from kd_core.models.registry import load_model, load_tokenizer
from kd_core.stages.common import (
    CORPUS_SUBDIR,
    HOLDOUT_SPLIT,
    MODEL_SUBDIR,
    PRUNING_SUBDIR,
    StageInputError,
    StageIO,
    count_empty_texts,
    data_root,
    existing,
    finish_training,
    init_projections,
    load_classifier,
    progress_of,
    quiet_transformers,
    read_rows,
    seeded_rows,
    shape_of,
    task_head_kwargs,
    teacher_shape,
    under,
    untrained,
)
from kd_core.train.recipes import expand_recipe

if TYPE_CHECKING:
    from kd_core.train.trainer import TrainerCallback


# ---- corpus and general distillation ------------------------------------------------------------
def prepare_corpus(cfg: PipelineConfig, io: StageIO) -> dict:
    """Corpus blocks of ``corpus.path``, tokenized by the teacher's tokenizer. Inputs: none."""
    from kd_core.data.corpus import prepare_corpus as write_shards

    tokenizer = load_tokenizer(cfg.teacher)
    source = under(data_root(cfg), cfg.corpus.path)
    manifest = write_shards(
        source, tokenizer, io.out / CORPUS_SUBDIR, cfg.corpus.max_seq_length, max_blocks=cfg.corpus.max_blocks,
        progress=False, on_progress=progress_of(io.callbacks),
    )
    return {k: v for k, v in manifest.items() if isinstance(v, (int, float, str))}


def distill_on_corpus(
    *,
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

    from kd_core.data.corpus import load_corpus_blocks
    from kd_core.models.student import build_student, init_layers_of, init_projections_from_channels
    from kd_core.train.objective import Objective
    from kd_core.train.trainer import DistillTrainer

    tokenizer = load_tokenizer(teacher_source)
    teacher = load_model(teacher_source)
    blocks = load_corpus_blocks(corpus_dir / CORPUS_SUBDIR)
    torch.manual_seed(section.train.seed)
    student = build_student(teacher, student_cfg, calibration=blocks, pad_token_id=tokenizer.pad_token_id,
                            plan_out=out / PRUNING_SUBDIR)
    if not section.enabled:
        student.save_pretrained(out / MODEL_SUBDIR)
        tokenizer.save_pretrained(out / MODEL_SUBDIR)
        return untrained(out, f"enabled=false: the student as initialised (init={student_cfg.init})")
    s_shape, t_shape = shape_of(student), shape_of(teacher)
    specs = expand_recipe(section.recipe, section.mapping, s_shape.num_layers, t_shape.num_layers, section.matches,
                          section.recipe_params, init_layers=init_layers_of(student))
    objective = Objective(specs, s_shape, t_shape)
    init_projections_from_channels(objective.projections, student)
    trainer = DistillTrainer(teacher, student, objective, examples=blocks, config=section.train, output_dir=work,
                             pad_token_id=tokenizer.pad_token_id, callbacks=callbacks)
    return finish_training(trainer, trainer.train(), tokenizer, out)


def general_distill(cfg: PipelineConfig, io: StageIO) -> dict:
    """The student distilled from the pre-trained teacher on corpus blocks. Inputs: ``corpus``."""
    return distill_on_corpus(teacher_source=cfg.teacher, student_cfg=cfg.student, section=cfg.general_distill,
                             corpus_dir=io["corpus"], out=io.out, work=io.work, callbacks=io.callbacks)


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


def assistant_distill(cfg: PipelineConfig, io: StageIO) -> dict:
    """MiniLM's teacher assistant (the teacher's depth, the student's width). Inputs: ``corpus``."""
    assistant = assistant_config(cfg)
    if assistant is None:
        raise StageInputError("this config needs no teacher assistant (minilm.assistant=auto and the student is large)")
    return distill_on_corpus(teacher_source=cfg.teacher, student_cfg=assistant, section=cfg.minilm,
                             corpus_dir=io["corpus"], out=io.out, work=io.work, callbacks=io.callbacks)


def minilm_distill(cfg: PipelineConfig, io: StageIO) -> dict:
    """The MiniLM student, from the assistant where there is one. Inputs: ``corpus``, and
    ``assistant`` when the flow distils through one."""
    assistant_dir = io.get("assistant")
    teacher = assistant_dir / MODEL_SUBDIR if assistant_dir is not None else cfg.teacher
    return distill_on_corpus(teacher_source=teacher, student_cfg=cfg.student, section=cfg.minilm,
                             corpus_dir=io["corpus"], out=io.out, work=io.work, callbacks=io.callbacks)


# ---- task data ---------------------------------------------------------------------------------
def prepare_task(cfg: PipelineConfig, io: StageIO) -> dict:
    """Inputs: none. train.parquet and the eval split; with task.holdout_rows also holdout.parquet, rows taken out
    of train before train_limit applies. The files do not depend on whether eval_split is holdout
    or the official split, so a selection run on the holdout and the final run share every
    training artifact."""
    from kd_core.data.loaders import load_split, write_split
    from kd_core.data.tasks import get_task

    out = io.out
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
    frames["train"] = seeded_rows(train, section.train_limit, section.seed)
    official = "dev" if section.eval_split == HOLDOUT_SPLIT else section.eval_split
    frames[official] = seeded_rows(load_split(spec, root, official), section.eval_limit, section.seed)
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


def finetune(
    *,
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

    from kd_core.data.tasks import get_task
    from kd_core.train.objective import Objective
    from kd_core.train.trainer import DistillTrainer

    spec = get_task(cfg.task.name)
    tokenizer = load_tokenizer(model_source)
    train = section.train
    torch.manual_seed(train.seed)
    with quiet_transformers():
        model = load_model(model_source, head="sequence_classification", **task_head_kwargs(spec))
    examples = encode_examples(read_rows(task_dir / "train.parquet"), tokenizer, cfg.task.max_seq_length)
    shape = shape_of(model)
    specs = expand_recipe("finetune", LayerMapping(), shape.num_layers, shape.num_layers, params={"regression": spec.is_regression})
    trainer = DistillTrainer(None, model, Objective(specs, shape, None), examples=examples, config=train, output_dir=work,
                             pad_token_id=tokenizer.pad_token_id, callbacks=callbacks)
    return finish_training(trainer, trainer.train(), tokenizer, out)


def finetune_teacher(cfg: PipelineConfig, io: StageIO) -> dict:
    """The pre-trained teacher fine-tuned on the task. Inputs: ``task`` (prepare_task)."""
    return finetune(model_source=cfg.teacher, section=cfg.finetune_teacher, cfg=cfg, task_dir=io["task"],
                    out=io.out, work=io.work, callbacks=io.callbacks)


def finetune_student(cfg: PipelineConfig, io: StageIO) -> dict:
    """The general student learns the task: fine-tuning, or (recipe ``distilbert``) distillation
    from the fine-tuned teacher on the task's train rows. Inputs: ``student``, ``task``, and
    ``teacher`` for a distilling recipe."""
    section = cfg.finetune_student
    if not section.needs_teacher:
        return finetune(model_source=io["student"] / MODEL_SUBDIR, section=section, cfg=cfg, task_dir=io["task"],
                        out=io.out, work=io.work, callbacks=io.callbacks)
    if io.get("teacher") is None:
        raise StageInputError(f"finetune_student.recipe={section.recipe!r} distils from the fine-tuned teacher; pass its artifact")
    from kd_core.data.tasks import get_task

    params = {**section.recipe_params, "regression": get_task(cfg.task.name).is_regression}
    return distill_on_task(cfg, io, train=section.train, recipe=section.recipe, mapping=cfg.task_distill.mapping,
                           params=params, data_role="task")


def augment(cfg: PipelineConfig, io: StageIO) -> dict:
    """TinyBERT's data augmentation of the train rows (or a copy, when disabled). Inputs: ``task``."""
    from kd_core.augment import augment_frame, write_augmented
    from kd_core.data.tasks import get_task

    section = cfg.augment
    report = progress_of(io.callbacks)
    rows = read_rows(io["task"] / "train.parquet")
    if not section.enabled:
        shutil.copyfile(io["task"] / "train.parquet", io.out / "train.parquet")
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
    write_augmented(augmented, io.out / "train.parquet", get_task(cfg.task.name), "train", stable)
    return {"rows": len(augmented), "source_rows": len(rows), **{k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))}}


def prune_finetuned(cfg: PipelineConfig, io: StageIO) -> dict:
    """The student cut out of the fine-tuned teacher, head included, by importance on task train
    rows (CoFi / Extract-Then-Distill style: task distillation follows, without general distillation).
    Inputs: ``teacher``, ``task``."""
    from kd_core.data.tasks import get_task
    from kd_core.models.student import build_student, init_layers_of

    spec = get_task(cfg.task.name)
    out = io.out
    tokenizer = load_tokenizer(io["teacher"] / MODEL_SUBDIR)
    teacher = load_classifier(io["teacher"] / MODEL_SUBDIR, spec)
    rows = encode_examples(read_rows(io["task"] / "train.parquet"), tokenizer, cfg.task.max_seq_length)
    student = build_student(teacher, cfg.student, calibration=rows, pad_token_id=tokenizer.pad_token_id,
                            plan_out=out / PRUNING_SUBDIR)
    student.save_pretrained(out / MODEL_SUBDIR)
    tokenizer.save_pretrained(out / MODEL_SUBDIR)
    return {"init_layers": init_layers_of(student), "params": sum(p.numel() for p in student.parameters()),
            "calibration_rows": min(cfg.student.prune.calibration_rows, len(rows))}


# ---- task distillation ---------------------------------------------------------------------------
def task_distill_intermediate(cfg: PipelineConfig, io: StageIO) -> dict:
    """TinyBERT's first task-distillation step: the layer matches of ``task_distill.recipe``.
    Inputs: ``teacher`` (fine-tuned), ``student``, ``data`` (the rows to distil on)."""
    section = cfg.task_distill
    if section.skip_intermediate:
        shutil.copytree(io["student"] / MODEL_SUBDIR, io.out / MODEL_SUBDIR)
        return untrained(io.out, "skip_intermediate=true: the student passed on as it came")
    return distill_on_task(cfg, io, train=section.intermediate, recipe=section.recipe, mapping=section.mapping,
                           params=section.recipe_params)


def task_distill_prediction(cfg: PipelineConfig, io: StageIO) -> dict:
    """TinyBERT's second task-distillation step: the logits (``task_distill.prediction_recipe``).
    Inputs: ``teacher``, ``student`` (the intermediate step's), ``data``."""
    from kd_core.data.tasks import get_task

    section = cfg.task_distill
    params = {"temperature": section.temperature, "regression": get_task(cfg.task.name).is_regression}
    return distill_on_task(cfg, io, train=section.prediction, recipe=section.prediction_recipe, mapping=section.mapping,
                           params=params)


def distill_on_task(cfg: PipelineConfig, io: StageIO, *, train: TrainConfig, recipe: str, mapping, params: dict,
                    data_role: str = "data") -> dict:
    """Distil the fine-tuned ``teacher``'s task model into ``student`` with ``recipe``'s matches, on
    the train rows of input ``data_role``."""
    import torch

    from kd_core.data.tasks import get_task
    from kd_core.models.student import init_layers_of, init_projections_from_channels
    from kd_core.train.objective import Objective
    from kd_core.train.trainer import DistillTrainer

    spec = get_task(cfg.task.name)
    teacher_dir, student_dir = io["teacher"], io["student"]
    tokenizer = load_tokenizer(teacher_dir / MODEL_SUBDIR)
    teacher = load_classifier(teacher_dir / MODEL_SUBDIR, spec)
    torch.manual_seed(train.seed)
    student = load_classifier(student_dir / MODEL_SUBDIR, spec)
    s_shape, t_shape = shape_of(student), shape_of(teacher)
    specs = expand_recipe(recipe, mapping, s_shape.num_layers, t_shape.num_layers, params=params,
                          init_layers=init_layers_of(student))
    objective = Objective(specs, s_shape, t_shape)
    init_projections_from_channels(objective.projections, student)
    init_projections(objective, student_dir / MODEL_SUBDIR)  # learned ones, where an earlier stage saved them
    examples = encode_examples(read_rows(io[data_role] / "train.parquet"), tokenizer, cfg.task.max_seq_length)
    # a hard-label recipe (the no-KD ablations) must not pay for the teacher's forward pass
    teacher = teacher if objective.needs_teacher else None
    trainer = DistillTrainer(teacher, student, objective, examples=examples, config=train, output_dir=io.work,
                             pad_token_id=tokenizer.pad_token_id, callbacks=io.callbacks)
    return finish_training(trainer, trainer.train(), tokenizer, io.out)


# ---- evaluation, benchmark, report ----------------------------------------------------------------
def evaluate(cfg: PipelineConfig, io: StageIO) -> dict:
    """metrics.parquet of every model input on ``task.eval_split``. Inputs: the models by name
    (``teacher``, ``student``), and ``task``."""
    return evaluate_models(cfg, io.others("task"), io["task"], io.out)


def evaluate_models(cfg: PipelineConfig, models: dict[str, Path], task_dir: Path, out: Path) -> dict:
    from kd_core.data.tasks import get_task
    from kd_core.evaluate.glue import evaluate_model, primary_score

    spec = get_task(cfg.task.name)
    rows = read_rows(task_dir / f"{cfg.task.eval_split}.parquet")
    records = []
    for name, model_dir in models.items():
        tokenizer = load_tokenizer(model_dir / MODEL_SUBDIR)
        model = load_classifier(model_dir / MODEL_SUBDIR, spec)
        examples = encode_examples(rows, tokenizer, cfg.task.max_seq_length)
        metrics = evaluate_model(model, examples, spec.metrics, spec.is_regression, tokenizer.pad_token_id)
        records.append({"model": name, "task": spec.name, "split": cfg.task.eval_split, "rows": len(rows),
                        "score": primary_score(metrics), **metrics})
    frame = pd.DataFrame(records)
    frame.to_parquet(out / "metrics.parquet", index=False)
    (out / "metrics.json").write_text(json.dumps(records, indent=2))
    return {f"{r['model']}_score": round(float(r["score"]), 4) for r in records}


def benchmark(cfg: PipelineConfig, io: StageIO) -> dict:
    """benchmark.parquet + benchmark.md of every model over cfg.benchmark's grid (kd_core.bench):
    the same inputs, one process, models interleaved within each repeat. Inputs: the models by
    name (``teacher``, ``student``)."""
    from kd_core.bench import BenchGrid, load_bench_model, run_benchmark, write_benchmark

    models, out = io.others("task"), io.out
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


def export(cfg: PipelineConfig, io: StageIO) -> dict:
    """The student as ONNX and ONNX int8 under ``out/<form>/`` (kd_core.export), with export.parquet
    and export.md: each form's parity with eager and its score on the evaluation split, and its
    speed beside eager. Inputs: ``student``, ``task``."""
    from kd_core.data.tasks import get_task
    from kd_core.evaluate.glue import compute_metrics, primary_score
    from kd_core.export import TimingCell, export_forms, export_markdown

    spec = get_task(cfg.task.name)
    section = cfg.export
    student_dir, task_dir, out = io["student"], io["task"], io.out
    tokenizer = load_tokenizer(student_dir / MODEL_SUBDIR)
    model = load_classifier(student_dir / MODEL_SUBDIR, spec)
    rows = read_rows(task_dir / f"{cfg.task.eval_split}.parquet")
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


HISTORY_ROLE = "history:"  # report inputs ``history:<stage>``: the training stages whose loss curves it draws


def report(cfg: PipelineConfig, io: StageIO, reference: str = "teacher") -> dict:
    """report.md, pareto.png, loss_curves.png and summary.parquet of one flow run (kd_core.report).
    Inputs: ``evaluation``, ``benchmark``, and ``history:<stage>`` for each training stage."""
    from kd_core.report import write_report

    histories = {}
    for role, stage_dir in io.inputs.items():
        if not role.startswith(HISTORY_ROLE):
            continue
        stage, history = role.removeprefix(HISTORY_ROLE), Path(stage_dir) / "history.parquet"
        if not history.is_file():
            raise StageInputError(f"training stage {stage} has no {history}; rerun it (kd stage {stage})")
        histories[stage] = pd.read_parquet(history)
    summary = write_report(
        io.out,
        f"{cfg.profile}: {cfg.task.name}",
        pd.read_parquet(existing(io["evaluation"] / "metrics.parquet")),
        pd.read_parquet(existing(io["benchmark"] / "benchmark.parquet")),
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


