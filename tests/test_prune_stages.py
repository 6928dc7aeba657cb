"""The pruned initialisation in the stages: prune_teacher (the fine-tuned teacher cut down, then
task distillation), the pruned general student, the student_init mapping, and task.holdout_rows."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

SMALL = {"finetune_teacher.train.max_steps": 8, "general_distill.train.max_steps": 3,
         "task_distill.intermediate.max_steps": 3, "task_distill.prediction.max_steps": 3}
PRUNED = {"student.init": "pruned", "student.prune.source": "finetuned", "task_distill.mapping.strategy": "student_init"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, kd_data_dir, one_thread):
    from flows.profiles import load_profile
    from kd_core.artifacts import ArtifactStore
    from kd_core.stages import glue as stages
    from kd_core.stages.common import StageIO

    home = tmp_path_factory.mktemp("prune")
    overrides = {"data_dir": str(kd_data_dir), **SMALL}
    cfg = load_profile("smoke", overrides)
    store = ArtifactStore(home / "artifacts")
    task = store.write("prepare_task", "t", lambda out: stages.prepare_task(cfg, StageIO(out=out)))
    teacher = store.write("finetune_teacher", "f", lambda out: stages.finetune_teacher(
        cfg, StageIO({"task": task.path}, out, store.work_dir("finetune_teacher", "f"))))
    corpus = store.write("prepare_corpus", "c", lambda out: stages.prepare_corpus(cfg, StageIO(out=out)))
    return {"overrides": overrides, "store": store, "task": task.path, "teacher": teacher.path, "corpus": corpus.path}


def _cfg(smoke, **overrides):
    from flows.profiles import load_profile

    return load_profile("smoke", {**smoke["overrides"], **overrides})


def _prune(smoke, key, **overrides):
    from kd_core.stages import glue as stages
    from kd_core.stages.common import StageIO

    cfg = _cfg(smoke, **{**PRUNED, **overrides})
    return cfg, smoke["store"].write("prune_teacher", key, lambda out: stages.prune_finetuned(
        cfg, StageIO({"teacher": smoke["teacher"], "task": smoke["task"]}, out))).path


def _logits(model_dir, smoke, cfg):
    from kd_core.data.features import encode_examples
    from kd_core.data.tasks import get_task
    from kd_core.models.registry import load_tokenizer
    from kd_core.stages.common import load_classifier
    from kd_core.train.data import pad_batch

    tokenizer = load_tokenizer(model_dir)
    rows = pd.read_parquet(smoke["task"] / "dev.parquet").head(24)
    batch = pad_batch(encode_examples(rows, tokenizer, cfg.task.max_seq_length), tokenizer.pad_token_id)
    with torch.no_grad():
        return load_classifier(model_dir, get_task("sst2")).eval()(**batch).logits


def test_pruning_the_fine_tuned_teacher_to_its_own_shape_keeps_its_predictions(smoke):
    """tiny-random-bert is 4x64, 4 heads, FFN 128: the same shape keeps every unit and the head."""
    cfg, pruned = _prune(smoke, "same", **{"student.num_layers": 4, "student.hidden_size": 64,
                                           "student.num_heads": 4, "student.intermediate_size": 128})
    torch.testing.assert_close(_logits(pruned / "model", smoke, cfg), _logits(smoke["teacher"] / "model", smoke, cfg),
                               rtol=0, atol=0)


def test_prune_teacher_writes_model_plan_and_feeds_task_distillation(smoke):
    from kd_core.stages import glue as stages
    from kd_core.stages.common import StageIO

    cfg, pruned = _prune(smoke, "small")
    manifest = json.loads((pruned / "manifest.json").read_text())
    layers = manifest["result"]["init_layers"]
    assert len(layers) == 2 and layers == sorted(layers) and manifest["result"]["calibration_rows"] == 128
    kept = pd.read_parquet(pruned / "pruning" / "kept.parquet")
    assert kept[kept.unit == "layer"]["teacher_layer"].tolist() == layers
    scores = pd.read_parquet(pruned / "pruning" / "scores.parquet")
    layer_scores = scores[scores.unit == "layer"].set_index("teacher_layer")["score"]
    # importance selection: the kept layers are the two of highest block influence
    assert sorted(layer_scores.nlargest(2).index.tolist()) == layers
    config = json.loads((pruned / "model" / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["kd_init_layers"]) == (2, 32, layers)
    store = smoke["store"]
    out = store.write("task_distill_intermediate", "ti", lambda o: stages.task_distill_intermediate(
        cfg, StageIO({"teacher": smoke["teacher"], "student": pruned, "data": smoke["task"]}, o,
                     store.work_dir("task_distill_intermediate", "ti"))))
    history = pd.read_parquet(out.path / "history.parquet")
    matched = sorted({c.split("[")[1].split("]")[0] for c in history.columns if c.startswith("loss/hidden[")})
    assert matched == [f"{s}<-{t}" for s, t in zip((1, 2), layers)]  # student_init: each layer against its source


def test_pruned_general_student_starts_its_projection_at_the_channel_selection(smoke):
    from safetensors.torch import load_file

    from kd_core.stages import glue as stages
    from kd_core.stages.common import StageIO

    cfg = _cfg(smoke, **{"student.init": "pruned", "general_distill.enabled": False})
    store = smoke["store"]
    untrained = store.write("general_distill", "p0", lambda out: stages.general_distill(
        cfg, StageIO({"corpus": smoke["corpus"]}, out, store.work_dir("general_distill", "p0")))).path
    assert (untrained / "pruning" / "kept.parquet").is_file()
    channels = json.loads((untrained / "model" / "config.json").read_text())["kd_init_hidden"]
    cfg = _cfg(smoke, **{"student.init": "pruned", "general_distill.train.learning_rate": 1e-12,
                         "general_distill.mapping.strategy": "student_init"})
    trained = store.write("general_distill", "p1", lambda out: stages.general_distill(
        cfg, StageIO({"corpus": smoke["corpus"]}, out, store.work_dir("general_distill", "p1")))).path
    projection = load_file(str(trained / "model" / "projections.safetensors"))["W_h.weight"]
    expected = torch.zeros(64, 32)
    expected[channels, np.arange(32)] = 1.0
    torch.testing.assert_close(projection, expected, atol=1e-6, rtol=0)  # lr ~0: still the selection


def test_holdout_rows_leave_train_and_do_not_depend_on_the_eval_split(smoke, tmp_path):
    from kd_core.artifacts import tree_digest
    from kd_core.stages import glue as stages
    from kd_core.stages.common import StageIO

    outs = {}
    for split in ("dev", "holdout"):
        cfg = _cfg(smoke, **{"task.holdout_rows": 40, "task.eval_split": split})
        outs[split] = tmp_path / split
        outs[split].mkdir()
        stages.prepare_task(cfg, StageIO(out=outs[split]))
    train, held = (pd.read_parquet(outs["dev"] / f"{s}.parquet") for s in ("train", "holdout"))
    assert len(held) == 40 and len(train) == 128 and not set(train.idx) & set(held.idx)
    assert tree_digest(outs["dev"]) == tree_digest(outs["holdout"])  # one teacher serves selection and report
    with pytest.raises(ValueError, match="task.eval_split 'holdout' needs task.holdout_rows"):
        _cfg(smoke, **{"task.eval_split": "holdout"})


def test_the_task_level_path_replaces_general_distillation_in_the_graph(smoke, monkeypatch, tmp_path):
    from tasks.stages import dag_for

    monkeypatch.setenv("KD_HOME", str(tmp_path))
    dag = dag_for("tinybert-full", _cfg(smoke, **PRUNED))
    assert "general_distill" not in dag and "prepare_corpus" not in dag
    assert dag["prune_teacher"].upstream == ("finetune_teacher", "prepare_task")
    assert dag["task_distill_intermediate"].upstream == ("finetune_teacher", "prune_teacher", "augment")
    with pytest.raises(ValueError, match="tinybert-full path"):
        dag_for("minilm", _cfg(smoke, **PRUNED))


def test_kd_run_rejects_an_impossible_pruned_shape_before_prefect_starts(tmp_path):
    # a real process, as a user runs it: in-process, Prefect's console logging would keep the
    # test runner's captured stream and break later flow tests
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "KD_HOME": str(tmp_path)}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", "from flows.cli import app; app()", "run", "tinybert-full",
                             "--profile", "smoke", "-p", "student.init=pruned", "-p", "student.num_heads=8"],
                            capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.perf_counter() - start
    assert result.returncode == 2, result.stderr[-2000:]
    assert "student.num_heads=8 exceeds the teacher's 4" in " ".join(result.stdout.split())
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "artifacts").exists()  # nothing started
    # imports (torch, transformers) and the graph build: 6-13 s on these 2 cores, 21-25 s once with
    # three other jobs on them; Prefect's server start alone would add 10 s more
    assert elapsed < 40, elapsed
