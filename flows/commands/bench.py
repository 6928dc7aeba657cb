"""``kd bench``: the inference benchmark of any set of models (kd_core.bench) into Parquet + markdown."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


def _int_list(option: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        _fail(f"{option} takes comma-separated integers, e.g. 1,32,128; got {text!r}")
    if not values or min(values) < 1:
        _fail(f"{option} needs at least one positive integer; got {text!r}")
    return values


def _default_name(source: str) -> str:
    path = Path(source)
    return path.name if path.exists() else source


def bench_command(
    models: List[str] = typer.Argument(..., help="model dirs (save_pretrained or pipeline artifact dirs with model/) or aliases"),
    names: Optional[str] = typer.Option(None, help="comma-separated display names, one per model (default: dir names)"),
    reference: Optional[str] = typer.Option(None, help="the name speed-ups divide by, e.g. teacher (default: the first model)"),
    threads: str = typer.Option("1", help="comma-separated thread counts, e.g. 1,2 (torch.set_num_threads)"),
    variants: str = typer.Option("eager", help="comma-separated: eager, compile, int8, onnx"),
    batches: str = typer.Option("1,32,128", help="comma-separated batch sizes"),
    seq_lens: str = typer.Option("32,128,512", help="comma-separated sequence lengths"),
    repeats: int = typer.Option(5, help="timed runs per model and cell (batch > latency batch)"),
    latency_repeats: int = typer.Option(20, help="timed runs per model in the latency (batch 1) cells"),
    latency_batch: int = typer.Option(1, help="the batch size whose cells use --latency-repeats"),
    warmup: int = typer.Option(1, help="untimed runs per model and cell first (torch.compile compiles here)"),
    max_tokens: Optional[int] = typer.Option(None, help="skip cells with batch x seq above this"),
    cell_budget: Optional[float] = typer.Option(None, help="seconds: skip a model in a cell estimated to take longer"),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 (meant for cuda)"),
    title: str = typer.Option("Inference benchmark", help="the markdown's heading"),
    out: Path = typer.Option(..., help="output dir: benchmark.parquet and benchmark.md"),
):
    """Latency, throughput, params, disk size and FLOPs of models on the same inputs, interleaved."""
    from kd_core.bench import BenchGrid, load_bench_model, run_benchmark, speedup_frame, write_benchmark
    from kd_core.models.registry import ModelNotFoundError

    labels = [n.strip() for n in names.split(",")] if names else [_default_name(m) for m in models]
    if len(labels) != len(models):
        _fail(f"--names gives {len(labels)} names for {len(models)} models; give one per model")
    if len(set(labels)) != len(labels):
        _fail(f"model names must be unique, got {labels}; pass --names")
    reference = reference or labels[0]
    if reference not in labels:
        _fail(f"--reference {reference!r} is not one of the model names {labels}")
    try:
        grid = BenchGrid(
            variants=tuple(v.strip() for v in variants.split(",") if v.strip()),
            thread_counts=_int_list("--threads", threads),
            batches=_int_list("--batches", batches),
            seq_lens=_int_list("--seq-lens", seq_lens),
            repeats=repeats, latency_repeats=latency_repeats, latency_batch=latency_batch, warmup=warmup,
            max_tokens=max_tokens, cell_budget_s=cell_budget, device=device, dtype=dtype,
        )
    except ValueError as exc:
        _fail(str(exc))
    loaded = []
    for label, source in zip(labels, models):
        try:
            loaded.append(load_bench_model(label, source))
        except (ModelNotFoundError, OSError, ValueError) as exc:
            _fail(str(exc) if label == source else f"model {label!r}: {exc}")
        console.print(f"loaded {label}: {source} ({loaded[-1].params / 1e6:.1f}M params)")
    frame = run_benchmark(loaded, grid, log=console.print)
    paths = write_benchmark(frame, out, reference, title=title)
    if len(loaded) > 1:
        speed = speedup_frame(frame, reference)
        table = Table(title=f"speed-up over {reference}")
        for column in ("model", "variant", "threads", "batch x seq", "measured", "FLOP ratio", "measured / FLOP"):
            table.add_column(column, justify="right" if column != "model" else "left")
        for r in speed.itertuples():
            table.add_row(r.model, r.variant, str(r.threads), f"{r.batch_size}x{r.seq_len}", f"{r.speedup:.2f}x",
                          f"{r.flop_ratio:.2f}x", f"{100 * r.fraction_of_flop_ratio:.0f}%")
        console.print(table)
    skipped = frame[frame["status"] != "ok"]
    if len(skipped):
        console.print(f"{len(skipped)} of {len(frame)} cells not measured (see their status in the markdown)")
    console.print(f"wrote {paths['parquet']} and {paths['markdown']}")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)
