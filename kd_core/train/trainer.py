"""One distillation loop for any set of matches, built on accelerate.

``accelerate launch`` or ``torchrun`` turns it into DDP with no code change: the student and
the projections are wrapped together, the frozen teacher is not. Checkpoints hold everything
needed for an exact resume: weights, projections, optimizer, scheduler, every process's RNG
states, and the data position.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch import nn
from transformers import get_linear_schedule_with_warmup

from kd_core.artifacts import atomic_dir
from kd_core.config import TrainConfig
from kd_core.errors import UserError
from kd_core.models.adaptors import ModelAdaptor
from kd_core.stop import STOP_REQUESTED, StopRequested, TrainingInterrupted, stoppable  # noqa: F401 - re-exported
from kd_core.train.data import DataPosition, GlobalBatchPlan, pad_batch
from kd_core.train.objective import Objective

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")


class NonFiniteLossError(UserError, RuntimeError):
    pass


class CheckpointMismatchError(UserError, RuntimeError):
    pass



class TrainerCallback(Protocol):
    """Named training events; the trainer calls each on the callbacks that define it:

    * ``on_train_begin(first_step, last_step, global_batch)``: once, before the first step (after
      a resume, ``first_step`` is the checkpoint's step);
    * ``on_epoch_begin(trainer, epoch)``: before the first step of each pass over the examples
      (and the first step of a run); metrics it returns are recorded with that step's;
    * ``on_step_end(step, metrics)``: after every optimizer step.

    Stages that do not train (augmentation, corpus preparation) call ``on_progress(done, total,
    unit)`` on the callbacks that define it."""

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None: ...


@dataclass
class TrainResult:
    steps: int
    resumed_from: int | None
    train_seconds: float
    sequences: int
    sequences_per_second: float
    history: list[dict] = field(default_factory=list)

    @property
    def final_loss(self) -> float | None:
        return self.history[-1]["loss"] if self.history else None


class _StudentBundle(nn.Module):
    """Student + projections as one module, so DDP sees every trainable parameter in forward."""

    def __init__(self, student: nn.Module, objective: Objective):
        super().__init__()
        self.student = student
        self.objective = objective
        self._adaptor = ModelAdaptor(student)

    def forward(self, batch: dict[str, torch.Tensor], teacher_out, labels=None):
        student_out = self._adaptor(**batch)
        return self.objective(student_out, teacher_out, labels)


def _resolve_precision(requested: str) -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"  # CPU autocast to bf16 is slower than fp32 on most CPUs


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


class DistillTrainer:
    def __init__(
        self,
        teacher: nn.Module | None,
        student: nn.Module,
        objective: Objective,
        *,
        examples: Sequence[dict],
        config: TrainConfig,
        output_dir: str | Path,
        pad_token_id: int,
        callbacks: Sequence[TrainerCallback] = (),
        accelerator: Accelerator | None = None,
        fingerprint_extra: dict | None = None,
    ):
        self.config = config
        self.output_dir = Path(output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.examples = examples
        self.pad_token_id = pad_token_id
        self.callbacks = list(callbacks)
        self.accelerator = accelerator or Accelerator(
            mixed_precision=_resolve_precision(config.mixed_precision),
            cpu=not torch.cuda.is_available(),
            # Which student parameters reach the loss depends on the matches (the pooler never
            # does; MiniLM leaves the last block's FFN out), so DDP must look for unused ones.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        acc = self.accelerator
        self.fingerprint = self._fingerprint(objective, fingerprint_extra)

        if objective.needs_teacher and teacher is None:
            raise ValueError("the objective compares with a teacher, but no teacher was given")
        self.teacher = teacher.to(acc.device).eval() if teacher is not None else None
        self.teacher_adaptor = None
        if self.teacher is not None:
            for param in self.teacher.parameters():
                param.requires_grad_(False)
            self.teacher_adaptor = ModelAdaptor(self.teacher)
        if objective.needs_labels and examples and "labels" not in examples[0]:
            raise ValueError("the objective trains on labels, but the examples have no 'labels' field")

        bundle = _StudentBundle(student, objective)
        self.optimizer = torch.optim.AdamW(_param_groups(bundle, config.weight_decay), lr=config.learning_rate)
        # The scheduler stays unprepared: accelerate's wrapper steps it once per process.
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, int(config.warmup_ratio * config.max_steps), config.max_steps
        )
        self.bundle, self.optimizer = acc.prepare(bundle, self.optimizer)
        self.plan = GlobalBatchPlan(
            len(examples), config.batch_size, config.grad_accum_steps, acc.num_processes, config.seed
        )
        self.step = 0
        self.position = DataPosition()
        # logged steps since step 0, checkpointed with the weights: a resumed run's history (and
        # so its artifact digest) equals an uninterrupted run's
        self.history: list[dict] = []

    # ---- properties -------------------------------------------------------------------------
    @property
    def unwrapped(self) -> _StudentBundle:
        return self.accelerator.unwrap_model(self.bundle)

    @property
    def student(self) -> nn.Module:
        return self.unwrapped.student

    @property
    def projections(self) -> nn.ModuleDict:
        return self.unwrapped.objective.projections

    def _fingerprint(self, objective: Objective, extra: dict | None) -> str:
        payload = {
            "train": self.config.model_dump(exclude={"log_every", "checkpoint_every", "keep_checkpoints"}),
            "matches": [spec.model_dump() for spec in objective.specs],
            "num_examples": len(self.examples),
            "extra": extra or {},
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    # ---- checkpoints ------------------------------------------------------------------------
    def latest_checkpoint(self) -> Path | None:
        if not self.checkpoint_dir.is_dir():
            return None
        found = [
            (int(m.group(1)), p)
            for p in self.checkpoint_dir.iterdir()
            if (m := CHECKPOINT_RE.match(p.name)) and (p / "trainer_state.pt").is_file()
        ]
        return max(found)[1] if found else None

    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        target = self.checkpoint_dir / f"step-{self.step:07d}"
        staging = self.checkpoint_dir / f".staging-step-{self.step:07d}"
        if acc.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        acc.wait_for_everyone()
        torch.save(_rng_state(), staging / f"rng-{acc.process_index}.pt")
        if acc.is_main_process:
            torch.save(self.unwrapped.state_dict(), staging / "model.pt")
            torch.save(
                {
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "step": self.step,
                    "position": asdict(self.position),
                    "fingerprint": self.fingerprint,
                    "num_processes": acc.num_processes,
                    "history": self.history,
                },
                staging / "trainer_state.pt",
            )
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)  # atomic: a checkpoint dir is complete or absent
            self._prune_checkpoints()
        acc.wait_for_everyone()
        return target

    def _prune_checkpoints(self) -> None:
        found = sorted(
            (int(m.group(1)), p) for p in self.checkpoint_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name))
        )
        for _, path in found[: -self.config.keep_checkpoints]:
            shutil.rmtree(path, ignore_errors=True)

    def load_checkpoint(self, path: Path) -> None:
        acc = self.accelerator
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
        if state["fingerprint"] != self.fingerprint:
            raise CheckpointMismatchError(
                f"{path} was written by a run with a different config or data "
                f"(fingerprint {state['fingerprint']} != {self.fingerprint}); "
                f"use a fresh output dir, or delete {self.checkpoint_dir} to start over"
            )
        if state["num_processes"] != acc.num_processes:
            raise CheckpointMismatchError(
                f"{path} was written with {state['num_processes']} processes, this run has "
                f"{acc.num_processes}; resume with the same number for an exact continuation"
            )
        self.unwrapped.load_state_dict(torch.load(path / "model.pt", map_location=acc.device, weights_only=True))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.position = DataPosition(**state["position"])
        self.history = list(state.get("history", []))
        _set_rng_state(torch.load(path / f"rng-{acc.process_index}.pt", weights_only=False))

    # ---- training ---------------------------------------------------------------------------
    def train(self, until_step: int | None = None, resume: bool = True) -> TrainResult:
        """Train to ``config.max_steps`` (or stop early at ``until_step``, checkpointing there).
        Raises TrainingInterrupted, after a checkpoint, when STOP_REQUESTED is set."""
        with stoppable():
            return self._train(until_step, resume)

    def _train(self, until_step: int | None, resume: bool) -> TrainResult:
        acc, cfg = self.accelerator, self.config
        set_seed(cfg.seed + acc.process_index)
        resumed_from = None
        checkpoint = self.latest_checkpoint() if resume else None
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)
            resumed_from = self.step
        stop = min(until_step or cfg.max_steps, cfg.max_steps)
        if not resumed_from:
            self.history = []
        sequences = 0
        train_seconds = 0.0
        self.bundle.train()
        for callback in self.callbacks:
            if hasattr(callback, "on_train_begin"):
                callback.on_train_begin(self.step, stop, self.plan.global_batch)
        while self.step < stop:
            if STOP_REQUESTED.is_set():
                raise TrainingInterrupted(self.step, self.save_checkpoint())
            started = time.perf_counter()
            noted = self._epoch_begins()
            metrics = self._train_step()
            metrics.update(noted)
            self.step += 1
            train_seconds += time.perf_counter() - started
            sequences += self.plan.global_batch
            metrics["step"] = self.step
            for callback in self.callbacks:
                if hasattr(callback, "on_step_end"):
                    callback.on_step_end(self.step, metrics)
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                self.history.append(metrics)
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
        if until_step is not None and until_step < cfg.max_steps and (
            not cfg.checkpoint_every or self.step % cfg.checkpoint_every
        ):
            self.save_checkpoint()  # an early stop always leaves a resumable point
        return TrainResult(
            steps=self.step,
            resumed_from=resumed_from,
            train_seconds=train_seconds,
            sequences=sequences,
            sequences_per_second=sequences / train_seconds if train_seconds else 0.0,
            history=list(self.history),
        )

    def epoch_starts(self) -> bool:
        """The next step starts a pass over the examples (or is the run's first step)."""
        position, plan = self.position, self.plan
        return position.offset == 0 or position.offset + plan.global_batch > plan.num_examples

    def _epoch_begins(self) -> dict:
        """``on_epoch_begin`` on the callbacks that take it, when the next step starts an epoch;
        the metrics they return, for that step."""
        noted: dict = {}
        if self.epoch_starts():
            # the plan wraps to the next epoch inside the step when the ragged tail is left
            epoch = self.position.epoch + (self.position.offset != 0)
            for callback in self.callbacks:
                if hasattr(callback, "on_epoch_begin"):
                    noted.update(callback.on_epoch_begin(self, epoch) or {})
        return noted

    def batch_targets(self, examples: list[dict], batch: dict[str, torch.Tensor], device):
        """What the objective receives as ``labels``: the batch labels. Subclasses whose
        objective needs more per-example fields (a domain id, an instance weight) return them."""
        return batch["labels"].to(device) if "labels" in batch else None

    def _train_step(self) -> dict:
        acc, cfg = self.accelerator, self.config
        micro_batches, next_position = self.plan.micro_batches(self.position, acc.process_index)
        loss_sum = torch.zeros((), device=acc.device)
        term_sums: dict[str, torch.Tensor] = {}
        for index, indices in enumerate(micro_batches):
            examples = [self.examples[i] for i in indices]
            batch = pad_batch(examples, self.pad_token_id)
            inputs = {k: v.to(acc.device) for k, v in _model_inputs(batch).items()}
            labels = self.batch_targets(examples, batch, acc.device)
            last = index == len(micro_batches) - 1
            with acc.autocast():
                teacher_out = None
                if self.teacher_adaptor is not None:
                    with torch.no_grad():
                        teacher_out = self.teacher_adaptor(**inputs)
                sync = nullcontext() if last or acc.num_processes == 1 else acc.no_sync(self.bundle)
                with sync:
                    loss, terms = self.bundle(inputs, teacher_out, labels)
                    if not torch.isfinite(loss):
                        detail = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
                        raise NonFiniteLossError(f"loss is {loss.item()} at step {self.step + 1} ({detail})")
                    acc.backward(loss / len(micro_batches))
            loss_sum += loss.detach()
            for name, value in terms.items():
                term_sums[name] = term_sums.get(name, 0.0) + value
        if cfg.max_grad_norm is not None:
            acc.clip_grad_norm_(self.bundle.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.position = next_position

        names = list(term_sums)
        packed = torch.stack([loss_sum] + [term_sums[n] for n in names]) / len(micro_batches)
        packed = acc.reduce(packed, reduction="mean") if acc.num_processes > 1 else packed
        values = packed.tolist()
        metrics = {"loss": values[0], "lr": self.scheduler.get_last_lr()[0]}
        metrics.update({f"loss/{n}": v for n, v in zip(names, values[1:])})
        return metrics

    # ---- output -----------------------------------------------------------------------------
    def save_student(self, target: str | Path, tokenizer=None, metadata: dict | None = None, atomic: bool = True) -> Path:
        """Write a ``save_pretrained`` dir plus ``projections.safetensors`` beside the weights.

        ``atomic=False`` writes straight into ``target``, for callers that already write into a
        staging directory (the artifact store).
        """
        from safetensors.torch import save_file

        target = Path(target)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            if not atomic:
                target.mkdir(parents=True, exist_ok=True)
            with (atomic_dir(target, overwrite=True) if atomic else nullcontext(target)) as tmp:
                self.student.save_pretrained(tmp)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
                projections = {
                    f"{name}.{key}": value.detach().cpu().contiguous()
                    for name, module in self.projections.items()
                    for key, value in module.state_dict().items()
                }
                if projections:
                    save_file(projections, str(tmp / "projections.safetensors"))
                matches = [spec.model_dump() for spec in self.unwrapped.objective.specs]
                (tmp / "distillation.json").write_text(
                    json.dumps({"matches": matches, "step": self.step, **(metadata or {})}, indent=2, default=str)
                )
        self.accelerator.wait_for_everyone()
        return target


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_projections(model_dir: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(model_dir) / "projections.safetensors"
    return load_file(str(path)) if path.is_file() else {}
