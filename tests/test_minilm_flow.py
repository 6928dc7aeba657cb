"""The minilm flow's variants: MiniLMv2 with unequal head counts and the DistilBERT-style baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from test_pipeline import artifacts, kd_home  # noqa: F401  (kd_home: the temp KD_HOME fixture)

from kd_core.config import LayerMapping
from kd_core.train.objective import expand_recipe


def test_distilbert_recipes_declare_soft_targets_and_last_hidden_cosine():
    specs = expand_recipe("distilbert", LayerMapping(), 2, 6, params={"temperature": 3.0})
    assert [(s.feature, s.loss, s.weight, s.params) for s in specs] == [
        ("logits", "kl_div", 5.0, {"temperature": 3.0}),
        ("hidden", "cosine", 1.0, {}),
    ]
    # uniform 2 <- 6 pairs the student's last layer with the teacher's last
    assert (specs[1].student_layer, specs[1].teacher_layer) == (2, 6)
    (regression, _) = expand_recipe("distilbert", LayerMapping(), 2, 6, params={"regression": True})
    assert (regression.loss, regression.weight) == ("logits_mse", 5.0)
    (cosine,) = expand_recipe("distilbert_cosine", LayerMapping(), 3, 6, params={"alpha_cos": 2.0})
    assert (cosine.feature, cosine.loss, cosine.weight, cosine.student_layer, cosine.teacher_layer) == ("hidden", "cosine", 2.0, 3, 6)


def run_minilm(overrides: dict):
    from flows.minilm import minilm

    state = minilm(profile="smoke", overrides=overrides, return_state=True)
    assert state.is_completed(), state
    return state.result()


def test_minilmv2_flow_runs_when_student_and_teacher_head_counts_differ(kd_home):  # noqa: F811
    from transformers import AutoConfig

    run_minilm({
        "student.num_heads": 2,  # the smoke teacher has 4
        "minilm.recipe": "minilmv2",
        "minilm.recipe_params": {"num_relation_heads": 4},
        "minilm.assistant": "off",
    })
    assert artifacts(kd_home, "assistant_distill") == []
    (general,) = artifacts(kd_home, "minilm_distill")
    assert AutoConfig.from_pretrained(general / "model").num_attention_heads == 2
    history = pd.read_parquet(general / "history.parquet")
    terms = sorted(c for c in history.columns if c.startswith("loss/"))
    assert terms == [f"loss/{k}_merged[2<-4]:minilmv2_relation_kl" for k in ("key", "query", "value")]
    # the total is the unweighted sum of the three relation terms
    assert history["loss"].to_numpy() == pytest.approx(history[terms].sum(axis=1).to_numpy(), rel=1e-5)


def test_distilbert_baseline_initialises_from_teacher_layers_and_distils_the_task(kd_home):  # noqa: F811
    import torch
    from safetensors.torch import load_file

    run_minilm({
        "student": {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "intermediate_size": 128, "init": "teacher_layers"},
        "minilm.recipe": "distilbert_cosine",
        "minilm.train.max_steps": 1,  # one step at a tiny rate: the init is still recognisable
        "minilm.train.learning_rate": 1.0e-9,
        "finetune_student.recipe": "distilbert",
        "finetune_student.recipe_params": {"temperature": 2.0},
    })
    (general,) = [a for a in artifacts(kd_home, "minilm_distill")
                  if json.loads((a / "manifest.json").read_text())["result"]["steps"] == 1]
    from kd_core.models.registry import resolve_model

    teacher = load_file(str(Path(resolve_model("tiny-random-bert")) / "model.safetensors"))
    student = load_file(str(general / "model" / "model.safetensors"))
    key = "encoder.layer.{}.attention.self.query.weight"
    # uniform 2 <- 4 copies teacher layers 2 and 4 (0-based 1 and 3) into student layers 0 and 1
    t_key = next(k for k in teacher if k.endswith(key.format(3)))
    s_key = next(k for k in student if k.endswith(key.format(1)))
    assert torch.allclose(student[s_key], teacher[t_key], atol=1e-6)

    finetune_runs = artifacts(kd_home, "finetune_student")
    distilled = [a for a in finetune_runs if (a / "history.parquet").is_file()
                 and "loss/logits:kl_div" in pd.read_parquet(a / "history.parquet").columns]
    assert len(distilled) == 1
    history = pd.read_parquet(distilled[0] / "history.parquet")
    assert set(c for c in history.columns if c.startswith("loss/")) == {"loss/logits:kl_div", "loss/hidden[2<-4]:cosine"}
    # alpha_ce = 5, alpha_cos = 1 (DistilBERT's weights)
    expected = 5 * history["loss/logits:kl_div"] + history["loss/hidden[2<-4]:cosine"]
    assert history["loss"].to_numpy() == pytest.approx(expected.to_numpy(), rel=1e-5)
    manifest = json.loads((distilled[0] / "manifest.json").read_text())
    assert "finetune_teacher" in manifest["inputs"]


@pytest.mark.parametrize("text, expected", [("off", "off"), ("on", "on"), ("auto", "auto"), ('"off"', "off")])
def test_assistant_override_survives_yaml_booleans(text, expected):
    # YAML 1.1 reads a bare off/on as False/True; `-p minilm.assistant=off` must still mean "off"
    from kd_core.config import PipelineConfig, parse_override, set_dotted

    key, value = parse_override(f"minilm.assistant={text}")
    tree: dict = {}
    set_dotted(tree, key, value)
    assert PipelineConfig.model_validate(tree).minilm.assistant == expected
