import json

from conftest import tiny_bert
from transformers import AutoModel
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def test_kd_distill_end_to_end_on_real_text(tmp_path, tokenizer, kd_data_dir):
    teacher_dir = tmp_path / "teacher"
    tiny_bert(layers=4, hidden=64, heads=4).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    out = tmp_path / "run"
    args = [
        "distill", "--teacher", str(teacher_dir), "--data", str(kd_data_dir / "wikipedia_sample" / "AA" / "wiki_02"),
        "--student-layers", "2", "--student-hidden", "32", "--max-steps", "6", "--batch-size", "4",
        "--max-seq-length", "32", "--checkpoint-every", "3", "--log-every", "1", "--out", str(out),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    student = AutoModel.from_pretrained(out / "student")
    assert (student.config.num_hidden_layers, student.config.hidden_size) == (2, 32)
    assert (out / "student" / "projections.safetensors").is_file()
    history = json.loads((out / "train_result.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]
    # a re-run finds the finished checkpoint and trains nothing more
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "resumed at 6" in again.output


def test_kd_distill_reports_bad_input_clearly(tmp_path):
    result = runner.invoke(app, ["distill", "--data", str(tmp_path / "missing"), "--teacher", "nope/none", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "HF_HUB_OFFLINE=1 forbids the hub" in " ".join(result.output.split())
    result = runner.invoke(app, ["distill", "--data", str(tmp_path), "--student-hidden", "4"])
    assert result.exit_code == 2 and "student.hidden_size" in result.output


def test_kd_distill_seed_decides_the_student(tmp_path, tokenizer, kd_data_dir):
    """Issue 16.7: the same --seed gives the same student and step-1 loss whatever the process's
    RNG state; another seed gives another."""
    import torch
    from safetensors.torch import load_file

    teacher_dir = tmp_path / "teacher"
    tiny_bert(layers=2, hidden=32, heads=2, intermediate=64).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)

    def distill(name: str, seed: int, noise: int):
        torch.manual_seed(noise)  # the RNG state left by whatever ran before must not matter
        out = tmp_path / name
        result = runner.invoke(app, [
            "distill", "--teacher", str(teacher_dir), "--data", str(kd_data_dir / "wikipedia_sample" / "AA" / "wiki_02"),
            "--student-layers", "1", "--student-hidden", "16", "--student-heads", "2", "--max-steps", "2",
            "--batch-size", "4", "--max-seq-length", "32", "--log-every", "1", "--seed", str(seed), "--out", str(out)])
        assert result.exit_code == 0, result.output
        history = json.loads((out / "train_result.json").read_text())["history"]
        return history[0]["loss"], load_file(str(out / "student" / "model.safetensors"))

    loss_a, weights_a = distill("a", 42, noise=1)
    loss_b, weights_b = distill("b", 42, noise=2)
    loss_c, _ = distill("c", 43, noise=1)
    assert loss_a == loss_b and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert loss_c != loss_a


def test_kd_stage_help_lists_every_stage_the_graphs_can_hold():
    """The help's static table (no torch at --help) against the graphs tasks/stages.py builds for
    every profile, plus the pruned-from-finetuned variant that swaps in prune_teacher."""
    import re

    from flows.profiles import available_profiles, load_profile
    from flows.registry import STAGE_NAMES
    from kd_core.config import parse_override
    from tasks.stages import dag_for

    pruned = dict(parse_override(p) for p in ("student.init=pruned", "student.prune.source=finetuned"))
    exported = dict([parse_override("export.enabled=true")])
    for flow, listed in STAGE_NAMES.items():
        seen: list[str] = []
        for profile in available_profiles():
            variants = {"tinybert-full": ({}, pruned, exported), "minilm": ({}, exported)}.get(flow, ({},))
            for overrides in variants:
                try:
                    dag = dag_for(flow, load_profile(profile, overrides))
                except Exception:  # profiles made for another flow (their task or teacher does not fit)
                    continue
                seen += [re.split("[@/]", name)[0] for name in dag if re.split("[@/]", name)[0] not in seen]
        assert set(seen) == set(listed), (flow, sorted(set(seen) ^ set(listed)))
    result = runner.invoke(app, ["stage", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())  # rich wraps at the terminal's width
    for flow, listed in STAGE_NAMES.items():
        assert f"{flow}: {', '.join(listed)}" in text, flow


def test_every_deployment_form_describes_its_flow_and_parameters():
    """Prefect builds a deployment's run form from the flow's description and docstring: each
    parameter gets a description, and profile's names every profile there is."""
    from prefect.utilities.callables import parameter_schema

    from flows.profiles import available_profiles
    from flows.registry import all_flows
    from flows.single_stage import single_stage

    for name, flow in {**all_flows(), "kd-stage": single_stage}.items():
        assert flow.description and "\n" not in flow.description, name
        properties = parameter_schema(flow).model_dump()["properties"]
        for parameter, spec in properties.items():
            assert len(spec.get("description", "")) > 20, (name, parameter)
        # the run form offers the profiles as a choice
        assert properties["profile"]["enum"] == available_profiles(), name
        if name != "kd-stage":
            assert all(profile in properties["profile"]["description"] for profile in available_profiles()), name
    from flows.registry import FLOW_NAMES

    assert parameter_schema(single_stage).model_dump()["properties"]["flow_name"]["enum"] == list(FLOW_NAMES)
    # in-process, `kd run --profile my.yaml` still passes a path: the choice is the form's, not a validator
    assert single_stage.validate_parameters({"stage": "evaluate", "profile": "a/b.yaml"})["profile"] == "a/b.yaml"
