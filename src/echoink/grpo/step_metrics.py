"""What one GRPO step logs, computed from its groups: EchoInk-R1's keys plus ours (local to this rank;
`RunLog` averages them over ranks, weighted by `num_groups`).

Per problem type T present in the step (spaces in T become "_"): ``reward_by_type/T`` (mean weighted
total reward of T's completions), ``accuracy_by_type/T`` (mean of the accuracy column) and
``unparsed_by_type/T`` (share of T's completions whose answer block is missing or does not parse for T:
they score 0, `rewards.score_answer`'s rule, the one evaluation uses for ``pred``). ``all_equal``:
share of groups whose totals are all equal (max == min: no signal), for every type. ``all_correct`` /
``all_wrong`` (accuracy 1 / 0 for the whole group) count binary types' groups only (multiple choice,
numerical, counting, binary user types) and are left out of a step without such groups: a graded
score of 0.4 is neither right nor wrong."""

from __future__ import annotations

import torch

from echoink.grpo.advantages import group_reward_stats
from echoink.grpo.scoring import RewardSet
from echoink.grpo.types import ScoredGroup
from echoink.problem_types import MULTIPLE_CHOICE, PROBLEM_TYPES
from echoink.rewards import score_answer


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
        metrics.update(_group_outcomes(groups, table, totals, rewards, num_generations))
        lengths = torch.cat([g.completion_lengths for g in groups]).float()
        metrics["completion_length"] = lengths.mean().item()
        metrics["truncated_ratio"] = torch.cat([g.truncated for g in groups]).float().mean().item()
    return metrics


def _group_outcomes(groups: list[ScoredGroup], table: torch.Tensor, totals: torch.Tensor, rewards: RewardSet,
                    num_generations: int) -> dict:
    """all_equal over every group; all_correct/all_wrong over binary types; per-type means."""
    grouped_totals = totals.view(-1, num_generations)                                       # [B, G]
    out = {"all_equal": (grouped_totals.max(dim=1).values == grouped_totals.min(dim=1).values).float().mean().item()}
    has_accuracy = "accuracy" in [name for name, _ in rewards.funcs]
    accuracy = table[:, rewards.accuracy_index].view(-1, num_generations)                   # [B, G]
    types = [getattr(g.record, "problem_type", MULTIPLE_CHOICE) for g in groups]
    binary = torch.tensor([bool(getattr(PROBLEM_TYPES.get(t), "binary", False)) for t in types])  # [B]
    if has_accuracy and binary.any():
        out["all_correct"] = (accuracy[binary] == 1).all(dim=1).float().mean().item()
        out["all_wrong"] = (accuracy[binary] == 0).all(dim=1).float().mean().item()
    for kind in dict.fromkeys(types):
        rows = torch.tensor([t == kind for t in types])                                      # [B]
        key = kind.replace(" ", "_")
        out[f"reward_by_type/{key}"] = grouped_totals[rows].mean().item()
        if has_accuracy:
            out[f"accuracy_by_type/{key}"] = accuracy[rows].mean().item()
        out[f"unparsed_by_type/{key}"] = _unparsed_share([g for g, t in zip(groups, types) if t == kind])
    return out


def _unparsed_share(groups: list[ScoredGroup]) -> float:
    """Share of the groups' completions whose answer does not parse for their record's problem type."""
    unparsed = [not score_answer(text, g.record.solution, g.record.problem_type, g.record.extra).parsed
                for g in groups for text in g.group.texts]
    return sum(unparsed) / max(1, len(unparsed))
