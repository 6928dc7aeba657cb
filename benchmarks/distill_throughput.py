"""Distillation throughput (sequences/s, teacher forward + student forward/backward) on CPU.

Each configuration trains the real minilm-l6 teacher against a student on real Wikipedia
blocks. Beside each, the same run measures the teacher's forward-only throughput on the same
batches, so the ratio (distill / teacher-forward) is comparable across noisy machines.

    .venv/bin/python benchmarks/distill_throughput.py [--steps 12] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from kd_core.config import DistillConfig
from kd_core.data.corpus import iter_documents, pack_token_blocks
from kd_core.models.registry import load_model, load_tokenizer
from kd_core.models.student import build_student
from kd_core.train.data import pad_batch
from kd_core.train.distill import build_objective
from kd_core.train.trainer import DistillTrainer

CONFIGS = [
    ("2x192 tinybert", {"num_layers": 2, "hidden_size": 192}, "tinybert_intermediate"),
    ("4x312 tinybert", {"num_layers": 4, "hidden_size": 312, "intermediate_size": 1200}, "tinybert_intermediate"),
    ("4x312 minilm", {"num_layers": 4, "hidden_size": 312, "intermediate_size": 1200}, "minilm"),
]


def teacher_forward_rate(teacher, blocks, batch_size, batches) -> float:
    from kd_core.models.adaptors import ModelAdaptor

    adaptor = ModelAdaptor(teacher)
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(batches):
            batch = pad_batch(blocks[i * batch_size : (i + 1) * batch_size], 0)
            adaptor(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=Path("/tmp/kd-bench-throughput"))
    args = parser.parse_args()
    data = Path(os.environ.get("KD_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    tokenizer = load_tokenizer("minilm-l6")
    teacher = load_model("minilm-l6")
    need = (args.steps + args.warmup) * args.batch_size
    blocks = list(pack_token_blocks(tokenizer, iter_documents(data / "wikipedia_sample"), args.seq, need))
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cpus")
    print(f"# batch {args.batch_size} x seq {args.seq}, {args.steps} timed steps after {args.warmup} warm-up steps")
    print("| threads | student | recipe | distill seq/s | teacher fwd seq/s | distill / teacher-fwd |")
    print("|---|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for label, student_cfg, recipe in CONFIGS:
            cfg = DistillConfig.model_validate(
                {
                    "teacher": "minilm-l6",
                    "student": student_cfg,
                    "recipe": recipe,
                    "train": {"max_steps": args.steps + args.warmup, "batch_size": args.batch_size, "log_every": 1000},
                }
            )
            torch.manual_seed(0)
            student = build_student(teacher, cfg.student)
            objective = build_objective(cfg, teacher, student)
            out = args.out / f"t{threads}-{label.replace(' ', '-')}"
            trainer = DistillTrainer(teacher, student, objective, examples=blocks, config=cfg.train, output_dir=out,
                                     pad_token_id=tokenizer.pad_token_id)
            trainer.train(until_step=args.warmup, resume=False)
            timed = trainer.train(resume=False)  # continues in-process from step `warmup`
            fwd = teacher_forward_rate(teacher, blocks, args.batch_size, min(args.steps, 6))
            rate = timed.sequences_per_second
            print(f"| {threads} | {label} | {recipe} | {rate:.1f} | {fwd:.1f} | {rate / fwd:.2f} |", flush=True)


if __name__ == "__main__":
    main()
