"""kd_core.bench: FLOP formula, timing statistics, grid caps, variants, schema, CLI and stage."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_bert
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig
from typer.testing import CliRunner

from kd_core.bench import (
    COLUMNS,
    VARIANTS,
    BenchGrid,
    BenchModel,
    EncoderShape,
    VariantUnavailable,
    encoder_flops_per_seq,
    encoder_shape,
    load_bench_model,
    model_flops_per_seq,
    run_benchmark,
    speedup_frame,
    time_interleaved,
    write_benchmark,
)
from kd_core.bench.variants import VariantContext

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = VariantContext(device=torch.device("cpu"), dtype=torch.float32, threads=1, work_dir=Path("."))


# ---- FLOPs --------------------------------------------------------------------------------------
def test_flops_match_a_hand_count():
    # L=2, H=8, I=16, S=4, per layer in MACs: QKV 3*4*8*8=768, output 4*8*8=256, scores 4*4*8=128,
    # context 128, FFN 2*4*8*16=1024 -> 2304; two layers 4608; pooler 8*8=64 -> 4672 MACs.
    shape = EncoderShape(num_layers=2, hidden_size=8, intermediate_size=16, has_pooler=True)
    assert encoder_flops_per_seq(shape, 4) == 2 * 4672
    assert encoder_flops_per_seq(EncoderShape(2, 8, 16, has_pooler=False), 4) == 2 * 4608
    # seq 8: per layer 3*8*64 + 8*64 + 2*(8*8*8) + 2*8*8*16 = 1536+512+1024+2048 = 5120 -> 10240 + 64
    assert encoder_flops_per_seq(shape, 8) == 2 * 10304


@pytest.mark.parametrize("seq_len", [16, 40])
def test_flops_match_torch_flop_counter(seq_len):
    # FlopCounterMode misses the CPU SDPA kernel, so count on the eager attention path.
    model = tiny_bert(layers=3, hidden=48, heads=4, intermediate=80, attn_implementation="eager")
    ids = torch.randint(1000, 30000, (2, seq_len))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert encoder_shape(model) == EncoderShape(3, 48, 80, has_pooler=True)
    assert model_flops_per_seq(model, seq_len) * 2 == counter.get_total_flops()


# ---- timing statistics ---------------------------------------------------------------------------
class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ScriptedModel(torch.nn.Module):
    """Each forward advances a fake clock by the next scripted duration (seconds)."""

    def __init__(self, clock: FakeClock, durations, hidden=16, layers=2):
        super().__init__()
        self.clock, self.durations = clock, durations if callable(durations) else list(durations)
        self.config = BertConfig(vocab_size=2000, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=2 * hidden)
        self.weight = torch.nn.Parameter(torch.zeros(hidden, hidden))
        self.pooler = None
        self.calls = 0

    def forward(self, input_ids, attention_mask):
        duration = self.durations[self.calls] if isinstance(self.durations, list) else self.durations(input_ids)
        self.calls += 1
        self.clock.now += duration
        return input_ids


def test_percentiles_match_numpy_on_injected_timings():
    clock = FakeClock()
    rng = np.random.default_rng(0)
    teacher_s = list(rng.uniform(0.01, 0.05, size=13))  # 1 warm-up + 12 timed
    student_s = list(rng.uniform(0.001, 0.02, size=13))
    models = [BenchModel("teacher", ScriptedModel(clock, teacher_s)), BenchModel("student", ScriptedModel(clock, student_s))]
    grid = BenchGrid(thread_counts=(1,), batches=(4,), seq_lens=(8,), repeats=12, warmup=1)
    frame = run_benchmark(models, grid, timer=clock).set_index("model")
    for name, script in (("teacher", teacher_s), ("student", student_s)):
        timed = np.array(script[1:])
        assert frame.loc[name, "latency_p50_ms"] == pytest.approx(1000 * np.percentile(timed, 50), rel=1e-9)
        assert frame.loc[name, "latency_p95_ms"] == pytest.approx(1000 * np.percentile(timed, 95), rel=1e-9)
        assert frame.loc[name, "seq_per_s"] == pytest.approx(4 / np.median(timed), rel=1e-9)
        assert frame.loc[name, "repeats"] == 12 and frame.loc[name, "status"] == "ok"


def test_interleaving_rotates_the_order_every_repeat():
    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    seconds = time_interleaved(runs, repeats=4)
    assert calls == list("abc" "bca" "cab" "abc")
    assert {k: len(v) for k, v in seconds.items()} == {"a": 4, "b": 4, "c": 4}


def test_batch_one_cells_use_latency_repeats():
    clock = FakeClock()
    model = ScriptedModel(clock, lambda ids: 0.001)
    frame = run_benchmark([BenchModel("m", model)], BenchGrid(thread_counts=(1,), batches=(1, 2), seq_lens=(8,),
                                                               repeats=3, latency_repeats=7, warmup=2), timer=clock)
    assert frame.set_index("batch_size")["repeats"].to_dict() == {1: 7, 2: 3}
    assert model.calls == (2 + 7) + (2 + 3)


# ---- caps and unavailable variants ----------------------------------------------------------------
def test_cells_over_the_caps_are_reported_as_skipped():
    clock = FakeClock()
    per_token = lambda ids: 1e-3 * ids.numel()  # noqa: E731 (1 ms per token)
    models = [BenchModel("big", ScriptedModel(clock, per_token)), BenchModel("small", ScriptedModel(clock, per_token, hidden=8))]
    grid = BenchGrid(thread_counts=(1,), batches=(1, 4), seq_lens=(8, 16, 64), repeats=2, latency_repeats=2,
                     warmup=1, max_tokens=128, cell_budget_s=0.2)
    frame = run_benchmark(models, grid, timer=clock).set_index(["model", "batch_size", "seq_len"])
    status = frame["status"].to_dict()
    assert status[("big", 4, 64)] == "skipped: 4x64 = 256 tokens > max_tokens 128"
    # FLOPs/seq (H=16, I=32, L=2, no pooler) = 8192 S + 128 S^2: 9216/token at S=8, 10240 at S=16, the best
    # rate seen before 1x64 is 10240 FLOPs/ms. 1x64: 1048576 / 10240 = 102.4 ms x 3 runs > 0.2 s, skipped;
    # 4x16 (cheaper tokens): 655360 / 10240 = 64 ms x 3 = 192 ms, runs.
    assert status[("big", 1, 64)] == "skipped: estimated >= 0.307 s (3 runs of >= 0.102 s) > cell budget 0.2 s"
    assert {status[("big", b, s)] for b, s in ((1, 8), (1, 16), (4, 8), (4, 16))} == {"ok"}
    skipped = frame[frame["status"] != "ok"]
    assert skipped["latency_p50_ms"].isna().all() and (skipped["repeats"] == 0).all()
    assert len(frame) == 2 * 6  # every cell has a row, measured or not


def test_unavailable_variants_and_failed_warmups_are_rows_not_crashes(monkeypatch):
    def refuses(name, model, ctx):
        raise VariantUnavailable("not on this machine")

    def breaks_for_student(name, model, ctx):
        def run(ids, mask):
            if name == "student":
                raise RuntimeError("inductor said no\nsecond line")
            return model(input_ids=ids, attention_mask=mask)
        return run

    monkeypatch.setitem(VARIANTS, "refuses", refuses)
    monkeypatch.setitem(VARIANTS, "breaks", breaks_for_student)
    models = [BenchModel("teacher", tiny_bert(layers=1, hidden=32, heads=2, intermediate=64)),
              BenchModel("student", tiny_bert(layers=1, hidden=16, heads=2, intermediate=32))]
    grid = BenchGrid(variants=("refuses", "breaks"), thread_counts=(1,), batches=(1, 2), seq_lens=(8,), repeats=2, latency_repeats=2)
    frame = run_benchmark(models, grid).set_index(["variant", "model", "batch_size"]).sort_index()
    assert (frame.loc["refuses", "status"] == "unavailable: not on this machine").all()
    assert (frame.loc[("breaks", "student"), "status"] == "unavailable: breaks failed: RuntimeError: inductor said no").all()
    assert (frame.loc[("breaks", "teacher"), "status"] == "ok").all()


def test_onnx_without_onnxruntime_is_unavailable_with_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(VariantUnavailable, match=r"pip install -e '\.\[bench\]'"):
        VARIANTS["onnx"]("m", tiny_bert(layers=1, hidden=16, heads=2, intermediate=32), CPU)


def test_int8_on_a_gpu_or_in_bf16_is_unavailable():
    model = tiny_bert(layers=1, hidden=16, heads=2, intermediate=32)
    with pytest.raises(VariantUnavailable, match="CPU only"):
        VARIANTS["int8"]("m", model, VariantContext(torch.device("cuda"), torch.float32, 1, Path(".")))
    with pytest.raises(VariantUnavailable, match="float32"):
        VARIANTS["int8"]("m", model, VariantContext(torch.device("cpu"), torch.bfloat16, 1, Path(".")))


# ---- variants against eager -----------------------------------------------------------------------
def _hidden(output) -> np.ndarray:
    return (output[0] if isinstance(output, (list, tuple)) else output.last_hidden_state).__array__()


def test_int8_output_is_close_to_eager():
    model = tiny_bert(layers=2, hidden=64, heads=4, intermediate=128)
    ids = torch.randint(1000, 30000, (3, 24))
    mask = torch.ones_like(ids)
    eager = _hidden(VARIANTS["eager"]("m", model, CPU)(ids, mask))
    int8 = _hidden(VARIANTS["int8"]("m", model, CPU)(ids, mask))
    assert not np.array_equal(eager, int8)  # it really is quantised
    cosine = (eager * int8).sum(-1) / np.linalg.norm(eager, axis=-1) / np.linalg.norm(int8, axis=-1)
    assert cosine.min() > 0.995
    assert np.abs(eager - int8).max() < 0.15  # LayerNorm outputs are O(1)
    assert isinstance(model.encoder.layer[0].attention.self.query, torch.nn.Linear)  # the original is untouched


def test_onnx_runtime_matches_eager_at_a_new_shape(tmp_path):
    pytest.importorskip("onnxruntime", reason="the ONNX variant needs the 'bench' extra: pip install -e '.[bench]'")
    model = tiny_bert(layers=2, hidden=32, heads=2, intermediate=64)
    run = VARIANTS["onnx"]("tiny", model, VariantContext(torch.device("cpu"), torch.float32, 1, tmp_path))
    assert (tmp_path / "tiny.onnx").is_file()
    ids = torch.randint(1000, 30000, (5, 40))  # neither the export shape nor the check shape
    mask = torch.ones_like(ids)
    got = run(ids, mask)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask)
    np.testing.assert_allclose(got[0], expected.last_hidden_state.numpy(), atol=1e-4)
    np.testing.assert_allclose(got[1], expected.pooler_output.numpy(), atol=1e-4)


def test_torch_compile_matches_eager():
    model = tiny_bert(layers=1, hidden=16, heads=2, intermediate=32)
    run = VARIANTS["compile"]("tiny", model, CPU)
    ids = torch.randint(1000, 30000, (2, 8))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    np.testing.assert_allclose(_hidden(run(ids, mask)), expected, atol=1e-5)


# ---- schema, markdown, speed-ups ---------------------------------------------------------------------
def _frame(rows):
    base = {"device": "cpu", "dtype": "float32", "params": 1, "disk_mb": 1.0, "latency_p95_ms": 1.0, "repeats": 5,
            "latency_p50_ms": 1.0, "variant": "eager", "status": "ok"}
    return pd.DataFrame([{**base, **r} for r in rows], columns=COLUMNS)


def test_speedup_is_measured_ratio_beside_the_flop_ratio():
    frame = _frame([
        {"model": "teacher", "threads": 1, "batch_size": 32, "seq_len": 128, "flops_per_seq": 10e9, "seq_per_s": 100.0},
        {"model": "student", "threads": 1, "batch_size": 32, "seq_len": 128, "flops_per_seq": 4e9, "seq_per_s": 200.0},
        {"model": "teacher", "threads": 2, "batch_size": 32, "seq_len": 128, "flops_per_seq": 10e9, "seq_per_s": 150.0},
        {"model": "student", "threads": 2, "batch_size": 32, "seq_len": 128, "flops_per_seq": 4e9, "seq_per_s": 330.0,
         "status": "skipped: test"},
    ])
    speed = speedup_frame(frame, "teacher")
    assert len(speed) == 1  # the skipped cell has no ratio
    row = speed.iloc[0]
    assert (row.speedup, row.flop_ratio, row.fraction_of_flop_ratio) == pytest.approx((2.0, 2.5, 0.8))
    with pytest.raises(ValueError, match="reference model 'nobody'"):
        speedup_frame(frame, "nobody")


def test_parquet_schema_and_markdown(tmp_path):
    models = [BenchModel("teacher", tiny_bert(layers=2, hidden=32, heads=2, intermediate=64)),
              BenchModel("student", tiny_bert(layers=1, hidden=16, heads=2, intermediate=32))]
    frame = run_benchmark(models, BenchGrid(thread_counts=(1,), batches=(1, 2), seq_lens=(8, 16), repeats=2,
                                            latency_repeats=3, max_tokens=16))
    paths = write_benchmark(frame, tmp_path, "teacher")
    table = pd.read_parquet(paths["parquet"])
    assert list(table.columns) == COLUMNS
    assert len(table) == 2 * 4
    assert table[["threads", "batch_size", "seq_len", "params", "flops_per_seq", "repeats"]].dtypes.map(
        pd.api.types.is_integer_dtype).all()
    assert table["params"].tolist()[:1] == [sum(p.numel() for p in models[0].model.parameters())]
    assert table.loc[0, "flops_per_seq"] == encoder_flops_per_seq(EncoderShape(2, 32, 64), 8)
    assert set(table["status"]) == {"ok", "skipped: 2x16 = 32 tokens > max_tokens 16"}
    ok = table[table["status"] == "ok"]
    assert (ok["latency_p95_ms"] >= ok["latency_p50_ms"]).all()
    text = paths["markdown"].read_text()
    assert "## Speed-up over teacher" in text and "skipped: 2x16" in text
    row = table.set_index(["model", "batch_size", "seq_len"])
    measured = row.loc[("student", 2, 8), "seq_per_s"] / row.loc[("teacher", 2, 8), "seq_per_s"]
    assert f"| student | eager | 1 | 2x8 | {measured:.2f}x |" in text


# ---- CLI and pipeline stage ---------------------------------------------------------------------------
def _save(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def test_cli_benchmarks_two_model_dirs(tmp_path):
    from flows.cli import app

    teacher_dir = _save(tiny_bert(layers=2, hidden=32, heads=2, intermediate=64), tmp_path / "teacher_artifact" / "model")
    student_dir = _save(tiny_bert(layers=1, hidden=16, heads=2, intermediate=32), tmp_path / "student")
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, [
        "bench", str(teacher_dir.parent), str(student_dir), "--names", "teacher,student", "--reference", "teacher",
        "--threads", "1", "--variants", "eager,int8", "--batches", "1,2", "--seq-lens", "8", "--repeats", "2",
        "--latency-repeats", "3", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(out / "benchmark.parquet")
    assert len(table) == 2 * 2 * 2 and set(table["status"]) == {"ok"}
    disk = table.drop_duplicates("model").set_index("model")["disk_mb"]
    assert disk["teacher"] == pytest.approx((teacher_dir / "model.safetensors").stat().st_size / 2**20, abs=1e-3)
    assert disk["student"] == pytest.approx((student_dir / "model.safetensors").stat().st_size / 2**20, abs=1e-3)
    assert "## Variants against eager" in (out / "benchmark.md").read_text()
    assert "speed-up over teacher" in result.output


def test_cli_names_a_missing_model_dir(tmp_path):
    from flows.cli import app

    result = CliRunner().invoke(app, ["bench", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert f"model dir {tmp_path / 'nope'} does not exist" in " ".join(result.output.split())
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(app, ["bench", str(empty), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "has neither config.json nor model/config.json" in " ".join(result.output.split())


def test_pipeline_stage_writes_the_headline_cells(tmp_path):
    from kd_core.config import PipelineConfig
    from kd_core.stages.common import StageIO
    from kd_core.stages.glue import benchmark

    dirs = {"teacher": tmp_path / "t", "student": tmp_path / "s"}
    _save(tiny_bert(layers=2, hidden=32, heads=2, intermediate=64), dirs["teacher"] / "model")
    _save(tiny_bert(layers=1, hidden=16, heads=2, intermediate=32), dirs["student"] / "model")
    cfg = PipelineConfig.model_validate({"benchmark": {"batch_size": 4, "seq_len": 16, "repeats": 2, "threads": 1}})
    out = tmp_path / "out"
    out.mkdir()
    result = benchmark(cfg, StageIO(dirs, out))
    table = pd.read_parquet(out / "benchmark.parquet")
    assert list(table.columns) == COLUMNS
    assert sorted(zip(table["model"], table["batch_size"], table["seq_len"])) == [
        ("student", 1, 16), ("student", 4, 16), ("teacher", 1, 16), ("teacher", 4, 16)]
    assert set(table["variant"]) == {"eager"} and set(table["threads"]) == {1} and set(table["status"]) == {"ok"}
    assert table.set_index("batch_size").loc[1, "repeats"].tolist() == [20, 20]
    headline = table[table["batch_size"] == 4].set_index("model")
    assert result["student_seq_per_s"] == round(float(headline.loc["student", "seq_per_s"]), 2)
    assert "teacher_latency_p50_ms" in result and (out / "benchmark.md").is_file()


def test_benchmark_section_defaults_keep_the_stage_cheap():
    from kd_core.config import BenchmarkSection

    grid = BenchGrid.from_section(BenchmarkSection.model_validate({"batch_size": 8, "seq_len": 32, "repeats": 3}))
    assert (grid.variants, grid.batches, grid.seq_lens, grid.thread_counts, grid.repeats) == (("eager",), (1, 8), (32,), None, 3)
    wide = BenchGrid.from_section(BenchmarkSection(variants=["eager", "int8"], batches=[1, 32, 128], seq_lens=[128, 512],
                                                   thread_counts=[1, 2], max_tokens=4096))
    assert wide.cells() == [(1, 128), (1, 512), (32, 128), (32, 512), (128, 128), (128, 512)]  # by tokens, then batch
    assert wide.max_tokens == 4096 and wide.thread_counts == (1, 2)
    with pytest.raises(ValueError, match="unknown variant"):
        BenchGrid(variants=("tensorrt",))


def test_load_bench_model_accepts_an_artifact_dir_and_a_model_dir(tmp_path):
    model = tiny_bert(layers=1, hidden=16, heads=2, intermediate=32)
    _save(model, tmp_path / "artifact" / "model")
    from_artifact = load_bench_model("a", tmp_path / "artifact")
    from_dir = load_bench_model("b", tmp_path / "artifact" / "model")
    assert from_artifact.weights_dir == from_dir.weights_dir == (tmp_path / "artifact" / "model").resolve()
    assert from_artifact.params == sum(p.numel() for p in model.parameters())
    assert math.isclose(from_dir.disk_mb, (tmp_path / "artifact" / "model" / "model.safetensors").stat().st_size / 2**20)
