"""The inference benchmark: a grid of models x variants x threads x (batch, seq) cells.

Every model in a cell runs on the same random token ids, in one process, and the models take
turns within each repeat (the order rotates every repeat), so a burst of load from another
process hits all of them instead of one. A cell is warmed up first (this is where
``torch.compile`` compiles), then timed ``repeats`` times per model; on CUDA the clock reads sit
between ``torch.cuda.synchronize()`` calls. Cells over a cap are skipped and say so in their
``status``; a variant that cannot run says why.
"""

from __future__ import annotations

import gc
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from kd_core.bench.flops import model_flops_per_seq
from kd_core.bench.variants import DTYPES, VARIANTS, VariantContext, VariantUnavailable, random_ids, variant_dtype

# One row per (model, variant, threads, batch_size, seq_len); the report stage reads these names.
COLUMNS = [
    "model", "variant", "device", "dtype", "threads", "batch_size", "seq_len", "params", "disk_mb",
    "flops_per_seq", "latency_p50_ms", "latency_p95_ms", "seq_per_s", "repeats", "status",
]
WEIGHTS_SUBDIR = "model"  # a pipeline artifact keeps its weights here


@dataclass
class BenchModel:
    name: str
    model: torch.nn.Module
    weights_dir: Path | None = None

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def disk_mb(self) -> float:
        return safetensors_mb(self.weights_dir) if self.weights_dir is not None else math.nan


def safetensors_mb(model_dir: Path) -> float:
    """Size of the weights on disk: the ``*.safetensors`` files below ``model_dir``, in MiB."""
    files = list(Path(model_dir).rglob("*.safetensors"))
    return sum(p.stat().st_size for p in files) / 2**20 if files else math.nan


def weights_dir_of(source: str | Path) -> str | Path:
    """A pipeline artifact dir's ``model/`` subdir; anything else (a model dir, an alias) as is."""
    path = Path(source)
    return path / WEIGHTS_SUBDIR if (path / WEIGHTS_SUBDIR / "config.json").is_file() else source


def load_bench_model(name: str, source: str | Path) -> BenchModel:
    """Load an encoder (``AutoModel``; a task head is dropped) from an artifact dir, model dir or alias."""
    from kd_core.models.registry import load_model, resolve_model

    path = Path(source).expanduser()
    if not path.exists() and str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(f"model dir {source} does not exist; pass a save_pretrained dir, a pipeline artifact dir or an alias")
    if path.is_dir() and not (path / "config.json").is_file() and not (path / WEIGHTS_SUBDIR / "config.json").is_file():
        raise FileNotFoundError(
            f"{source} has neither config.json nor {WEIGHTS_SUBDIR}/config.json; pass a save_pretrained dir or a pipeline artifact dir"
        )
    resolved = resolve_model(weights_dir_of(path) if path.is_dir() else source)
    model = load_model(resolved).eval()
    return BenchModel(name, model, Path(resolved) if Path(resolved).is_dir() else None)


@dataclass(frozen=True)
class BenchGrid:
    """Which cells to measure, and the caps that skip the ones too big to wait for."""

    variants: tuple[str, ...] = ("eager",)
    thread_counts: tuple[int, ...] | None = None  # None: torch's current setting
    batches: tuple[int, ...] = (1, 32, 128)
    seq_lens: tuple[int, ...] = (32, 128, 512)
    repeats: int = 5
    latency_batch: int = 1
    latency_repeats: int = 20  # batch-1 runs are cheap and p95 needs more than a handful
    warmup: int = 1
    max_tokens: int | None = None  # skip cells with batch * seq above this
    cell_budget_s: float | None = None  # skip a model in a cell whose estimated time exceeds this
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self):
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {list(DTYPES)}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device {self.device!r} is not cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda was asked for, but torch sees no CUDA device")
        for label, values in (("batches", self.batches), ("seq_lens", self.seq_lens), ("thread_counts", self.thread_counts or (1,))):
            if not values or min(values) < 1:
                raise ValueError(f"{label} must be a non-empty list of positive integers, not {values}")
        if self.repeats < 1 or self.latency_repeats < 1 or self.warmup < 0:
            raise ValueError("repeats and latency_repeats must be >= 1 and warmup >= 0")

    @classmethod
    def from_section(cls, section) -> "BenchGrid":
        """The grid of a pipeline :class:`~kd_core.config.BenchmarkSection`: by default the
        headline throughput cell (batch_size x seq_len) plus batch-``latency_batch`` latency at seq_len."""
        batches = section.batches or sorted({section.latency_batch, section.batch_size})
        threads = section.thread_counts or ([section.threads] if section.threads else None)
        return cls(
            variants=tuple(section.variants),
            thread_counts=tuple(threads) if threads else None,
            batches=tuple(batches),
            seq_lens=tuple(section.seq_lens or [section.seq_len]),
            repeats=section.repeats,
            latency_batch=section.latency_batch,
            latency_repeats=section.latency_repeats,
            max_tokens=section.max_tokens,
            cell_budget_s=section.cell_budget_s,
            device=section.device,
            dtype=section.dtype,
        )

    def cells(self) -> list[tuple[int, int]]:
        """(batch, seq) pairs, cheapest first, so that rate estimates exist before the big cells."""
        return sorted(((b, s) for b in self.batches for s in self.seq_lens), key=lambda c: (c[0] * c[1], c[0]))


def time_interleaved(
    runs: dict[str, Callable[[], object]],
    repeats: int,
    timer: Callable[[], float] = time.perf_counter,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, list[float]]:
    """Seconds per call of each run; each repeat calls every run once, the order rotating."""
    names = list(runs)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            sync()
            start = timer()
            runs[name]()
            sync()
            seconds[name].append(timer() - start)
    return seconds


def summarize(seconds: Sequence[float], batch_size: int) -> dict[str, float]:
    """p50/p95 latency of one batch (ms, NumPy's linear percentiles) and sequences/s at the median."""
    values = np.asarray(seconds, dtype=float)
    p50 = float(np.percentile(values, 50))
    return {
        "latency_p50_ms": 1000.0 * p50,
        "latency_p95_ms": 1000.0 * float(np.percentile(values, 95)),
        "seq_per_s": batch_size / p50 if p50 > 0 else math.inf,
    }


def make_inputs(batch: int, seq: int, vocab_size: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = random_ids((batch, seq), vocab_size, seed * 1_000_003 + batch * 1009 + seq)
    return ids.to(device), torch.ones_like(ids).to(device)


@dataclass
class _Estimates:
    """Observed FLOP rate per (model, variant, threads), for predicting the next, bigger cell."""

    rates: dict[tuple, float] = field(default_factory=dict)

    def record(self, key: tuple, flops: float, seconds: float) -> None:
        if seconds > 0:  # the best rate seen: a skip then means "over budget even at that rate"
            self.rates[key] = max(self.rates.get(key, 0.0), flops / seconds)

    def seconds(self, key: tuple, flops: float) -> float | None:
        rate = self.rates.get(key)
        return flops / rate if rate else None


def _skip_reason(grid: BenchGrid, batch: int, seq: int, runs: int, predicted_s: float | None) -> str | None:
    if grid.max_tokens is not None and batch * seq > grid.max_tokens:
        return f"skipped: {batch}x{seq} = {batch * seq} tokens > max_tokens {grid.max_tokens}"
    if grid.cell_budget_s is not None and predicted_s is not None:
        total = predicted_s * runs
        if total > grid.cell_budget_s:
            return (f"skipped: estimated >= {total:.3g} s ({runs} runs of >= {predicted_s:.3g} s) > "
                    f"cell budget {grid.cell_budget_s:g} s")
    return None


def run_benchmark(
    models: Sequence[BenchModel],
    grid: BenchGrid,
    timer: Callable[[], float] = time.perf_counter,
    work_dir: Path | None = None,
    log: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Measure every cell of ``grid`` for every model; one row per (model, variant, threads, batch, seq)."""
    if not models:
        raise ValueError("the benchmark needs at least one model")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    log = log or (lambda message: None)
    device = torch.device(grid.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    vocab = min(m.model.config.vocab_size for m in models)
    static = {m.name: {"params": m.params, "disk_mb": round(m.disk_mb, 3)} for m in models}
    flops = {(m.name, s): model_flops_per_seq(m.model, s) for m in models for s in grid.seq_lens}
    estimates = _Estimates()
    rows: list[dict] = []
    threads_before = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="kd-bench-") as scratch:
        work = Path(work_dir) if work_dir is not None else Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        try:
            for threads in grid.thread_counts or (threads_before,):
                torch.set_num_threads(threads)
                for variant in grid.variants:
                    rows += _run_variant(models, grid, variant, threads, device, work, vocab, static, flops,
                                         estimates, timer, sync, log)
        finally:
            torch.set_num_threads(threads_before)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    ranks = {"model": {n: i for i, n in enumerate(names)}, "variant": {v: i for i, v in enumerate(grid.variants)}}
    frame = frame.sort_values(
        ["model", "variant", "threads", "batch_size", "seq_len"],
        key=lambda col: col.map(ranks[col.name]) if col.name in ranks else col,
        kind="stable",
    )
    return frame.reset_index(drop=True)


def _run_variant(models, grid, variant, threads, device, work, vocab, static, flops, estimates, timer, sync, log) -> list[dict]:
    context = VariantContext(device=device, dtype=DTYPES[grid.dtype], threads=threads, work_dir=work)
    unavailable: dict[str, str] = {}
    runners = {}
    if variant == "compile":
        import torch._dynamo

        torch._dynamo.reset()  # per thread count: keeps each model's (threads, shape) graphs within the recompile limit
    for m in models:
        try:
            runners[m.name] = VARIANTS[variant](m.name, m.model, context)
        except VariantUnavailable as exc:
            unavailable[m.name] = str(exc)
            log(f"{m.name} {variant}: unavailable: {exc}")
    rows: list[dict] = []
    for batch, seq in grid.cells():
        repeats = grid.latency_repeats if batch == grid.latency_batch else grid.repeats
        base = {"variant": variant, "device": device.type, "dtype": variant_dtype(variant, grid.dtype),
                "threads": threads, "batch_size": batch, "seq_len": seq, "repeats": 0,
                "latency_p50_ms": math.nan, "latency_p95_ms": math.nan, "seq_per_s": math.nan}
        ids, mask = make_inputs(batch, seq, vocab, device, grid.seed)
        active: dict[str, Callable[[], object]] = {}
        cell_rows = []
        for m in models:
            row = {**base, "model": m.name, **static[m.name], "flops_per_seq": flops[(m.name, seq)]}
            if m.name in unavailable:
                cell_rows.append({**row, "status": f"unavailable: {unavailable[m.name]}"})
                continue
            predicted = estimates.seconds((m.name, variant, threads), batch * flops[(m.name, seq)])
            reason = _skip_reason(grid, batch, seq, repeats + grid.warmup, predicted)
            if reason:
                cell_rows.append({**row, "status": reason})
                log(f"{m.name} {variant} t{threads} {batch}x{seq}: {reason}")
                continue
            run = runners[m.name]
            active[m.name] = lambda run=run: run(ids, mask)
            cell_rows.append(row)
        for name in list(active):
            try:
                for _ in range(grid.warmup):
                    active[name]()
                sync()
            except Exception as exc:  # e.g. an inductor compile error: report it, keep the grid going
                unavailable[name] = f"{variant} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                del active[name]
                log(f"{name} {variant}: unavailable: {unavailable[name]}")
        seconds = time_interleaved(active, repeats, timer, sync)
        for row in cell_rows:
            if row.get("status"):
                continue
            name = row["model"]
            if name in active:
                row.update(summarize(seconds[name], batch), repeats=repeats, status="ok")
                estimates.record((name, variant, threads), batch * flops[(name, seq)], row["latency_p50_ms"] / 1000.0)
                log(f"{name} {variant} t{threads} {batch}x{seq}: p50 {row['latency_p50_ms']:.1f} ms, "
                    f"{row['seq_per_s']:.1f} seq/s")
            else:
                row["status"] = f"unavailable: {unavailable[name]}"
        rows += cell_rows
    del runners
    gc.collect()
    return rows
