"""tasks.tracking: what MLflow is sent, checked without a store."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("trainer_name, mlflow_name", [
    ("loss/attention_scores[1<-2]:attention_mse", "loss/attention_scores/s1_t2/attention_mse"),
    ("loss/hidden[0<-0]:hidden_mse", "loss/hidden/s0_t0/hidden_mse"),
    ("loss/value[4<--1]:value_relation_kl", "loss/value/s4_t-1/value_relation_kl"),
    ("loss/logits:soft_cross_entropy", "loss/logits/soft_cross_entropy"),
    ("loss/embeddings:hidden_mse", "loss/embeddings/hidden_mse"),
    ("loss", "loss"),
    ("lr", "lr"),
    ("odd[name]", "odd_name_"),  # not a loss term: only the characters MLflow refuses are replaced
])
def test_loss_terms_get_readable_mlflow_names(trainer_name, mlflow_name):
    from tasks.tracking import metric_name

    assert metric_name(trainer_name) == mlflow_name


def test_declared_match_terms_get_readable_names():
    """Match terms as the objective names them map to loss/<feature>[/s<i>_t<j>]/<loss>."""
    import re

    from kd_core.config import MatchSpec
    from kd_core.train.objective import term_name
    from tasks.tracking import metric_name

    specs = [MatchSpec(feature="attention_scores", loss="attention_mse", student_layer=2, teacher_layer=6),
             MatchSpec(feature="hidden", loss="hidden_mse", student_layer=0, teacher_layer=0),
             MatchSpec(feature="logits", loss="soft_cross_entropy")]
    names = [metric_name(f"loss/{term_name(spec)}") for spec in specs]
    assert names == ["loss/attention_scores/s2_t6/attention_mse", "loss/hidden/s0_t0/hidden_mse",
                     "loss/logits/soft_cross_entropy"]
    assert all(re.fullmatch(r"loss/[a-z_]+(/s-?\d+_t-?\d+)?/[a-z_]+", n) for n in names)


def test_model_logging_leaves_os_environ_alone(tmp_path, monkeypatch):
    """MLflow's env-var recording patches os.environ's class for the whole process while a model
    is logged: a stage thread reading the environment meanwhile broke a served run's export."""
    import os

    from mlflow.utils.model_utils import env_var_tracker

    from tasks.tracking import setup_tracking

    monkeypatch.setenv("KD_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RECORD_ENV_VARS_IN_MODEL_LOGGING", raising=False)
    setup_tracking()
    before = (os._Environ.get, os._Environ.__getitem__)
    with env_var_tracker() as names:
        assert (os._Environ.get, os._Environ.__getitem__) == before
        os.environ.get("HOME")
    assert names == set()


def test_progress_of_a_stage_that_does_not_train_counts_from_the_stage_start(monkeypatch):
    """The rate is done / seconds since the stage began: a stage that reports once, at its end,
    gets its real rate (it printed 1.3e11 rows/s when the clock started at that report)."""
    import time

    from tasks.runtime import StageProgress

    monkeypatch.setattr("prefect.artifacts.create_progress_artifact", lambda *args, **kwargs: None)  # no flow run here
    clock = iter([100.0, 104.0, 108.0])
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    lines = []

    class Logger:
        def info(self, fmt, *args):
            lines.append(fmt % args)

        debug = info

    progress = StageProgress("augment", Logger(), every_s=15.0)  # t=100
    progress.on_progress(8, 16, "rows")  # t=104: 2 rows/s, 8 left -> 4 s; not yet logged (every 15 s)
    progress.on_progress(16, 16, "rows")  # t=108: done, always logged
    assert lines[-1] == "augment: 16/16 rows  2.0 rows/s  ETA 0m00s"
