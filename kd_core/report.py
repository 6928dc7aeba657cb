"""The report of one flow run: a markdown table, a Pareto plot and loss curves.

Pure: frames in, files out. Inputs are the evaluate stage's ``metrics.parquet`` (one row per
model and split: model, task, split, rows, score and the task's metric columns), the benchmark
stage's ``benchmark.parquet`` (one row per model, variant, threads, batch size and sequence
length; see :data:`BENCHMARK_COLUMNS`) and each training stage's ``history.parquet`` (step,
loss, lr, ``loss/<term>``). Outputs: ``report.md``, ``pareto.png``, ``loss_curves.png`` and
``summary.parquet`` (one row per model and split; what ``kd report --runs`` compares).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kd_core.artifacts import atomic_file
from kd_core.errors import UserError

BENCHMARK_COLUMNS = (
    "model", "variant", "device", "dtype", "threads", "batch_size", "seq_len", "params", "disk_mb",
    "flops_per_seq", "latency_p50_ms", "latency_p95_ms", "seq_per_s", "repeats", "status",
)
METRICS_COLUMNS = ("model", "task", "split", "rows", "score")
SUMMARY_COLUMNS = (
    "model", "task", "split", "rows", "score", "retention", "metrics", "params", "disk_mb", "latency_ms",
    "latency_source", "seq_per_s", "speedup", "flop_ratio", "threads",
)


class ReportInputError(UserError, ValueError):
    pass


def _require(frame: pd.DataFrame, columns, where: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ReportInputError(f"{where} lacks columns {missing}; it has {list(frame.columns)}. Rerun the stage that writes it")


# ---- benchmark ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchmarkCells:
    """Which benchmark rows the report reads: throughput at ``batch_size`` x ``seq_len``, latency
    at ``latency_batch`` x ``seq_len``, both of ``variant`` (the config's benchmark section)."""

    batch_size: int
    seq_len: int
    latency_batch: int = 1
    variant: str = "eager"

    @property
    def latency_label(self) -> str:
        return f"batch {self.latency_batch}"


def benchmark_view(bench: pd.DataFrame, cells: BenchmarkCells, where: str = "benchmark.parquet") -> tuple[pd.DataFrame, list[str]]:
    """Per model: size, FLOPs, headline throughput and latency, from the variant's rows that succeeded.

    Throughput is the cell ``batch_size`` x ``seq_len`` at the most threads measured for that model
    (a model without that cell gets no row, and a note); latency is the ``latency_batch`` p50 at
    ``seq_len`` and the same threads. Without those rows the latency is derived from the headline
    cell (its p50 batch time / batch size), and a note says so.
    """
    _require(bench, BENCHMARK_COLUMNS, where)
    notes: list[str] = []
    variant_rows = bench[bench["variant"] == cells.variant]
    ok = variant_rows[variant_rows["status"] == "ok"]
    records = []
    for model, rows in ok.groupby("model", sort=False):
        headline = rows[(rows["batch_size"] == cells.batch_size) & (rows["seq_len"] == cells.seq_len)]
        if headline.empty:
            measured = sorted({(int(b), int(s)) for b, s in zip(rows["batch_size"], rows["seq_len"])})
            notes.append(
                f"{where} has no {cells.variant} 'ok' row for {model} at batch {cells.batch_size} x seq {cells.seq_len} "
                f"(benchmark.batch_size x benchmark.seq_len), only (batch, seq) {measured}: no speed for {model}."
            )
            continue
        threads = int(headline["threads"].max())
        cell = headline[headline["threads"] == threads].iloc[0]
        single = rows[(rows["batch_size"] == cells.latency_batch) & (rows["seq_len"] == cells.seq_len) & (rows["threads"] == threads)]
        if len(single):
            latency, source = float(single.iloc[0]["latency_p50_ms"]), cells.latency_label
        else:
            latency, source = float(cell["latency_p50_ms"]) / cells.batch_size, f"per sequence at batch {cells.batch_size}"
        records.append({
            "model": model, "params": int(cell["params"]), "disk_mb": float(cell["disk_mb"]),
            "flops_per_seq": float(cell["flops_per_seq"]), "threads": threads, "seq_per_s": float(cell["seq_per_s"]),
            "latency_ms": latency, "latency_source": source, "device": str(cell["device"]), "dtype": str(cell["dtype"]),
        })
    view = pd.DataFrame(records, columns=[
        "model", "params", "disk_mb", "flops_per_seq", "threads", "seq_per_s", "latency_ms", "latency_source", "device", "dtype",
    ]).set_index("model")
    derived = view.index[view["latency_source"] != cells.latency_label]
    if len(derived):
        notes.append(
            f"No {cells.latency_label} rows at seq {cells.seq_len} for {', '.join(derived)}: their latency is derived from "
            f"the headline cell (p50 time of a batch of {cells.batch_size} / {cells.batch_size}), not measured at "
            f"{cells.latency_label}."
        )
    if view["threads"].nunique() > 1:
        notes.append(f"Models were measured at different thread counts: {view['threads'].to_dict()}.")
    for row in variant_rows[variant_rows["status"] != "ok"].itertuples():
        notes.append(f"Benchmark cell {row.model} batch {row.batch_size} x seq {row.seq_len}, {row.threads} threads: {row.status}.")
    return view, notes


# ---- summary --------------------------------------------------------------------------------------
def _metric_text(row: pd.Series, metric_columns: list[str]) -> str:
    return ", ".join(f"{c} {row[c]:.2f}" for c in metric_columns if c in row and pd.notna(row[c]))


def summarize(metrics: pd.DataFrame, view: pd.DataFrame, reference: str = "teacher", where: str = "metrics.parquet") -> pd.DataFrame:
    """One row per model and split: score, retention % of ``reference``, size, latency and speed-ups."""
    _require(metrics, METRICS_COLUMNS, where)
    if reference not in set(metrics["model"]):
        raise ReportInputError(f"{where} has no {reference!r} row (models: {sorted(set(metrics['model']))}); retention needs it")
    if reference not in view.index:
        raise ReportInputError(f"the benchmark has no headline row for {reference!r} (models: {list(view.index)}); speed-up needs it")
    metric_columns = [c for c in metrics.columns if c not in METRICS_COLUMNS]
    ref = view.loc[reference]
    records = []
    for row in metrics.itertuples(index=False):
        row = pd.Series(row._asdict())
        ref_rows = metrics[(metrics["model"] == reference) & (metrics["split"] == row["split"])]
        ref_score = float(ref_rows["score"].iloc[0]) if len(ref_rows) else math.nan
        bench = view.loc[row["model"]] if row["model"] in view.index else None
        get = (lambda key: float(bench[key])) if bench is not None else (lambda key: math.nan)
        records.append({
            "model": row["model"], "task": row["task"], "split": row["split"], "rows": int(row["rows"]),
            "score": float(row["score"]),
            "retention": 100.0 * float(row["score"]) / ref_score if ref_score else math.nan,
            "metrics": _metric_text(row, metric_columns),
            "params": get("params"), "disk_mb": get("disk_mb"), "latency_ms": get("latency_ms"),
            "latency_source": str(bench["latency_source"]) if bench is not None else "",
            "seq_per_s": get("seq_per_s"),
            "speedup": get("seq_per_s") / float(ref["seq_per_s"]),
            "flop_ratio": float(ref["flops_per_seq"]) / get("flops_per_seq") if bench is not None and get("flops_per_seq") else math.nan,
            "threads": get("threads"),
        })
    return pd.DataFrame(records, columns=list(SUMMARY_COLUMNS))


def pareto_front(latency, score) -> np.ndarray:
    """Mask of the points no other point beats: none is as fast and as good, and better in one."""
    latency, score = np.asarray(latency, dtype=float), np.asarray(score, dtype=float)
    valid = np.isfinite(latency) & np.isfinite(score)
    front = np.zeros(len(latency), dtype=bool)
    for i in np.flatnonzero(valid):
        others = valid & (np.arange(len(latency)) != i)
        dominated = others & (latency <= latency[i]) & (score >= score[i]) & ((latency < latency[i]) | (score > score[i]))
        front[i] = not dominated.any()
    return front


# ---- plots ----------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on workers
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(summary: pd.DataFrame, path: Path, title: str) -> None:
    plt = _pyplot()
    points = summary[np.isfinite(summary["latency_ms"])]
    front = pareto_front(points["latency_ms"], points["score"])
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.scatter(points["latency_ms"][~front], points["score"][~front], color="tab:gray", label="dominated", zorder=3)
    ax.scatter(points["latency_ms"][front], points["score"][front], color="tab:red", marker="*", s=140,
               label="Pareto front", zorder=4)
    ordered = points[front].sort_values("latency_ms")
    ax.step(ordered["latency_ms"], ordered["score"], where="post", color="tab:red", alpha=0.5)
    for row in points.itertuples():
        ax.annotate(row.model, (row.latency_ms, row.score), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel(f"latency p50 (ms, {points['latency_source'].iloc[0] if len(points) else ''})")
    ax.margins(x=0.15, y=0.12)  # room for the labels
    ax.set_ylabel("score")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path, plt)


def _feature_curves(history: pd.DataFrame) -> dict[str, pd.Series]:
    """``loss/<term>`` columns summed per feature and loss (layers merged: hidden[1<-2]:mse -> hidden:mse)."""
    curves: dict[str, pd.Series] = {}
    for column in history.columns:
        if column.startswith("loss/"):
            feature = re.sub(r"\[.*?\]", "", column[len("loss/"):])
            curves[feature] = curves[feature] + history[column] if feature in curves else history[column]
    return curves


def plot_loss_curves(histories: dict[str, pd.DataFrame], path: Path, title: str) -> None:
    plt = _pyplot()
    count = max(1, len(histories))
    cols = min(2, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    for ax, (stage, history) in zip(axes.flat, histories.items()):
        ax.set_title(stage, fontsize=10)
        if history.empty or "loss" not in history:
            ax.text(0.5, 0.5, "no steps logged", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.plot(history["step"], history["loss"], color="black", linewidth=1.6, label="loss (weighted total)")
        curves = _feature_curves(history) if len(_feature_curves(history)) > 1 else {}  # one term is the total itself
        for name, values in curves.items():
            ax.plot(history["step"], values, linewidth=0.9, label=name)
        plotted = np.concatenate([history["loss"].to_numpy(float), *[v.to_numpy(float) for v in curves.values()]])
        plotted = plotted[np.isfinite(plotted)]
        if len(plotted) and plotted.min() > 0 and plotted.max() / plotted.min() > 20:  # terms of different scales
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(histories):]:
        ax.axis("off")
    if not histories:
        axes.flat[0].text(0.5, 0.5, "no training stages in this flow", ha="center", va="center")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    _save(fig, path, plt)


def _save(fig, path: Path, plt) -> None:
    with atomic_file(path) as tmp:
        # no timestamp in the file: equal inputs give equal bytes (stable artifact digests)
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)


# ---- markdown -------------------------------------------------------------------------------------
def _fmt(value, spec: str, suffix: str = "") -> str:
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:{spec}}{suffix}"


def _bound_lines(summary: pd.DataFrame, reference: str) -> list[str]:
    """The measured speed-up as a share of the FLOP ratio (the issue's target: 80% at batch 32 x 128 on CPU)."""
    lines = []
    for r in summary.drop_duplicates("model").itertuples():
        if r.model != reference and np.isfinite(r.speedup) and np.isfinite(r.flop_ratio) and r.flop_ratio > 0:
            lines.append(f"{r.model}: measured speed-up {r.speedup:.2f}x is {100 * r.speedup / r.flop_ratio:.0f}% of its "
                         f"FLOP ratio {r.flop_ratio:.2f}x.")
    return lines


def markdown(title: str, summary: pd.DataFrame, view: pd.DataFrame, notes: list[str], cells: BenchmarkCells,
             histories: dict[str, pd.DataFrame], reference: str) -> str:
    ref = view.loc[reference]
    lines = [f"# {title}", ""]
    for split, table in summary.groupby("split", sort=False):
        first = table.iloc[0]
        lines += [
            f"## {first['task']} · {split} ({int(first['rows'])} rows)",
            "",
            "| model | score | metrics | retention % | params (M) | size (MB) | latency p50 (ms) | throughput (seq/s) | speed-up "
            "| FLOP ratio |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in table.itertuples():
            lines.append(
                f"| {r.model} | {_fmt(r.score, '.2f')} | {r.metrics} | {_fmt(r.retention, '.1f')} | "
                f"{_fmt(r.params / 1e6, '.2f')} | {_fmt(r.disk_mb, '.1f')} | {_fmt(r.latency_ms, '.2f')} | "
                f"{_fmt(r.seq_per_s, '.1f')} | {_fmt(r.speedup, '.2f', 'x')} | {_fmt(r.flop_ratio, '.2f', 'x')} |"
            )
        lines.append("")
    lines += [
        f"Retention is the score as % of the {reference}'s; speed-up is throughput over the {reference}'s and the "
        f"FLOP ratio ({reference} FLOPs / model FLOPs per sequence) its physical bound.",
        f"Benchmark: {cells.variant} on {ref['device']} ({ref['dtype']}), "
        f"{int(ref['threads'])} thread{'s' if int(ref['threads']) != 1 else ''}; throughput at "
        f"batch {cells.batch_size} x seq {cells.seq_len}; latency p50 at "
        + (f"{cells.latency_label} x seq {cells.seq_len}." if (view["latency_source"] == cells.latency_label).all()
           else f"seq {cells.seq_len}, measured at {cells.latency_label} where the benchmark has it (see the notes)."),
        *_bound_lines(summary, reference),
        "",
        "![score against latency](pareto.png)",
        "",
        "Loss curves per training stage: "
        + (", ".join(f"{s} ({int(h['step'].max()) if len(h) else 0} steps)" for s, h in histories.items()) or "none"),
        "",
        "![loss curves](loss_curves.png)",
    ]
    if notes:
        lines += ["", "Notes:", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def write_report(
    out: Path,
    title: str,
    metrics: pd.DataFrame,
    bench: pd.DataFrame,
    histories: dict[str, pd.DataFrame],
    cells: BenchmarkCells,
    reference: str = "teacher",
) -> pd.DataFrame:
    """Write report.md, pareto.png, loss_curves.png and summary.parquet into ``out``; return the summary."""
    out = Path(out)
    view, notes = benchmark_view(bench, cells)
    if reference not in view.index:
        raise ReportInputError(f"the speed-ups need the {reference}'s benchmark: " + " ".join(notes or [f"no {reference} rows"]))
    summary = summarize(metrics, view, reference)
    first_split = summary["split"].iloc[0]
    plot_pareto(summary[summary["split"] == first_split], out / "pareto.png", f"{title}: score against latency ({first_split})")
    plot_loss_curves(histories, out / "loss_curves.png", f"{title}: training loss per stage")
    with atomic_file(out / "summary.parquet") as tmp:
        summary.to_parquet(tmp, index=False)
    text = markdown(title, summary, view, notes, cells, histories, reference)
    with atomic_file(out / "report.md") as tmp:
        Path(tmp).write_text(text)
    return summary


def markdown_html(path: Path) -> str:
    """``path`` (a report's markdown) as one self-contained HTML page: tables rendered, and each
    image it links beside it inlined as a data URI, because MLflow's artifact viewer shows .md
    as plain text and renders .html in a sandbox that cannot fetch the neighbouring files."""
    import base64
    import html

    from markdown_it import MarkdownIt

    path = Path(path)
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(path.read_text())

    def inline(match: re.Match) -> str:
        source = html.unescape(match.group(1))
        image = path.parent / source
        if "/" in source or not image.is_file():
            return match.group(0)
        data = base64.b64encode(image.read_bytes()).decode()
        return f'src="data:image/{image.suffix.lstrip(".")};base64,{data}"'

    body = re.sub(r'src="([^"]+)"', inline, body)
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "th:first-child,td:first-child{text-align:left}img{max-width:100%}code{background:#f4f4f4}")
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(path.stem)}</title>"
            f"<style>{style}</style></head><body>{body}</body></html>\n")
