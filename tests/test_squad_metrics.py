"""SQuAD exact match, F1, the official normalisation and the v2.0 no-answer threshold, against
values worked out by hand."""

from __future__ import annotations

import pytest

from kd_core.evaluate.squad import (
    apply_no_answer_threshold,
    exact_match,
    f1,
    find_best_threshold,
    gold_answers,
    normalize_answer,
    raw_scores,
    squad_metrics,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Cat!", "cat"),
        ("an apple a day", "apple day"),
        ("  Hello,   World.  ", "hello world"),
        ("theatre and Anthem", "theatre and anthem"),  # articles only as whole words
        ("A-B", "ab"),  # punctuation is removed, not replaced by a space
        ("the the THE", ""),
        ("Denver\tBroncos\n", "denver broncos"),
        ("1,000 (approx.)", "1000 approx"),
    ],
)
def test_normalisation_matches_the_official_rules(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_compares_normalised_answers():
    assert exact_match("the Denver Broncos.", "Denver Broncos") == 1
    assert exact_match("Broncos", "Denver Broncos") == 0


def test_f1_token_overlap_by_hand():
    # gold "the cat sat on the mat" -> [cat, sat, on, mat] (4 tokens)
    # pred "cat on mat"             -> [cat, on, mat]      (3 tokens)
    # common = 3; precision = 3/3 = 1; recall = 3/4; F1 = 2*1*0.75/(1+0.75) = 1.5/1.75 = 6/7
    assert f1("cat on mat", "the cat sat on the mat") == pytest.approx(6 / 7)
    # bag semantics: pred "cat cat" -> [cat, cat]; gold [cat, dog]; common = min(2, 1) = 1
    # precision 1/2, recall 1/2, F1 = 0.5
    assert f1("cat cat", "cat dog") == pytest.approx(0.5)
    assert f1("dog", "cat") == 0.0
    # v2.0's empty-answer rule: both empty agree, one empty scores 0
    assert f1("", "") == 1.0 and f1("", "cat") == 0.0 and f1("the", "") == 1.0


def test_dataset_scores_take_the_max_over_gold_answers():
    golds = {
        "q1": ["Denver Broncos", "the Broncos"],
        "q2": ["Santa Clara, California", "Levi's Stadium"],
        "q3": ["gold"],
    }
    predictions = {"q1": "Broncos", "q2": "Santa Clara", "q3": "silver"}
    exact, f1s = raw_scores(golds, predictions)
    # q1: "Broncos" == normalise("the Broncos") -> EM 1, F1 1
    # q2: vs "Santa Clara, California": pred [santa, clara], gold [santa, clara, california]
    #     common 2, P = 1, R = 2/3, F1 = 2*(2/3)/(5/3) = 0.8; vs "Levi's Stadium": 0 -> max 0.8
    # q3: 0
    assert exact == {"q1": 1, "q2": 0, "q3": 0}
    assert f1s == pytest.approx({"q1": 1.0, "q2": 0.8, "q3": 0.0})
    metrics = squad_metrics(golds, predictions)
    assert metrics["exact_match"] == pytest.approx(100 / 3)
    assert metrics["f1"] == pytest.approx(100 * 1.8 / 3)
    assert metrics["has_ans_total"] == 3 and metrics["no_ans_total"] == 0
    with pytest.raises(ValueError, match="no prediction"):
        squad_metrics(golds, {"q1": "x"})


def test_unanswerable_gold_is_the_empty_answer():
    assert gold_answers([]) == [""]
    assert gold_answers(["the", "Paris"]) == ["Paris"]  # "the" normalises to nothing


# A toy SQuAD v2.0 set. na = null score - best span score (higher: more likely unanswerable).
TOY_GOLDS = {"q1": ["blue"], "q2": ["red car"], "q3": [], "q4": [], "q5": ["dog"]}
TOY_SPANS = {"q1": "blue", "q2": "car", "q3": "green", "q4": "tree", "q5": "cat"}
TOY_NA = {"q1": -3.0, "q2": -1.0, "q3": 0.5, "q4": 2.0, "q5": 1.5}


def test_best_threshold_on_a_toy_set_by_hand():
    exact, f1s = raw_scores(TOY_GOLDS, TOY_SPANS)
    has = {q: bool(TOY_GOLDS[q]) for q in TOY_GOLDS}
    # raw: q1 EM 1 F1 1; q2 EM 0, F1: [car] vs [red, car] -> P 1, R 1/2, F1 2/3; q5 0 / 0
    assert f1s["q2"] == pytest.approx(2 / 3)
    # Walk by increasing na, starting from "all empty" = 2 points (q3, q4 unanswerable):
    #   EM:  q1(-3) +1 -> 3 (best, thr -3); q2(-1) +0 -> 3; q3(0.5) -1 -> 2; q5(1.5) +0 -> 2; q4(2) -1 -> 1
    #   F1:  q1 +1 -> 3 (thr -3); q2 +2/3 -> 11/3 (best, thr -1); q3 -1; q5 +0; q4 -1
    assert find_best_threshold(TOY_SPANS, exact, TOY_NA, has) == pytest.approx((100 * 3 / 5, -3.0))
    assert find_best_threshold(TOY_SPANS, f1s, TOY_NA, has) == pytest.approx((100 * (11 / 3) / 5, -1.0))


def test_v2_metrics_at_a_threshold_with_has_ans_and_no_ans_breakdown():
    metrics = squad_metrics(TOY_GOLDS, TOY_SPANS, TOY_NA, threshold=0.0)
    # na > 0 -> answered "": q3 (no answer: 1), q4 (1), q5 (has one: 0); q1, q2 keep their spans
    # EM = (1 + 0 + 1 + 1 + 0)/5 = 60%; F1 = (1 + 2/3 + 1 + 1 + 0)/5 = 73.33%
    assert metrics["exact_match"] == pytest.approx(60.0)
    assert metrics["f1"] == pytest.approx(100 * (11 / 3) / 5)
    # has answer q1, q2, q5: EM 1/3, F1 (1 + 2/3 + 0)/3 = 5/9; no answer q3, q4: both right
    assert metrics["has_ans_exact"] == pytest.approx(100 / 3)
    assert metrics["has_ans_f1"] == pytest.approx(100 * 5 / 9)
    assert (metrics["has_ans_total"], metrics["no_ans_total"]) == (3, 2)
    assert metrics["no_ans_exact"] == metrics["no_ans_f1"] == 100.0
    assert metrics["best_f1"] == pytest.approx(100 * (11 / 3) / 5) and metrics["best_f1_thresh"] == -1.0
    assert metrics["best_exact"] == pytest.approx(60.0) and metrics["best_exact_thresh"] == -3.0
    # a threshold above every na answers everything: q3 and q4 lose their points
    high = squad_metrics(TOY_GOLDS, TOY_SPANS, TOY_NA, threshold=10.0)
    assert high["exact_match"] == pytest.approx(20.0) and high["no_ans_exact"] == 0.0


def test_apply_threshold_scores_empty_answers_by_answerability():
    scores = {"a": 0.5, "b": 0.0}
    out = apply_no_answer_threshold(scores, {"a": 1.0, "b": 1.0}, {"a": True, "b": False}, threshold=0.0)
    assert out == {"a": 0.0, "b": 1.0}


def test_best_threshold_reproduces_its_score_when_nothing_beats_answering_nothing():
    golds = {"a": ["x"], "b": [], "c": []}
    spans = {"a": "y", "b": "z", "c": "w"}  # the only answerable question is wrong
    na = {"a": -2.0, "b": 1.0, "c": 1.0}
    metrics = squad_metrics(golds, spans, na, threshold=0.0)
    # walk from 2 points (b, c empty): a +0 -> 2, b and c (tied at 1.0) -1 each -> 0: never above 2
    assert metrics["best_exact"] == pytest.approx(200 / 3) and metrics["best_exact_thresh"] == -float("inf")
    # at -inf every question is answered "": b and c right, a wrong -> the same 2/3
    assert squad_metrics(golds, spans, na, threshold=-float("inf"))["exact_match"] == pytest.approx(200 / 3)
    # tied na_scores move together: start 1 (b empty); a (right, +1) and b (a span on an
    # unanswerable question, -1) share na 0.5, so the total goes 1 -> 1, never above the start
    tied = {"a": ["x"], "b": []}
    exact, _ = raw_scores(tied, {"a": "x", "b": "z"})
    assert find_best_threshold({"a": "x", "b": "z"}, exact, {"a": 0.5, "b": 0.5}, {"a": True, "b": False}) == (50.0, -float("inf"))
