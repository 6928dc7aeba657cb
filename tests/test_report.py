"""The report stage (kd_core.report) on constructed inputs, and `kd report --runs` on two smoke flow runs."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kd_core.report import (
    BENCHMARK_COLUMNS,
    BenchmarkCells,
    ReportInputError,
    _feature_curves,
    benchmark_view,
    pareto_front,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CELLS = BenchmarkCells(batch_size=8, seq_len=32)  # latency at batch 1, eager


def _bench_row(model, threads, batch, seq, p50, seq_per_s, variant="eager", status="ok", params=4_000_000, flops=4e9, disk=15.5):
    return {"model": model, "variant": variant, "device": "cpu", "dtype": "float32", "threads": threads,
            "batch_size": batch, "seq_len": seq, "params": params, "disk_mb": disk, "flops_per_seq": flops,
            "latency_p50_ms": p50, "latency_p95_ms": p50 * 1.2, "seq_per_s": seq_per_s, "repeats": 5, "status": status}


def _benchmark(with_batch_one=True) -> pd.DataFrame:
    teacher = dict(params=4_000_000, flops=4e9, disk=15.5)
    student = dict(params=1_000_000, flops=1e9, disk=4.0)
    rows = [
        # headline cell (batch 8 x seq 32) at 1 and 2 threads: the 2-thread row is used
        _bench_row("teacher", 1, 8, 32, 80.0, 100.0, **teacher),
        _bench_row("teacher", 2, 8, 32, 44.0, 180.0, **teacher),
        _bench_row("student", 1, 8, 32, 30.0, 260.0, **student),
        _bench_row("student", 2, 8, 32, 16.0, 540.0, **student),
        # other cells, variants and failures that the headline must ignore
        _bench_row("student", 2, 8, 128, 60.0, 130.0, **student),
        _bench_row("student", 2, 8, 32, 1.0, 9999.0, variant="compile", **student),
        _bench_row("student", 2, 128, 32, float("nan"), float("nan"), status="error: out of memory", **student),
    ]
    if with_batch_one:
        rows += [
            _bench_row("teacher", 1, 1, 32, 10.0, 100.0, **teacher),
            _bench_row("teacher", 2, 1, 32, 6.0, 166.7, **teacher),
            _bench_row("student", 2, 1, 32, 2.0, 500.0, **student),
            _bench_row("student", 2, 1, 128, 5.0, 200.0, **student),
        ]
    frame = pd.DataFrame(rows)
    assert tuple(frame.columns) == BENCHMARK_COLUMNS
    return frame


METRICS = pd.DataFrame([
    {"model": "teacher", "task": "sst2", "split": "dev", "rows": 100, "score": 90.0, "accuracy": 90.0},
    {"model": "student", "task": "sst2", "split": "dev", "rows": 100, "score": 81.0, "accuracy": 81.0},
])


def _history(steps, start, terms):
    step = np.arange(1, steps + 1)
    frame = pd.DataFrame({"step": step, "loss": start / step, "lr": np.full(steps, 1e-3)})
    for i, term in enumerate(terms):
        frame[f"loss/{term}"] = start / step / len(terms)
    return frame


HISTORIES = {
    "general_distill": _history(20, 4.0, ["attention_scores[1<-2]:kl_div", "attention_scores[2<-4]:kl_div", "hidden[1<-2]:mse"]),
    "finetune_teacher": _history(10, 0.7, ["logits:cross_entropy"]),
}


def test_benchmark_view_picks_the_eager_headline_at_most_threads_and_batch_one_latency():
    view, notes = benchmark_view(_benchmark(), CELLS)
    assert view.loc["teacher", ["threads", "seq_per_s", "latency_ms"]].tolist() == [2, 180.0, 6.0]
    assert view.loc["student", ["threads", "seq_per_s", "latency_ms"]].tolist() == [2, 540.0, 2.0]
    assert (view["latency_source"] == "batch 1").all()
    assert notes == ["Benchmark cell student batch 128 x seq 32, 2 threads: error: out of memory."]


def test_the_latency_batch_and_variant_come_from_the_cells():
    view, notes = benchmark_view(_benchmark(), BenchmarkCells(8, 32, latency_batch=8))
    assert view.loc["teacher", "latency_ms"] == 44.0 and view.loc["teacher", "latency_source"] == "batch 8"
    view, notes = benchmark_view(_benchmark(), BenchmarkCells(8, 32, variant="compile"))
    assert list(view.index) == ["student"] and view.loc["student", "seq_per_s"] == 9999.0


def test_without_batch_one_rows_latency_is_derived_and_said_so():
    view, notes = benchmark_view(_benchmark(with_batch_one=False), CELLS)
    # the headline p50 is the time of a batch of 8: 44 ms / 8 and 16 ms / 8 per sequence
    assert view.loc["teacher", "latency_ms"] == pytest.approx(5.5) and view.loc["student", "latency_ms"] == pytest.approx(2.0)
    assert any("derived from the headline cell" in n and "teacher, student" in n for n in notes)


def test_a_missing_headline_cell_is_noted_or_fails_for_the_teacher_and_missing_columns_fail():
    # a model without the headline cell loses its speed columns; without the teacher's, no speed-up exists
    bench = _benchmark()
    bench = bench[~((bench["model"] == "student") & (bench["seq_len"] == 32) & (bench["batch_size"] == 8))]
    view, notes = benchmark_view(bench, CELLS)
    assert list(view.index) == ["teacher"] and "no eager 'ok' row for student at batch 8 x seq 32" in notes[0]
    with pytest.raises(ReportInputError, match=r"no eager 'ok' row for teacher at batch 32 x seq 128.*\(1, 32\), \(8, 32\)"):
        write_report(Path("/nonexistent"), "t", METRICS, _benchmark(), {}, BenchmarkCells(32, 128))
    old_schema = pd.DataFrame([{"model": "teacher", "sequences_per_second": 10.0}])
    with pytest.raises(ReportInputError, match=r"benchmark.parquet lacks columns \['variant'"):
        benchmark_view(old_schema, CELLS)


def test_pareto_front_by_hand():
    # (latency, score): C (5 ms, 70) is beaten by B (2 ms, 81) on both; A is slower but better than B
    latency, score = [10.0, 2.0, 5.0, 2.0, np.nan], [90.0, 81.0, 70.0, 81.0, 99.0]
    # B and its twin D dominate nothing of each other; the NaN latency (no benchmark) is off the plot
    assert pareto_front(latency, score).tolist() == [True, True, False, True, False]
    assert pareto_front([1.0, 2.0], [50.0, 50.0]).tolist() == [True, False]  # equal score, slower: dominated


def test_feature_curves_sum_layers_per_feature():
    curves = _feature_curves(HISTORIES["general_distill"])
    assert sorted(curves) == ["attention_scores:kl_div", "hidden:mse"]
    # each of the 3 terms is loss/3: two attention layers sum to 2/3 of the loss
    np.testing.assert_allclose(curves["attention_scores:kl_div"], HISTORIES["general_distill"]["loss"] * 2 / 3)


def test_write_report_table_plots_and_summary(tmp_path):
    summary = write_report(tmp_path, "smoke: sst2", METRICS, _benchmark(), HISTORIES, CELLS)
    student = summary.set_index("model").loc["student"]
    # retention 81/90; speed-up 540/180 seq/s; FLOP ratio 4e9/1e9
    assert student["retention"] == pytest.approx(90.0)
    assert student["speedup"] == pytest.approx(3.0) and student["flop_ratio"] == pytest.approx(4.0)
    assert student["latency_ms"] == 2.0 and student["params"] == 1_000_000 and student["metrics"] == "accuracy 81.00"
    assert pd.read_parquet(tmp_path / "summary.parquet").equals(summary)
    text = (tmp_path / "report.md").read_text()
    assert "| teacher | 90.00 | accuracy 90.00 | 100.0 | 4.00 | 15.5 | 6.00 | 180.0 | 1.00x | 1.00x |" in text
    assert "| student | 81.00 | accuracy 81.00 | 90.0 | 1.00 | 4.0 | 2.00 | 540.0 | 3.00x | 4.00x |" in text
    assert "![score against latency](pareto.png)" in text and "general_distill (20 steps), finetune_teacher (10 steps)" in text
    assert "out of memory" in text and "2 threads" in text and "latency p50 at batch 1 x seq 32." in text
    assert "student: measured speed-up 3.00x is 75% of its FLOP ratio 4.00x." in text
    import matplotlib.image

    for name in ("pareto.png", "loss_curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_SIGNATURE
    height, width, _ = matplotlib.image.imread(tmp_path / "loss_curves.png").shape
    assert width > height  # two stages side by side
    # equal inputs, equal bytes: the artifact digest of a recomputed report does not change
    again = tmp_path / "again"
    write_report(again, "smoke: sst2", METRICS, _benchmark(), HISTORIES, CELLS)
    for name in ("pareto.png", "loss_curves.png", "report.md", "summary.parquet"):
        assert (again / name).read_bytes() == (tmp_path / name).read_bytes(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_the_html_page_of_a_report_renders_its_tables_and_carries_its_images(tmp_path):
    """MLflow's artifact viewer shows .md as text; report.html is what it renders."""
    import base64
    import re

    from kd_core.report import markdown_html

    write_report(tmp_path, "smoke: sst2", METRICS, _benchmark(), HISTORIES, CELLS)
    page = markdown_html(tmp_path / "report.md")
    markdown_tables = len(re.findall(r"^\|(?:---\|)+$", (tmp_path / "report.md").read_text(), flags=re.M))
    assert markdown_tables >= 1 and page.count("<table>") == markdown_tables
    assert "<td>student</td><td>81.00</td>" in page.replace("\n", "")
    images = dict(re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]+)"', page))
    decoded = {alt: base64.b64decode(data) for data, alt in images.items()}
    assert decoded == {"score against latency": (tmp_path / "pareto.png").read_bytes(),
                       "loss curves": (tmp_path / "loss_curves.png").read_bytes()}
    assert 'src="pareto.png"' not in page and "<script" not in page


def test_report_needs_the_teacher_in_both_inputs(tmp_path):
    with pytest.raises(ReportInputError, match="no 'teacher' row"):
        write_report(tmp_path, "t", METRICS[METRICS["model"] == "student"], _benchmark(), {}, CELLS)
    bench = _benchmark()
    with pytest.raises(ReportInputError, match="the speed-ups need the teacher's benchmark"):
        write_report(tmp_path, "t", METRICS, bench[bench["model"] == "student"], {}, CELLS)


def test_report_stage_reads_training_histories(tmp_path):
    from kd_core.config import PipelineConfig
    from kd_core.stages import glue as stages
    from kd_core.stages.common import StageIO

    cfg = PipelineConfig(profile="smoke", benchmark={"batch_size": 8, "seq_len": 32})
    dirs = {name: tmp_path / name for name in ("evaluate", "benchmark", "general_distill", "out")}
    for path in dirs.values():
        path.mkdir()
    METRICS.to_parquet(dirs["evaluate"] / "metrics.parquet", index=False)
    _benchmark().to_parquet(dirs["benchmark"] / "benchmark.parquet", index=False)
    HISTORIES["general_distill"].to_parquet(dirs["general_distill"] / "history.parquet", index=False)
    result = stages.report(cfg, StageIO({"evaluation": dirs["evaluate"], "benchmark": dirs["benchmark"],
                                         "history:general_distill": dirs["general_distill"]}, dirs["out"]))
    assert result == {"teacher_retention": 100.0, "teacher_speedup": 1.0, "student_retention": 90.0, "student_speedup": 3.0}
    assert "general_distill (20 steps)" in (dirs["out"] / "report.md").read_text()
    with pytest.raises(stages.StageInputError, match="finetune_teacher has no"):
        stages.report(cfg, StageIO({"evaluation": dirs["evaluate"], "benchmark": dirs["benchmark"],
                                    "history:finetune_teacher": tmp_path / "missing"}, tmp_path / "x"))


def test_report_stage_takes_every_training_stage_of_the_dag():
    from flows.profiles import load_profile
    from tasks.glue_dag import minilm_dag
    from tasks.graph import check_graph
    from tasks.stages import dag_for

    cfg = load_profile("smoke")
    assert dag_for("tinybert-full", cfg)["report"].upstream == (
        "evaluate", "benchmark", "general_distill", "finetune_teacher", "task_distill_intermediate", "task_distill_prediction")
    # smoke's minilm student is small: the assistant joins
    assert dag_for("minilm", cfg)["report"].upstream == (
        "evaluate", "benchmark", "assistant_distill", "minilm_distill", "finetune_teacher", "finetune_student")
    # a graph whose report (and evaluation) reads a stage that no entry declares fails when it is built
    stages = [s for s in minilm_dag(cfg) if s.name != "finetune_student"]
    with pytest.raises(ValueError, match=r"stage evaluate reads \['finetune_student'\], which no earlier entry declares"):
        check_graph("minilm", stages)


# ---- kd report --runs on real flow runs ------------------------------------------------------------
# Shorter than the smoke profile: this module checks the report's wiring, not training.
FAST = {f"{section}.max_steps": 8 for section in (
    "general_distill.train", "finetune_teacher.train", "task_distill.intermediate", "task_distill.prediction")}
FAST.update({"augment.n_aug": 1, "task.train_limit": 32, "task.eval_limit": 32, "corpus.max_blocks": 64})


@pytest.fixture(scope="module")
def flow_runs(tmp_path_factory, kd_data_dir):
    """Smoke runs in a temp KD_HOME: the second changes only the benchmark repeats, the third repeats
    the second (every stage cached, so its parent run holds the only copy of the summary)."""
    from flows.tinybert_full import tinybert_full

    home = tmp_path_factory.mktemp("kd_home")
    saved = {k: os.environ.get(k) for k in ("KD_HOME", "KD_DATA_DIR", "MLFLOW_TRACKING_URI")}
    os.environ.update({"KD_HOME": str(home), "KD_DATA_DIR": str(kd_data_dir)})
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        first = tinybert_full(profile="smoke", overrides=FAST)
        second = tinybert_full(profile="smoke", overrides={**FAST, "benchmark.repeats": 2})
        cached = tinybert_full(profile="smoke", overrides={**FAST, "benchmark.repeats": 2})
        yield home, first, second, cached
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _stage_dirs(home: Path, stage: str) -> list[Path]:
    root = home / "artifacts" / stage
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def test_flow_report_holds_plots_and_reaches_mlflow(flow_runs):
    from mlflow.tracking import MlflowClient

    home, first, second, cached = flow_runs
    # the second run reused every stage but benchmark and report
    for stage in ("general_distill", "finetune_teacher", "task_distill_prediction", "evaluate"):
        assert len(_stage_dirs(home, stage)) == 1, stage
    assert len(_stage_dirs(home, "benchmark")) == 2 and len(_stage_dirs(home, "report")) == 2
    report_dir = Path(first["report"]).parent
    text = (report_dir / "report.md").read_text()
    for stage in ("general_distill", "finetune_teacher", "task_distill_intermediate", "task_distill_prediction"):
        assert f"{stage} (8 steps)" in text
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    parent = first["mlflow_run_id"]
    (child,) = client.search_runs(
        [client.get_run(parent).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and tags.`kd.stage` = 'report'")
    wanted = {"report.md", "pareto.png", "loss_curves.png", "summary.parquet"}
    assert wanted <= {a.path for a in client.list_artifacts(child.info.run_id)}
    assert wanted <= {a.path for a in client.list_artifacts(parent)}
    assert client.get_run(parent).data.tags["kd.report"] == str(report_dir)


def test_kd_report_compares_runs_side_by_side(flow_runs, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    home, first, second, cached = flow_runs
    runs = [first["mlflow_run_id"], second["mlflow_run_id"]]
    out = tmp_path / "compare.md"
    result = CliRunner().invoke(app, ["report", "--runs", *runs, "--out", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    markdown = out.read_text()
    for run_id, flow_result in zip(runs, (first, second)):
        assert run_id in markdown and run_id[:8] in result.output
        summary = pd.read_parquet(Path(flow_result["report"]).parent / "summary.parquet").set_index("model")
        for model in ("teacher", "student"):
            row = summary.loc[model]
            cells = [run_id[:8], "tinybert-full · smoke", "sst2 · dev", model, f"{row.score:.2f}", f"{row.retention:.1f}",
                     f"{row.params / 1e6:.2f}", f"{row.latency_ms:.2f}", f"{row.speedup:.2f}x"]
            assert "| " + " | ".join(cells) + " |" in markdown
    # the config that differs between the two runs is named with both values
    assert re.search(r"\| benchmark\.repeats \| 3 \| 2 \|", markdown) and "benchmark.repeats" in result.output


def test_kd_report_names_an_unknown_run_and_a_stage_run(flow_runs):
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from flows.cli import app

    home, first, _, _ = flow_runs
    result = CliRunner().invoke(app, ["report", "--runs", first["mlflow_run_id"], "0123456789abcdef"])
    assert result.exit_code == 2 and "unknown run id '0123456789abcdef'" in " ".join(result.output.split())
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    parent = first["mlflow_run_id"]
    child = client.search_runs([client.get_run(parent).info.experiment_id],
                               filter_string=f"tags.`mlflow.parentRunId` = '{parent}'", max_results=1)[0]
    result = CliRunner().invoke(app, ["report", child.info.run_id])
    assert result.exit_code == 2 and f"of flow run {parent}" in " ".join(result.output.split())


def test_kd_report_reads_a_fully_cached_run_from_its_parent(flow_runs, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    home, _, second, cached = flow_runs
    assert cached["report"] == second["report"]  # the same artifact, no report stage run this time
    out = tmp_path / "cached.md"
    result = CliRunner().invoke(app, ["report", cached["mlflow_run_id"], "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"`{cached['mlflow_run_id']}`: tinybert-full · smoke" in out.read_text() and "(cached report)" in out.read_text()


def test_kd_report_takes_the_short_ids_it_prints_and_fits_80_columns(flow_runs):
    from typer.testing import CliRunner

    from flows.cli import app

    home, first, second, _ = flow_runs
    short = [first["mlflow_run_id"][:8], second["mlflow_run_id"][:8]]
    result = CliRunner().invoke(app, ["report", "--runs", *short], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in result.output, result.output
    for flow_result, run in zip((first, second), short):
        summary = pd.read_parquet(Path(flow_result["report"]).parent / "summary.parquet")
        for row in summary.itertuples():
            cells = [run, row.model, f"{row.score:.2f}", f"{row.retention:.1f}", f"{row.params / 1e6:.2f}"]
            assert any(line.split()[:5] == cells for line in lines if line.strip()), (cells, result.output)
    too_short = CliRunner().invoke(app, ["report", "--runs", "ab"])
    assert too_short.exit_code == 2 and "at least 4 characters" in " ".join(too_short.output.split())
    unknown = CliRunner().invoke(app, ["report", "--runs", "zzzz"])
    assert unknown.exit_code == 2 and "no kd flow run's id starts with it" in " ".join(unknown.output.split())
