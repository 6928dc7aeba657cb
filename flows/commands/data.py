"""``kd prepare-task`` and ``kd prepare-corpus``: the data layer on the command line."""

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


def prepare_task_command(
    task: str = typer.Option(
        ..., help="task name: sst2, cola, mrpc, stsb, qqp, mnli, mnli-mm, qnli, rte, wnli, squad, squad_v2, amazon-<domain>"),
    data_dir: Optional[str] = typer.Option(
        None, help="data folder (GLUE TSV, HF export, SQuAD JSON, Amazon TSV or Parquet), 'hub' for the 🤗 hub; default $KD_DATA_DIR"
    ),
    out: Path = typer.Option(..., help="output folder: <split>.parquet per split plus manifest.json"),
    split: Optional[List[str]] = typer.Option(None, help="split(s) to prepare (repeatable); default: every split found"),
):
    """Normalise a task's splits into fingerprinted Parquet files."""
    from kd_core.data.loaders import prepare_task
    from kd_core.data.tasks import UnknownTaskError, get_task

    try:
        spec = get_task(task, data_dir if data_dir not in ("hub", "hf") else None)
        results = prepare_task(spec, data_dir, out, splits=split or None)
    except (ValueError, UnknownTaskError) as exc:
        _fail(str(exc))
    import pyarrow.parquet as pq

    table = Table(title=f"{spec.name} -> {out}")
    for column in ("split", "rows", "fingerprint", "file"):
        table.add_column(column, justify="right" if column == "rows" else "left")
    for name, (path, fingerprint) in results.items():
        table.add_row(name, f"{pq.read_metadata(path).num_rows:,}", fingerprint[:16], str(path))
    console.print(table)


def prepare_corpus_command(
    data: Path = typer.Option(..., help="text file or folder (WikiExtractor output is fine)"),
    out: Path = typer.Option(..., help="output folder of Parquet shards plus manifest.json"),
    teacher: str = typer.Option("minilm-l6", help="whose tokenizer: alias, local dir or hub id"),
    max_seq_length: int = typer.Option(128, help="block length in tokens, [CLS] and [SEP] included"),
    shard_rows: int = typer.Option(8192, help="blocks per Parquet shard"),
    max_blocks: Optional[int] = typer.Option(None, help="stop after this many blocks"),
    overwrite: bool = typer.Option(False, help="replace an existing output folder"),
):
    """Tokenise a corpus into sentence-packed blocks (TinyBERT's format) as Parquet shards."""
    from kd_core.data.corpus import CorpusError, prepare_corpus
    from kd_core.models.registry import ModelNotFoundError, load_tokenizer

    try:
        tokenizer = load_tokenizer(teacher)
        manifest = prepare_corpus(
            data, tokenizer, out, max_seq_length=max_seq_length, shard_rows=shard_rows, max_blocks=max_blocks, overwrite=overwrite
        )
    except (CorpusError, ModelNotFoundError, ValueError, OSError) as exc:
        _fail(str(exc))
    table = Table(title=f"corpus -> {out}")
    table.add_column("what")
    table.add_column("value", justify="right")
    for key in ("source_files", "num_documents", "num_sentences", "num_blocks", "num_full_blocks", "num_tokens"):
        table.add_row(key, f"{manifest[key]:,}")
    table.add_row("shards", str(len(manifest["shards"])))
    table.add_row("fingerprint", manifest["fingerprint"][:16])
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add ``prepare-task`` and ``prepare-corpus`` to ``app``."""
    app.command("prepare-task")(prepare_task_command)
    app.command("prepare-corpus")(prepare_corpus_command)
