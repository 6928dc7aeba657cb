"""TinyBERT data augmentation (Algorithm 1 of the TinyBERT paper), batched; nlpaug as an option.

Quick use::

    from kd_core.augment import augment_task
    augment_task("sst2", "/path/to/shared/data", "train", "sst2-aug.parquet", mlm="bert-base-uncased")

    from kd_core.augment import TinyBertAugmenter, AugmentConfig
    aug = TinyBertAugmenter(mlm=(model, tokenizer), vectors=None, config=AugmentConfig(n_aug=20))
    out = aug.augment_frame(df)     # idx, text_a, text_b, label, source_idx, aug_id

See ``tinybert`` for the algorithm, ``words`` for what a word is, ``mlm`` and ``vectors`` for
the two candidate sources, ``nlpaug_backend`` for the alternative backend, ``io`` for the file.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from kd_core.augment.io import AugmentResult, read_augmented, table_fingerprint, write_augmented
from kd_core.augment.mlm import MaskedLM, MaskRequest
from kd_core.augment.tinybert import (
    GLOVE_ONLY_WARNING,
    MODE_FULL,
    MODE_GLOVE_ONLY,
    AugmentConfig,
    AugmentError,
    Slot,
    TinyBertAugmenter,
    sample_copies,
)
from kd_core.augment.vectors import NeighbourIndex, VectorsError, WordVectors, load_word_vectors
from kd_core.augment.words import STOP_WORDS, is_eligible, split_words

BACKENDS = ("ours", "nlpaug")

__all__ = [
    "AugmentConfig", "AugmentError", "AugmentResult", "BACKENDS", "GLOVE_ONLY_WARNING", "MODE_FULL",
    "MODE_GLOVE_ONLY", "MaskRequest", "MaskedLM", "NeighbourIndex", "STOP_WORDS", "Slot", "TinyBertAugmenter",
    "VectorsError", "WordVectors", "augment_frame", "augment_task", "is_eligible", "load_word_vectors",
    "make_augmenter", "read_augmented", "sample_copies", "split_words", "table_fingerprint", "write_augmented",
]

_CONFIG_FIELDS = set(AugmentConfig.__dataclass_fields__)


def make_augmenter(
    backend: str = "ours",
    *,
    mlm=None,
    vectors=None,
    config: AugmentConfig | None = None,
    nlpaug_method: str = "contextual",
    device: str | None = None,
    mlm_dtype: str = "float32",
    vectors_format: str = "auto",
):
    """``TinyBertAugmenter`` (backend ``ours``) or ``NlpaugAugmenter`` (backend ``nlpaug``)."""
    if backend == "ours":
        return TinyBertAugmenter(mlm, vectors, config, device=device, mlm_dtype=mlm_dtype, vectors_format=vectors_format)
    if backend == "nlpaug":
        from kd_core.augment.nlpaug_backend import NlpaugAugmenter

        return NlpaugAugmenter(
            nlpaug_method, mlm, vectors, config, device=device or "cpu", vectors_format=vectors_format
        )
    raise AugmentError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def augment_frame(
    frame,
    *,
    backend: str = "ours",
    mlm=None,
    vectors=None,
    tokenizer=None,
    nlpaug_method: str = "contextual",
    device: str | None = None,
    mlm_dtype: str = "float32",
    progress: bool | Callable[[int, int], None] = False,
    **settings: Any,
):
    """Augment a frame in the normalised schema; returns ``(augmented frame, manifest)``.
    ``progress``: True for a tqdm bar, or a function called with (rows done, rows).

    ``settings`` are ``AugmentConfig`` fields (n_aug, p_t, k, seed, ...). ``tokenizer`` is
    accepted for callers that hold one but unused: word pieces are always those of the MLM's
    own tokenizer, and GloVe-only mode needs none.
    """
    unknown = set(settings) - _CONFIG_FIELDS
    if unknown:
        raise AugmentError(f"unknown augmentation setting(s) {sorted(unknown)}; known: {sorted(_CONFIG_FIELDS)}")
    config = AugmentConfig(**settings)
    augmenter = make_augmenter(
        backend, mlm=mlm, vectors=vectors, config=config, nlpaug_method=nlpaug_method, device=device, mlm_dtype=mlm_dtype
    )
    out = augmenter.augment_frame(frame, progress=progress)
    return out, augmenter.metadata()


def augment_task(
    task: str,
    data_dir: str | Path | None,
    split: str,
    out: str | Path,
    *,
    limit: int | None = None,
    backend: str = "ours",
    mlm=None,
    vectors=None,
    nlpaug_method: str = "contextual",
    device: str | None = None,
    mlm_dtype: str = "float32",
    progress: bool = False,
    **settings: Any,
) -> AugmentResult:
    """Read a task split through the loaders, augment it, write ``out`` (Parquet) atomically."""
    from kd_core.data.loaders import load_split
    from kd_core.data.tasks import get_task

    started = time.perf_counter()
    spec = get_task(task, data_dir)
    frame = load_split(spec, data_dir, split)
    if "text_a" not in frame.columns:
        raise AugmentError(f"task {spec.name} has no text_a/text_b columns; augmentation covers classification tasks")
    if limit is not None:
        frame = frame.iloc[: int(limit)].reset_index(drop=True)
    source_fp = table_fingerprint(frame, spec)
    augmented, manifest = augment_frame(
        frame, backend=backend, mlm=mlm, vectors=vectors, nlpaug_method=nlpaug_method, device=device,
        mlm_dtype=mlm_dtype, progress=progress, **settings,
    )
    manifest["source"] = {
        "task": spec.name, "split": split, "rows": len(frame), "limit": limit, "fingerprint": source_fp,
        "files": frame.attrs.get("source"),
    }
    fingerprint = write_augmented(augmented, out, spec, split, manifest)
    return AugmentResult(Path(out), len(frame), len(augmented), fingerprint, manifest, time.perf_counter() - started)
