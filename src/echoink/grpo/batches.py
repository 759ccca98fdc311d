"""Which prompts each rank trains on at each step: a pure function of (seed, step), so a resumed run
continues exactly where it stopped with no sampler state to save.

Each epoch is a seeded permutation (its last, partial step is filled from the start of the same order) of the dataset (or the dataset order when shuffling is off).
With `balance_answer_letters`, the permutation is re-ordered so that consecutive prompts cycle
through the answer letters (A, B, C, D, A, ...): every batch then mixes the letters, which keeps a
small policy from chasing whichever letter won the last batch.

A step consumes `prompts_per_step = per_device_batch * num_processes * grad_accum` prompts. Rank r
takes its `per_device_batch` prompts of micro-step m from a contiguous slice, so groups stay whole on
one rank.

Dynamic sampling consumes a varying number of prompts per step, so there the data position IS state:
prompts are drawn in rounds (`round_indices`) of `per_device_batch` per rank from one endless stream
(the epoch orders one after another), and the number of rounds consumed is saved in checkpoints.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class BatchPlan:
    num_items: int
    per_device_batch: int
    num_processes: int
    grad_accum: int
    seed: int
    shuffle: bool = True
    answer_letters: tuple[str, ...] | None = None  # set to balance the letters

    @property
    def prompts_per_step(self) -> int:
        return self.per_device_batch * self.num_processes * self.grad_accum

    def epoch_order(self, epoch: int) -> list[int]:
        """Dataset indices in the order epoch `epoch` visits them."""
        return list(_epoch_order(self, epoch))

    def round_indices(self, round_index: int, rank: int) -> list[int]:
        """Dynamic sampling: rank `rank`'s `per_device_batch` prompts of draw round `round_index`."""
        start = round_index * self.per_device_batch * self.num_processes + rank * self.per_device_batch
        indices = []
        for position in range(start, start + self.per_device_batch):
            epoch, within = divmod(position, self.num_items)
            indices.append(_epoch_order(self, epoch)[within])
        return indices

    def uncached_epoch_order(self, epoch: int) -> list[int]:
        """`epoch_order` computed afresh (`epoch_order` caches the last few epochs)."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.num_items).tolist() if self.shuffle else list(range(self.num_items))
        if self.answer_letters is None:
            return order
        by_letter: dict[str, list[int]] = defaultdict(list)
        for index in order:
            by_letter[self.answer_letters[index]].append(index)
        letters = sorted(by_letter)
        interleaved = []
        while any(by_letter.values()):
            for letter in letters:
                if by_letter[letter]:
                    interleaved.append(by_letter[letter].pop(0))
        return interleaved

    def step_indices(self, step: int, rank: int) -> list[list[int]]:
        """Indices for rank `rank` at optimizer step `step`: one list per micro-step (grad accumulation)."""
        per_epoch = max(1, math.ceil(self.num_items / self.prompts_per_step))  # the last step wraps around
        epoch, within = divmod(step, per_epoch)
        order = _epoch_order(self, epoch)
        start = within * self.prompts_per_step
        micro = []
        for m in range(self.grad_accum):
            offset = start + (m * self.num_processes + rank) * self.per_device_batch
            micro.append([order[(offset + i) % self.num_items] for i in range(self.per_device_batch)])
        return micro


@lru_cache(maxsize=4)
def _epoch_order(plan: BatchPlan, epoch: int) -> tuple[int, ...]:
    return tuple(plan.uncached_epoch_order(epoch))
