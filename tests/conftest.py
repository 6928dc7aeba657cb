"""Shared fixtures: tiny models built from a config, the real tokenizer, real text."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    path = Path(os.environ.get("KD_DATA_DIR", REPO.parent / "shared" / "data"))
    if not (path / "wikipedia_sample").is_dir():
        raise RuntimeError(f"real data not found at {path}; set KD_DATA_DIR to the shared data folder")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine every
    parallel region of a 2-thread forward waits for a descheduled thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_mlm(tokenizer):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512,
    )
    return BertForMaskedLM(config).eval()


@pytest.fixture(scope="session")
def kd_data_dir() -> Path:
    return data_dir()


@pytest.fixture(scope="session")
def tokenizer():
    from kd_core.models.registry import load_tokenizer

    return load_tokenizer("minilm-l6")


def tiny_bert(layers=4, hidden=64, heads=4, intermediate=128, vocab=30522, seed=0, head=None, dropout=0.0, **extra):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=128,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        **extra,
    )
    torch.manual_seed(seed)
    cls = BertForSequenceClassification if head == "sequence_classification" else BertModel
    return cls(config).eval()


@pytest.fixture(scope="session")
def wiki_blocks(tokenizer, kd_data_dir):
    """64 real Wikipedia token blocks of exactly 32 ids."""
    from kd_core.data.corpus import iter_documents, pack_token_blocks

    blocks = pack_token_blocks(tokenizer, iter_documents(kd_data_dir / "wikipedia_sample" / "AA" / "wiki_00"), 32, 400)
    full = [b for b in blocks if len(b["input_ids"]) == 32]
    assert len(full) >= 64
    return full[:64]
