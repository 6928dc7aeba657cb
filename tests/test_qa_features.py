"""QA features, post-processing, the dev-by-article split and the QA losses.

Windows are checked on real SQuAD v1.1 dev questions with the real tokenizer; window counts,
spans and losses against hand-worked values and NumPy re-implementations.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from kd_core.data.qa import (
    QAFeatures,
    SpanPrediction,
    build_features,
    postprocess_predictions,
    sample_questions,
    split_by_article,
)


@pytest.fixture(scope="module")
def dev(kd_data_dir):
    from kd_core.data.loaders import load_split

    return load_split("squad", kd_data_dir, "dev")


# ---- windows on real dev questions -------------------------------------------------------------
def test_answer_positions_map_back_to_the_answer_text_on_real_dev(dev, tokenizer):
    rows = dev.iloc[:300].reset_index(drop=True)
    features = build_features(rows, tokenizer, max_seq_length=128, doc_stride=32, max_query_length=32)
    assert len(features) > len(rows)  # long contexts really are cut into several windows
    aligned = straddling = outside = 0
    answered = set()
    for inputs, row, offsets in zip(features.inputs, features.example_index, features.offsets):
        context, answer = rows.context[row], rows.answers_text[row][0]
        start_char = int(rows.answers_start[row][0])
        end_char = start_char + len(answer)
        spans = [s for s in offsets if s is not None]
        start, end = inputs["labels"]
        if (start, end) == (0, 0):  # the CLS position: this window must not hold the whole answer
            assert not (spans[0][0] <= start_char and spans[-1][1] >= end_char)
            outside += 1
            continue
        answered.add(row)
        assert offsets[start] is not None and offsets[end] is not None and start <= end
        text = context[offsets[start][0] : offsets[end][1]]
        if start_char in {s[0] for s in spans} and end_char in {s[1] for s in spans}:
            assert text == answer  # the answer's boundaries are token boundaries: exactly the answer
            aligned += 1
        else:  # the answer starts or ends inside a word piece ("gold" in "golden"): the covering tokens
            assert offsets[start][0] <= start_char and offsets[end][1] >= end_char and answer in text
            straddling += 1
    assert aligned > 10 * straddling and outside > 0
    # the windows overlap by 32 tokens, more than any of these answers: each lies whole in some window
    assert answered == set(range(len(rows)))


def _single_token_words(tokenizer, count):
    words = [w for w in tokenizer.vocab if w.isascii() and w.isalpha() and len(w) >= 4]
    words = sorted(words)[:count]
    assert all(len(tokenizer.tokenize(w)) == 1 for w in words)
    return words


def test_window_count_and_labels_for_a_long_context_by_hand(tokenizer):
    words = _single_token_words(tokenizer, 100)
    context = " ".join(words)
    answer_start = sum(len(w) + 1 for w in words[:50])  # the 51st word
    frame = pd.DataFrame({
        "id": ["q"], "title": ["t"], "context": [context], "question": ["what?"],
        "answers_text": [[words[50]]], "answers_start": [[answer_start]], "is_impossible": [False],
    })
    assert tokenizer.tokenize("what?") == ["what", "?"]
    features = build_features(frame, tokenizer, max_seq_length=32, doc_stride=8, max_query_length=32)
    # room per window = 32 - 2 question tokens - 3 specials = 27 context tokens; consecutive
    # windows share 8, so they start every 27 - 8 = 19 tokens: 0, 19, 38, 57, 76.
    # windows = 1 + ceil((100 - 27) / 19) = 1 + 4 = 5; the last holds 100 - 76 = 24 tokens.
    assert len(features) == 5
    assert [sum(s is not None for s in o) for o in features.offsets] == [27, 27, 27, 27, 24]
    for first, second in zip(features.offsets, features.offsets[1:]):
        assert [s for s in first if s][-8:] == [s for s in second if s][:8]
    # word 50 is in window 3 only (tokens 38..64), at context position 12 -> token 1 + 2 + 1 + 12 = 16
    assert [f["labels"] for f in features.inputs] == [[0, 0], [0, 0], [16, 16], [0, 0], [0, 0]]
    # ... and every window of an unanswerable question points at CLS
    impossible = frame.assign(answers_text=[[]], answers_start=[[]], is_impossible=[True])
    assert all(f["labels"] == [0, 0] for f in build_features(impossible, tokenizer, 32, 8, 32).inputs)


def test_long_questions_are_cut_to_max_query_length(tokenizer):
    words = _single_token_words(tokenizer, 40)
    frame = pd.DataFrame({
        "id": ["q"], "title": ["t"], "context": ["short context here"], "question": ["  " + " ".join(words)],
        "answers_text": [["context"]], "answers_start": [[6]], "is_impossible": [False],
    })
    (features,) = build_features(frame, tokenizer, max_seq_length=64, doc_stride=8, max_query_length=10).inputs
    # [CLS] + 10 question tokens + [SEP] + 3 context tokens + [SEP]
    assert len(features["input_ids"]) == 16
    assert tokenizer.convert_ids_to_tokens(features["input_ids"][1:11]) == words[:10]


# ---- the split by article -----------------------------------------------------------------------
def test_split_by_article_is_disjoint_seeded_and_sized_by_fraction(dev):
    split = split_by_article(dev, eval_fraction=0.25, seed=3)
    assert len(split.train_titles) + len(split.eval_titles) == 48
    assert len(split.eval_titles) == 12  # 0.25 * 48
    assert not set(split.train_titles) & set(split.eval_titles)
    assert len(split.train) + len(split.eval) == len(dev) == 10570
    assert set(split.eval["title"]) == set(split.eval_titles)
    again = split_by_article(dev.sample(frac=1.0, random_state=0), eval_fraction=0.25, seed=3)
    assert again.eval_titles == split.eval_titles  # the file's row order does not matter
    assert split_by_article(dev, 0.25, seed=4).eval_titles != split.eval_titles
    small = split_by_article(dev, eval_fraction=0.5, seed=3, articles=5)
    # 0.5 * 5 = 2.5, rounded half up: 3 eval articles, 2 train articles
    assert (len(small.train_titles), len(small.eval_titles)) == (2, 3)
    with pytest.raises(ValueError, match="only 48 articles"):
        split_by_article(dev, 0.5, seed=3, articles=49)
    sample = sample_questions(split.eval, 50, seed=1)
    assert len(sample) == 50 and sample["id"].isin(split.eval["id"]).all()
    positions = split.eval.reset_index().set_index("id").loc[sample["id"], "index"].tolist()
    assert positions == sorted(positions)  # the original order is kept


# ---- post-processing ----------------------------------------------------------------------------
# Context "red fox jumps high" read through two windows of 7 tokens: [CLS] q [SEP] 3 words [SEP].
CONTEXT = "red fox jumps high"
RED, FOX, JUMPS, HIGH = (0, 3), (4, 7), (8, 13), (14, 18)
TOY_FEATURES = QAFeatures(
    inputs=[{"input_ids": [0] * 7}, {"input_ids": [0] * 7}],
    example_index=[0, 0],
    offsets=[[None, None, None, RED, FOX, JUMPS, None], [None, None, None, FOX, JUMPS, HIGH, None]],
)
TOY_FRAME = pd.DataFrame({"id": ["q"], "context": [CONTEXT]})
#                   CLS   q  SEP  w1   w2   w3  SEP
STARTS = [np.array([1.0, 0, 0, 2.0, 0.0, 0.0, 9.0]),  # window A: red, fox, jumps (SEP 9: not context)
          np.array([0.5, 0, 0, 1.0, 4.0, 0.0, 0.0])]  # window B: fox, jumps, high
ENDS = [np.array([1.0, 0, 0, 0.0, 3.0, 0.0, 0.0]),
        np.array([0.5, 0, 0, 0.0, 0.0, 2.0, 0.0])]


def _predict(**kwargs) -> SpanPrediction:
    return postprocess_predictions(TOY_FRAME, TOY_FEATURES, STARTS, ENDS, **kwargs)["q"]


def test_postprocess_picks_the_best_span_over_all_windows():
    best = _predict(n_best=20, max_answer_length=30)
    # window A: red..fox = 2 + 3 = 5; window B: jumps..high = 4 + 2 = 6 (the best), fox..high 1 + 2 = 3
    assert (best.text, best.score) == ("jumps high", 6.0)
    assert best.nbest[:3] == (("jumps high", 6.0), ("red fox", 5.0), ("jumps", 4.0))
    # null score: the smallest CLS start + end over the windows = min(1 + 1, 0.5 + 0.5) = 1
    assert best.null_score == 1.0 and best.na_score == 1.0 - 6.0
    assert best.answer() == "jumps high" and best.answer(no_answer_threshold=-6.0) == ""


def test_postprocess_respects_max_answer_length_and_n_best():
    # one-token answers only: A red 2+0, fox 0+3, jumps 0+0; B fox 1+0, jumps 4+0, high 0+2
    one = _predict(n_best=20, max_answer_length=1)
    assert (one.text, one.score) == ("jumps", 4.0)
    # n_best=1: A pairs only start red with end fox (5), B only jumps with high (6)
    assert _predict(n_best=1, max_answer_length=30).text == "jumps high"
    # ... and neither pair is one token long: no valid span, the answer is empty
    none = _predict(n_best=1, max_answer_length=1)
    assert none.text == "" and none.score == -math.inf and none.na_score == math.inf


# ---- losses ---------------------------------------------------------------------------------------
def _numpy_log_softmax(x):
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def _qa_batch(seed=0):
    rng = np.random.default_rng(seed)
    student = rng.normal(size=(3, 2, 7)) * 2
    teacher = rng.normal(size=(3, 2, 7)) * 2
    mask = np.ones((3, 7), dtype=np.int64)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    return student, teacher, mask


def test_qa_soft_cross_entropy_matches_numpy():
    from kd_core.losses import get_loss

    student, teacher, mask = _qa_batch()
    temperature = 2.0
    expected = []
    for b in range(3):
        valid = mask[b] == 1
        for row in range(2):  # start, end
            p = np.exp(_numpy_log_softmax(teacher[b, row, valid] / temperature))
            log_q = _numpy_log_softmax(student[b, row, valid] / temperature)
            expected.append(-(p * log_q).sum())
    # mean over the batch of (start + end) / 2 = mean over the 6 (example, row) terms
    loss = get_loss("qa_soft_cross_entropy").fn(
        torch.tensor(student), torch.tensor(teacher), attention_mask=torch.tensor(mask), temperature=temperature
    )
    assert loss.item() == pytest.approx(float(np.mean(expected)), rel=1e-6)
    # logits at padded positions do not matter
    noisy = student.copy()
    noisy[2, :, 3:] = 100.0
    again = get_loss("qa_soft_cross_entropy").fn(
        torch.tensor(noisy), torch.tensor(teacher), attention_mask=torch.tensor(mask), temperature=temperature
    )
    assert again.item() == pytest.approx(loss.item(), rel=1e-6)


def test_qa_hard_cross_entropy_matches_numpy():
    from kd_core.losses import get_loss

    student, _, mask = _qa_batch(1)
    positions = np.array([[2, 4], [0, 4], [1, 1]])
    expected = [
        -_numpy_log_softmax(student[b, row, mask[b] == 1])[positions[b, row]] for b in range(3) for row in range(2)
    ]
    spec = get_loss("qa_hard_cross_entropy")
    assert spec.uses_labels
    loss = spec.fn(torch.tensor(student), torch.tensor(positions), attention_mask=torch.tensor(mask))
    assert loss.item() == pytest.approx(float(np.mean(expected)), rel=1e-6)
    with pytest.raises(ValueError, match="positions must lie in 0..6"):
        spec.fn(torch.tensor(student), torch.tensor([[0, 7], [0, 0], [0, 0]]))


def test_qa_logits_feature_and_recipes_drive_the_objective():
    from transformers import BertConfig, BertForQuestionAnswering

    from kd_core.config import LayerMapping
    from kd_core.losses.qa import qa_hard_cross_entropy, qa_soft_cross_entropy
    from kd_core.models.adaptors import ModelAdaptor
    from kd_core.train.objective import ModelShape, Objective, expand_recipe

    def qa_model(seed, layers, hidden):
        torch.manual_seed(seed)
        config = BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                            intermediate_size=2 * hidden, max_position_embeddings=32)
        return BertForQuestionAnswering(config).eval()

    teacher, student = qa_model(0, 2, 16), qa_model(1, 1, 8)
    ids = torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    s_out, t_out = ModelAdaptor(student)(ids, mask), ModelAdaptor(teacher)(ids, mask)
    raw = student(input_ids=ids, attention_mask=mask)
    assert torch.equal(s_out.feature("qa_logits"), torch.stack((raw.start_logits, raw.end_logits), dim=1))

    specs = expand_recipe("qa_prediction", LayerMapping(), 1, 2, params={"temperature": 3.0, "hard_weight": 0.5})
    assert [(s.feature, s.loss, s.weight) for s in specs] == [
        ("qa_logits", "qa_soft_cross_entropy", 1.0), ("qa_logits", "qa_hard_cross_entropy", 0.5)]
    objective = Objective(specs, ModelShape(1, 8, 2), ModelShape(2, 16, 2))
    labels = torch.tensor([[3, 4], [1, 2]])
    total, terms = objective(s_out, t_out, labels)
    soft = qa_soft_cross_entropy(s_out.feature("qa_logits"), t_out.feature("qa_logits"), mask, temperature=3.0)
    hard = qa_hard_cross_entropy(s_out.feature("qa_logits"), labels, mask)
    assert total.item() == pytest.approx((soft + 0.5 * hard).item(), rel=1e-6)
    assert set(terms) == {"qa_logits:qa_soft_cross_entropy", "qa_logits:qa_hard_cross_entropy"}

    (finetune,) = expand_recipe("qa_finetune", LayerMapping(), 2, 2)
    teacher_only = Objective([finetune], ModelShape(2, 16, 2), None)
    assert teacher_only.needs_labels and not teacher_only.needs_teacher
