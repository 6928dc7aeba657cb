"""nlpaug as an alternative augmentation backend (and the speed baseline).

Methods, each one of nlpaug's word augmenters in ``substitute`` mode:

``contextual``  ``ContextualWordEmbsAug``: one masked-LM call per replaced word, sequentially.
``embedding``   ``WordEmbsAug`` with our word vectors (GloVe by default), via gensim queries.
``synonym``     ``SynonymAug`` (WordNet, or a PPDB file): needs ``nltk`` and its corpora.

nlpaug's semantics differ from TinyBERT's Algorithm 1: it replaces ``round(aug_p x #tokens)``
randomly chosen tokens per copy (not each word independently with probability p_t), over its
own tokenisation. The output schema and provenance columns are the same as ours.

transformers 5 dropped ``PreTrainedTokenizerBase._convert_token_to_id`` (and, outside the
tokenizers backend, ``_convert_id_to_token``), which nlpaug 1.1.11's language models call;
``install_transformers_shim`` adds both, delegating to the public conversion methods.
"""

from __future__ import annotations

import logging
import random
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kd_core.augment.mlm import MaskedLM, quiet_transformers
from kd_core.augment.tinybert import AugmentConfig, AugmentError, Stats
from kd_core.augment.vectors import WordVectors, load_word_vectors
from kd_core.augment.words import STOP_WORDS

logger = logging.getLogger("kd_core.augment")

METHODS = ("contextual", "embedding", "synonym")
_NLPAUG_MODEL_TYPES = {"bert": "bert", "distilbert": "distilbert", "roberta": "roberta", "xlm-roberta": "roberta", "bart": "bart"}


def install_transformers_shim() -> bool:
    """Give ``PreTrainedTokenizerBase`` the private converters nlpaug calls; True if it patched.

    Idempotent. Subclasses that define their own (the SentencePiece backend) keep theirs.
    """
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    patched = False
    if not hasattr(PreTrainedTokenizerBase, "_convert_token_to_id"):

        def _convert_token_to_id(self, token):
            return self.convert_tokens_to_ids(token)

        PreTrainedTokenizerBase._convert_token_to_id = _convert_token_to_id
        patched = True
    if not hasattr(PreTrainedTokenizerBase, "_convert_id_to_token"):

        def _convert_id_to_token(self, index):
            return self.convert_ids_to_tokens(int(index))

        PreTrainedTokenizerBase._convert_id_to_token = _convert_id_to_token
        patched = True
    return patched


def _seed_all(*parts: int) -> None:
    import torch

    seed = int(np.random.SeedSequence([p % (1 << 63) for p in parts]).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class NlpaugAugmenter:
    """Same interface as ``TinyBertAugmenter`` (``augment``, ``augment_frame``, ``metadata``)."""

    backend = "nlpaug"

    def __init__(
        self,
        method: str = "contextual",
        mlm: MaskedLM | tuple | str | Path | None = None,
        vectors: WordVectors | str | Path | None = None,
        config: AugmentConfig | None = None,
        *,
        device: str = "cpu",
        synonym_source: str = "wordnet",
        ppdb_path: str | Path | None = None,
        vectors_format: str = "auto",
    ):
        if method not in METHODS:
            raise AugmentError(f"unknown nlpaug method {method!r}; choose one of {', '.join(METHODS)}")
        self.method = method
        self.config = config or AugmentConfig()
        self.device = device
        self.warnings: list[str] = []
        self.stats = Stats()
        self._tmpdir: str | None = None
        self.mlm_name: str | None = None
        self.vectors_info: dict | None = None
        install_transformers_shim()
        cfg = self.config
        stopwords = sorted(STOP_WORDS) if cfg.skip_stopwords and method != "contextual" else None
        common = {"action": "substitute", "aug_p": cfg.p_t, "aug_max": None}
        if method == "contextual":
            import nlpaug.augmenter.word as naw

            if mlm is None:
                raise AugmentError("nlpaug's contextual augmenter needs a masked LM (--mlm)")
            model_dir, model_type = self._model_dir(mlm)
            _seed_all(cfg.seed)  # a checkpoint without an MLM head gets a seeded random one
            self.aug = naw.ContextualWordEmbsAug(
                model_path=model_dir, model_type=model_type, top_k=cfg.k, device=device,
                batch_size=cfg.batch_size, force_reload=True, silence=True, **common,
            )
        elif method == "embedding":
            import nlpaug.augmenter.word as naw
            import nlpaug.model.word_embs as nmw

            if not isinstance(vectors, WordVectors):
                vectors = load_word_vectors(vectors, fmt=vectors_format)
            vectors = vectors.head(cfg.max_vectors)
            model = nmw.GloVe(top_k=cfg.k)
            model.model = _keyed_vectors(vectors)
            model._read()
            model.words = set(model.words)  # nlpaug tests `word in get_vocab()`: O(1) instead of O(V)
            self.aug = naw.WordEmbsAug(model_type="glove", model=model, top_k=cfg.k, stopwords=stopwords, **common)
            self.vectors_info = {"source": vectors.source, "words": len(vectors), "dim": vectors.dim}
        else:
            try:
                import nltk  # noqa: F401
            except ImportError:
                raise AugmentError(
                    "nlpaug's synonym augmenter needs nltk and its corpora (pip install nltk; then "
                    "python -m nltk.downloader wordnet omw-1.4 averaged_perceptron_tagger_eng); they are "
                    "not installed here. Use method 'contextual' or 'embedding', or our backend."
                ) from None
            import nlpaug.augmenter.word as naw

            self.aug = naw.SynonymAug(
                aug_src=synonym_source, model_path=None if ppdb_path is None else str(ppdb_path),
                stopwords=stopwords, aug_p=cfg.p_t, aug_max=None,
            )

    def _model_dir(self, mlm) -> tuple[str, str]:
        """A directory nlpaug can load, plus nlpaug's model type for it."""
        from transformers import AutoConfig

        from kd_core.models.registry import resolve_model

        if isinstance(mlm, MaskedLM):
            mlm = (mlm.model, mlm.tokenizer)
        if isinstance(mlm, tuple):
            model, tokenizer = mlm
            self._tmpdir = tempfile.mkdtemp(prefix="kd-nlpaug-mlm-")
            with quiet_transformers():
                model.save_pretrained(self._tmpdir)
                tokenizer.save_pretrained(self._tmpdir)
            source = self._tmpdir
            self.mlm_name = type(model).__name__ + " (in memory)"
        else:
            source = resolve_model(mlm)
            self.mlm_name = str(mlm)
        model_type = AutoConfig.from_pretrained(source).model_type
        if model_type not in _NLPAUG_MODEL_TYPES:
            raise AugmentError(f"nlpaug's contextual augmenter supports {sorted(_NLPAUG_MODEL_TYPES)}, not {model_type!r}")
        return source, _NLPAUG_MODEL_TYPES[model_type]

    def close(self) -> None:
        if getattr(self, "_tmpdir", None):
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __del__(self):  # pragma: no cover - best effort
        self.close()

    @property
    def mode(self) -> str:
        return f"nlpaug-{self.method}"

    def _augment_batch(self, texts: list[str], key: int, copy: int) -> list[str]:
        _seed_all(self.config.seed, key, copy)
        if self.method == "contextual":
            out = self.aug.augment(texts)  # nlpaug batches a list through the MLM
        else:
            out = [self._one(t) for t in texts]
        if len(out) != len(texts):  # nlpaug returns [] for an empty input, for example
            out = [self._one(t) for t in texts]
        return [o if isinstance(o, str) and o else t for o, t in zip(out, texts)]

    def _one(self, text: str) -> str:
        out = self.aug.augment(text) if text.strip() else [text]
        return out[0] if isinstance(out, list) and out else (out if isinstance(out, str) else text)

    def augment(self, texts: Sequence[str], keys: Sequence[int] | None = None) -> list[list[str]]:
        """``n_aug`` copies of each text; draws seeded by the chunk's first key and the copy number."""
        keys = list(range(len(texts))) if keys is None else list(keys)
        out: list[list[str]] = [[] for _ in texts]
        size = self.config.chunk_size
        for start in range(0, len(texts), size):
            chunk = list(texts[start : start + size])
            for copy in range(self.config.n_aug):
                for i, text in enumerate(self._augment_batch(chunk, keys[start], copy)):
                    out[start + i].append(text)
        self.stats.segments += len(texts)
        return out

    def augment_frame(self, frame, progress=False):
        from kd_core.augment.io import AugmentedRows, source_columns

        cfg = self.config
        started = time.perf_counter()
        idxs, text_a, text_b, labels = source_columns(frame)
        copies_a = self.augment(text_a, idxs)
        pair_rows = [r for r, b in enumerate(text_b) if b is not None]
        copies_b: dict[int, list[str]] = {}
        if pair_rows:
            for r, copies in zip(pair_rows, self.augment([text_b[r] for r in pair_rows], [idxs[r] + (1 << 40) for r in pair_rows])):
                copies_b[r] = copies
        rows = AugmentedRows(cfg.include_original, cfg.dedupe)
        for r in range(len(frame)):
            rows.add(text_a[r], text_b[r], labels[r], idxs[r], list(zip(copies_a[r], copies_b.get(r, [None] * cfg.n_aug))))
        out = rows.frame(frame["label"].dtype)
        self.stats.record_call(len(frame), len(rows), started)
        if callable(progress):  # nlpaug works through the whole frame at once: done when it returns
            progress(len(frame), len(frame))
        return out

    def metadata(self) -> dict[str, Any]:
        stats = asdict(self.stats)
        stats.pop("extra")
        cfg = self.config
        return {
            "kind": "tinybert-augmentation",
            "backend": self.backend,
            "mode": self.mode,
            "n_aug": cfg.n_aug,
            "p_t": cfg.p_t,
            "k": cfg.k,
            "seed": cfg.seed,
            "settings": cfg.to_dict(),
            "nlpaug": {"method": self.method, "augmenter": type(self.aug).__name__},
            "mlm": None if self.mlm_name is None else {"name": self.mlm_name},
            "vectors": self.vectors_info,
            "words": "nlpaug's own tokenisation; round(p_t x tokens) replaced per copy",
            "warnings": list(self.warnings),
            "stats": stats,
        }


def _keyed_vectors(vectors: WordVectors):
    from gensim.models import KeyedVectors

    keep = sorted(vectors.index.values())  # first occurrence of each word
    kv = KeyedVectors(vector_size=vectors.dim, count=0)
    kv.add_vectors([vectors.words[i] for i in keep], vectors.vectors[keep])
    return kv
