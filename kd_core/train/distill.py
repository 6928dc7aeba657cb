"""General distillation from a corpus, end to end: the engine behind ``kd distill``."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from accelerate.utils import set_seed

from kd_core.config import DistillConfig
from kd_core.data.corpus import iter_documents, pack_token_blocks
from kd_core.models.adaptors import ModelAdaptor
from kd_core.models.registry import load_model, load_tokenizer
from kd_core.models.student import build_student
from kd_core.train.objective import ModelShape, Objective, expand_recipe
from kd_core.train.trainer import DistillTrainer, TrainerCallback, TrainResult


@dataclass
class DistillOutcome:
    student_dir: Path
    result: TrainResult
    num_blocks: int
    student_params: int
    teacher_params: int


def model_shape(model) -> ModelShape:
    adaptor = ModelAdaptor(model)
    try:
        return ModelShape(adaptor.num_layers, adaptor.hidden_size, adaptor.num_heads)
    finally:
        adaptor.remove_hooks()


def build_objective(cfg: DistillConfig, teacher, student) -> Objective:
    s_shape, t_shape = model_shape(student), model_shape(teacher)
    specs = expand_recipe(cfg.recipe, cfg.mapping, s_shape.num_layers, t_shape.num_layers, cfg.matches, cfg.recipe_params)
    return Objective(specs, s_shape, t_shape)


def distill_corpus(
    cfg: DistillConfig,
    corpus: str | Path,
    output_dir: str | Path,
    callbacks: Sequence[TrainerCallback] = (),
    until_step: int | None = None,
    max_blocks: int | None = None,
) -> DistillOutcome:
    output_dir = Path(output_dir)
    tokenizer = load_tokenizer(cfg.teacher)
    teacher = load_model(cfg.teacher)
    # the student's and the projections' random init come from the seed, like the trainer's batches
    set_seed(cfg.train.seed)
    student = build_student(teacher, cfg.student)
    objective = build_objective(cfg, teacher, student)  # fails on impossible matches before any data work
    train = cfg.train
    needed = train.max_steps * train.batch_size * train.grad_accum_steps
    # One pass over fresh text is enough for a short run; cap what we tokenise.
    blocks = list(pack_token_blocks(tokenizer, iter_documents(corpus), cfg.max_seq_length, max_blocks or needed))
    trainer = DistillTrainer(
        teacher,
        student,
        objective,
        examples=blocks,
        config=train,
        output_dir=output_dir,
        pad_token_id=tokenizer.pad_token_id,
        callbacks=callbacks,
        fingerprint_extra={"teacher": cfg.teacher, "student": cfg.student.model_dump(), "corpus": str(corpus)},
    )
    started = time.time()
    result = trainer.train(until_step=until_step)
    student_dir = output_dir / "student"
    if result.steps >= train.max_steps:
        trainer.save_student(
            student_dir,
            tokenizer,
            metadata={"config": cfg.model_dump(), "wall_seconds": time.time() - started},
        )
    (output_dir / "train_result.json").write_text(
        json.dumps(
            {
                "steps": result.steps,
                "resumed_from": result.resumed_from,
                "sequences_per_second": result.sequences_per_second,
                "train_seconds": result.train_seconds,
                "history": result.history,
            },
            indent=2,
        )
    )
    return DistillOutcome(
        student_dir=student_dir,
        result=result,
        num_blocks=len(blocks),
        student_params=sum(p.numel() for p in student.parameters()),
        teacher_params=sum(p.numel() for p in teacher.parameters()),
    )
