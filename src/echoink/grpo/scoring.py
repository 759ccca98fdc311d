"""Score groups with the configured reward functions: completions + the record's columns -> [G, R].

With ``len_control`` on, one more column, ``length``, holds EchoInk-R1's length bonus (a group-level
reward: it needs the completions' token lengths and the group's accuracy):

    length_i = bonus  if accuracy_i > threshold, min_tokens <= tokens_i <= max_tokens
                      and more than one completion of the group has accuracy > threshold
               0      otherwise

(EchoInk-R1: bonus 0.2, threshold 0.1, 160-256 tokens; tokens count the completion up to and
including its end-of-sequence token). Its weight is 1. The accuracy column is the reward named
``accuracy``, else the first reward function (EchoInk-R1 used the first column).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from echoink.model.engine import Group
from echoink.rewards import compute_rewards, resolve_rewards, reward_columns, reward_names

LENGTH_REWARD_NAME = "length"


@dataclass(frozen=True)
class LengthReward:
    """EchoInk-R1's ``len_control`` bonus (see the module docstring)."""

    min_tokens: int = 160
    max_tokens: int = 256
    bonus: float = 0.2
    threshold: float = 0.1

    def __call__(self, accuracy: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """accuracy [G], lengths [G] -> bonus [G]."""
        correct = accuracy > self.threshold                                                # [G]
        in_range = (lengths >= self.min_tokens) & (lengths <= self.max_tokens)            # [G]
        if int(correct.sum()) <= 1:
            return torch.zeros_like(accuracy)
        return (correct & in_range).to(accuracy.dtype) * self.bonus


@dataclass
class RewardSet:
    """The reward functions of a run, their names and weights (the length bonus last, when on)."""

    funcs: list  # (name, function) pairs
    weights: torch.Tensor  # [R] (+1 for the length column)
    length: LengthReward | None = None

    @classmethod
    def from_config(cls, reward_funcs: list, reward_weights: list[float],
                    length: LengthReward | None = None) -> "RewardSet":
        weights = [*reward_weights, 1.0] if length is not None else list(reward_weights)
        rewards = cls(funcs=resolve_rewards(reward_funcs), weights=torch.tensor(weights, dtype=torch.float32),
                      length=length)
        if length is not None and rewards.names.count(LENGTH_REWARD_NAME) > 1:
            raise ValueError(f"a reward function is named {LENGTH_REWARD_NAME!r}, the name of the len_control "
                             "column: rename the function or turn len_control off")
        return rewards

    @classmethod
    def for_config(cls, config) -> "RewardSet":
        """The rewards a TrainConfig asks for: ``reward_funcs``/``reward_weights`` and ``len_control``."""
        length = (LengthReward(config.len_control_min_tokens, config.len_control_max_tokens,
                               config.len_control_bonus, config.len_control_threshold)
                  if config.len_control else None)
        return cls.from_config(config.reward_funcs, config.reward_weight_list, length)

    @property
    def names(self) -> list[str]:
        names = reward_names([name for name, _ in self.funcs])
        return [*names, LENGTH_REWARD_NAME] if self.length is not None else names

    @property
    def accuracy_index(self) -> int:
        """The column read as accuracy: the reward named ``accuracy``, else the first one."""
        names = [name for name, _ in self.funcs]
        return names.index("accuracy") if "accuracy" in names else 0


def score_group(rewards: RewardSet, group: Group, record) -> torch.Tensor:
    """-> [G, R] rewards of the group's completions of `record` (one column per reward function, + length)."""
    table = compute_rewards(rewards.funcs, group.texts, reward_columns([record] * group.size))
    scored = torch.from_numpy(np.asarray(table, dtype=np.float32))                          # [G, R]
    if rewards.length is None:
        return scored
    bonus = rewards.length(scored[:, rewards.accuracy_index], group.completion_lengths.to(scored.device))
    return torch.cat([scored, bonus[:, None]], dim=1)                                      # [G, R+1]
