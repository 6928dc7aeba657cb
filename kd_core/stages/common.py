"""What every stage module shares: the stage contract (:class:`StageIO`), artifact layout names,
and the helpers that read inputs and write training outputs.

A stage function is ``fn(cfg, io) -> dict``: it reads its upstream artifact dirs by role from
``io.inputs``, writes its files into ``io.out`` (a staging dir of the artifact store), may
checkpoint into ``io.work`` so that a killed run resumes mid-stage, and returns a small JSON-able
result for the manifest. Prefect and MLflow live in ``tasks/``; nothing here imports them.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import pandas as pd

from kd_core.config import PipelineConfig
from kd_core.data.tasks import default_data_dir
from kd_core.errors import UserError
from kd_core.train.recipes import ModelShape

# torch, transformers' models and the trainer load inside the functions that compute: a run whose
# every stage is cached (keys, sections, lookups) never imports them (about 4 s)
if TYPE_CHECKING:
    from kd_core.train.objective import Objective
    from kd_core.train.trainer import DistillTrainer, TrainerCallback, TrainResult

MODEL_SUBDIR = "model"
CORPUS_SUBDIR = "corpus"  # the shards keep their own manifest; the store's sits one level up
PRUNING_SUBDIR = "pruning"  # kept.parquet and scores.parquet of a pruned student
HOLDOUT_SPLIT = "holdout"


class StageInputError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class StageIO:
    """A stage's inputs by role (``{"teacher": <finetune_teacher dir>, ...}``, as its graph entry
    names them), its output dir, its scratch dir and the callbacks that take its progress."""

    inputs: Mapping[str, Path] = field(default_factory=dict)
    out: Path = Path(".")
    work: Path | None = None
    callbacks: Sequence = ()

    def __getitem__(self, role: str) -> Path:
        if role not in self.inputs:
            raise StageInputError(f"this stage reads an input {role!r}; its graph entry passes {sorted(self.inputs) or 'none'}")
        return Path(self.inputs[role])

    def get(self, role: str) -> Path | None:
        return Path(self.inputs[role]) if role in self.inputs else None

    def others(self, *roles: str) -> dict[str, Path]:
        """Every input but ``roles``, in entry order: the models beside the data, the domains
        beside a meta-teacher's cached representations."""
        return {role: Path(path) for role, path in self.inputs.items() if role not in roles}


def data_root(cfg: PipelineConfig) -> Path:
    # the loaders' own rule (KD_DATA_DIR, ../shared/data, beside the repo): `kd run` and
    # `kd prepare-task` find the same data from any working directory
    root = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
    if not root.is_dir():
        raise StageInputError(f"data dir {root} does not exist; set data_dir in the profile or KD_DATA_DIR")
    return root


def under(root: Path, path: str) -> Path:
    candidate = Path(path)
    return candidate if candidate.is_absolute() else root / candidate


def shape_of(model) -> ModelShape:
    from kd_core.models.adaptors import ModelAdaptor

    with ModelAdaptor(model) as adaptor:
        return ModelShape(adaptor.num_layers, adaptor.hidden_size, adaptor.num_heads)


def teacher_shape(teacher: str) -> dict[str, int]:
    """Depth, width and heads of a teacher, read from its config alone."""
    from transformers import AutoConfig

    from kd_core.models.registry import resolve_model
    from kd_core.models.student import teacher_sizes

    return teacher_sizes(AutoConfig.from_pretrained(resolve_model(teacher)))


def train_summary(result: TrainResult, world_size: int) -> dict:
    return {
        "steps": result.steps,
        "world_size": world_size,
        "resumed_from": result.resumed_from,
        "sequences_per_second": round(result.sequences_per_second, 3),
        "train_seconds": round(result.train_seconds, 3),
        "first_loss": result.history[0]["loss"] if result.history else None,
        "final_loss": result.final_loss,
    }


def finish_training(trainer: DistillTrainer, result: TrainResult, tokenizer, out: Path) -> dict:
    """Save the student and its loss history; the manifest's training summary."""
    trainer.save_student(out / MODEL_SUBDIR, tokenizer, atomic=False)  # rank 0 writes, all wait
    if trainer.accelerator.is_main_process:
        pd.DataFrame(result.history).to_parquet(out / "history.parquet", index=False)
    return train_summary(result, trainer.accelerator.num_processes)


def untrained(out: Path, reason: str) -> dict:
    """The summary (and the empty loss history the report reads) of a training stage switched off."""
    pd.DataFrame({"step": pd.Series(dtype="int64"), "loss": pd.Series(dtype="float64")}).to_parquet(
        out / "history.parquet", index=False)
    return {"steps": 0, "untrained": reason}


def progress_of(callbacks: Sequence[TrainerCallback]):
    """One ``(done, total, unit)`` function for the callbacks that take progress events."""
    takers = [cb.on_progress for cb in callbacks if hasattr(cb, "on_progress")]

    def report(done: int, total: int, unit: str) -> None:
        for on_progress in takers:
            on_progress(done, total, unit)

    return report


def read_rows(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise StageInputError(f"expected task rows at {path}; rerun the upstream stage")
    return pd.read_parquet(path)


def existing(path: Path) -> Path:
    if not path.is_file():
        raise StageInputError(f"expected {path}; rerun the upstream stage")
    return path


def seeded_rows(frame: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame:
    """At most ``limit`` rows, a seeded sample kept in file order."""
    if limit is None or limit >= len(frame):
        return frame
    return frame.sample(n=limit, random_state=seed).sort_values("idx").reset_index(drop=True)


def count_empty_texts(frame: pd.DataFrame) -> int:
    """Rows whose first text, or second text where the task has one, is empty or whitespace."""
    empty = frame["text_a"].fillna("").str.strip() == ""
    if "text_b" in frame and frame["text_b"].notna().any():
        empty |= frame["text_b"].notna() & (frame["text_b"].fillna("").str.strip() == "")
    return int(empty.sum())


def task_head_kwargs(spec) -> dict:
    """``from_pretrained`` kwargs of a task's head: regression, or its labels in task order."""
    if spec.is_regression:
        return {"num_labels": 1, "problem_type": "regression"}
    labels = list(spec.labels)
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
        "problem_type": "single_label_classification",
    }


@contextmanager
def quiet_transformers():
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def load_classifier(model_dir: Path, spec):
    from transformers import AutoModelForSequenceClassification

    from kd_core.evaluate.glue import check_label_order

    check_label_order(model_dir, spec)  # the head kwargs below would relabel a permuted head silently
    with quiet_transformers():  # an encoder dir gains a fresh head here, by design
        return AutoModelForSequenceClassification.from_pretrained(model_dir, **task_head_kwargs(spec))


def init_projections(objective: Objective, source_dir: Path) -> None:
    """Start from the projections learned one stage earlier, where they fit."""
    from kd_core.train.trainer import load_projections

    saved = load_projections(source_dir)
    for name, module in objective.projections.items():
        state = {k.split(".", 1)[1]: v for k, v in saved.items() if k.split(".", 1)[0] == name}
        if state and all(state[k].shape == v.shape for k, v in module.state_dict().items() if k in state):
            module.load_state_dict(state, strict=False)
