"""Score groups with the configured reward functions: completions + the record's columns -> [G, R]."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from echoink.grpo.types import Group
from echoink.rewards import compute_rewards, resolve_rewards, reward_columns


@dataclass
class RewardSet:
    """The reward functions of a run, their names and weights."""

    funcs: list  # (name, function) pairs
    weights: torch.Tensor  # [R]

    @classmethod
    def from_config(cls, reward_funcs: list, reward_weights: list[float]) -> "RewardSet":
        return cls(funcs=resolve_rewards(reward_funcs), weights=torch.tensor(reward_weights, dtype=torch.float32))

    @property
    def names(self) -> list[str]:
        return [name.rsplit(":", 1)[-1] for name, _ in self.funcs]


def score_group(rewards: RewardSet, group: Group, record) -> torch.Tensor:
    """-> [G, R] rewards of the group's completions of `record` (one column per reward function)."""
    table = compute_rewards(rewards.funcs, group.texts, reward_columns([record] * group.size))
    return torch.from_numpy(np.asarray(table, dtype=np.float32))
