"""The squad-distill flow on the smoke-squad profile (temp KD_HOME, MLflow on sqlite), and the
v2.0 evaluation path on real unanswerable pairs built from dev."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pandas as pd
import pytest
from test_pipeline import artifacts, kd_home, stage_states  # noqa: F401  (kd_home: the temp KD_HOME fixture)

from kd_core.evaluate.squad import squad_metrics

STAGES = [
    "prepare_corpus", "general_distill", "prepare_qa", "finetune_teacher_qa", "task_distill_qa_intermediate",
    "task_distill_qa_prediction", "evaluate_qa", "benchmark", "report",
]


def run_squad(**kwargs):
    from flows.squad import squad_distill

    started = time.perf_counter()
    state = squad_distill(profile="smoke-squad", return_state=True, **kwargs)
    elapsed = time.perf_counter() - started
    assert state.is_completed(), state
    return state.result(), elapsed, str(state.state_details.flow_run_id)


@pytest.fixture(scope="module")
def first_run(kd_home, one_thread):  # noqa: F811
    return run_squad()


def test_squad_smoke_flow_trains_scores_and_labels_the_dev_article_split(first_run, kd_home):  # noqa: F811
    from transformers import AutoModelForQuestionAnswering

    from kd_core.data.loaders import read_split

    result, elapsed, _ = first_run
    assert elapsed < 120, elapsed
    for stage in STAGES:
        assert len(artifacts(kd_home, stage)) == 1, stage

    (data,) = artifacts(kd_home, "prepare_qa")
    train, train_meta = read_split(data / "dev-articles-train.parquet")
    evaluation, eval_meta = read_split(data / "dev-articles-eval.parquet")
    assert (train_meta["split"], eval_meta["split"]) == ("dev-articles-train", "dev-articles-eval")
    # smoke-squad: 4 articles, half of them for eval; 96 eval questions, at most 256 training ones
    assert train["title"].nunique() == evaluation["title"].nunique() == 2
    assert not set(train["title"]) & set(evaluation["title"])
    assert len(evaluation) == 96 and 0 < len(train) <= 256

    (scored,) = artifacts(kd_home, "evaluate_qa")
    metrics = pd.read_parquet(scored / "metrics.parquet").set_index("model")
    assert sorted(metrics.index) == ["student", "teacher"]
    assert (metrics["split"] == "dev-articles-eval").all() and (metrics["rows"] == 96).all()
    assert (metrics["task"] == "squad").all() and (metrics["score"] == metrics["f1"]).all()
    golds = dict(zip(evaluation["id"], evaluation["answers_text"]))
    contexts = dict(zip(evaluation["id"], evaluation["context"]))
    for model in ("teacher", "student"):
        predictions = json.loads((scored / f"predictions-{model}.json").read_text())
        assert set(predictions) == set(golds)
        assert all(text and text in contexts[qid] for qid, text in predictions.items())  # spans cut from the context
        again = squad_metrics(golds, predictions)
        assert again["exact_match"] == pytest.approx(metrics.loc[model, "exact_match"])
        assert again["f1"] == pytest.approx(metrics.loc[model, "f1"])
        hits = metrics.loc[model, "exact_match"] * 96 / 100  # EM counts whole questions
        assert abs(hits - round(hits)) < 1e-9

    report = Path(result["report"]).read_text()
    assert "dev-articles-eval" in report and "dev-articles-train" in report
    assert "not official SQuAD dev scores" in report
    assert "| teacher |" in report and "| student |" in report

    (student,) = artifacts(kd_home, "task_distill_qa_prediction")
    model = AutoModelForQuestionAnswering.from_pretrained(student / "model")
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (2, 32)
    history = pd.read_parquet(student / "history.parquet")
    assert [c for c in history.columns if c.startswith("loss/")] == ["loss/qa_logits:qa_soft_cross_entropy"]
    (intermediate,) = artifacts(kd_home, "task_distill_qa_intermediate")
    terms = [c for c in pd.read_parquet(intermediate / "history.parquet").columns if c.startswith("loss/")]
    assert "loss/embeddings:hidden_mse" in terms and "loss/attention_scores[2<-4]:attention_mse" in terms
    (teacher,) = artifacts(kd_home, "finetune_teacher_qa")
    trained = json.loads((teacher / "manifest.json").read_text())["result"]
    assert trained["final_loss"] < trained["first_loss"] and trained["train_windows"] > len(train)


def test_squad_rerun_is_all_cached(first_run, kd_home):  # noqa: F811
    _, first_elapsed, _ = first_run
    _, elapsed, flow_run_id = run_squad()
    assert stage_states(flow_run_id) == {stage: "Cached" for stage in STAGES}
    assert elapsed < first_elapsed


def test_qa_models_are_registered_under_the_qa_task(first_run, kd_home):  # noqa: F811
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{kd_home / 'mlflow.db'}")
    for suffix in ("teacher", "general-student", "student"):
        assert client.search_model_versions(f"name = 'squad-distill-smoke-squad-squad-{suffix}'"), suffix


def test_doc_stride_must_leave_room_in_a_window():
    from pydantic import ValidationError

    from kd_core.config import PipelineConfig

    with pytest.raises(ValidationError, match=r"qa.doc_stride 50 must be below the context room .* = 45"):
        PipelineConfig(qa={"max_seq_length": 64, "max_query_length": 16, "doc_stride": 50})


def test_v2_evaluation_tunes_the_no_answer_threshold(tmp_path, kd_data_dir, tokenizer, one_thread):
    """SQuAD v2.0 is not offline: unanswerable pairs are made from dev by giving 12 questions the
    context of another article, which cannot hold their answers."""
    import torch
    from transformers import BertConfig, BertForQuestionAnswering

    from kd_core.config import PipelineConfig
    from kd_core.data.loaders import load_split, write_split
    from kd_core.stages import qa
    from kd_core.stages.common import StageIO

    dev = load_split("squad", kd_data_dir, "dev")
    first, other = dev["title"].unique()[:2]
    answerable = dev[dev["title"] == first].iloc[:12]
    unanswerable = dev[dev["title"] == first].iloc[12:24].copy()
    unanswerable["context"] = dev[dev["title"] == other]["context"].iloc[0]
    unanswerable["answers_text"] = [[] for _ in range(12)]
    unanswerable["answers_start"] = [[] for _ in range(12)]
    unanswerable["is_impossible"] = True
    rows = pd.concat([answerable, unanswerable], ignore_index=True)
    data = tmp_path / "qa"
    data.mkdir()
    write_split(rows, data / "toy-v2-eval.parquet", "squad_v2", "toy-v2-eval")
    (data / qa.SPLIT_FILE).write_text(json.dumps({"train_split": "toy-v2-eval", "eval_split": "toy-v2-eval"}))

    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    model_dir = tmp_path / "teacher"
    BertForQuestionAnswering(config).save_pretrained(model_dir / "model")
    tokenizer.save_pretrained(model_dir / "model")
    out = tmp_path / "out"
    out.mkdir()
    cfg = PipelineConfig(qa={"version_2": True, "max_seq_length": 128, "doc_stride": 32, "max_query_length": 32})
    result = qa.evaluate_qa(cfg, StageIO({"teacher": model_dir, "data": data}, out))

    (row,) = pd.read_parquet(out / "metrics.parquet").to_dict("records")
    assert (row["task"], row["split"], row["rows"]) == ("squad_v2", "toy-v2-eval", 24)
    assert (row["has_ans_total"], row["no_ans_total"]) == (12, 12)
    assert row["score"] == row["best_f1"] and result["teacher_score"] == pytest.approx(row["best_f1"], abs=1e-4)
    # the stored spans and na scores give back the same numbers through the official procedure
    na = {q: math.inf if v is None else v for q, v in json.loads((out / "na-scores-teacher.json").read_text()).items()}
    answers = json.loads((out / "predictions-teacher.json").read_text())
    golds = dict(zip(rows["id"], rows["answers_text"]))
    threshold = row["best_f1_thresh"]
    assert all((answers[q] == "") == (na[q] > threshold) for q in golds)  # predictions at the tuned threshold
    at_best = squad_metrics(golds, answers)  # scored as they stand: "" is the no-answer prediction
    assert at_best["f1"] == pytest.approx(row["best_f1"])
    # tuning can only help: the best F1 is at least the F1 at threshold 0
    assert row["best_f1"] >= row["f1"] - 1e-9
