"""The meta-kd report: every score, mean and spread over seeds, the per-domain and few-shot tables."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from kd_core.config import PipelineConfig, TrainConfig
from kd_core.errors import UserError

TEACHER_KINDS = ("single", "mixed", "meta")
STUDENT_METHODS = ("single", "mixed", "meta")  # (a), (b), (c)
METHOD_LABELS = {"single": "(a) single-domain KD", "mixed": "(b) mixed-domain KD", "meta": "(c) Meta-KD"}


def teacher_base_config(cfg: PipelineConfig) -> TrainConfig:
    """``meta_kd.teacher_train``, else ``finetune_teacher.train``: every teacher's training settings."""
    return cfg.meta_kd.teacher_train or cfg.finetune_teacher.train


def _cell(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "—"
    if len(values) == 1:
        return f"{values.iloc[0]:.2f}"
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


def _fraction_label(fraction: float) -> str:
    return f"{fraction:g}"


def collect_scores(cfg: PipelineConfig, student_evals: Sequence[tuple], teacher_evals: Sequence[tuple]) -> pd.DataFrame:
    """One row per (domain, fraction, seed, role, method): every dev score of the run.

    ``student_evals``/``teacher_evals`` are ``(target, fraction, seed, eval_dir)``; model names in
    the metrics are ``single``/``mixed``/``meta`` (students) or ``<kind>_teacher`` (teachers).
    """
    records = []
    for role, evaluations in (("student", student_evals), ("teacher", teacher_evals)):
        for target, fraction, seed, eval_dir in evaluations:
            metrics = pd.read_parquet(Path(eval_dir) / "metrics.parquet")
            for row in metrics.itertuples():
                method = row.model.removesuffix("_teacher")
                records.append({"domain": target, "fraction": float(fraction), "seed": seed, "role": role,
                                "method": method, "split": row.split, "rows": int(row.rows), "score": float(row.score)})
    return pd.DataFrame(records)


def summarize_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """mean, sample std and count over seeds per (role, domain, fraction, method)."""
    grouped = scores.groupby(["role", "domain", "fraction", "method"], sort=True)["score"]
    summary = grouped.agg(mean="mean", std=lambda s: s.std(ddof=1) if len(s) > 1 else float("nan"), n="count")
    return summary.reset_index()


def _columns(scores: pd.DataFrame) -> list[tuple[str, str, str]]:
    columns = []
    for method in TEACHER_KINDS:
        if ((scores.role == "teacher") & (scores.method == method)).any():
            columns.append(("teacher", method, f"{method} teacher"))
    for method in STUDENT_METHODS:
        if ((scores.role == "student") & (scores.method == method)).any():
            columns.append(("student", method, METHOD_LABELS[method]))
    return columns


def _seed_averaged(scores: pd.DataFrame) -> pd.DataFrame:
    """Per (role, method, fraction, seed): the score averaged over domains (teachers trained once
    carry their one seed). The spread of these over seeds is the few-shot table's ±."""
    return scores.groupby(["role", "method", "fraction", "seed"], dropna=False)["score"].mean().reset_index()


def metakd_report(cfg: PipelineConfig, student_evals: Sequence[tuple], teacher_evals: Sequence[tuple], out: Path) -> dict:
    """``scores.parquet`` (every score), ``summary.parquet`` (mean/std over seeds) and
    ``report.md``: a per-domain table at fraction 1.0 and a few-shot table averaged over domains."""
    section = cfg.meta_kd
    scores = collect_scores(cfg, student_evals, teacher_evals)
    if scores.empty:
        raise UserError("the meta-kd report got no evaluations; rerun its evaluate stages")
    summary = summarize_scores(scores)
    scores.to_parquet(out / "scores.parquet", index=False)
    summary.to_parquet(out / "summary.parquet", index=False)
    columns = _columns(scores)
    split = scores["split"].iloc[0]
    lines = [f"# {cfg.profile}: Meta-KD on Amazon reviews ({split} accuracy, mean ± sample std over seeds)", ""]

    full = scores[scores.fraction == 1.0]
    if not full.empty:
        lines += ["## Per domain, full training data (fraction 1.0)", "",
                  "| domain | " + " | ".join(c[2] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for domain in section.target_domains:
            cells = [_cell(full[(full.domain == domain) & (full.role == r) & (full.method == m)]["score"]) for r, m, _ in columns]
            lines.append(f"| {domain} | " + " | ".join(cells) + " |")
        averaged = _seed_averaged(full)
        cells = [_cell(averaged[(averaged.role == r) & (averaged.method == m)]["score"]) for r, m, _ in columns]
        lines += ["| **mean** | " + " | ".join(cells) + " |", ""]

    averaged = _seed_averaged(scores)
    lines += ["## Few-shot: target-domain fraction, averaged over target domains", "",
              "| fraction | " + " | ".join(c[2] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for fraction in sorted(scores.fraction.unique(), reverse=True):
        at = averaged[averaged.fraction == fraction]
        cells = [_cell(at[(at.role == r) & (at.method == m)]["score"]) for r, m, _ in columns]
        lines.append(f"| {_fraction_label(fraction)} | " + " | ".join(cells) + " |")

    deltas = {}
    students = averaged[averaged.role == "student"]
    if {"meta", "mixed"} <= set(students.method):
        lines += ["", "Meta-KD minus the mixed-domain baseline (domain-averaged, mean over seeds):"]
        for fraction in sorted(students.fraction.unique(), reverse=True):
            at = students[students.fraction == fraction].groupby("method")["score"].mean()
            delta = float(at["meta"] - at["mixed"])
            deltas[f"meta_minus_mixed_f{_fraction_label(fraction)}"] = round(delta, 4)
            lines.append(f"- fraction {_fraction_label(fraction)}: {delta:+.2f} points")

    student, teacher = section.student, teacher_base_config(cfg)
    teacher_seed = (f"one teacher per (fraction, target), trained with the first seed ({section.seeds[0]})"
                    if section.teacher_seeds == "first" else "one teacher per seed")
    lines += [
        "",
        "## Setup",
        "",
        f"- teacher `{cfg.teacher}` fine-tuned "
        + (f"{section.teacher_epochs:g} epoch(s) (at least {section.teacher_min_steps} steps)" if section.teacher_epochs is not None
           else f"{teacher.max_steps} steps")
        + f" (batch {teacher.batch_size}, lr {teacher.learning_rate:g}) from the same pre-trained weights: single-domain, "
        f"mixed-domain and meta-teacher alike; {teacher_seed}",
        f"- student {student.num_layers}x{student.hidden_size} ({student.init}), max_seq_length {cfg.task.max_seq_length}: "
        f"{section.distill.max_steps} intermediate steps (TinyBERT embedding/attention/hidden; batch {section.distill.batch_size}, "
        f"lr {section.distill.learning_rate:g}), then {section.prediction.max_steps} prediction steps (soft CE, T={section.temperature}; "
        f"batch {section.prediction.batch_size}, lr {section.prediction.learning_rate:g}); the same init, matches, steps and rows "
        "for every method",
        f"- Meta-KD: alpha {section.alpha}, gamma1 {section.gamma1}, gamma2 {section.gamma2}, prototype weights "
        f"{'normalised to mean 1' if section.normalize_scores else 'raw'}; students weighted by λ in both steps",
        f"- seeds {section.seeds}; few-shot rows drawn once per fraction (subsample_seed {section.subsample_seed}), "
        "the same for every seed, teacher and student; other domains whole",
        f"- eval: each target domain's {split} split ({int(scores['rows'].iloc[0])} rows); ± is the sample std over seeds "
        "(for domain averages: of the per-seed averages); a single value has no ±",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    result = {"scores": len(scores), **deltas}
    for row in summary[(summary.fraction == 1.0)].itertuples():
        result[f"{row.domain}_{row.role}_{row.method}_mean"] = round(float(row.mean), 4)
    return result
