"""nlpaug as an alternative backend, with the transformers-5 tokenizer shim (DESIGN.md)."""

from __future__ import annotations

import pandas as pd
import pytest

from kd_core.augment import AugmentConfig, AugmentError, load_word_vectors, make_augmenter

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def rows(kd_data_dir) -> pd.DataFrame:
    from kd_core.data.loaders import load_split

    return load_split("sst2", kd_data_dir, "train").iloc[:8]


def test_shim_adds_the_converters_transformers_5_dropped(tokenizer):
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    from kd_core.augment.nlpaug_backend import install_transformers_shim

    install_transformers_shim()
    assert hasattr(PreTrainedTokenizerBase, "_convert_token_to_id")
    assert tokenizer._convert_token_to_id("movie") == tokenizer.convert_tokens_to_ids("movie") != tokenizer.unk_token_id
    assert tokenizer._convert_id_to_token(tokenizer.convert_tokens_to_ids("movie")) == "movie"
    assert install_transformers_shim() is False  # idempotent


def _check_frame(out: pd.DataFrame, rows: pd.DataFrame, n_aug: int) -> None:
    assert list(out.columns) == ["idx", "text_a", "text_b", "label", "source_idx", "aug_id"]
    assert len(out) == len(rows) * (n_aug + 1)
    source = rows.set_index("idx")
    assert (out["label"].to_numpy() == source.loc[out["source_idx"], "label"].to_numpy()).all()
    copies = out[out["aug_id"] > 0]
    assert (copies["text_a"].to_numpy() != source.loc[copies["source_idx"], "text_a"].to_numpy()).mean() > 0.5


def test_contextual_backend_runs_with_the_shim_and_is_seeded(tiny_mlm, tokenizer, rows):
    config = AugmentConfig(n_aug=2, k=5, seed=1)
    aug = make_augmenter("nlpaug", mlm=(tiny_mlm, tokenizer), config=config, nlpaug_method="contextual")
    assert type(aug.aug).__name__ == "ContextualWordEmbsAug"
    out = aug.augment_frame(rows)
    _check_frame(out, rows, 2)
    assert aug.metadata()["mode"] == "nlpaug-contextual" and aug.metadata()["backend"] == "nlpaug"
    again = aug.augment_frame(rows)
    pd.testing.assert_frame_equal(out, again)
    aug.close()


def test_embedding_backend_uses_our_vectors(rows):
    vectors = load_word_vectors(None).head(50_000)
    aug = make_augmenter("nlpaug", vectors=vectors, config=AugmentConfig(n_aug=2, k=5), nlpaug_method="embedding")
    out = aug.augment_frame(rows)
    _check_frame(out, rows, 2)
    assert aug.metadata()["vectors"]["words"] == 50_000


def test_synonym_backend_explains_what_it_needs():
    try:
        import nltk  # noqa: F401
    except ImportError:
        with pytest.raises(AugmentError, match="nltk"):
            make_augmenter("nlpaug", config=AugmentConfig(n_aug=1), nlpaug_method="synonym")
    else:  # pragma: no cover - nltk is not part of the stack
        pytest.skip("nltk is installed; the WordNet path is nlpaug's own")


def test_unknown_backend_and_method():
    with pytest.raises(AugmentError, match="backend"):
        make_augmenter("textattack")
    with pytest.raises(AugmentError, match="method"):
        make_augmenter("nlpaug", nlpaug_method="backtranslation")
