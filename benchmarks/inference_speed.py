"""Inference speed of a 4x312 student against the minilm-l6 and mpnet-base teachers (kd_core.bench).

Two grids in one process, each interleaving its models within every repeat:

1. eager PyTorch, the three models, threads 1 and 2, batch 1/32/128 x seq 32/128/512
   (cells over --max-tokens or the per-cell time budget are skipped and listed);
2. the variants (eager, torch.compile, dynamic int8, ONNX Runtime) on minilm-l6 and the student
   at batch 1 and 32 x seq 128, threads 1 and 2.

The student is a randomly initialised BertModel of TinyBERT4's shape (4 layers, hidden 312,
12 heads, FFN 1200), saved with save_pretrained: weights do not change the speed.

    .venv/bin/python benchmarks/inference_speed.py --out /tmp/kd-inference-bench
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import torch

from kd_core.artifacts import atomic_dir
from kd_core.bench import BenchGrid, load_bench_model, run_benchmark, speedup_frame, variant_speedup_frame
from kd_core.models.registry import kd_home

STUDENT_SHAPE = {"num_hidden_layers": 4, "hidden_size": 312, "num_attention_heads": 12, "intermediate_size": 1200}


def student_dir() -> Path:
    """A random-init 4x312 BERT with minilm-l6's vocabulary, saved once under $KD_HOME/models."""
    target = kd_home() / "models" / "bench-student-4x312"
    if (target / "config.json").is_file():
        return target
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=30522, max_position_embeddings=512, **STUDENT_SHAPE))
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
    return target


def _cell(row) -> str:
    return f"{row.batch_size}x{row.seq_len}"


def eager_table(frame: pd.DataFrame) -> list[str]:
    threads = sorted(frame["threads"].unique())
    header = ["model", "batch x seq"] + [f"{t}T {k}" for t in threads for k in ("p50 ms", "p95 ms", "seq/s")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (model, batch, seq), group in frame.groupby(["model", "batch_size", "seq_len"], sort=False):
        cells = [model, f"{batch}x{seq}"]
        for t in threads:
            row = group[group["threads"] == t].iloc[0]
            if row.status == "ok":
                cells += [f"{row.latency_p50_ms:,.1f}", f"{row.latency_p95_ms:,.1f}", f"{row.seq_per_s:,.1f}"]
            else:
                cells += [row.status.split(":")[0], "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def speedup_table(speed: pd.DataFrame) -> list[str]:
    lines = ["| model | vs | variant | threads | batch x seq | model seq/s | ref seq/s | measured | FLOP ratio | measured / FLOP |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in speed.itertuples():
        lines.append(f"| {r.model} | {r.reference} | {r.variant} | {r.threads} | {_cell(r)} | {r.seq_per_s:,.1f} | "
                     f"{r.reference_seq_per_s:,.1f} | {r.speedup:.2f}x | {r.flop_ratio:.2f}x | {100 * r.fraction_of_flop_ratio:.0f}% |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("/tmp/kd-inference-bench"))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-repeats", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--cell-budget", type=float, default=60.0, help="seconds per model and cell")
    parser.add_argument("--variants", default="eager,compile,int8,onnx")
    parser.add_argument("--skip-grid", action="store_true", help="only the variants part")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    load_before = os.getloadavg()
    student = student_dir()
    models = [load_bench_model("minilm-l6", "minilm-l6"), load_bench_model("mpnet-base", "mpnet-base"),
              load_bench_model("student-4x312", student)]
    loads = [load_before[0]]

    def log(message: str) -> None:
        loads.append(os.getloadavg()[0])  # the other tenants of this shared machine, cell by cell
        print(f"[{time.time() - started:6.0f}s] load {loads[-1]:.1f} {message}", flush=True)

    threads = tuple(args.threads)
    frames = {}
    if not args.skip_grid:
        grid = BenchGrid(variants=("eager",), thread_counts=threads, batches=(1, 32, 128), seq_lens=(32, 128, 512),
                         repeats=args.repeats, latency_repeats=args.latency_repeats, max_tokens=args.max_tokens,
                         cell_budget_s=args.cell_budget)
        frames["grid"] = run_benchmark(models, grid, log=log)
        frames["grid"].to_parquet(args.out / "grid_eager.parquet", index=False)
    variants = tuple(args.variants.split(","))
    grid = BenchGrid(variants=variants, thread_counts=threads, batches=(1, 32), seq_lens=(128,),
                     repeats=args.repeats, latency_repeats=args.latency_repeats, cell_budget_s=args.cell_budget)
    frames["variants"] = run_benchmark([models[0], models[2]], grid, work_dir=args.out / "onnx", log=log)
    frames["variants"].to_parquet(args.out / "variants.parquet", index=False)
    elapsed = time.time() - started

    lines = [f"Run {dt.date.today().isoformat()}: `{' '.join([Path(sys.executable).name, *sys.argv])}`; "
             f"{elapsed / 60:.1f} min wall; torch {torch.__version__}; {platform.machine()}, {os.cpu_count()} CPUs; "
             f"1-min load average {load_before[0]:.2f} at the start, {min(loads):.2f}-{max(loads):.2f} during the run "
             f"(2 would be both cores busy).", ""]
    models_table = frames["variants"].drop_duplicates("model")
    if "grid" in frames:
        models_table = frames["grid"]
        lines += ["## Models", "", "| model | params (M) | disk (MiB) | GFLOPs/seq @32 | @128 | @512 |", "|---|---|---|---|---|---|"]
        for name, g in models_table.groupby("model", sort=False):
            fl = g.drop_duplicates("seq_len").set_index("seq_len")["flops_per_seq"] / 1e9
            lines.append(f"| {name} | {g.params.iloc[0] / 1e6:.1f} | {g.disk_mb.iloc[0]:.1f} | {fl[32]:.3f} | {fl[128]:.3f} "
                         f"| {fl[512]:.3f} |")
        lines += ["", "## Eager grid (latency per batch; throughput = batch / p50)", ""] + eager_table(frames["grid"])
        skipped = frames["grid"][frames["grid"]["status"] != "ok"]
        lines += ["", "Not measured:", ""] + [f"- {r.model}, {r.threads}T, {_cell(r)}: {r.status}" for r in skipped.itertuples()]
        for reference in ("minilm-l6", "mpnet-base"):
            speed = speedup_frame(frames["grid"], reference)
            speed = speed[speed["model"] == "student-4x312"]
            lines += ["", f"## Student speed-up over {reference} (eager)", ""] + speedup_table(speed)
    lines += ["", "## Variants (minilm-l6 and the student, seq 128)", "",
              "| model | variant | threads | batch x seq | p50 ms | p95 ms | seq/s | status |",
              "|---|---|---|---|---|---|---|---|"]
    for r in frames["variants"].itertuples():
        measured = r.status == "ok"
        lines.append(f"| {r.model} | {r.variant} | {r.threads} | {_cell(r)} | {r.latency_p50_ms:,.1f} | {r.latency_p95_ms:,.1f} | "
                     f"{r.seq_per_s:,.1f} | {r.status} |" if measured else
                     f"| {r.model} | {r.variant} | {r.threads} | {_cell(r)} | | | | {r.status} |")
    lines += ["", "### Student speed-up over minilm-l6 per variant", ""] + speedup_table(speedup_frame(frames["variants"], "minilm-l6"))
    lines += ["", "### Each variant over eager (same model, threads, cell)", "",
              "| model | variant | threads | batch x seq | speed-up over eager |",
              "|---|---|---|---|---|"]
    for r in variant_speedup_frame(frames["variants"]).itertuples():
        lines.append(f"| {r.model} | {r.variant} | {r.threads} | {_cell(r)} | {r.speedup_over_eager:.2f}x |")
    (args.out / "inference_speed.generated.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
