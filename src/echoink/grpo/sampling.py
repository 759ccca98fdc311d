"""Which prompts a step rolls out, and which of the resulting groups it trains on.

A group whose G rewards are all equal (max == min) has advantage exactly 0 everywhere: with beta = 0 it
adds nothing to the gradient. Two ways not to pay for such groups:

* **skip** (`skip_zero_advantage_groups`, default on when beta = 0): the group stays in the step — its
  sequences and tokens still count in the loss's normalisers, so the gradient is identical — but it
  gets no policy forward/backward and no old-policy or reference pass. With beta > 0 the skipped groups'
  KL term is dropped (off by default there; the log says so when it is on).
* **dynamic sampling** (`dynamic_sampling`, DAPO's idea): each micro-batch keeps drawing rounds of
  `per_device_train_batch_size` further prompts until every process holds that many informative groups
  (all processes run the same number of rounds, at most `max_sampling_rounds`); surplus informative
  groups are discarded and counted; when the rounds run out, the micro-batch is topped up with the most
  recent uninformative groups (which the skip then leaves out) and trained on as is. Only what the batch
  can still use is kept while drawing (`GroupSelection`): memory stays bounded however many rounds run.

With dynamic sampling the data position is state: `StepPrompts` draws rounds from `BatchPlan.round_indices`
and the trainer saves the number of rounds consumed in every checkpoint.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from echoink.grpo.batches import BatchPlan


def informative(rewards: torch.Tensor, weights: torch.Tensor) -> bool:
    """Whether a group's weighted total rewards ([G, R] @ [R] -> [G]) differ at all (max != min)."""
    totals = rewards @ weights
    return bool(totals.max() != totals.min())


def skips_zero_advantage_groups(config) -> bool:
    """`skip_zero_advantage_groups`, whose default (None) is on exactly when beta = 0."""
    if config.skip_zero_advantage_groups is None:
        return config.beta == 0
    return bool(config.skip_zero_advantage_groups)


@dataclass
class StepPrompts:
    """This rank's prompts for one step: one planned list per micro-batch, and more rounds on request.

    Without dynamic sampling the planned lists come from `BatchPlan.step_indices` and `next_round` is never
    called. With it, every list (planned or further) is a draw round and `rounds_used` counts them; the
    trainer adds that to the saved data position.
    """

    plan: BatchPlan
    records: list
    rank: int
    step: int
    dynamic: bool = False
    first_round: int = 0   # dynamic sampling: the data position (draw rounds consumed) at the step's start
    rounds_used: int = 0

    def planned(self, micro_batch: int) -> list:
        if not self.dynamic:
            return [self.records[i] for i in self.plan.step_indices(self.step, self.rank)[micro_batch]]
        return self.next_round()

    def next_round(self) -> list:
        indices = self.plan.round_indices(self.first_round + self.rounds_used, self.rank)
        self.rounds_used += 1
        return [self.records[i] for i in indices]


@dataclass
class GroupSelection:
    """The groups a dynamic-sampling micro-batch keeps while it draws rounds, in bounded memory.

    Holds the first `wanted` informative groups and the `wanted` most recent uninformative ones (the
    fillers), never more; everything else is only counted. `chosen()` is what the micro-batch trains on:
    the informative groups in draw order, then the most recent fillers (newest first) up to `wanted`.
    Items are `(record, Group, rewards [G, R])`; `weights` [R] make the totals.
    """

    wanted: int
    weights: torch.Tensor
    useful: list = field(default_factory=list)
    fillers: deque = field(default_factory=deque)
    seen: int = 0
    informative_seen: int = 0

    def add(self, items: list[tuple]) -> None:
        for item in items:
            self.seen += 1
            if informative(item[2], self.weights):
                self.informative_seen += 1
                if len(self.useful) < self.wanted:
                    self.useful.append(item)
            else:
                self.fillers.append(item)
                if len(self.fillers) > self.wanted:
                    self.fillers.popleft()

    @property
    def enough(self) -> bool:
        return len(self.useful) >= self.wanted

    def chosen(self) -> list[tuple]:
        return self.useful + list(reversed(self.fillers))[: self.wanted - len(self.useful)]

    @property
    def surplus(self) -> int:
        """Groups rolled out (not skipped) that the micro-batch does not train on."""
        return self.seen - len(self.chosen())
