"""Deterministic, resumable batching with dynamic padding.

The order of examples is a pure function of (seed, epoch), so a data position is just
(epoch, offset) and resuming needs no sampler state. Each optimizer step consumes one global
batch of ``batch_size × grad_accum_steps × world_size`` examples; process r takes its micro
batches from fixed slices of it, so one process and N processes see the same global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


@dataclass
class DataPosition:
    epoch: int = 0
    offset: int = 0


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


class GlobalBatchPlan:
    def __init__(self, num_examples: int, batch_size: int, grad_accum_steps: int, world_size: int, seed: int):
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.grad_accum_steps = grad_accum_steps
        self.world_size = world_size
        self.seed = seed
        self.global_batch = batch_size * grad_accum_steps * world_size
        if num_examples < self.global_batch:
            raise ValueError(
                f"the dataset has {num_examples} examples, fewer than one global batch "
                f"({batch_size} per device x {grad_accum_steps} accumulation x {world_size} processes); "
                f"lower train.batch_size or add data"
            )
        self._order_cache: tuple[int, np.ndarray] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, epoch_order(self.num_examples, self.seed, epoch))
        return self._order_cache[1]

    def micro_batches(self, position: DataPosition, rank: int) -> tuple[list[np.ndarray], DataPosition]:
        """Index arrays of this rank's micro batches for one optimizer step, and the next position."""
        epoch, offset = position.epoch, position.offset
        if offset + self.global_batch > self.num_examples:  # drop the ragged tail of an epoch
            epoch, offset = epoch + 1, 0
        order = self._order(epoch)
        micro = []
        for accum in range(self.grad_accum_steps):
            start = offset + (accum * self.world_size + rank) * self.batch_size
            micro.append(order[start : start + self.batch_size])
        return micro, DataPosition(epoch, offset + self.global_batch)


def pad_batch(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest example of this batch (dynamic padding)."""
    longest = max(len(ex["input_ids"]) for ex in examples)
    batch: dict[str, torch.Tensor] = {}
    ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    has_types = "token_type_ids" in examples[0]
    types = torch.zeros((len(examples), longest), dtype=torch.long) if has_types else None
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        ids[row, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        mask[row, :n] = 1
        if types is not None:
            types[row, :n] = torch.as_tensor(ex["token_type_ids"], dtype=torch.long)
    batch["input_ids"] = ids
    batch["attention_mask"] = mask
    if types is not None:
        batch["token_type_ids"] = types
    if "labels" in examples[0]:
        batch["labels"] = torch.as_tensor([ex["labels"] for ex in examples])
    return batch
