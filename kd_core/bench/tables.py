"""Benchmark results as tables: speed-ups against a reference model and against eager, and markdown."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import torch

from kd_core.artifacts import atomic_file

CELL_KEYS = ["variant", "device", "dtype", "threads", "batch_size", "seq_len"]
# The target: on CPU at batch 32 x seq 128, a measured speed-up of >= 80% of the FLOP ratio.
TARGET_CELL = (32, 128)
TARGET_FRACTION = 0.8


def _ok(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["status"] == "ok"]


def speedup_frame(frame: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Per non-reference model and cell: measured throughput ratio model/reference beside the FLOP
    ratio reference/model (what the speed-up would be if time followed FLOPs), and their quotient."""
    if reference not in set(frame["model"]):
        raise ValueError(f"reference model {reference!r} is not among {sorted(set(frame['model']))}")
    ok = _ok(frame)
    ref = ok[ok["model"] == reference][CELL_KEYS + ["seq_per_s", "flops_per_seq"]]
    ref = ref.rename(columns={"seq_per_s": "reference_seq_per_s", "flops_per_seq": "reference_flops_per_seq"})
    others = ok[ok["model"] != reference][["model"] + CELL_KEYS + ["seq_per_s", "flops_per_seq"]]
    merged = others.merge(ref, on=CELL_KEYS, how="inner")
    merged.insert(1, "reference", reference)
    merged["speedup"] = merged["seq_per_s"] / merged["reference_seq_per_s"]
    merged["flop_ratio"] = merged["reference_flops_per_seq"] / merged["flops_per_seq"]
    merged["fraction_of_flop_ratio"] = merged["speedup"] / merged["flop_ratio"]
    return merged.drop(columns=["reference_flops_per_seq"]).reset_index(drop=True)


def variant_speedup_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Per model and cell: each non-eager variant's throughput over eager's (same threads, same inputs)."""
    ok = _ok(frame)
    keys = ["model", "device", "threads", "batch_size", "seq_len"]
    eager = ok[ok["variant"] == "eager"][keys + ["seq_per_s"]].rename(columns={"seq_per_s": "eager_seq_per_s"})
    others = ok[ok["variant"] != "eager"][keys + ["variant", "dtype", "seq_per_s"]]
    merged = others.merge(eager, on=keys, how="inner")
    merged["speedup_over_eager"] = merged["seq_per_s"] / merged["eager_seq_per_s"]
    return merged.reset_index(drop=True)


def _num(value: float, digits: int = 1) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(frame: pd.DataFrame, reference: str | None, title: str = "Inference benchmark") -> str:
    lines = [f"# {title}", ""]
    devices = ", ".join(sorted(set(frame["device"])))
    lines.append(f"Device {devices}; torch {torch.__version__}; threads {sorted(set(frame['threads']))}; "
                 f"latency per batch (p50/p95 over the repeats), throughput = batch / p50.")
    lines += ["", "## Models", ""]
    seq_lens = sorted(set(frame["seq_len"]))
    model_rows = []
    for name, group in frame.groupby("model", sort=False):
        first = group.iloc[0]
        flops = {int(s): g["flops_per_seq"].iloc[0] for s, g in group.groupby("seq_len")}
        model_rows.append([name, _num(first["params"] / 1e6, 2), _num(first["disk_mb"], 1)]
                          + [f"{flops[s] / 1e9:.4g}" for s in seq_lens])
    lines += _table(["model", "params (M)", "disk (MiB)"] + [f"GFLOPs/seq @{s}" for s in seq_lens], model_rows)
    lines += ["", "## Results", ""]
    result_rows = []
    for r in frame.itertuples():
        ok = r.status == "ok"
        result_rows.append([r.model, r.variant, r.dtype, str(r.threads), f"{r.batch_size}x{r.seq_len}",
                            _num(r.latency_p50_ms, 2) if ok else "", _num(r.latency_p95_ms, 2) if ok else "",
                            _num(r.seq_per_s, 1) if ok else "", str(r.repeats), r.status])
    lines += _table(["model", "variant", "dtype", "threads", "batch x seq", "p50 ms", "p95 ms", "seq/s", "repeats", "status"],
                    result_rows)
    if reference is not None and frame["model"].nunique() > 1:
        speed = speedup_frame(frame, reference)
        lines += ["", f"## Speed-up over {reference}", "",
                  "measured = model seq/s / reference seq/s in the same cell; FLOP ratio = reference FLOPs / "
                  "model FLOPs per sequence (the bound if time followed FLOPs); last column = measured / FLOP ratio.", ""]
        lines += _table(
            ["model", "variant", "threads", "batch x seq", "measured", "FLOP ratio", "measured / FLOP"],
            [[r.model, r.variant, str(r.threads), f"{r.batch_size}x{r.seq_len}", f"{r.speedup:.2f}x",
              f"{r.flop_ratio:.2f}x", f"{100 * r.fraction_of_flop_ratio:.0f}%"] for r in speed.itertuples()],
        )
        target = speed[(speed["device"] == "cpu") & (speed["batch_size"] == TARGET_CELL[0]) & (speed["seq_len"] == TARGET_CELL[1])]
        if len(target):
            lines += ["", f"Target (CPU, {TARGET_CELL[0]}x{TARGET_CELL[1]}: measured >= {TARGET_FRACTION:.0%} of the FLOP ratio):", ""]
            for r in target.itertuples():
                verdict = "met" if r.fraction_of_flop_ratio >= TARGET_FRACTION else "NOT met"
                lines.append(f"- {r.model} vs {reference}, {r.variant}, {r.threads} thread(s): "
                             f"{100 * r.fraction_of_flop_ratio:.0f}% -> {verdict}")
    variants = variant_speedup_frame(frame)
    if len(variants):
        lines += ["", "## Variants against eager", ""]
        lines += _table(
            ["model", "variant", "threads", "batch x seq", "seq/s", "eager seq/s", "speed-up"],
            [[r.model, r.variant, str(r.threads), f"{r.batch_size}x{r.seq_len}", _num(r.seq_per_s),
              _num(r.eager_seq_per_s), f"{r.speedup_over_eager:.2f}x"] for r in variants.itertuples()],
        )
    not_run = frame[frame["status"] != "ok"]
    if len(not_run):
        lines += ["", f"{len(not_run)} of {len(frame)} rows were not measured; their status says why."]
    return "\n".join(lines) + "\n"


def write_benchmark(frame: pd.DataFrame, out: Path, reference: str | None, title: str = "Inference benchmark") -> dict[str, Path]:
    """``benchmark.parquet`` (one row per cell, the runner's columns) and ``benchmark.md`` in ``out``."""
    out = Path(out)
    paths = {"parquet": out / "benchmark.parquet", "markdown": out / "benchmark.md"}
    with atomic_file(paths["parquet"]) as tmp:
        frame.to_parquet(tmp, index=False)
    with atomic_file(paths["markdown"]) as tmp:
        tmp.write_text(markdown(frame, reference, title))
    return paths
