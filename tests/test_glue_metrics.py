"""GLUE metrics against hand-computed values, the tasks' metric declarations, and the label-order check."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_bert

from kd_core.data.tasks import get_task
from kd_core.evaluate.glue import (
    METRICS,
    LabelOrderError,
    accuracy,
    check_label_order,
    compute_metrics,
    f1_positive,
    matthews,
    pearson,
    primary_score,
    spearman,
)

# ---- metrics by hand ---------------------------------------------------------------------------
PRED = np.array([1, 0, 1, 1, 0])
GOLD = np.array([1, 0, 0, 1, 1])


def test_accuracy_counts_matches():
    # rows 0, 1, 3 agree: 3 of 5
    assert accuracy(PRED, GOLD) == pytest.approx(60.0)


def test_f1_is_of_the_positive_class():
    # class 1: TP = rows 0, 3 (2); FP = row 2 (pred 1, gold 0); FN = row 4 (pred 0, gold 1)
    # precision = 2/3, recall = 2/3, F1 = 2PR/(P+R) = 2/3
    assert f1_positive(PRED, GOLD) == pytest.approx(200 / 3)
    # not class 0's F1 (TP=1, FP=1, FN=1: 1/2) nor the macro mean (7/12)
    assert f1_positive(1 - PRED, 1 - GOLD) == pytest.approx(50.0)
    # no positive predicted or present: F1 is 0 by convention, not an error
    assert f1_positive(np.zeros(3, int), np.zeros(3, int)) == 0.0


def test_matthews_from_the_confusion_matrix():
    # TP=3 (1,1), TN=2 (0,0), FP=1 (pred 1, gold 0), FN=2 (pred 0, gold 1)
    pred = np.array([1, 1, 1, 0, 0, 1, 0, 0])
    gold = np.array([1, 1, 1, 0, 0, 0, 1, 1])
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (6 - 2) / sqrt(4*5*3*4) = 4/sqrt(240)
    assert matthews(pred, gold) == pytest.approx(100 * 4 / math.sqrt(240))
    # perfect and inverted predictions: +100 and -100; a constant prediction: 0
    assert matthews(gold, gold) == pytest.approx(100.0)
    assert matthews(1 - gold, gold) == pytest.approx(-100.0)
    assert matthews(np.ones(8, int), gold) == 0.0


def test_pearson_and_spearman_by_hand():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    y = np.array([1.0, 3.0, 2.0, 4.0])
    # deviations from the mean 2.5: dx = (-1.5, -.5, .5, 1.5), dy = (-1.5, .5, -.5, 1.5)
    # sum dx*dy = 2.25 - .25 - .25 + 2.25 = 4; sum dx^2 = sum dy^2 = 5; r = 4/5
    assert pearson(x, y) == pytest.approx(80.0)
    # Spearman is Pearson of the ranks, with ties at their mean rank:
    # pred (0.1, 0.4, 0.4, 0.9) -> ranks (1, 2.5, 2.5, 4); gold ranks (1, 2, 3, 4)
    # dr = (-1.5, 0, 0, 1.5), dg = (-1.5, -.5, .5, 1.5): sum dr*dg = 4.5, sum dr^2 = 4.5, sum dg^2 = 5
    # rho = 4.5 / sqrt(4.5 * 5) = sqrt(0.9)
    assert spearman([0.1, 0.4, 0.4, 0.9], [1, 2, 3, 4]) == pytest.approx(100 * math.sqrt(0.9))
    # a monotone but non-linear prediction: Spearman 100, Pearson below it
    assert spearman(x, x**3) == pytest.approx(100.0)
    assert pearson(x, x**3) < 99.0
    # a collapsed regressor has no correlation: 0, not NaN
    assert pearson(np.full(4, 2.0), y) == 0.0 and spearman(np.full(4, 2.0), y) == 0.0


def test_metrics_agree_with_a_numpy_reimplementation():
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 2, 200)
    pred = np.where(rng.random(200) < 0.7, gold, 1 - gold)
    tp = np.sum((pred == 1) & (gold == 1))
    tn = np.sum((pred == 0) & (gold == 0))
    fp = np.sum((pred == 1) & (gold == 0))
    fn = np.sum((pred == 0) & (gold == 1))
    assert accuracy(pred, gold) == pytest.approx(100 * (tp + tn) / 200)
    assert f1_positive(pred, gold) == pytest.approx(100 * 2 * tp / (2 * tp + fp + fn))
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert matthews(pred, gold) == pytest.approx(100 * mcc)
    a, b = rng.normal(size=50), rng.normal(size=50)
    b = a + b
    da, db = a - a.mean(), b - b.mean()
    assert pearson(a, b) == pytest.approx(100 * (da @ db) / math.sqrt((da @ da) * (db @ db)))
    ra, rb = a.argsort().argsort().astype(float), b.argsort().argsort().astype(float)  # no ties in floats
    ra, rb = ra - ra.mean(), rb - rb.mean()
    assert spearman(a, b) == pytest.approx(100 * (ra @ rb) / math.sqrt((ra @ ra) * (rb @ rb)))


def test_compute_metrics_uses_the_tasks_names_and_primary_score_is_their_mean():
    pred = np.array([1, 0, 1, 1, 0])
    scores = compute_metrics(get_task("mrpc").metrics, pred, GOLD)
    assert scores == pytest.approx({"accuracy": 60.0, "f1": 200 / 3})
    assert primary_score(scores) == pytest.approx((60.0 + 200 / 3) / 2)  # GLUE averages MRPC's two
    stsb = compute_metrics(get_task("stsb").metrics, [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0])
    assert stsb == pytest.approx({"pearson": 80.0, "spearmanr": 80.0})
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        compute_metrics(["bleu"], pred, GOLD)
    with pytest.raises(ValueError, match="one length"):
        compute_metrics(["accuracy"], pred[:3], GOLD)
    with pytest.raises(ValueError, match="empty"):
        compute_metrics(["accuracy"], np.array([]), np.array([]))


@pytest.mark.parametrize(
    "task, metrics",
    [
        ("sst2", ("accuracy",)), ("qnli", ("accuracy",)), ("rte", ("accuracy",)), ("wnli", ("accuracy",)),
        ("mnli", ("accuracy",)), ("mnli-mm", ("accuracy",)),
        ("mrpc", ("accuracy", "f1")), ("qqp", ("accuracy", "f1")),
        ("cola", ("matthews_correlation",)), ("stsb", ("pearson", "spearmanr")),
    ],
)
def test_tasks_declare_the_official_metrics(task, metrics):
    spec = get_task(task)
    assert spec.metrics == metrics and all(m in METRICS for m in metrics)


def test_f1_tasks_put_the_positive_class_at_id_1_and_mnli_mismatched_is_evaluable():
    assert get_task("mrpc").labels[1] == "equivalent" and get_task("qqp").labels[1] == "duplicate"
    mnli = get_task("mnli")
    assert mnli.resolve_split("dev_mismatched") == "dev_mismatched" and mnli.resolve_split("dev") == "dev_matched"
    assert get_task("MNLI-mm").resolve_split("dev") == "dev_mismatched"


# ---- label order -------------------------------------------------------------------------------
def _save_classifier(path, labels, seed=0, architectures=None):
    model = tiny_bert(layers=1, hidden=32, heads=2, intermediate=64, head="sequence_classification", seed=seed,
                      num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={name: i for i, name in enumerate(labels)})
    model.save_pretrained(path)
    if architectures is not None:
        config = json.loads((path / "config.json").read_text())
        config["architectures"] = architectures
        (path / "config.json").write_text(json.dumps(config))
    return model


def test_label_order_check_accepts_the_tasks_order_and_generic_names(tmp_path):
    sst2, mnli = get_task("sst2"), get_task("mnli")
    _save_classifier(tmp_path / "same", ["Negative", "POSITIVE"])  # case is not an order
    check_label_order(tmp_path / "same", sst2)
    _save_classifier(tmp_path / "generic", ["LABEL_0", "LABEL_1", "LABEL_2"])
    check_label_order(tmp_path / "generic", mnli)
    # an encoder saved without a head gets a fresh one: its names order nothing
    _save_classifier(tmp_path / "encoder", ["positive", "negative"], architectures=["BertModel"])
    check_label_order(tmp_path / "encoder", sst2)
    check_label_order(tmp_path / "same", get_task("stsb"))  # regression: no order to check


@pytest.mark.parametrize(
    "labels, problem",
    [
        (["positive", "negative"], "the task's labels in another order"),
        (["LABEL_1", "LABEL_0"], "generic labels are permuted"),
        (["good", "bad"], "not the task's labels"),
    ],
)
def test_label_order_check_names_dir_both_orders_and_the_fix(tmp_path, labels, problem):
    _save_classifier(tmp_path / "teacher", labels)
    with pytest.raises(LabelOrderError) as caught:
        check_label_order(tmp_path / "teacher", get_task("sst2"))
    message = str(caught.value)
    assert str(tmp_path / "teacher") in message and problem in message
    assert str(labels) in message and "['negative', 'positive']" in message and "Fix: permute" in message


def test_label2id_that_contradicts_id2label_fails(tmp_path):
    _save_classifier(tmp_path / "m", ["negative", "positive"])
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["label2id"] = {"negative": 1, "positive": 0}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(LabelOrderError, match="label2id says 1"):
        check_label_order(tmp_path / "m", get_task("sst2"))


@pytest.fixture()
def sst2_dev(tmp_path, kd_data_dir):
    from kd_core.data.loaders import load_split, write_split

    rows = load_split("sst2", kd_data_dir, "dev").head(48)
    write_split(rows, tmp_path / "task" / "dev.parquet", "sst2", "dev")
    return tmp_path / "task", rows


def _model_dir(root, labels, tokenizer, seed):
    (root / "model").mkdir(parents=True)
    model = _save_classifier(root / "model", labels, seed=seed)
    tokenizer.save_pretrained(root / "model")
    return model


def test_evaluate_scores_rows_and_refuses_a_swapped_teacher(tmp_path, sst2_dev, tokenizer, one_thread):
    from kd_core.config import PipelineConfig
    from kd_core.stages import glue as stages
    from kd_core.stages.common import StageIO

    task_dir, rows = sst2_dev
    cfg = PipelineConfig(task={"name": "sst2", "max_seq_length": 32})
    good = _model_dir(tmp_path / "good", ["negative", "positive"], tokenizer, seed=1)
    out = tmp_path / "eval"
    out.mkdir()
    stages.evaluate(cfg, StageIO({"teacher": tmp_path / "good", "task": task_dir}, out))
    metrics = pd.read_parquet(out / "metrics.parquet").set_index("model")
    # the same model, one unpadded sentence at a time: the batched, padded evaluation must agree
    with torch.no_grad():
        predicted = [
            int(good(**tokenizer(text, truncation=True, max_length=32, return_tensors="pt")).logits.argmax(-1))
            for text in rows["text_a"]
        ]
    expected = 100.0 * np.mean(np.array(predicted) == rows["label"].to_numpy())
    assert metrics.loc["teacher", "accuracy"] == pytest.approx(expected)
    assert metrics.loc["teacher", "score"] == pytest.approx(expected) and metrics.loc["teacher", "rows"] == 48

    # saved with ["positive", "negative"]: evaluation and task distillation refuse it, naming the dir
    _model_dir(tmp_path / "swapped", ["positive", "negative"], tokenizer, seed=1)
    with pytest.raises(LabelOrderError, match=r"swapped/model.*\['positive', 'negative'\].*\['negative', 'positive'\]"):
        stages.evaluate(cfg, StageIO({"teacher": tmp_path / "swapped", "task": task_dir}, tmp_path / "eval"))
    with pytest.raises(LabelOrderError):
        stages.load_classifier(tmp_path / "swapped" / "model", get_task("sst2"))
