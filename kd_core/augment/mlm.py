"""A masked LM as a batched source of replacement candidates.

``MaskedLM.topk`` takes many masked sequences (one masked position each), runs the encoder once
per batch under ``inference_mode``, and applies the LM head only at the masked positions: the
head's vocabulary projection costs about as much per position as the whole encoder, so running
it at every position (what a plain ``model(**inputs).logits`` does) doubles the work.

Candidates are restricted to whole-word vocabulary entries made of ASCII letters (no ``##``
continuation pieces, no special or punctuation tokens) and never include the masked word
itself, so the K returned are K real alternatives.
"""

from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from kd_core.augment.words import is_valid_word
from kd_core.errors import UserError

logger = logging.getLogger("kd_core.augment")

DTYPES = ("float32", "bfloat16", "float16")


class MaskedLMError(UserError, ValueError):
    pass


@dataclass
class MaskRequest:
    """One masked copy: ``input_ids`` (with special tokens) where ``position`` will be masked.

    ``word`` is the text of the masked word (for case filtering and for instrumentation).
    """

    input_ids: Sequence[int]
    position: int
    word: str
    token_type_ids: Sequence[int] | None = None


@contextmanager
def quiet_transformers():
    """No transformers log lines below ERROR and no progress bars inside the block."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _head_fn(model) -> Callable | None:
    """The module(s) mapping last hidden states to vocabulary logits, where we know them."""
    import torch.nn.functional as F

    if hasattr(model, "cls"):  # BERT
        return model.cls
    if hasattr(model, "lm_head"):  # RoBERTa, MPNet, XLM-R, ...
        return model.lm_head
    if hasattr(model, "predictions"):  # ALBERT
        return model.predictions
    if all(hasattr(model, n) for n in ("vocab_transform", "vocab_layer_norm", "vocab_projector")):  # DistilBERT
        act = getattr(model, "activation", F.gelu)
        return lambda h: model.vocab_projector(model.vocab_layer_norm(act(model.vocab_transform(h))))
    return None


class MaskedLM:
    """A Hugging Face masked LM plus its tokenizer, prepared for batched top-K candidates."""

    # A batch is closed early, once it holds MIN_SPLIT sequences, when padding would exceed
    # PAD_SLACK of its real tokens (lengths rise along the sorted requests).
    MIN_SPLIT = 16
    PAD_SLACK = 0.25

    def __init__(
        self,
        model,
        tokenizer,
        *,
        name: str = "in-memory",
        device: str | None = None,
        dtype: str = "float32",
        head_missing: Sequence[str] | None = None,
    ):
        import torch

        if dtype not in DTYPES:
            raise MaskedLMError(f"unknown MLM dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        if tokenizer.mask_token_id is None:
            raise MaskedLMError(f"{name}: the tokenizer has no mask token; a masked LM tokenizer is needed")
        if not getattr(tokenizer, "is_fast", False):
            raise MaskedLMError(f"{name}: a fast tokenizer (with offset mappings) is needed")
        self.name = name
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.head_missing = None if head_missing is None else list(head_missing)  # None: not known
        self.base = model.base_model
        self.head = _head_fn(model)
        self.accepts_token_types = "token_type_ids" in inspect.signature(self.base.forward).parameters
        self.max_length = min(
            int(getattr(model.config, "max_position_embeddings", 512) or 512),
            int(tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else 512),
        )
        # The RoBERTa family reserves two extra positions (padding_idx + 1 offset).
        if getattr(model.config, "model_type", "") in ("roberta", "xlm-roberta", "camembert", "longformer"):
            self.max_length = min(self.max_length, model.config.max_position_embeddings - 2)
        self.mask_id = int(tokenizer.mask_token_id)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self._build_vocab()
        self.forward_calls = 0
        self.sequences = 0

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, name: str | Path, *, device: str | None = None, dtype: str = "float32", seed: int = 0) -> "MaskedLM":
        """Any HF masked-LM directory, hub id or registry alias (``AutoModelForMaskedLM``).

        Weights the checkpoint lacks (an encoder saved without its MLM head, e.g. ``minilm-l6``)
        are initialised from ``seed`` and reported: candidates from a random head are noise.
        """
        import torch
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        from kd_core.models.registry import resolve_model

        source = resolve_model(name)
        with torch.random.fork_rng(devices=[]), quiet_transformers():  # seeded, global RNG untouched
            torch.manual_seed(seed)
            model, info = AutoModelForMaskedLM.from_pretrained(source, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(source)
        missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
        return cls(model, tokenizer, name=str(name), device=device, dtype=dtype, head_missing=missing)

    def _build_vocab(self) -> None:
        import torch

        tok = self.tokenizer
        vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        tokens = tok.convert_ids_to_tokens(list(range(min(vocab_size, len(tok)))))
        special = set(tok.all_special_ids)
        markers = ("\u0120", "\u2581")  # byte-level BPE "Ġ", SentencePiece "▁": word-initial pieces
        n_marked = sum(1 for t in tokens if t and t[0] in markers)
        spaced = n_marked > len(tokens) // 4
        strings: list[str | None] = [None] * vocab_size
        for i, t in enumerate(tokens):
            if t is None or i in special:
                continue
            if spaced:
                if not t or t[0] not in markers:
                    continue
                t = t[1:]
            elif t.startswith("##"):
                continue
            if is_valid_word(t):
                strings[i] = t
        self.id_strings = strings
        bias = torch.full((vocab_size,), float("-inf"))
        bias[[i for i, s in enumerate(strings) if s is not None]] = 0.0
        self.vocab_bias = bias.to(self.device)
        self.lowercase_vocab = all(s == s.lower() for s in strings if s is not None)

    @property
    def head_initialized(self) -> bool | None:
        """False when loading reported missing (randomly initialised) weights; None if unknown."""
        return None if self.head_missing is None else not self.head_missing

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "class": type(self.model).__name__,
            "dtype": self.dtype,
            "device": str(self.device),
            "head_initialized": self.head_initialized,
            "missing_weights": (self.head_missing or [])[:10],
            "candidate_vocab": sum(s is not None for s in self.id_strings),
        }

    # ------------------------------------------------------------------ inference
    def _autocast(self):
        import contextlib

        import torch

        if self.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, self.dtype))

    def masked_logits(self, input_ids, attention_mask, positions, token_type_ids=None):
        """Vocabulary logits at ``positions`` (one per row) of already-masked ``input_ids``."""
        import torch

        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and self.accepts_token_types:
            kwargs["token_type_ids"] = token_type_ids
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        with torch.inference_mode(), self._autocast():
            if self.head is None:  # unknown architecture: full forward, then gather
                return self.model(**kwargs).logits[rows, positions].float()
            hidden = self.base(**kwargs).last_hidden_state
            return self.head(hidden[rows, positions].unsqueeze(1)).squeeze(1).float()

    def topk(
        self, requests: Sequence[MaskRequest], k: int, batch_size: int = 128, max_tokens: int | None = None
    ) -> list[list[str]]:
        """The K best valid candidate words for each request (best first).

        Requests are sorted by length so that a batch pads little; each batch (at most
        ``batch_size`` sequences and ``max_tokens`` padded tokens, closed early where padding
        would pass ``PAD_SLACK``) is one forward pass.
        """
        import torch

        out: list[list[str]] = [[] for _ in requests]
        if not requests:
            return out
        order = sorted(range(len(requests)), key=lambda i: len(requests[i].input_ids))
        take = min(k + (0 if self.lowercase_vocab else 8), int(self.vocab_bias.numel()))
        batches: list[list[int]] = [[]]
        real = 0  # unpadded tokens in the current batch
        for i in order:  # ascending lengths: the newest request sets the batch's width
            width = len(requests[i].input_ids)
            current = batches[-1]
            padded = (len(current) + 1) * width
            if current and (
                len(current) >= batch_size
                or (max_tokens and padded > max_tokens)
                or (len(current) >= self.MIN_SPLIT and padded > (1 + self.PAD_SLACK) * (real + width))
            ):
                batches.append(current := [])
                real = 0
            current.append(i)
            real += width
        for members in batches:
            batch = [requests[i] for i in members]
            width = max(len(r.input_ids) for r in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            types = torch.zeros((len(batch), width), dtype=torch.long) if self.accepts_token_types else None
            positions = torch.tensor([r.position for r in batch], dtype=torch.long)
            for row, r in enumerate(batch):
                n = len(r.input_ids)
                ids[row, :n] = torch.as_tensor(r.input_ids, dtype=torch.long)
                attention[row, :n] = 1
                if types is not None and r.token_type_ids is not None:
                    types[row, :n] = torch.as_tensor(r.token_type_ids, dtype=torch.long)
            original = ids[torch.arange(len(batch)), positions].clone()
            ids[torch.arange(len(batch)), positions] = self.mask_id
            dev = self.device
            logits = self.masked_logits(
                ids.to(dev), attention.to(dev), positions.to(dev), None if types is None else types.to(dev)
            )
            self.forward_calls += 1
            self.sequences += len(batch)
            logits = logits + self.vocab_bias
            logits[torch.arange(len(batch), device=dev), original.to(dev)] = float("-inf")
            best = logits.topk(take, dim=1).indices.tolist()
            for r, i, cand in zip(batch, members, best):
                low = r.word.lower()
                words = [self.id_strings[c] for c in cand]
                out[i] = [w for w in words if w is not None and w.lower() != low][:k]
        return out
