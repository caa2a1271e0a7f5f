"""Which examples each rank trains on at each optimizer step: a resumable, topology-free order.

The training stream is an endless sequence of epochs, each a permutation of the examples drawn
from ``seed + epoch``. Optimizer step ``t`` consumes stream positions [t G, (t + 1) G) with
G = micro_batch * accumulation * world_size; rank ``r`` takes the r-th contiguous share and cuts
it into ``accumulation`` micro-batches. The order depends only on the seed and the global batch,
so a resumed run (even on another number of ranks with the same global batch) sees the same data,
and a 1-process run with k times the accumulation sees exactly the same global batches.
"""
from __future__ import annotations

from typing import Sequence

import torch


class StepBatches:
    """The stream over ``examples`` (dataset indices; a method may pass a subset, e.g. one of
    BiLoRA's two splits)."""

    def __init__(self, examples: Sequence[int], micro_batch: int, accumulation: int,
                 world_size: int, seed: int):
        self.examples = list(examples)
        self.n_examples = len(self.examples)
        self.micro_batch, self.accumulation, self.world_size = micro_batch, accumulation, world_size
        self.seed = seed
        self._epoch_cache: dict[int, list[int]] = {}

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation * self.world_size

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._epoch_cache:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch_cache = {epoch: torch.randperm(self.n_examples, generator=generator).tolist()}
        return self._epoch_cache[epoch]

    def stream(self, start: int, count: int) -> list[int]:
        """Example indices at stream positions [start, start + count)."""
        indices = []
        for position in range(start, start + count):
            epoch, offset = divmod(position, self.n_examples)
            indices.append(self.examples[self._epoch_order(epoch)[offset]])
        return indices

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """This rank's micro-batches (lists of example indices) for optimizer step ``step``."""
        share = self.micro_batch * self.accumulation
        indices = self.stream(step * self.global_batch + rank * share, share)
        return [indices[i:i + self.micro_batch] for i in range(0, share, self.micro_batch)]
