"""Sentence splitting, sentence-packed blocks and the streaming Parquet corpus."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from kd_core.data import corpus as corpus_mod
from kd_core.data.corpus import (
    CorpusError,
    iter_corpus_blocks,
    iter_documents,
    iter_sentence_documents,
    iter_sentences,
    load_corpus_blocks,
    pack_sentence_blocks,
    pack_sentence_stream,
    prepare_corpus,
    read_corpus_manifest,
    split_sentences,
)


def test_split_sentences():
    assert split_sentences("It rained. Then it stopped! Did it? Yes.") == ["It rained.", "Then it stopped!", "Did it?", "Yes."]
    assert split_sentences("Dr. Watson met Mr. J. R. Smith in the U.S. Army. He left.") == [
        "Dr. Watson met Mr. J. R. Smith in the U.S. Army.",
        "He left.",
    ]
    assert split_sentences('He said "Stop." Then he left. It cost $3.50 in 1999. Prices rose.') == [
        'He said "Stop."', "Then he left.", "It cost $3.50 in 1999.", "Prices rose."
    ]
    assert split_sentences("no capital. so no split") == ["no capital. so no split"]
    assert split_sentences("   ") == []


def test_sentence_documents_of_wikiextractor_text(tmp_path):
    (tmp_path / "wiki_00").write_text(
        '<doc id="1" url="u" title="A">\nA\n\nFirst one. Second one.\nThird one.\n</doc>\n'
        '<doc id="2" url="u" title="B">\nB\n\nOnly one here.\n</doc>\n'
    )
    docs = [["First one.", "Second one.", "Third one."], ["Only one here."]]
    assert list(iter_sentence_documents(tmp_path)) == docs
    assert list(iter_sentences(tmp_path)) == [(0, "First one."), (0, "Second one."), (0, "Third one."), (1, "Only one here.")]
    seen = []
    list(iter_documents(tmp_path, progress=seen.append))
    assert sum(seen) == (tmp_path / "wiki_00").stat().st_size


def test_blocks_pack_whole_sentences_and_never_cross_documents(tokenizer):
    # "w1 w2 w3 w4 w5." is 6 word pieces for a BERT-uncased vocab ("aa".."ee" are single pieces);
    # with max_seq_length 16 (14 for text) two such sentences fit a block, a third does not.
    assert len(tokenizer("aa bb cc dd ee.", add_special_tokens=False)["input_ids"]) == 6
    sentence = "aa bb cc dd ee."
    docs = [[sentence] * 5, [sentence] * 2, ["aa."]]
    blocks = list(pack_sentence_blocks(tokenizer, docs, 16, min_tokens=2))
    assert [b["doc_id"] for b in blocks] == [0, 0, 0, 1, 2]
    assert [len(b["input_ids"]) for b in blocks] == [14, 14, 8, 14, 4]
    for block in blocks:
        ids = block["input_ids"]
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.decode(blocks[0]["input_ids"][1:-1]) == "aa bb cc dd ee. aa bb cc dd ee."
    # the default min_tokens=8 drops the 6-token tail of document 0 and the 2-token document 2
    assert [b["doc_id"] for b in pack_sentence_blocks(tokenizer, docs, 16)] == [0, 0, 1]
    # a sentence longer than a block fills blocks and its rest carries on
    long = " ".join(["aa"] * 30) + "."
    blocks = list(pack_sentence_blocks(tokenizer, [["bb cc.", long]], 16, min_tokens=1))
    assert [len(b["input_ids"]) for b in blocks] == [16, 16, 8]
    assert sum(len(b["input_ids"]) - 2 for b in blocks) == 3 + 31
    assert len(list(pack_sentence_blocks(tokenizer, docs, 16, max_blocks=2))) == 2
    with pytest.raises(CorpusError, match="too small"):
        pack_sentence_blocks(tokenizer, docs, 4)


def test_one_huge_document_is_tokenised_in_chunks(tokenizer):
    calls = []

    class Spy:
        cls_token_id, sep_token_id = tokenizer.cls_token_id, tokenizer.sep_token_id

        def __call__(self, texts, **kwargs):
            calls.append(len(texts))
            return tokenizer(texts, **kwargs)

    stream = ((0, f"Sentence number {i} is here.") for i in range(1000))
    blocks = list(pack_sentence_stream(Spy(), stream, 64, chunk_sentences=128))
    assert calls == [128] * 7 + [1000 - 7 * 128]
    assert {b["doc_id"] for b in blocks} == {0}


def test_prepare_corpus_on_real_wikipedia(tokenizer, kd_data_dir, tmp_path):
    source = kd_data_dir / "wikipedia_sample" / "AA" / "wiki_00"
    out = tmp_path / "corpus"
    manifest = prepare_corpus(source, tokenizer, out, max_seq_length=64, shard_rows=1000, progress=False)
    assert manifest == read_corpus_manifest(out)
    doc_lines = sum(1 for line in source.read_text().splitlines() if line.startswith("<doc "))
    assert manifest["num_documents"] == doc_lines == 38
    shards = sorted(p.name for p in out.glob("shard-*.parquet"))
    assert shards == [s["file"] for s in manifest["shards"]]
    assert [s["rows"] for s in manifest["shards"]][:-1] == [1000] * (len(shards) - 1)
    assert sum(s["rows"] for s in manifest["shards"]) == manifest["num_blocks"]
    schema = pq.read_schema(out / shards[0])
    assert str(schema.field("input_ids").type) in ("list<element: int32>", "list<item: int32>")
    blocks = load_corpus_blocks(out)
    expected = list(pack_sentence_blocks(tokenizer, iter_sentence_documents(source), 64))
    assert blocks == expected
    assert manifest["num_tokens"] == sum(len(b["input_ids"]) for b in blocks)
    assert all(len(b["input_ids"]) <= 64 for b in blocks) and blocks[-1]["doc_id"] == 37
    assert "<doc" not in tokenizer.decode(blocks[0]["input_ids"])
    assert tokenizer.decode(blocks[0]["input_ids"][1:-1]).startswith("anarchism is a political philosophy")
    assert load_corpus_blocks(out, limit=3) == expected[:3]
    # the blocks feed the trainer's batching as they are
    from kd_core.train.data import pad_batch

    batch = pad_batch(blocks[:4], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (4, max(len(b["input_ids"]) for b in blocks[:4]))
    # the same input gives the same fingerprint; max_blocks stops early
    again = prepare_corpus(source, tokenizer, tmp_path / "again", max_seq_length=64, shard_rows=300, progress=False)
    assert again["fingerprint"] == manifest["fingerprint"]
    small = prepare_corpus(source, tokenizer, tmp_path / "small", 64, max_blocks=10, progress=False)
    assert small["num_blocks"] == 10 and load_corpus_blocks(tmp_path / "small") == expected[:10]


def test_prepare_corpus_is_all_or_nothing(tokenizer, kd_data_dir, tmp_path, monkeypatch):
    source = kd_data_dir / "wikipedia_sample" / "AA" / "wiki_00"
    out = tmp_path / "corpus"
    flush = corpus_mod._ShardWriter.flush

    def crash_on_third(self):
        if len(self.shards) == 2:
            raise RuntimeError("killed")
        flush(self)

    monkeypatch.setattr(corpus_mod._ShardWriter, "flush", crash_on_third)
    with pytest.raises(RuntimeError, match="killed"):
        prepare_corpus(source, tokenizer, out, 64, shard_rows=200, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(CorpusError, match="does not exist"):
        list(iter_corpus_blocks(out))
    out.mkdir()
    (out / "shard-00000.parquet").write_bytes(b"half")
    with pytest.raises(CorpusError, match="no manifest.json: not a prepared corpus, or its preparation did not finish"):
        load_corpus_blocks(out)
    monkeypatch.setattr(corpus_mod._ShardWriter, "flush", flush)
    with pytest.raises(CorpusError, match="exists; pass overwrite=True"):
        prepare_corpus(source, tokenizer, out, 64, progress=False)
    manifest = prepare_corpus(source, tokenizer, out, 64, max_blocks=5, overwrite=True, progress=False)
    assert manifest["num_blocks"] == 5 and len(load_corpus_blocks(out)) == 5
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(CorpusError, match="no token blocks"):
        prepare_corpus(tmp_path / "empty.txt", tokenizer, tmp_path / "none", 64, progress=False)
    assert not (tmp_path / "none").exists()

