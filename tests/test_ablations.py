"""The ablation switches of the tinybert-full stages (TinyBERT Tables 2-3; docs/results.md):
no general distillation, no intermediate step, a hard-label prediction step (no KD)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, kd_data_dir):
    """The smoke profile's corpus, task data and fine-tuned teacher, shared by the tests below."""
    from flows.profiles import load_profile
    from kd_core.artifacts import ArtifactStore
    from kd_core.stages import glue as stages
    from kd_core.stages.common import StageIO

    home = tmp_path_factory.mktemp("ablations")
    overrides = {"data_dir": str(kd_data_dir), "finetune_teacher.train.max_steps": 8,
                 "general_distill.train.max_steps": 4, "task_distill.intermediate.max_steps": 4,
                 "task_distill.prediction.max_steps": 6}
    cfg = load_profile("smoke", overrides)
    store = ArtifactStore(home / "artifacts")
    corpus = store.write("prepare_corpus", "c", lambda out: stages.prepare_corpus(cfg, StageIO(out=out)))
    task = store.write("prepare_task", "t", lambda out: stages.prepare_task(cfg, StageIO(out=out)))
    teacher = store.write("finetune_teacher", "f", lambda out: stages.finetune_teacher(
        cfg, StageIO({"task": task.path}, out, store.work_dir("finetune_teacher", "f"))))
    return {"overrides": overrides, "store": store, "corpus": corpus.path, "task": task.path, "teacher": teacher.path}


def _write(smoke, stage, key, run):
    store = smoke["store"]
    return store.write(stage, key, lambda out: run(out, store.work_dir(stage, key))).path


def _general(smoke, key, **overrides):
    from flows.profiles import load_profile
    from kd_core.stages import glue as stages
    from kd_core.stages.common import StageIO

    cfg = load_profile("smoke", {**smoke["overrides"], **overrides})
    return cfg, _write(smoke, "general_distill", key, lambda out, work: stages.general_distill(
        cfg, StageIO({"corpus": smoke["corpus"]}, out, work)))


def test_general_distill_switched_off_writes_the_student_as_initialised(smoke):
    from kd_core.models.registry import load_model
    from kd_core.models.student import build_student

    cfg, off = _general(smoke, "off", **{"general_distill.enabled": False})
    manifest = json.loads((off / "manifest.json").read_text())
    assert manifest["result"]["steps"] == 0 and "enabled=false" in manifest["result"]["untrained"]
    assert pd.read_parquet(off / "history.parquet").empty
    # an independent build with the stage's seed: every tensor equal, so no step was taken
    torch.manual_seed(cfg.general_distill.train.seed)
    fresh = build_student(load_model(cfg.teacher), cfg.student).state_dict()
    written = load_file(str(off / "model" / "model.safetensors"))
    assert written.keys() <= fresh.keys() and len(written) > 10
    for name, tensor in written.items():
        assert torch.equal(tensor, fresh[name]), name
    _, on = _general(smoke, "on")
    trained = load_file(str(on / "model" / "model.safetensors"))
    assert any(not torch.equal(trained[name], written[name]) for name in written)  # the switch is what differs


def _task_distill(smoke, key, step, student_dir, **overrides):
    from flows.profiles import load_profile
    from kd_core.stages import glue as stages
    from kd_core.stages.common import StageIO

    cfg = load_profile("smoke", {**smoke["overrides"], **overrides})
    run = stages.task_distill_intermediate if step == "intermediate" else stages.task_distill_prediction
    return _write(smoke, f"task_distill_{step}", key, lambda out, work: run(
        cfg, StageIO({"teacher": smoke["teacher"], "student": student_dir, "data": smoke["task"]}, out, work)))


def test_skip_intermediate_passes_the_student_on_untouched(smoke):
    _, general = _general(smoke, "g")
    skipped = _task_distill(smoke, "skip", "intermediate", general, **{"task_distill.skip_intermediate": True})
    assert (skipped / "model" / "model.safetensors").read_bytes() == (general / "model" / "model.safetensors").read_bytes()
    assert json.loads((skipped / "manifest.json").read_text())["result"]["steps"] == 0
    assert pd.read_parquet(skipped / "history.parquet").empty
    trained = _task_distill(smoke, "trained", "intermediate", general)
    assert (trained / "model" / "model.safetensors").read_bytes() != (general / "model" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("recipe, teacher_calls, losses", [
    ("tinybert_prediction", 6, ["soft_cross_entropy"]),
    ("finetune", 0, ["hard_cross_entropy"]),
])
def test_prediction_recipe_chooses_the_loss_and_whether_the_teacher_runs(smoke, monkeypatch, recipe, teacher_calls, losses):
    from kd_core.stages import glue as stages

    _, general = _general(smoke, "g")
    calls = []
    load = stages.load_classifier

    def counting_load(model_dir, spec):
        model = load(model_dir, spec)
        if model_dir.parent == smoke["teacher"]:
            model.register_forward_hook(lambda *_: calls.append(1))
        return model

    monkeypatch.setattr(stages, "load_classifier", counting_load)
    out = _task_distill(smoke, recipe, "prediction", general, **{"task_distill.prediction_recipe": recipe})
    assert len(calls) == teacher_calls  # one teacher forward per step (6 steps), none without KD
    matches = json.loads((out / "model" / "distillation.json").read_text())
    assert [m["loss"] for m in matches["matches"]] == losses
    history = pd.read_parquet(out / "history.parquet")
    assert history["step"].max() == 6 and history["loss"].notna().all()
