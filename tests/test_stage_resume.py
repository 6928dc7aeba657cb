"""A stage killed mid-training resumes from its checkpoint on the next run, and the store never
shows a half-written artifact."""

from __future__ import annotations

import json

import pytest


class Killed(Exception):
    pass


class KillAt:
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, step, metrics):
        if step == self.step:
            raise Killed(f"killed at step {step}")


def test_killed_general_distill_resumes_mid_stage(tmp_path, kd_data_dir, monkeypatch):
    from flows.profiles import load_profile
    from kd_core.artifacts import ArtifactStore
    from kd_core.stages import glue as stages
    from kd_core.stages.common import StageIO

    monkeypatch.setenv("KD_HOME", str(tmp_path))
    cfg = load_profile("smoke", {"general_distill.train.checkpoint_every": 2, "general_distill.train.max_steps": 8,
                                 "data_dir": str(kd_data_dir)})
    store = ArtifactStore(tmp_path / "artifacts")
    corpus = store.write("prepare_corpus", "k0", lambda out: stages.prepare_corpus(cfg, StageIO(out=out)))
    key = "k1"
    work = store.work_dir("general_distill", key)

    with pytest.raises(Killed):
        store.write("general_distill", key, lambda out: stages.general_distill(
            cfg, StageIO({"corpus": corpus.path}, out, work, [KillAt(5)])))
    assert store.get("general_distill", key) is None  # nothing half-written is visible
    assert (work / "checkpoints" / "step-0000004").is_dir()

    resumed = store.write("general_distill", key, lambda out: stages.general_distill(
        cfg, StageIO({"corpus": corpus.path}, out, work)))
    result = json.loads((resumed.path / "manifest.json").read_text())["result"]
    assert result["resumed_from"] == 4 and result["steps"] == 8
    assert not work.exists()  # scratch space goes once the artifact lands

    straight = store.write("general_distill", "k2", lambda out: stages.general_distill(
        cfg, StageIO({"corpus": corpus.path}, out, store.work_dir("general_distill", "k2"))))
    # exact resume: the resumed student's weights equal an uninterrupted run's, file for file
    for name in ("model/model.safetensors", "model/projections.safetensors"):
        assert (resumed.path / name).read_bytes() == (straight.path / name).read_bytes(), name
    # ... and so does the whole artifact, loss history included: the same digest, so every
    # downstream cache key is the one a clean store would have
    assert resumed.digest == straight.digest
    straight_result = json.loads((straight.path / "manifest.json").read_text())["result"]
    assert result["first_loss"] == straight_result["first_loss"] and result["final_loss"] == straight_result["final_loss"]
