"""The rollout engine's interface: prompts in, groups of sampled completions out.

    engine.generate(prompts, sampling, generators=None) -> list[Group]     one Group per prompt, in order
    engine.sync(policy, version)                                           after each optimizer step

Training rollouts (grpo), dynamic-sampling rounds and evaluation (eval) all draw completions through an
engine; greedy evaluation is an engine called with greedy settings. An engine may decode its prompts
one after another or many groups in one loop; callers hand it every prompt they have at once.

Random streams. Without `generators`, sampling draws from torch's global generator (training rollouts:
the run's RNG, restored exactly on resume). With `generators` (one `torch.Generator` per prompt, on the
model's device), prompt i's completions draw only from `generators[i]`, so its samples do not depend on
which other prompts share the call: the hook for batched engines seeded per (run seed, step, prompt
position). An engine that cannot honour per-prompt streams raises ValueError when given them.

Weights. `sync(policy, version)` is called after every optimizer step with the policy module and the
number of optimizer steps taken. In-process engines decode with that very module, so they only note the
version; an out-of-process engine (vLLM) would copy the weights there. Every Group carries the
`policy_version` of the weights that sampled it (what asynchronous rollouts need to bound staleness).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from echoink.model.families import family_of_model
from echoink.model.generation import SamplingSettings, completion_mask
from echoink.model.inputs import PromptInputs


@dataclass(frozen=True)
class Group:
    """One prompt and its G sampled completions (what an engine returns per prompt).

    completion_ids:  [G, C] sampled tokens, right-padded with the pad id (C = the group's longest completion)
    completion_mask: [G, C] 1 for tokens up to and including the first EOS, 0 after
    texts:           G decoded completions (special tokens removed; the chat template's generation prefix first)
    truncated:       [G] bool, True where no EOS was produced within max_new_tokens
    policy_version:  optimizer steps the sampling weights had taken (0: the initial weights)
    """

    prompt: PromptInputs
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    texts: list[str]
    truncated: torch.Tensor
    policy_version: int = 0

    @property
    def size(self) -> int:
        return int(self.completion_ids.shape[0])

    @property
    def completion_lengths(self) -> torch.Tensor:
        """[G] number of completion tokens (including the EOS)."""
        return self.completion_mask.sum(dim=1)


class RolloutEngine(ABC):
    """Samples completions for prompts (see the module docstring)."""

    policy_version: int

    @abstractmethod
    def generate(self, prompts: Sequence[PromptInputs], sampling: SamplingSettings,
                 generators: Sequence[torch.Generator] | None = None) -> list[Group]:
        """-> one Group of `sampling.num_generations` completions per prompt, in the prompts' order."""

    @abstractmethod
    def sync(self, policy: nn.Module, version: int) -> None:
        """The policy after `version` optimizer steps: the weights every later `generate` samples from."""


class InProcessEngine(RolloutEngine):
    """An engine that decodes with the training process's own thinker (`model`, unwrapped) and its tokenizer.

    Tokens come from the family: EOS (`end_of_turn_token`), the pad id, the media tokens never sampled.
    `generate` runs without gradient, in eval mode (the model's mode is restored afterwards).
    """

    def __init__(self, model: nn.Module, tokenizer, policy_version: int = 0) -> None:
        self.model, self.tokenizer, self.policy_version = model, tokenizer, policy_version
        self.family = family_of_model(model)
        self.eos_id, self.pad_id = self.family.eos_id(tokenizer), tokenizer.pad_token_id
        if self.pad_id is None:
            raise ValueError("the tokenizer has no pad token (completions are padded with it)")
        self.suppress = self.family.media_token_ids(tokenizer)

    def sync(self, policy: nn.Module, version: int) -> None:
        """In process the engine samples from `policy` itself: point at it and note the version."""
        self.model, self.policy_version = policy, version

    def generate(self, prompts: Sequence[PromptInputs], sampling: SamplingSettings,
                 generators: Sequence[torch.Generator] | None = None) -> list[Group]:
        if generators is not None and len(generators) != len(prompts):
            raise ValueError(f"{len(generators)} generators for {len(prompts)} prompts (one per prompt)")
        with torch.no_grad(), _eval_mode(self.model):
            return self._generate(list(prompts), sampling, generators)

    @abstractmethod
    def _generate(self, prompts: list[PromptInputs], sampling: SamplingSettings,
                  generators: Sequence[torch.Generator] | None) -> list[Group]:
        ...

    def _group(self, prompt: PromptInputs, ids: torch.Tensor) -> Group:
        """Sampled ids [G, C'] (anything after an EOS is ignored) -> the prompt's Group, trimmed to its longest."""
        mask, truncated = completion_mask(ids, self.eos_id)
        length = int(mask.sum(dim=1).max())
        ids, mask = ids[:, :length].masked_fill(mask[:, :length] == 0, self.pad_id), mask[:, :length]
        texts = [prompt.generation_prefix + text
                 for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        return Group(prompt=prompt, completion_ids=ids, completion_mask=mask, texts=texts, truncated=truncated,
                     policy_version=self.policy_version)


@contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
