"""What one GRPO step logs, computed from its groups: EchoInk-R1's keys plus ours (local to this rank;
`RunLog` averages them over ranks, weighted by `num_groups`)."""

from __future__ import annotations

import torch

from echoink.grpo.advantages import group_reward_stats
from echoink.grpo.scoring import RewardSet
from echoink.grpo.types import ScoredGroup


def step_metrics(groups: list[ScoredGroup], rewards: RewardSet, num_generations: int) -> dict:
    """EchoInk-R1's logged keys (+ ours), local to this rank; RunLog averages them over ranks."""
    metrics: dict = {"num_groups": float(len(groups))}
    if groups:
        table = torch.cat([g.rewards for g in groups])                                      # [B*G, R]
        totals = table @ rewards.weights                                                    # [B*G]
        metrics["reward"] = totals.mean().item()
        for j, name in enumerate(rewards.names):
            metrics[f"rewards/{name}"] = table[:, j].mean().item()
        metrics.update(group_reward_stats(totals, num_generations))
        if "accuracy" in rewards.names:
            accuracy = table[:, rewards.names.index("accuracy")].view(-1, num_generations)     # [B, G]
            metrics["all_correct"] = (accuracy == 1).all(dim=1).float().mean().item()
            metrics["all_wrong"] = (accuracy == 0).all(dim=1).float().mean().item()
        lengths = torch.cat([g.completion_lengths for g in groups]).float()
        metrics["completion_length"] = lengths.mean().item()
        metrics["truncated_ratio"] = torch.cat([g.truncated for g in groups]).float().mean().item()
    return metrics
