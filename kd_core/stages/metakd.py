"""The meta-kd flow's stages (no Prefect, no MLflow; the contract of :mod:`kd_core.stages.common`).

The stage entries (:func:`encode_domains_stage`, :func:`teacher_stage`, :func:`student_stage`,
:func:`evaluation_stage`, :func:`report_stage`) read their inputs by role and call:

* :func:`train_teacher` - ``single`` (one domain), ``mixed`` (all domains, plain cross-entropy) or
  ``meta`` (all domains, §3.2 of Meta-KD) teacher, fine-tuned from the pre-trained ``cfg.teacher``.
* :func:`distill_student` - one student per (target, fraction, seed): ``single``/``mixed`` are
  plain TinyBERT task distillation from those teachers (λ ≡ 1, no transfer loss); ``meta`` is
  meta-distillation (§3.3). Same student init, matches, steps and rows for all three.
* :func:`evaluate_models` - dev scores; the tables are :mod:`kd_core.metakd.report`'s.

Few-shot: a target's training rows are subsampled (stratified, ``meta_kd.subsample_seed``) for
every teacher and student that sees the target domain; the other domains stay whole.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from kd_core.config import LayerMapping, PipelineConfig, TrainConfig, for_task
from kd_core.data.features import encode_examples
from kd_core.evaluate.glue import predict_logits
from kd_core.metakd.core import DomainCorruptionHead, subsample_fraction
from kd_core.metakd.objectives import (
    DomainBatchTrainer,
    MetaDistillObjective,
    MetaTeacherObjective,
    PredictionObjective,
    WeightedDistillObjective,
    attach_rows,
    encode_content,
    tinybert_intermediate_matches,
)
from kd_core.metakd.report import STUDENT_METHODS, TEACHER_KINDS, metakd_report, teacher_base_config
from kd_core.models.registry import load_model, load_tokenizer
from kd_core.models.student import build_student
from kd_core.stages.common import (
    MODEL_SUBDIR,
    StageInputError,
    StageIO,
    finish_training,
    load_classifier,
    quiet_transformers,
    read_rows,
    shape_of,
    task_head_kwargs,
)
from kd_core.train.objective import Objective, expand_recipe, map_layers
from kd_core.train.trainer import DistillTrainer, TrainerCallback

META_HEAD_FILE = "metakd_head.safetensors"
META_INFO_FILE = "metakd.json"
META_SCORES_FILE = "prototype_scores.parquet"
LOGITS_FILE = "teacher_logits.parquet"
REPS_FILE = "content_reps.npz"


def domain_task(domain: str) -> str:
    return f"amazon-{domain}"


def _spec(domain: str):
    from kd_core.data.tasks import get_task

    return get_task(domain_task(domain))


def training_rows(cfg: PipelineConfig, task_dirs: dict[str, Path], target: str | None, fraction: float) -> pd.DataFrame:
    """The train rows of ``task_dirs``'s domains with a ``domain`` index column (position in
    ``meta_kd.domains``); the ``target``'s rows keep only ``fraction`` of themselves."""
    section = cfg.meta_kd
    frames = []
    for domain, task_dir in task_dirs.items():
        if domain not in section.domains:
            raise StageInputError(f"domain {domain!r} is not in meta_kd.domains {section.domains}")
        rows = read_rows(Path(task_dir) / "train.parquet")
        if domain == target:
            rows = subsample_fraction(rows, fraction, section.subsample_seed)
        frames.append(rows.assign(domain=section.domains.index(domain)))
    return pd.concat(frames, ignore_index=True)


def teacher_train_config(cfg: PipelineConfig, rows: int, seed: int) -> TrainConfig:
    """``meta_kd.teacher_train`` (default ``finetune_teacher.train``) with the teacher's seed and,
    under ``teacher_epochs``, as many steps as that many passes over ``rows`` take (at least
    ``teacher_min_steps``)."""
    base, section = teacher_base_config(cfg), cfg.meta_kd
    steps = base.max_steps
    if section.teacher_epochs is not None:
        steps = max(section.teacher_min_steps, math.ceil(section.teacher_epochs * rows / (base.batch_size * base.grad_accum_steps)))
    return base.model_copy(update={"max_steps": steps, "seed": seed})


def _row_counts(rows: pd.DataFrame, domains: list[str]) -> dict[str, int]:
    counts = rows["domain"].value_counts()
    return {domains[i]: int(counts.get(i, 0)) for i in sorted(set(rows["domain"]))}


def _teacher_classifier(cfg: PipelineConfig, spec):
    with quiet_transformers():
        return load_model(cfg.teacher, head="sequence_classification", **task_head_kwargs(spec))


def encode_domains(cfg: PipelineConfig, task_dirs: dict[str, Path], out: Path) -> dict:
    """``h(X)`` of every domain's train rows under the pre-trained teacher, keyed by row ``idx``.

    This is the meta-teacher's first prototype pass (Eq. 1 at epoch 0), which does not depend on
    the target or fraction: computed once here, every meta-teacher node reads it.
    """
    spec = _spec(next(iter(task_dirs)))
    tokenizer = load_tokenizer(cfg.teacher)
    model = _teacher_classifier(cfg, spec)
    arrays, counts = {}, {}
    for domain, task_dir in task_dirs.items():
        rows = read_rows(Path(task_dir) / "train.parquet")
        examples = encode_examples(rows, tokenizer, cfg.task.max_seq_length)
        arrays[f"{domain}/idx"] = rows["idx"].to_numpy()
        arrays[f"{domain}/reps"] = encode_content(model, examples, tokenizer.pad_token_id).cpu().numpy()
        counts[f"{domain}_rows"] = len(rows)
    with open(out / REPS_FILE, "wb") as handle:
        np.savez(handle, **arrays)
    return counts


def lookup_reps(reps_dir: Path, rows: pd.DataFrame, domains: list[str]) -> torch.Tensor:
    """The cached ``h(X)`` of ``rows`` (columns ``domain`` index and ``idx``), in row order."""
    cached = np.load(Path(reps_dir) / REPS_FILE)
    out = []
    for index, group in rows.groupby("domain", sort=False):
        name = domains[index]
        if f"{name}/idx" not in cached:
            raise StageInputError(f"{reps_dir} has no representations of domain {name!r}; rerun encode_domains")
        position = {int(i): p for p, i in enumerate(cached[f"{name}/idx"])}
        missing = [i for i in group["idx"] if int(i) not in position]
        if missing:
            raise StageInputError(f"{reps_dir}: rows {missing[:5]} of {name} were not encoded; rerun encode_domains")
        out.append(pd.Series(list(cached[f"{name}/reps"][[position[int(i)] for i in group["idx"]]]), index=group.index))
    ordered = pd.concat(out).sort_index()
    return torch.from_numpy(np.stack(ordered.to_list()))


def train_teacher(
    cfg: PipelineConfig,
    kind: str,
    task_dirs: dict[str, Path],
    target: str | None,
    fraction: float,
    seed: int,
    out: Path,
    work: Path,
    callbacks: Sequence[TrainerCallback] = (),
    reps_dir: Path | None = None,
) -> dict:
    """Fine-tune ``cfg.teacher`` on ``task_dirs``'s domains: ``single``/``mixed`` with the plain
    cross-entropy, ``meta`` with §3.2's prototype-weighted cross-entropy + γ1 domain corruption.

    The meta-teacher's model dir also holds its corruption head and the prototypes of its last
    refresh, which meta-distillation reads for λ and the transfer loss. ``reps_dir`` (an
    :func:`encode_domains` output) stands in for its first prototype pass.
    """
    if kind not in TEACHER_KINDS:
        raise StageInputError(f"teacher kind must be one of {TEACHER_KINDS}, got {kind!r}")
    section = cfg.meta_kd
    if kind == "single" and len(task_dirs) != 1:
        raise StageInputError(f"a single-domain teacher trains on one domain, got {list(task_dirs)}")
    spec = _spec(next(iter(task_dirs)))
    rows = training_rows(cfg, task_dirs, target, fraction)
    tokenizer = load_tokenizer(cfg.teacher)
    train = teacher_train_config(cfg, len(rows), seed)
    torch.manual_seed(train.seed)
    model = _teacher_classifier(cfg, spec)
    examples = attach_rows(encode_examples(rows, tokenizer, cfg.task.max_seq_length), rows["domain"].tolist())
    shape = shape_of(model)
    if kind == "meta":
        objective = MetaTeacherObjective(shape, len(section.domains), len(spec.labels), len(examples),
                                         section.alpha, section.gamma1, section.corruption_dropout, section.normalize_scores)
        extra = {"kind": kind, "alpha": section.alpha, "gamma1": section.gamma1, "domains": section.domains,
                 "normalize_scores": section.normalize_scores}
        trainer = DomainBatchTrainer(None, model, objective, examples=examples, config=train, output_dir=work,
                                     pad_token_id=tokenizer.pad_token_id,
                                     callbacks=callbacks, fingerprint_extra=extra)
        if reps_dir is not None:
            trainer.initial_reps = lookup_reps(reps_dir, rows, section.domains)
    else:
        specs = expand_recipe("finetune", LayerMapping(), shape.num_layers, shape.num_layers)
        trainer = DistillTrainer(None, model, Objective(specs, shape, None), examples=examples, config=train, output_dir=work,
                                 pad_token_id=tokenizer.pad_token_id, callbacks=callbacks, fingerprint_extra={"kind": kind})
    summary = finish_training(trainer, trainer.train(), tokenizer, out)
    if kind == "meta":
        summary["prototype_refreshes"] = trainer.prototype_refreshes
        if trainer.accelerator.is_main_process:
            save_meta_head(out / MODEL_SUBDIR, trainer.objective, section.domains)
            scores = rows[["domain", "idx"]].assign(domain=[section.domains[i] for i in rows["domain"]],
                                                    score=trainer.objective.instance_scores.cpu().numpy())
            scores.to_parquet(out / META_SCORES_FILE, index=False)
    info = {"teacher": kind, "target": target, "fraction": fraction, "seed": seed, "rows": _row_counts(rows, section.domains)}
    if trainer.accelerator.is_main_process:
        (out / "rows.json").write_text(json.dumps(info, indent=2))
        # the rows its students distil on: the target's, or every domain's for a shared teacher
        students = rows["domain"] == section.domains.index(target) if target is not None else rows["domain"] >= 0
        logits = predict_logits(trainer.student, [ex for ex, keep in zip(examples, students) if keep], tokenizer.pad_token_id)
        table = rows.loc[students, ["domain", "idx"]].assign(domain=lambda t: [section.domains[i] for i in t["domain"]])
        table.assign(logits=list(logits)).to_parquet(out / LOGITS_FILE, index=False)
    return {**summary, "teacher": kind, "rows": len(rows), "seed": seed}


def save_meta_head(model_dir: Path, objective: MetaTeacherObjective, domains: list[str]) -> None:
    from safetensors.torch import save_file

    tensors = {f"domain_head.{k}": v.detach().cpu().contiguous() for k, v in objective.domain_head.state_dict().items()}
    tensors["prototypes"] = objective.prototypes.detach().cpu().contiguous()
    save_file(tensors, str(model_dir / META_HEAD_FILE))
    info = {
        "domains": list(domains),
        "alpha": objective.alpha,
        "gamma1": objective.gamma1,
        "num_classes": objective.num_classes,
        "prototype_counts": objective.prototype_counts.cpu().tolist(),
    }
    (model_dir / META_INFO_FILE).write_text(json.dumps(info, indent=2))


def load_meta_head(model_dir: Path) -> tuple[DomainCorruptionHead, torch.Tensor, dict]:
    """The meta-teacher's corruption head (for ``h_d``), last prototypes and settings."""
    from safetensors.torch import load_file

    head_path, info_path = Path(model_dir) / META_HEAD_FILE, Path(model_dir) / META_INFO_FILE
    if not head_path.is_file() or not info_path.is_file():
        raise StageInputError(f"{model_dir} holds no meta-teacher head ({META_HEAD_FILE}); is it a meta_teacher output?")
    tensors = load_file(str(head_path))
    info = json.loads(info_path.read_text())
    prototypes = tensors.pop("prototypes")
    head = DomainCorruptionHead(prototypes.shape[0], prototypes.shape[2])
    head.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items()})
    return head, prototypes, info


def _rows_of(path: Path, column: str, domain: str, idx: pd.Series, what: str, hint: str) -> list:
    """``column`` of ``domain``'s rows ``idx`` from a per-row table a teacher stage wrote."""
    table = pd.read_parquet(path)
    table = table[table["domain"] == domain].set_index("idx")[column]
    missing = [int(i) for i in idx if i not in table.index]
    if missing:
        raise StageInputError(f"the {what} in {path.parent} has no {column} for {domain} rows {missing[:5]}; {hint}")
    return [table[i] for i in idx]


def meta_scores(teacher_dir: Path, domain: str, idx: pd.Series) -> list[float]:
    """The meta-teacher's Eq. 2 scores of ``domain``'s rows ``idx`` (it trained on exactly these)."""
    scores = _rows_of(Path(teacher_dir) / META_SCORES_FILE, "score", domain, idx, "meta-teacher",
                      "it was trained on other rows (fraction or subsample seed differ)")
    return [float(v) for v in scores]


def student_config(cfg: PipelineConfig, teacher_layers: int):
    """``meta_kd.student``; copied teacher layers default to the ones the student imitates."""
    student = cfg.meta_kd.student
    if student.init == "teacher_layers" and student.init_layers is None:
        mapped = map_layers(cfg.meta_kd.mapping, student.num_layers, teacher_layers)
        student = student.model_copy(update={"init_layers": mapped})
    return student


def distill_student(
    cfg: PipelineConfig,
    method: str,
    teacher_dir: Path,
    task_dir: Path,
    target: str,
    fraction: float,
    seed: int,
    out: Path,
    work: Path,
    callbacks: Sequence[TrainerCallback] = (),
) -> dict:
    """One student on the target's (subsampled) train rows, in TinyBERT's two steps:
    ``meta_kd.distill`` on the intermediate matches (Meta-KD: λ-weighted, plus γ2 · transfer),
    then ``meta_kd.prediction`` on the teacher's cached logits (Meta-KD: λ-weighted)."""
    if method not in STUDENT_METHODS:
        raise StageInputError(f"student method must be one of {STUDENT_METHODS}, got {method!r}")
    section = cfg.meta_kd
    spec = _spec(target)
    model_dir = Path(teacher_dir) / MODEL_SUBDIR
    tokenizer = load_tokenizer(model_dir)
    teacher = load_classifier(model_dir, spec)
    rows = subsample_fraction(read_rows(Path(task_dir) / "train.parquet"), fraction, section.subsample_seed)
    index = section.domains.index(target)
    examples = attach_rows(encode_examples(rows, tokenizer, cfg.task.max_seq_length), [index] * len(rows))
    for example, logits in zip(examples, cached_logits(teacher_dir, target, rows["idx"])):
        example["teacher_logits"] = logits
    if method == "meta":
        for example, score in zip(examples, meta_scores(teacher_dir, target, rows["idx"])):
            example["score"] = score
    t_shape = shape_of(teacher)
    torch.manual_seed(seed)
    with quiet_transformers():
        base = load_model(cfg.teacher)
        student = build_student(base, student_config(cfg, shape_of(base).num_layers), head="sequence_classification",
                                **task_head_kwargs(spec))
    del base
    s_shape = shape_of(student)
    specs = tinybert_intermediate_matches(section.mapping, s_shape, t_shape)
    extra = {"method": method, "target": target, "fraction": fraction, "seed": seed}
    if method == "meta":
        head, _, info = load_meta_head(model_dir)
        if info["domains"] != section.domains:
            raise StageInputError(f"the meta-teacher was trained on domains {info['domains']}, this config has {section.domains}")
        objective = MetaDistillObjective(specs, s_shape, t_shape, head, section.gamma2)
        extra["gamma2"] = section.gamma2
    else:
        objective = WeightedDistillObjective(specs, s_shape, t_shape)
    intermediate = DomainBatchTrainer(teacher, student, objective, examples=examples,
                                      config=section.distill.model_copy(update={"seed": seed}),
                                      output_dir=Path(work) / "intermediate", pad_token_id=tokenizer.pad_token_id,
                                      callbacks=callbacks, fingerprint_extra=extra)
    first = intermediate.train()
    del intermediate, teacher
    offset = _StepOffset(callbacks, first.steps)
    prediction = DomainBatchTrainer(None, student, PredictionObjective(s_shape, t_shape, section.temperature, method == "meta"),
                                    examples=examples, config=section.prediction.model_copy(update={"seed": seed}),
                                    output_dir=Path(work) / "prediction",
                                    pad_token_id=tokenizer.pad_token_id, callbacks=[offset], fingerprint_extra=extra)
    second = prediction.train()
    prediction.save_student(out / MODEL_SUBDIR, tokenizer, atomic=False)
    history = pd.concat([pd.DataFrame(first.history).assign(phase="intermediate"),
                         pd.DataFrame(second.history).assign(phase="prediction", step=lambda h: h["step"] + first.steps)],
                        ignore_index=True)
    if prediction.accelerator.is_main_process:
        history.to_parquet(out / "history.parquet", index=False)
    seconds = first.train_seconds + second.train_seconds
    return {
        "method": method, "rows": len(rows), "seed": seed, "world_size": prediction.accelerator.num_processes,
        "intermediate_steps": first.steps, "prediction_steps": second.steps,
        "intermediate_final_loss": first.final_loss, "prediction_final_loss": second.final_loss,
        "train_seconds": round(seconds, 3),
        "sequences_per_second": round((first.sequences + second.sequences) / seconds, 3) if seconds else 0.0,
        "student_params": sum(p.numel() for p in student.parameters()),
    }


class _StepOffset:
    """Passes the prediction step's metrics on with steps counted after the intermediate step's."""

    def __init__(self, callbacks: Sequence[TrainerCallback], offset: int):
        self.callbacks, self.offset = list(callbacks), offset

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        for callback in self.callbacks:
            if hasattr(callback, "on_step_end"):
                callback.on_step_end(step + self.offset, {**metrics, "step": step + self.offset})


def cached_logits(teacher_dir: Path, domain: str, idx: pd.Series) -> list[list[float]]:
    """The teacher's logits on ``domain``'s rows ``idx``, computed once in its stage."""
    logits = _rows_of(Path(teacher_dir) / LOGITS_FILE, "logits", domain, idx, "teacher",
                      "it was trained for another target or fraction")
    return [list(map(float, v)) for v in logits]


def evaluate_models(cfg: PipelineConfig, target: str, models: dict[str, Path], task_dir: Path, out: Path) -> dict:
    """Each model's score on the target domain's eval split (``metrics.parquet``)."""
    from kd_core.stages.glue import evaluate_models as evaluate

    return evaluate(for_task(cfg, domain_task(target)), models, task_dir, out)


# ---- the stage entries: inputs by role ------------------------------------------------------------
def encode_domains_stage(cfg: PipelineConfig, io: StageIO) -> dict:
    """Inputs: each domain's prepare_task, by domain name."""
    return encode_domains(cfg, dict(io.inputs), io.out)


def teacher_stage(cfg: PipelineConfig, io: StageIO, *, kind: str, target: str | None, fraction: float, seed: int) -> dict:
    """Inputs: the prepare_task of each domain it trains on, by domain name, and for a
    meta-teacher ``reps`` (encode_domains)."""
    task_dirs = io.others("reps")
    return train_teacher(cfg, kind, task_dirs, target, fraction, seed, io.out, io.work, io.callbacks, reps_dir=io.get("reps"))


def student_stage(cfg: PipelineConfig, io: StageIO, *, method: str, target: str, fraction: float, seed: int) -> dict:
    """Inputs: ``teacher``, ``task`` (the target's prepare_task)."""
    return distill_student(cfg, method, io["teacher"], io["task"], target, fraction, seed, io.out, io.work, io.callbacks)


def evaluation_stage(cfg: PipelineConfig, io: StageIO, *, target: str) -> dict:
    """Inputs: the models by metric name, and ``task`` (the target's prepare_task)."""
    models = io.others("task")
    return evaluate_models(cfg, target, models, io["task"], io.out)


def report_stage(cfg: PipelineConfig, io: StageIO, *, student_evals: Sequence[tuple], teacher_evals: Sequence[tuple]) -> dict:
    """``student_evals``/``teacher_evals``: ``(target, fraction, seed, node)``; inputs by node name."""
    def resolved(evaluations):
        return [(target, fraction, seed, io[node]) for target, fraction, seed, node in evaluations]

    return metakd_report(cfg, resolved(student_evals), resolved(teacher_evals), io.out)


