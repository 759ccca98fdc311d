"""Data types of a GRPO step. The group — one prompt, its media, its G completions — is the unit.

Shapes: P = prompt length, G = completions per prompt, C = longest completion in the group.
A prompt's multimodal tensors are stored once (`PromptInputs`), never repeated G times; only the
code that talks to the model (`rollout`, `logprobs`) decides how to expand them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from echoink.model.inputs import PromptInputs

@dataclass
class Group:
    """One prompt and its G sampled completions.

    completion_ids:  [G, C] sampled tokens, right-padded with the pad id
    completion_mask: [G, C] 1 for tokens up to and including the first EOS, 0 after
    texts:           G decoded completions (special tokens removed)
    truncated:       [G] bool, True where no EOS was produced within max_completion_length
    rewards:         [G, R] one column per reward function (set after scoring)
    advantages:      [G] group-normalised advantages (set after scoring)
    old_logps / ref_logps: [G, C] per-token log-probs of the sampling policy / reference (when needed)
    """

    prompt: PromptInputs
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    texts: list[str]
    truncated: torch.Tensor
    record: Any = None
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.completion_ids.shape[0])

    @property
    def completion_lengths(self) -> torch.Tensor:
        """[G] number of completion tokens (including the EOS)."""
        return self.completion_mask.sum(dim=1)
