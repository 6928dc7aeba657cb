"""Names and shapes checked when the config loads or the stage graph is built, before any stage
runs (issues 16.5, 14.4/14.6, 13's data-folder key)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pandas as pd
import pytest

from kd_core.config import ConfigError


@pytest.fixture
def data_env(monkeypatch, kd_data_dir, tmp_path):
    monkeypatch.setenv("KD_DATA_DIR", str(kd_data_dir))
    monkeypatch.setenv("KD_HOME", str(tmp_path / "home"))


def _load(overrides=None, force=None):
    from flows.profiles import load_profile

    return load_profile("smoke", overrides or {}, force)


def _dag(overrides=None, force=None, flow="tinybert-full"):
    from tasks.stages import dag_for

    return dag_for(flow, _load(overrides, force))


@pytest.mark.parametrize("override, expected", [
    ({"task_distill.recipe": "tinybert_typo"}, "-p task_distill.recipe=tinybert_typo: unknown recipe 'tinybert_typo'; choose one of"),
    ({"general_distill.recipe": "minilmv3"}, "-p general_distill.recipe=minilmv3: unknown recipe 'minilmv3'"),
    ({"general_distill.matches": [{"feature": "logits", "loss": "kl_divergence"}]}, "unknown loss 'kl_divergence'; choose one of"),
    ({"task.trainlimit": 5}, "-p task.trainlimit=5: unknown key 'task.trainlimit'; did you mean task.train_limit? valid keys there:"),
])
def test_typos_fail_when_the_config_loads_naming_the_p_key(override, expected):
    with pytest.raises(ConfigError) as raised:
        _load(override)
    message = str(raised.value)
    assert expected in message and "\n" not in message, message


def test_an_unknown_force_stage_fails_with_the_stage_names(data_env):
    expected = r"-p force: unknown stage 'task_distil' for tinybert-full; its stages: .*task_distill_intermediate"
    with pytest.raises(ConfigError, match=expected):
        _dag(force=["task_distil"])
    assert "task_distill_prediction" in _dag(force=["task_distill"])  # a prefix of real stages is fine


def test_an_explicit_mapping_outside_the_teacher_fails_at_graph_build(data_env):
    with pytest.raises(ConfigError, match=r"task_distill.mapping: mapping.layers \[9\] out of range: the teacher has layers 1..4"):
        _dag({"task_distill.mapping.strategy": "explicit", "task_distill.mapping.layers": [1, 9]})


def test_task_name_aliases_share_one_cache_key(data_env):
    from tasks.glue_dag import PREPARE_TASK

    assert _load({"task.name": "SST-2"}).task.name == "sst2"
    assert PREPARE_TASK.section(_load({"task.name": "SST-2"})) == PREPARE_TASK.section(_load({"task.name": "sst2"}))


def test_a_checkpoint_of_another_shape_fails_naming_both(data_env, tmp_path, tokenizer):
    from conftest import tiny_bert

    checkpoint = tmp_path / "ckpt"
    tiny_bert(layers=4, hidden=64, heads=4, intermediate=128).save_pretrained(checkpoint)
    expected = r"student.checkpoint .*ckpt is 4x64 \(4 heads, FFN 128\), but student.\* asks for 2x32 \(4 heads, FFN 64\)"
    with pytest.raises(ValueError, match=expected):
        _dag({"student.init": "checkpoint", "student.checkpoint": str(checkpoint)})


def test_scoring_on_an_unlabeled_split_fails_before_training(data_env, kd_data_dir):
    with pytest.raises(ConfigError) as raised:
        _dag({"task.eval_split": "test"})
    message = str(raised.value)
    assert "task.eval_split=test: sst2's test split" in message and str(kd_data_dir / "glue" / "SST-2" / "test.tsv") in message
    assert "labeled splits: train, dev, test-labeled, holdout" in message or "labeled splits: train, dev" in message, message


def test_kd_run_and_prepare_task_find_the_same_data_from_any_directory(monkeypatch, tmp_path):
    from kd_core.data.tasks import default_data_dir
    from kd_core.stages import common as stages

    monkeypatch.delenv("KD_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # no ../shared/data from here
    root = stages.data_root(_load())
    assert root == default_data_dir() and (root / "glue" / "SST-2" / "train.tsv").is_file()


def test_the_prepare_task_key_follows_the_files_in_any_layout_the_loader_reads(monkeypatch, tmp_path, kd_data_dir):
    """SST-2/ directly under the data dir (no glue/): the loader reads it, and editing it must
    change prepare_task's key (before: the key hashed the absent glue/SST-2 folder)."""
    from tasks.glue_dag import PREPARE_TASK

    folder = tmp_path / "data" / "SST-2"
    folder.mkdir(parents=True)
    source = kd_data_dir / "glue" / "SST-2"
    (folder / "train.tsv").write_text("\n".join(source.joinpath("train.tsv").read_text().splitlines()[:50]) + "\n")
    (folder / "dev.tsv").write_text(source.joinpath("dev.tsv").read_text())
    monkeypatch.setenv("KD_DATA_DIR", str(tmp_path / "data"))
    before = PREPARE_TASK.section(_load())["source"]
    assert PREPARE_TASK.section(_load())["source"] == before  # stable
    lines = (folder / "train.tsv").read_text().splitlines()
    lines[5] = lines[5].replace("\t0", "\t1") if lines[5].endswith("\t0") else lines[5].replace("\t1", "\t0")
    (folder / "train.tsv").write_text("\n".join(lines) + "\n")  # same size, another label
    assert PREPARE_TASK.section(_load())["source"] != before


def test_empty_text_rows_are_counted_in_the_stage_result(monkeypatch, tmp_path, kd_data_dir, caplog):
    from kd_core.stages import glue as stages
    from kd_core.stages.common import StageIO

    folder = tmp_path / "data" / "glue" / "SST-2"
    folder.mkdir(parents=True)
    rows = (kd_data_dir / "glue" / "SST-2" / "train.tsv").read_text().splitlines()[:40]
    rows[3], rows[7] = "\t1", "   \t0"  # two rows with nothing to read
    (folder / "train.tsv").write_text("\n".join(rows) + "\n")
    (folder / "dev.tsv").write_text((kd_data_dir / "glue" / "SST-2" / "dev.tsv").read_text())
    cfg = _load({"data_dir": str(tmp_path / "data"), "task.train_limit": None, "task.eval_limit": 20})
    with caplog.at_level("WARNING", logger="kd_core.data"):
        result = stages.prepare_task(cfg, StageIO(out=tmp_path / "out"))
    assert result["train_empty_text_rows"] == 2 and result["dev_empty_text_rows"] == 0
    assert "sst2 train: 2 of 39 rows have an empty text field" in caplog.text
    assert stages.count_empty_texts(pd.DataFrame({"text_a": ["a", "b"], "text_b": ["", "c"]})) == 1


def test_kd_run_with_a_typo_fails_in_one_line_before_anything_starts(tmp_path, kd_data_dir):
    env = {**os.environ, "KD_HOME": str(tmp_path), "KD_DATA_DIR": str(kd_data_dir)}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", "from flows.cli import app; app()", "run", "tinybert-full",
                             "--profile", "smoke", "-p", "force=[task_distil]"],
                            capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.perf_counter() - started
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 2 and "Traceback" not in output
    assert output.splitlines() == [output.splitlines()[0]] and "unknown stage 'task_distil'" in output, output
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "artifacts").exists()
    # the graph build imports neither torch nor transformers any more: about 1 s on these 2 cores
    # (and the early ephemeral server is stopped before the line); the bound leaves room for a
    # loaded CI machine
    assert elapsed < 40, elapsed


def test_the_run_it_first_hint_carries_the_overrides(tmp_path, kd_data_dir):
    """Issue 14.5: on an empty store, the suggested commands rebuild the artifact this command needs."""
    env = {**os.environ, "KD_HOME": str(tmp_path), "KD_DATA_DIR": str(kd_data_dir)}
    env.pop("PREFECT_API_URL", None)
    result = subprocess.run([sys.executable, "-c", "from flows.cli import app; app()", "stage", "task_distill",
                             "--profile", "smoke", "-p", "augment.n_aug=5", "-p", "task.train_limit=64"],
                            capture_output=True, text=True, env=env, timeout=180)
    output = (result.stdout + result.stderr).strip()
    last = output.splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in output, output[-3000:]
    assert "run it first: kd run tinybert-full --profile smoke -p augment.n_aug=5 -p task.train_limit=64 " in last, last
    assert "kd stage " in last and last.count("-p augment.n_aug=5 -p task.train_limit=64") == 2, last


@pytest.mark.parametrize("override, expected", [
    ({"teacher": "no-such-teacher"}, "no-such-teacher"),
    ({"task.name": "sst3"}, "unknown task 'sst3'. Did you mean 'sst2'?"),
])
def test_an_unknown_teacher_or_task_fails_at_graph_build_as_a_user_error(data_env, override, expected):
    from kd_core.errors import UserError

    with pytest.raises(UserError, match=expected.replace("?", r"\?").replace(".", r"\.")):
        _dag(override)


def test_a_p_key_typo_fails_in_under_two_seconds(tmp_path, kd_data_dir):
    """Issue 14.6: a -p typo is a pydantic error, raised before torch or Prefect is imported."""
    env = {**os.environ, "KD_HOME": str(tmp_path), "KD_DATA_DIR": str(kd_data_dir)}
    probe = ("import sys, time; t = time.perf_counter(); sys.argv = ['kd', 'run', 'tinybert-full', '-p', 'task.trainlimit=5']\n"
             "from flows.cli import app\ntry:\n    app()\nexcept SystemExit as e:\n"
             "    print('EXIT', e.code, round(time.perf_counter() - t, 3), 'torch' in sys.modules, 'prefect' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert "-p task.trainlimit=5: unknown key 'task.trainlimit'; did you mean task.train_limit?" in " ".join(result.stdout.split())
    code, seconds, torch_loaded, prefect_loaded = result.stdout.split("EXIT ")[1].split()
    assert code == "2" and torch_loaded == "False" and prefect_loaded == "False", result.stdout
    assert float(seconds) < 2.0, seconds


def test_the_export_switch_adds_the_stage_where_a_flow_has_one_and_fails_where_it_has_none(data_env):
    from kd_core.config import ConfigError

    for flow, student in (("tinybert-full", "task_distill_prediction"), ("minilm", "finetune_student")):
        assert "export" not in _dag(flow=flow)
        export = _dag({"export.enabled": True}, flow=flow)["export"]
        assert export.upstream == (student, "prepare_task") and export.registers_onnx and not export.trains
    with pytest.raises(ConfigError, match="export.enabled: squad-distill has no export stage"):
        _dag({"export.enabled": True}, flow="squad-distill")
