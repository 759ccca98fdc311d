"""The transformers-generate engine: the thinker's own `generate` (through the family, which keeps the
checkpoint's sampling defaults out and clears the state generate leaves behind).

Prompts are left-padded into batches of up to `max_batch_prompts` (`model.batching`; consecutive prompts
with the same `use_audio_in_video` flag), each answered `num_generations` times in the same call
(`num_return_sequences`): the prompt and its media are repeated G times inside generate, so the encoders
and the prefill run G times. Batched greedy decoding reproduces one prompt per call (tests/test_eval_run.py).
Evaluation uses it with its batch size; training rollouts without `group_sharing: full` use it with one
prompt per call. Draws come from torch's global generator: per-prompt generators are refused.
"""

from __future__ import annotations

from typing import Sequence

import torch

from echoink.model.batching import collate_prompts
from echoink.model.engine.interface import Group, InProcessEngine
from echoink.model.generation import SamplingSettings
from echoink.model.inputs import PromptInputs


class TransformersGenerateEngine(InProcessEngine):
    """`generate(num_return_sequences=G)` on left-padded batches of up to `max_batch_prompts` prompts."""

    def __init__(self, model, tokenizer, policy_version: int = 0, max_batch_prompts: int = 1) -> None:
        super().__init__(model, tokenizer, policy_version)
        if max_batch_prompts < 1:
            raise ValueError(f"max_batch_prompts must be >= 1, got {max_batch_prompts}")
        self.max_batch_prompts = max_batch_prompts

    def _generate(self, prompts: list[PromptInputs], sampling: SamplingSettings,
                  generators: Sequence[torch.Generator] | None) -> list[Group]:
        if generators is not None:
            raise ValueError("the transformers-generate engine draws from torch's global generator; per-prompt "
                             "generators need the shared-prefill engine (group_sharing: full)")
        config = sampling.generation_config(self.eos_id, self.pad_id, self.suppress)
        groups: list[Group] = []
        for batch in self._batches(prompts):
            collated = collate_prompts(batch, self.pad_id)
            sequences = self.family.generate(self.model, collated, config)
            completions = sequences[:, collated["input_ids"].shape[1]:]                   # [B*G, C]
            for prompt, ids in zip(batch, completions.split(sampling.num_generations)):
                groups.append(self._group(prompt, ids))
        return groups

    def _batches(self, prompts: list[PromptInputs]) -> list[list[PromptInputs]]:
        """Consecutive prompts, at most `max_batch_prompts` per batch, one `use_audio_in_video` flag per batch."""
        batches: list[list[PromptInputs]] = []
        for prompt in prompts:
            last = batches[-1] if batches else None
            if (last is None or len(last) == self.max_batch_prompts
                    or bool(last[0].use_audio_in_video) != bool(prompt.use_audio_in_video)):
                batches.append([prompt])
            else:
                last.append(prompt)
        return batches
