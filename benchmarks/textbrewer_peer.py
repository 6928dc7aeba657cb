"""TextBrewer 0.2.1's GeneralDistiller against kd_core's trainer: TinyBERT task distillation
(intermediate layers, then the prediction layer) at equal compute.

Both sides get the same fine-tuned teacher, the same random student (built once with
``build_student``, init random, seeded; kd_core loads the saved copy, TextBrewer trains a deep
copy), the same starting projections, the same batches in the same order (kd_core's
``GlobalBatchPlan`` + ``pad_batch``), the same optimizer (AdamW, kd_core's parameter groups),
schedule (linear, warmup) and step counts, the same dropout seed, fp32, one process, one thread
count. The matches are what our recipe ``tinybert_intermediate`` expands to with the uniform
mapping g(m): embeddings hidden MSE through W_e; per student layer m, attention-score MSE and
hidden MSE through the shared W_h against teacher layer g(m). The prediction step is
``tinybert_prediction``: soft cross-entropy at T (logits MSE for regression tasks).

* kd_core side: the pipeline's own stage functions, ``kd_core.stages.glue.task_distill_intermediate``,
  then ``task_distill_prediction`` on the intermediate output, and ``kd_core.stages.glue.evaluate_models``.
* TextBrewer side: ``GeneralDistiller`` with ``intermediate_matches`` (feature attention/hidden,
  loss attention_mse/hidden_mse, proj ['linear', d_s, d_t]) and adaptors that return kd_core's
  ``ModelAdaptor`` internals: hidden states, pre-softmax attention scores (transformers 5
  returns none), logits, and the attention mask as ``inputs_mask``.

``--textbrewer-mode matched`` (default) makes TextBrewer optimise exactly what we optimise: the
hidden matches share one W_h (TextBrewer builds one projection per match), projection biases get
no weight decay, and gradients are clipped over student and projections together (TextBrewer
clips the student only). Per-step losses then agree on every step, not just the first, and the
speed difference is the loop's. ``stock`` keeps TextBrewer's own behaviour for those three
(each projection still starts as a copy of ours, so the first step agrees).

Shims for torch 2.13 / transformers 5 (all local to this script): a stub ``tensorboardX`` module
when neither tensorboardX nor tensorboard is installed (TextBrewer imports a SummaryWriter at
import time and uses it only with a log_dir, which is never set here); its tqdm progress bars
are turned off; the pre-softmax scores come from the adaptor.

    .venv/bin/python benchmarks/textbrewer_peer.py \\
        --teacher data/artifacts/finetune_teacher/<key>/model \\
        --train data/artifacts/augment/<key>/train.parquet \\
        --eval data/artifacts/prepare_task/<key>/dev.parquet --task sst2 \\
        --steps 200 --prediction-steps 100 --out /tmp/kd-bench-textbrewer
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import types
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import torch
from torch import nn

from kd_core.config import LayerMapping, PipelineConfig, PruneConfig, StudentConfig, TaskDistillSection, TaskSection, TrainConfig
from kd_core.data.features import encode_examples
from kd_core.data.tasks import get_task
from kd_core.models.adaptors import ModelAdaptor
from kd_core.models.registry import load_tokenizer
from kd_core.models.student import build_student
from kd_core.stages import common, glue
from kd_core.stages.common import StageIO
from kd_core.train.data import DataPosition, GlobalBatchPlan, pad_batch
from kd_core.train.objective import expand_recipe, term_name
from kd_core.train.trainer import _param_groups

MARKER = "textbrewer_peer.json"
MODEL = common.MODEL_SUBDIR
CLAMP_NOTE = (
    "TextBrewer's attention_mse zeroes every score <= -1e-3 (student and teacher) on purpose, but only "
    "in its branch without inputs_mask; these adaptors pass inputs_mask, so its masked branch runs (no "
    "clamp, mean over valid query-key pairs and heads, as ours)."
)


# ---- TextBrewer and its shims ---------------------------------------------------------------------
def import_textbrewer():
    """Import textbrewer 0.2.1 on this stack; returns the module."""
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        try:
            import torch.utils.tensorboard  # noqa: F401  (needs the tensorboard package)
        except ImportError:
            # TextBrewer imports a SummaryWriter at import time and instantiates it only when
            # TrainingConfig.log_dir is set; log_dir stays None here, so a stub is enough.
            stub = types.ModuleType("tensorboardX")

            class SummaryWriter:  # noqa: D401 - a stub
                def __init__(self, *args, **kwargs):
                    raise RuntimeError("tensorboardX stub (benchmarks/textbrewer_peer.py): leave log_dir None")

            stub.SummaryWriter = SummaryWriter
            sys.modules["tensorboardX"] = stub
    import textbrewer
    from textbrewer import distiller_basic

    if textbrewer.__version__ != "0.2.1.post1":
        print(f"warning: this benchmark was written for textbrewer 0.2.1.post1, found {textbrewer.__version__}")
    distiller_basic.tqdm = lambda iterable, **kwargs: iterable  # no progress bars in the benchmark output
    return textbrewer


class WithInternals(nn.Module):
    """The HF model behind kd_core's ModelAdaptor: forward returns EncoderInternals (hidden
    states, lazily computed pre-softmax scores, logits). Batch labels are dropped, as our trainer
    drops them from the model inputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._adaptor = ModelAdaptor(model)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        return self._adaptor(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)


class LazyScores:
    """TextBrewer's ``attention`` list (index i = transformer layer i+1); a score matrix is
    computed from the hooked q/k only when a match asks for it, as kd_core's objective does."""

    def __init__(self, internals):
        self._internals = internals

    def __getitem__(self, index: int):
        return self._internals.scores(index + 1)

    def __len__(self) -> int:
        return self._internals.num_layers


def intermediate_adaptor(batch, internals):
    return {"hidden": internals._hidden, "attention": LazyScores(internals), "inputs_mask": batch["attention_mask"]}


def prediction_adaptor(batch, internals):
    return {"logits": internals.logits}


class ClipAllAdamW(torch.optim.AdamW):
    """AdamW that clips the global gradient norm of all its parameters (student and projections,
    as our trainer does) right before stepping. TextBrewer then runs with max_grad_norm=-1."""

    def __init__(self, params, max_grad_norm: float | None, **kwargs):
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm

    def step(self, closure=None):
        if self.max_grad_norm is not None:
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        return super().step(closure)


def make_distiller_class(textbrewer):
    from textbrewer.losses import att_mse_loss

    class PeerDistiller(textbrewer.GeneralDistiller):
        """GeneralDistiller that records each step's losses and, in matched mode, adds every
        distinct projection once with kd_core's weight-decay grouping."""

        def __init__(self, *args, matched: bool, weight_decay: float, **kwargs):
            super().__init__(*args, **kwargs)
            self.matched = matched
            self.weight_decay = weight_decay
            self.losses: list[dict] = []
            self.clamp_probe: list[dict] | None = None

        def initialize_training(self, optimizer, scheduler_class, scheduler_args, scheduler):
            if not self.matched:
                return super().initialize_training(optimizer, scheduler_class, scheduler_args, scheduler)
            unique = list({id(p): p for p in self.projs if p is not None}.values())
            for group in _param_groups(nn.ModuleList(unique), self.weight_decay):
                if group["params"]:
                    optimizer.add_param_group(group)
            saved, self.projs = self.projs, []  # the parent would add a tied projection once per match
            try:
                return super().initialize_training(optimizer, scheduler_class, scheduler_args, scheduler)
            finally:
                self.projs = saved

        def compute_loss(self, results_S, results_T):
            total, losses = super().compute_loss(results_S, results_T)
            if self.clamp_probe is None and "attention" in results_S:
                # after the loss: EncoderInternals caches each score matrix on first access, and a
                # first access under no_grad would cut the attention terms out of the graph
                self.clamp_probe = self._probe_clamp(results_S, results_T)
            return total, losses

        @torch.no_grad()
        def _probe_clamp(self, results_S, results_T):
            """First batch only: what the unmasked (clamped) branch of attention_mse would give."""
            mask = results_S["inputs_mask"]
            valid = (mask[:, None, :, None] != 0) & (mask[:, None, None, :] != 0)
            probe = []
            for match in self.d_config.intermediate_matches:
                if match.feature != "attention":
                    continue
                s, t = results_S["attention"][match.layer_S].detach(), results_T["attention"][match.layer_T].detach()
                pairs = valid.expand_as(t)
                probe.append({
                    "layer_S": match.layer_S, "layer_T": match.layer_T,
                    "masked": float(att_mse_loss(s, t, mask)),
                    "unmasked_clamped": float(att_mse_loss(s, t, None)),
                    "teacher_scores_clamped_share": float((t[pairs] <= -1e-3).float().mean()),
                })
            return probe

        def write_loss(self, total_loss, writer_step, losses_dict=None):
            record = {"loss": float(total_loss.detach())}
            record.update({k: float(v.detach()) for k, v in (losses_dict or {}).items()})
            self.losses.append(record)

    return PeerDistiller


class PlanBatches:
    """The batches our trainer draws (GlobalBatchPlan, one process, no accumulation), in its order,
    endlessly; stamps the clock at each fetch (a fetch starts the next step)."""

    def __init__(self, examples, batch_size: int, seed: int, pad_token_id: int):
        self.examples, self.pad_token_id = examples, pad_token_id
        self.plan = GlobalBatchPlan(len(examples), batch_size, 1, 1, seed)
        self.stamps: list[float] = []

    def __iter__(self):
        position = DataPosition()
        while True:
            self.stamps.append(time.perf_counter())
            (indices,), position = self.plan.micro_batches(position, 0)
            yield pad_batch([self.examples[i] for i in indices], self.pad_token_id)


class StepClock:
    """kd_core TrainerCallback: the clock and the metrics at the end of every step."""

    def __init__(self):
        self.stamps: list[float] = []
        self.metrics: list[dict] = []

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        self.stamps.append(time.perf_counter())
        self.metrics.append(dict(metrics))


# ---- helpers -------------------------------------------------------------------------------------
def step_seconds(ends: list[float], warmup: int) -> dict:
    """Durations between consecutive step ends (step 1 has no clean start on either side, and the
    last TextBrewer step includes its checkpoint save), median after ``warmup`` steps."""
    durations = [b - a for a, b in zip(ends, ends[1:])]  # durations[k-1]: step k+1 (1-based)
    timed = durations[max(warmup - 1, 0):-1] or durations[-1:] or durations
    return {
        "median": statistics.median(timed) if timed else float("nan"),
        "timed_steps": len(timed),
        "durations": durations,
    }


def prepare_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise SystemExit(f"--out {out} is not empty and holds no {MARKER}; give a new or empty dir")
        for name in ("_stage", "ours", "textbrewer", "eval", MARKER, "textbrewer_peer.md"):
            target = out / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def model_dir(path: Path) -> Path:
    path = path.resolve()
    if (path / "config.json").is_file():
        return path
    if (path / MODEL / "config.json").is_file():
        return path / MODEL
    raise SystemExit(f"--teacher {path}: no config.json there or in {path / MODEL}")


def link(target: Path, link_path: Path) -> None:
    link_path.parent.mkdir(parents=True, exist_ok=True)
    link_path.symlink_to(target.resolve())


def fmt(x: float, digits: int = 4) -> str:
    return "n/a" if x is None or x != x else f"{x:.{digits}f}"


def git_head() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                              capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return None


# ---- the two sides -------------------------------------------------------------------------------
def run_ours(cfg, step: str, teacher_stage: Path, student_stage: Path, data_stage: Path, out: Path, warmup: int) -> dict:
    clock = StepClock()
    (out / "work").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    run = glue.task_distill_intermediate if step == "intermediate" else glue.task_distill_prediction
    io = StageIO({"teacher": teacher_stage, "student": student_stage, "data": data_stage}, out, out / "work", [clock])
    summary = run(cfg, io)
    wall = time.perf_counter() - started
    shutil.rmtree(out / "work", ignore_errors=True)
    return {"summary": summary, "wall_seconds": wall, "losses": clock.metrics,
            "seconds_per_step": step_seconds(clock.stamps, warmup)}


def run_textbrewer(textbrewer, distiller_cls, *, teacher, student, adaptor, matches, proj_names, proj_states, examples, train: TrainConfig,
                   pad_token_id: int, device: str, matched: bool, kd_loss_type: str, temperature: float, out: Path,
                   warmup: int) -> dict:
    from transformers import get_linear_schedule_with_warmup

    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train_config = textbrewer.TrainingConfig(output_dir=str(out / "checkpoints"), device=device, ckpt_steps=train.max_steps,
                                             log_dir=None)
    distill_config = textbrewer.DistillationConfig(temperature=temperature, kd_loss_type=kd_loss_type, kd_loss_weight=1,
                                                   hard_label_weight=0, intermediate_matches=matches)
    model_T, model_S = WithInternals(teacher), WithInternals(student)
    distiller = distiller_cls(train_config, distill_config, model_T, model_S, adaptor, adaptor,
                              matched=matched, weight_decay=train.weight_decay)
    # Every projection starts as ours (W_e, W_h); matched mode ties the hidden-layer ones into one W_h.
    tied: dict[str, nn.Module] = {}
    for index, name in enumerate(proj_names):
        if name is None:
            continue
        if matched and name in tied:
            distiller.projs[index] = tied[name]
        else:
            distiller.projs[index].load_state_dict(proj_states[name])
        tied.setdefault(name, distiller.projs[index])
    clip = train.max_grad_norm
    optimizer = ClipAllAdamW(_param_groups(student, train.weight_decay), max_grad_norm=clip if matched else None,
                             lr=train.learning_rate)
    batches = PlanBatches(examples, train.batch_size, train.seed, pad_token_id)
    ends: list[float] = []

    def at_end(model, step):  # TextBrewer calls this after its final checkpoint save
        ends.append(time.perf_counter())

    from accelerate.utils import set_seed

    set_seed(train.seed)  # our trainer seeds here too: the same dropout masks, step by step
    with distiller:
        distiller.train(optimizer, batches, num_steps=train.max_steps,
                        scheduler_class=get_linear_schedule_with_warmup,
                        scheduler_args={"num_warmup_steps": int(train.warmup_ratio * train.max_steps),
                                        "num_training_steps": train.max_steps},
                        max_grad_norm=-1.0 if matched or clip is None else clip, callback=at_end)
    wall = time.perf_counter() - started
    model_S._adaptor.remove_hooks()  # the next phase wraps the same models with fresh hooks
    model_T._adaptor.remove_hooks()
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    step_ends = batches.stamps[1:train.max_steps] + ends[-1:]
    return {"wall_seconds": wall, "losses": distiller.losses, "clamp_probe": distiller.clamp_probe,
            "seconds_per_step": step_seconds(step_ends, warmup), "projections": len({id(p) for p in distiller.projs if p is not None})}


def first_step(ours: dict, brewer: dict, names: list[str]) -> dict:
    """Step-1 totals and terms of both sides, matched by position (both follow the match order)."""
    o, b = ours["losses"][0], brewer["losses"][0]
    o_terms = [(k[len("loss/"):], v) for k, v in o.items() if k.startswith("loss/")]
    b_terms = [(k, v) for k, v in b.items() if k != "loss"]
    rows = [{"term": name, "ours": ov, "textbrewer": bv, "textbrewer_name": bn}
            for name, (_, ov), (bn, bv) in zip(names, o_terms, b_terms)]
    rel = abs(o["loss"] - b["loss"]) / max(abs(o["loss"]), 1e-12)
    return {"ours": o["loss"], "textbrewer": b["loss"], "abs_diff": abs(o["loss"] - b["loss"]), "rel_diff": rel, "terms": rows}


def max_rel_diff(ours: dict, brewer: dict) -> float:
    pairs = list(zip([m["loss"] for m in ours["losses"]], [m["loss"] for m in brewer["losses"]]))
    return max(abs(a - b) / max(abs(a), 1e-12) for a, b in pairs) if pairs else float("nan")


# ---- main ----------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, required=True, help="fine-tuned classifier (save_pretrained dir)")
    parser.add_argument("--train", type=Path, required=True, help="task rows: text_a, optional text_b, label")
    parser.add_argument("--eval", type=Path, required=True, help="dev rows, same columns")
    parser.add_argument("--task", required=True, help="sst2, mrpc, stsb, cola, ...")
    parser.add_argument("--steps", type=int, default=200, help="intermediate-layer steps")
    parser.add_argument("--prediction-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--prediction-lr", type=float, default=None, help="default: --lr")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="<= 0 disables clipping")
    parser.add_argument("--temperature", type=float, default=1.0, help="prediction step")
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument("--student-layers", type=int, default=4)
    parser.add_argument("--student-hidden", type=int, default=312)
    parser.add_argument("--student-heads", type=int, default=None, help="default: the teacher's (TinyBERT needs equal heads)")
    parser.add_argument("--student-intermediate", type=int, default=1200)
    parser.add_argument("--student-dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the s/step median")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--textbrewer-mode", choices=("matched", "stock"), default="matched",
                        help="matched: TextBrewer optimises exactly our objective; stock: its own projections/clipping")
    parser.add_argument("--with-pruned", action="store_true",
                        help="a third side: ours, same steps, from the student cut out of the fine-tuned teacher "
                             "(student.init pruned, mapping student_init), which TextBrewer cannot build")
    parser.add_argument("--out", type=Path, default=Path("/tmp/kd-bench-textbrewer"))
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    textbrewer = import_textbrewer()
    distiller_cls = make_distiller_class(textbrewer)
    spec = get_task(args.task)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    matched = args.textbrewer_mode == "matched"
    clip = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None
    out = args.out.resolve()
    prepare_out(out)

    # Stage dirs in the artifact layout the pipeline's stage functions read.
    stage = out / "_stage"
    teacher_stage, student_stage, data_stage, task_stage = (stage / n for n in ("teacher", "student", "data", "task"))
    link(model_dir(args.teacher), teacher_stage / MODEL)
    link(args.train, data_stage / "train.parquet")
    eval_split = args.eval.stem
    link(args.eval, task_stage / f"{eval_split}.parquet")

    def train_config(steps: int, lr: float) -> TrainConfig:
        return TrainConfig(max_steps=steps, batch_size=args.batch_size, learning_rate=lr, weight_decay=args.weight_decay,
                           warmup_ratio=args.warmup_ratio, max_grad_norm=clip, mixed_precision="no", seed=args.seed,
                           log_every=1)

    intermediate = train_config(args.steps, args.lr)
    prediction = train_config(args.prediction_steps, args.prediction_lr or args.lr)
    student_cfg = StudentConfig(num_layers=args.student_layers, hidden_size=args.student_hidden, num_heads=args.student_heads,
                                intermediate_size=args.student_intermediate, init="random", dropout=args.student_dropout)
    cfg = PipelineConfig(
        profile="textbrewer-peer", teacher=str(teacher_stage / MODEL), student=student_cfg,
        task=TaskSection(name=spec.name, max_seq_length=args.max_seq_length, eval_split=eval_split),
        task_distill=TaskDistillSection(mapping=LayerMapping(strategy="uniform"), intermediate=intermediate,
                                        prediction=prediction, temperature=args.temperature),
    )

    with common.quiet_transformers():
        teacher = common.load_classifier(teacher_stage / MODEL, spec)
    teacher.to(device).eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    tokenizer = load_tokenizer(teacher_stage / MODEL)

    # The one random student, and the starting projections, for both sides.
    torch.manual_seed(args.seed)
    student = build_student(teacher, student_cfg, head="sequence_classification", **common.task_head_kwargs(spec))
    s_shape, t_shape = common.shape_of(student), common.shape_of(teacher)
    specs = expand_recipe(cfg.task_distill.recipe, cfg.task_distill.mapping, s_shape.num_layers, t_shape.num_layers)
    torch.manual_seed(args.seed + 1)
    projections = {}
    for s in specs:
        if s.projection and s.projection not in projections:
            projections[s.projection] = nn.Linear(s_shape.hidden_size, t_shape.hidden_size).state_dict()
    (student_stage / MODEL).mkdir(parents=True)
    student.save_pretrained(student_stage / MODEL)
    tokenizer.save_pretrained(student_stage / MODEL)
    from safetensors.torch import save_file

    # kd_core's task_distill starts from projections saved beside the student (_init_projections).
    save_file({f"{n}.{k}": v.contiguous() for n, state in projections.items() for k, v in state.items()},
              str(student_stage / MODEL / "projections.safetensors"))
    with common.quiet_transformers():
        reloaded = common.load_classifier(student_stage / MODEL, spec)
    built, loaded = student.state_dict(), reloaded.state_dict()
    same = built.keys() == loaded.keys() and all(torch.equal(built[k], loaded[k]) for k in built)
    if not same:
        raise SystemExit("the saved student does not reload bit-identically; the comparison would not start equal")
    del reloaded
    student_tb = copy.deepcopy(student).to(device)
    del student

    # TextBrewer's matches: hidden index 0 = embeddings, i = layer i; attention index i = layer i+1.
    tb_matches, tb_proj_names, names = [], [], []
    for s in specs:
        names.append(term_name(s))
        if s.feature == "embeddings":
            entry = {"layer_S": 0, "layer_T": 0, "feature": "hidden", "loss": "hidden_mse"}
        elif s.feature == "hidden":
            entry = {"layer_S": s.student_layer, "layer_T": s.teacher_layer, "feature": "hidden", "loss": "hidden_mse"}
        elif s.feature == "attention_scores":
            entry = {"layer_S": s.student_layer - 1, "layer_T": s.teacher_layer - 1, "feature": "attention", "loss": "attention_mse"}
        else:
            raise SystemExit(f"unexpected match {term_name(s)} in {cfg.task_distill.recipe}")
        entry["weight"] = s.weight
        if s.projection:
            entry["proj"] = ["linear", s_shape.hidden_size, t_shape.hidden_size]
        tb_matches.append(entry)
        tb_proj_names.append(s.projection)

    examples = encode_examples(pd.read_parquet(args.train), tokenizer, args.max_seq_length)
    print(f"teacher {t_shape}, student {s_shape}, {len(examples)} train rows, device {device}, "
          f"threads {torch.get_num_threads()}, textbrewer {args.textbrewer_mode}")
    print("matches (ours -> TextBrewer):")
    for name, entry in zip(names, tb_matches):
        print(f"  {name:40s} {entry}")

    results: dict = {}
    # intermediate layers: ours, then TextBrewer
    print(f"[ours] intermediate, {args.steps} steps", flush=True)
    results["ours_intermediate"] = run_ours(cfg, "intermediate", teacher_stage, student_stage, data_stage,
                                            out / "ours" / "intermediate", args.warmup)
    print(f"[textbrewer] intermediate, {args.steps} steps", flush=True)
    results["textbrewer_intermediate"] = run_textbrewer(
        textbrewer, distiller_cls, teacher=teacher, student=student_tb, adaptor=intermediate_adaptor, matches=tb_matches,
        proj_names=tb_proj_names, proj_states=projections, examples=examples, train=intermediate,
        pad_token_id=tokenizer.pad_token_id, device=device, matched=matched, kd_loss_type="ce", temperature=1.0,
        out=out / "textbrewer" / "intermediate", warmup=args.warmup)
    # prediction layer: each side continues from its own intermediate student
    print(f"[ours] prediction, {args.prediction_steps} steps", flush=True)
    results["ours_prediction"] = run_ours(cfg, "prediction", teacher_stage, out / "ours" / "intermediate", data_stage,
                                          out / "ours" / "prediction", args.warmup)
    print(f"[textbrewer] prediction, {args.prediction_steps} steps", flush=True)
    results["textbrewer_prediction"] = run_textbrewer(
        textbrewer, distiller_cls, teacher=teacher, student=student_tb, adaptor=prediction_adaptor, matches=[],
        proj_names=[], proj_states={}, examples=examples, train=prediction, pad_token_id=tokenizer.pad_token_id,
        device=device, matched=matched, kd_loss_type="mse" if spec.is_regression else "ce",
        temperature=args.temperature, out=out / "textbrewer" / "prediction", warmup=args.warmup)
    tb_final = out / "textbrewer" / "prediction" / MODEL
    student_tb.save_pretrained(tb_final)
    tokenizer.save_pretrained(tb_final)
    sides = {"teacher": teacher_stage, "ours": out / "ours" / "prediction", "textbrewer": out / "textbrewer" / "prediction"}
    if args.with_pruned:
        pruned_cfg = cfg.model_copy(update={
            "student": student_cfg.model_copy(update={"init": "pruned", "prune": PruneConfig(source="finetuned")}),
            "task_distill": cfg.task_distill.model_copy(update={"mapping": LayerMapping(strategy="student_init")})})
        pruned_stage = stage / "pruned"
        (pruned_stage).mkdir()
        glue.prune_finetuned(pruned_cfg, StageIO({"teacher": teacher_stage, "task": data_stage}, pruned_stage))
        print(f"[ours, pruned init] intermediate, {args.steps} steps", flush=True)
        results["pruned_intermediate"] = run_ours(pruned_cfg, "intermediate", teacher_stage, pruned_stage, data_stage,
                                                  out / "pruned" / "intermediate", args.warmup)
        print(f"[ours, pruned init] prediction, {args.prediction_steps} steps", flush=True)
        results["pruned_prediction"] = run_ours(pruned_cfg, "prediction", teacher_stage, out / "pruned" / "intermediate",
                                                data_stage, out / "pruned" / "prediction", args.warmup)
        sides["pruned"] = out / "pruned" / "prediction"

    # dev scores with the pipeline's evaluate stage (teacher for reference)
    (out / "eval").mkdir()
    with common.quiet_transformers():
        glue.evaluate_models(cfg, sides, task_stage, out / "eval")
    metrics = {r["model"]: r for r in json.loads((out / "eval" / "metrics.json").read_text())}

    checks = {
        "intermediate_first_step": first_step(results["ours_intermediate"], results["textbrewer_intermediate"], names),
        "prediction_first_step": first_step(results["ours_prediction"], results["textbrewer_prediction"],
                                            [term_name(s) for s in expand_recipe(
                                                "tinybert_prediction", cfg.task_distill.mapping, s_shape.num_layers,
                                                t_shape.num_layers, params={"regression": spec.is_regression,
                                                                            "temperature": args.temperature})]),
        "intermediate_max_rel_diff_all_steps": max_rel_diff(results["ours_intermediate"], results["textbrewer_intermediate"]),
        "prediction_max_rel_diff_all_steps": max_rel_diff(results["ours_prediction"], results["textbrewer_prediction"]),
        "clamp_probe": results["textbrewer_intermediate"]["clamp_probe"],
    }
    write_report(args, out, spec, device, s_shape, t_shape, len(examples), results, metrics, checks, eval_split)


def write_report(args, out, spec, device, s_shape, t_shape, rows, results, metrics, checks, eval_split) -> None:
    import textbrewer
    import transformers

    side_rows = []
    labelled = [("ours", "kd_core DistillTrainer"), ("textbrewer", f"TextBrewer GeneralDistiller ({args.textbrewer_mode})")]
    if "pruned_intermediate" in results:
        labelled.append(("pruned", "kd_core DistillTrainer, student pruned from the fine-tuned teacher"))
    for side, label in labelled:
        inter, pred = results[f"{side}_intermediate"], results[f"{side}_prediction"]
        side_rows.append({
            "side": label,
            "intermediate_steps": args.steps,
            "prediction_steps": args.prediction_steps,
            "s_per_step_intermediate": inter["seconds_per_step"]["median"],
            "s_per_step_prediction": pred["seconds_per_step"]["median"],
            "final_loss_intermediate": inter["losses"][-1]["loss"],
            "final_loss_prediction": pred["losses"][-1]["loss"],
            "dev_score": metrics[side]["score"],
            "dev_metrics": {k: metrics[side][k] for k in spec.metrics},
        })
    first_i, first_p = checks["intermediate_first_step"], checks["prediction_first_step"]
    lines = [
        f"# TextBrewer GeneralDistiller vs kd_core DistillTrainer: {spec.name}",
        "",
        f"Teacher `{args.teacher}` ({t_shape.num_layers}x{t_shape.hidden_size}, {t_shape.num_heads} heads), "
        f"student {s_shape.num_layers}x{s_shape.hidden_size} ({s_shape.num_heads} heads, intermediate "
        f"{args.student_intermediate}, random init, seed {args.seed}), {rows} train rows from `{args.train}`, "
        f"dev `{args.eval}`; batch {args.batch_size}, max_seq_length {args.max_seq_length}, lr {args.lr}"
        f"{'' if not args.prediction_lr else f' / {args.prediction_lr}'}, {device}, {torch.get_num_threads()} threads, "
        f"fp32. torch {torch.__version__}, transformers {transformers.__version__}, textbrewer {textbrewer.__version__}, "
        f"kd-pipeline {git_head() or '?'}.",
        "",
        "| side | intermediate steps | prediction steps | s/step intermediate | s/step prediction | dev score |",
        "|---|---|---|---|---|---|",
    ]
    for r in side_rows:
        lines.append(f"| {r['side']} | {r['intermediate_steps']} | {r['prediction_steps']} | "
                     f"{fmt(r['s_per_step_intermediate'])} | {fmt(r['s_per_step_prediction'])} | {fmt(r['dev_score'], 2)} |")
    timed_i = results["ours_intermediate"]["seconds_per_step"]["timed_steps"]
    timed_p = results["ours_prediction"]["seconds_per_step"]["timed_steps"]
    lines += [
        "",
        f"- Teacher dev score ({', '.join(spec.metrics)}, split `{eval_split}`): {fmt(metrics['teacher']['score'], 2)}.",
        f"- s/step: median over {timed_i} intermediate / {timed_p} prediction steps, after {args.warmup} warm-up steps "
        f"and without the last step (TextBrewer saves a checkpoint in it); same process, ours first in each phase.",
        f"- Final losses (intermediate / prediction): ours {fmt(side_rows[0]['final_loss_intermediate'])} / "
        f"{fmt(side_rows[0]['final_loss_prediction'])}, TextBrewer {fmt(side_rows[1]['final_loss_intermediate'])} / "
        f"{fmt(side_rows[1]['final_loss_prediction'])}.",
        f"- First-step total loss, same batch, student, projections and dropout masks: intermediate ours "
        f"{first_i['ours']:.6f} vs TextBrewer {first_i['textbrewer']:.6f} (rel. diff {first_i['rel_diff']:.1e}); "
        f"prediction ours {first_p['ours']:.6f} vs TextBrewer {first_p['textbrewer']:.6f} (rel. diff {first_p['rel_diff']:.1e}).",
        f"- Largest per-step relative loss difference over all steps: intermediate "
        f"{checks['intermediate_max_rel_diff_all_steps']:.1e}, prediction {checks['prediction_max_rel_diff_all_steps']:.1e}"
        + (" (matched mode: the two optimise the same thing, so only float noise should separate them)."
           if args.textbrewer_mode == "matched"
           else " (stock mode: TextBrewer learns one projection per match and clips the student only, so they part after step 1)."),
        f"- {CLAMP_NOTE}",
    ]
    probe = checks["clamp_probe"] or []
    if probe:
        share = statistics.mean(p["teacher_scores_clamped_share"] for p in probe)
        lines.append(f"  On the first batch the clamp would have zeroed {100 * share:.1f}% of the valid teacher scores; "
                     "attention_mse masked vs unmasked+clamped: "
                     + ", ".join(f"L{p['layer_S'] + 1}<-L{p['layer_T'] + 1} {p['masked']:.4f} vs {p['unmasked_clamped']:.4f}"
                                 for p in probe) + ".")
    lines += ["", "First step, term by term (intermediate):", "", "| term | ours | TextBrewer | TextBrewer name |", "|---|---|---|---|"]
    for t in first_i["terms"]:
        lines.append(f"| {t['term']} | {t['ours']:.6f} | {t['textbrewer']:.6f} | {t['textbrewer_name']} |")
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    (out / "textbrewer_peer.md").write_text(text)
    payload = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "device": device, "threads": torch.get_num_threads(), "platform": platform.platform(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "textbrewer": textbrewer.__version__, "kd_pipeline_commit": git_head()},
        "teacher_shape": asdict(t_shape), "student_shape": asdict(s_shape), "train_rows": rows,
        "table": side_rows, "teacher_dev": metrics["teacher"], "checks": checks, "clamp_note": CLAMP_NOTE,
        "runs": results,
    }
    (out / MARKER).write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {out / 'textbrewer_peer.md'} and {out / MARKER}")


if __name__ == "__main__":
    main()
