"""Data types of a GRPO step. The group — one prompt, its media, its G completions — is the unit.

Shapes: P = prompt length, G = completions per prompt, C = longest completion in the group, R = reward
functions, B = groups in a micro-batch. A prompt's multimodal tensors are stored once (`PromptInputs`),
never repeated G times; only the model layer (the rollout engine, `model.group_forward`) decides how
to expand them. `Group` (one prompt and its G completions, with the policy version that sampled them) is
the rollout engine's output type (`echoink.model.engine`); the types here add what training needs.

Every type here is immutable: `collect` builds a `CollectedBatch` once per step and `update` only reads it.

    engine.generate ──▶ Group ──score, advantages, old/ref log-probs──▶ ScoredGroup
    list of micro-batches of ScoredGroup + the step's global counts ──▶ CollectedBatch ──▶ update
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from echoink.grpo.loss import StepCounts
from echoink.model.engine import Group
from echoink.model.inputs import PromptInputs


@dataclass(frozen=True)
class ScoredGroup:
    """A rollout with everything the update needs.

    group:      the rollout (prompt once, completions [G, C])
    record:     the dataset record it answers
    rewards:    [G, R] one column per reward function
    advantages: [G] group-normalised advantages of the weighted total reward
    old_logps:  [G, C] log-probs of the sampling policy (num_iterations > 1), else None
    ref_logps:  [G, C] log-probs of the reference (beta > 0), else None
    trained:    False when the update skips this group (all advantages exactly 0 and skipping is on);
                its sequences and tokens still count in the loss's normalisers
    """

    group: Group
    record: Any
    rewards: torch.Tensor
    advantages: torch.Tensor
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    trained: bool = True

    # the rollout's fields, so log-prob code takes a Group or a ScoredGroup alike
    @property
    def prompt(self) -> PromptInputs:
        return self.group.prompt

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.group.completion_ids

    @property
    def completion_mask(self) -> torch.Tensor:
        return self.group.completion_mask

    @property
    def texts(self) -> list[str]:
        return self.group.texts

    @property
    def truncated(self) -> torch.Tensor:
        return self.group.truncated

    @property
    def size(self) -> int:
        return self.group.size

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.group.completion_lengths


@dataclass(frozen=True)
class CollectedBatch:
    """One step's collected experience on this process (`collect`'s output, `update`'s input).

    micro_batches: one tuple of ScoredGroup per gradient-accumulation micro-batch (may be empty when every
                   prompt of it was skipped)
    counts:        the step's global denominators for the loss (all processes, all micro-batches)
    stats:         what collecting measured (skipped prompts, sampling rounds, seconds, ...), for the log
    """

    micro_batches: tuple[tuple[ScoredGroup, ...], ...]
    counts: StepCounts
    stats: dict[str, float]

    @property
    def groups(self) -> list[ScoredGroup]:
        return [g for batch in self.micro_batches for g in batch]
