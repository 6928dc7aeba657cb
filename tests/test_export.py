"""kd_core.export: the ONNX and ONNX int8 forms of a student, checked against eager outputs that
the tests compute themselves (tiny models built from a config, real GLUE rows)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_bert

pytest.importorskip("onnxruntime", reason="the export needs the bench extra: pip install -e '.[bench]'")


@pytest.fixture(scope="module")
def mrpc_examples(tokenizer, kd_data_dir):
    """60 real MRPC dev pairs: sentence pairs, so segment ids matter."""
    from kd_core.data.features import encode_examples
    from kd_core.data.loaders import load_split
    from kd_core.data.tasks import get_task

    rows = load_split(get_task("mrpc"), kd_data_dir, "dev").head(60)
    return encode_examples(rows, tokenizer, 48)


@pytest.fixture(scope="module")
def pair_model():
    """A tiny classifier with weights wide enough that its logits differ from row to row, and a
    large segment embedding, so a graph that dropped token_type_ids would give other logits."""
    model = tiny_bert(layers=2, hidden=32, heads=2, intermediate=64, head="sequence_classification", num_labels=2, seed=3,
                      initializer_range=0.2)
    with torch.no_grad():
        model.bert.embeddings.token_type_embeddings.weight.normal_(0, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def exported(pair_model, tokenizer, mrpc_examples, tmp_path_factory, one_thread):
    from kd_core.export import TimingCell, export_forms

    out = tmp_path_factory.mktemp("export")
    labels = np.asarray([ex["labels"] for ex in mrpc_examples])
    frame = export_forms(pair_model, tokenizer, out, mrpc_examples, False, out,
                         cell=TimingCell(batch_size=4, seq_len=16, repeats=2, threads=1),
                         score=lambda logits: 100.0 * float(np.mean(logits.argmax(-1) == labels)))
    return frame.set_index("form"), out


def _eager_logits(model, examples):
    """Each row on its own, unpadded: independent of the export's batching."""
    with torch.no_grad():
        return np.stack([model(**{k: torch.tensor([ex[k]]) for k in ("input_ids", "token_type_ids")},
                               attention_mask=torch.ones(1, len(ex["input_ids"]), dtype=torch.long)).logits[0].numpy()
                         for ex in examples])


def _onnx_logits(path, examples):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rows = []
    for ex in examples:
        ids = np.asarray([ex["input_ids"]], dtype=np.int64)
        rows.append(session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                             "token_type_ids": np.asarray([ex["token_type_ids"]], dtype=np.int64)})[0][0])
    return np.stack(rows)


def _padded_onnx_logits(path, examples, pad_id=0):
    """All rows as one batch padded to the longest: int8 activations are quantised per batch, so
    its logits depend on the batch they ran in."""
    import onnxruntime as ort

    longest = max(len(ex["input_ids"]) for ex in examples)
    feed = {name: np.zeros((len(examples), longest), dtype=np.int64) for name in ("input_ids", "attention_mask", "token_type_ids")}
    feed["input_ids"][:] = pad_id
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        feed["input_ids"][row, :n] = ex["input_ids"]
        feed["attention_mask"][row, :n] = 1
        feed["token_type_ids"][row, :n] = ex["token_type_ids"]
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], feed)[0]


def test_parity_is_the_largest_logit_difference_and_the_share_of_agreeing_labels():
    from kd_core.export import parity

    reference = np.array([[1.0, 2.0], [3.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
    logits = np.array([[1.5, 1.0], [3.0, 0.2], [0.0, 1.25], [2.0, 1.0]])
    # row 0 flips (argmax 1 -> 0) with |1.0 - 2.0| = 1.0, the largest difference; 3 of 4 agree
    assert parity(reference, logits, is_regression=False) == {"max_abs_logit_diff": 1.0, "label_agreement": 0.75}
    # regression: the share of scores within 0.1 of the reference
    scores = parity(np.array([[1.0], [2.0], [3.0]]), np.array([[1.05], [2.5], [3.0]]), is_regression=True)
    assert scores == {"max_abs_logit_diff": 0.5, "label_agreement": pytest.approx(2 / 3)}


def test_the_onnx_graph_computes_the_eager_logits_with_segment_ids_at_every_length(exported, pair_model, mrpc_examples):
    frame, out = exported
    eager = _eager_logits(pair_model, mrpc_examples)
    onnx = _onnx_logits(out / "onnx" / "model.onnx", mrpc_examples)
    # traced at 2x16, run here one row at a time at each pair's own length (up to 48)
    assert len({len(ex["input_ids"]) for ex in mrpc_examples}) > 10
    assert np.abs(onnx - eager).max() < 1e-4
    # without the segment ids the logits move: the graph really takes them
    no_types = _onnx_logits(out / "onnx" / "model.onnx", [{**ex, "token_type_ids": [0] * len(ex["input_ids"])}
                                                         for ex in mrpc_examples])
    assert np.abs(no_types - eager).max() > 0.1
    # the recorded parity is that of the graph on disk, batched and padded as evaluation pads
    assert frame.loc["onnx", "max_abs_logit_diff"] == pytest.approx(np.abs(onnx - eager).max(), abs=1e-4)
    assert frame.loc["onnx", "label_agreement"] == 1.0


def test_the_int8_form_is_smaller_and_its_recorded_parity_is_its_own(exported, pair_model, mrpc_examples):
    frame, out = exported
    eager = _eager_logits(pair_model, mrpc_examples)
    int8 = _padded_onnx_logits(out / "onnx_int8" / "model.onnx", mrpc_examples)  # 60 rows: one batch of 64
    assert (out / "onnx_int8" / "model.onnx").stat().st_size < 0.5 * (out / "onnx" / "model.onnx").stat().st_size
    diff = np.abs(int8 - eager).max()
    assert 1e-6 < diff < 0.5  # quantised: close, not equal
    assert frame.loc["onnx_int8", "max_abs_logit_diff"] == pytest.approx(diff, rel=0.05, abs=1e-4)
    agreement = float(np.mean(int8.argmax(-1) == eager.argmax(-1)))
    assert frame.loc["onnx_int8", "label_agreement"] == pytest.approx(agreement, abs=1 / len(mrpc_examples))
    labels = np.asarray([ex["labels"] for ex in mrpc_examples])
    assert frame.loc["eager", "score"] == pytest.approx(100.0 * np.mean(eager.argmax(-1) == labels))


def test_each_form_is_servable_on_its_own_and_timed_beside_eager(exported):
    from transformers import AutoConfig, AutoTokenizer

    frame, out = exported
    for form in ("onnx", "onnx_int8"):
        assert AutoTokenizer.from_pretrained(out / form)("a b")["input_ids"][0] == 101
        assert AutoConfig.from_pretrained(out / form).num_labels == 2
    assert list(frame.index) == ["eager", "onnx", "onnx_int8"]
    assert (frame["seq_per_s"] > 0).all()
    speedup = frame["seq_per_s"] / frame.loc["eager", "seq_per_s"]
    assert np.allclose(frame["speedup_vs_eager"], speedup)
    assert np.allclose(frame["seq_per_s"], 4 / (frame["latency_p50_ms"] / 1000.0))


def test_a_graph_that_is_not_the_model_fails_the_export(pair_model, tokenizer, mrpc_examples, tmp_path, monkeypatch):
    import kd_core.export as export

    other = tiny_bert(layers=2, hidden=32, heads=2, intermediate=64, head="sequence_classification", num_labels=2, seed=9)
    real_export = export.export_onnx
    monkeypatch.setattr(export, "export_onnx", lambda model, names, path: real_export(other, names, path))
    with pytest.raises(export.ExportError, match="differs from eager"):
        export.export_forms(pair_model, tokenizer, tmp_path, mrpc_examples[:8], False, tmp_path, forms=["onnx"],
                            cell=export.TimingCell(batch_size=2, seq_len=8, repeats=1))


def test_the_graph_takes_segment_ids_only_where_model_and_tokenizer_use_them(tokenizer):
    from types import SimpleNamespace

    from kd_core.export import model_input_names

    bert = tiny_bert(layers=1, hidden=16, heads=2, intermediate=32)
    assert model_input_names(bert, tokenizer) == ["input_ids", "attention_mask", "token_type_ids"]
    # MPNet: no type embedding; RoBERTa: a tokenizer that never writes them
    mpnet = SimpleNamespace(config=SimpleNamespace())
    assert model_input_names(mpnet, tokenizer) == ["input_ids", "attention_mask"]
    roberta_tokenizer = SimpleNamespace(model_input_names=["input_ids", "attention_mask"])
    assert model_input_names(bert, roberta_tokenizer) == ["input_ids", "attention_mask"]
