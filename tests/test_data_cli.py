"""``kd prepare-task`` and ``kd prepare-corpus`` through Typer's CliRunner on a local app."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import typer
from typer.testing import CliRunner

from flows.commands.data import register

runner = CliRunner()


def make_app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_cli_prepare_task(kd_data_dir, tmp_path):
    app = make_app()
    out = tmp_path / "sst2"
    result = runner.invoke(app, ["prepare-task", "--task", "SST-2", "--data-dir", str(kd_data_dir), "--out", str(out), "--split", "dev"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["dev.parquet", "manifest.json"]
    assert pq.read_metadata(out / "dev.parquet").num_rows == 872
    assert "872" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task"] == "sst2" and manifest["splits"]["dev"]["rows"] == 872
    both = runner.invoke(app, ["prepare-task", "--task", "stsb", "--data-dir", str(kd_data_dir), "--out", str(tmp_path / "s"),
                               "--split", "train", "--split", "validation"])
    assert both.exit_code == 0, both.output
    assert sorted(p.name for p in (tmp_path / "s").glob("*.parquet")) == ["dev.parquet", "train.parquet"]


def test_cli_prepare_task_errors(kd_data_dir, tmp_path):
    app = make_app()
    result = runner.invoke(app, ["prepare-task", "--task", "sst3", "--data-dir", str(kd_data_dir), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "Did you mean 'sst2'" in " ".join(result.output.split())
    (tmp_path / "glue" / "SST-2").mkdir(parents=True)
    (tmp_path / "glue" / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nfine\t3\n")
    result = runner.invoke(app, ["prepare-task", "--task", "sst2", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "line 2: unknown label '3'" in text
    assert not (tmp_path / "o" / "dev.parquet").exists()


def test_cli_prepare_corpus(kd_data_dir, tmp_path):
    app = make_app()
    out = tmp_path / "c"
    args = ["prepare-corpus", "--data", str(kd_data_dir / "wikipedia_sample" / "AA" / "wiki_01"), "--out", str(out),
            "--max-seq-length", "64", "--max-blocks", "50", "--shard-rows", "20"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_blocks"] == 50 and [s["rows"] for s in manifest["shards"]] == [20, 20, 10]
    assert manifest["max_seq_length"] == 64 and "num_blocks" in result.output
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    bad = runner.invoke(app, ["prepare-corpus", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "does not exist" in bad.output
