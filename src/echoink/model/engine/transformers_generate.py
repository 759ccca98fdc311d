"""The transformers-generate engine: the thinker's own `generate` (through the family, which keeps the
checkpoint's sampling defaults out and clears the state generate leaves behind).

Prompts are left-padded into batches of up to `max_batch_prompts` (`model.batching`; consecutive prompts
with the same `use_audio_in_video` flag), each answered `num_generations` times in the same call
(`num_return_sequences`): the prompt and its media are repeated G times inside generate, so the encoders
and the prefill run G times. Batched greedy decoding reproduces one prompt per call (tests/test_eval_run.py).
Training rollouts without `group_sharing: full` use it with one prompt per call.

Random streams. Without generators, draws come from torch's global generator. With per-prompt generators,
each prompt runs in a call of its own with the global generator of the model's device set to that prompt's
generator state (and the advanced state handed back to the generator); the caller's global state is restored
afterwards. Its draws are then exactly those of the shared-prefill engine under the same generators.
"""

from __future__ import annotations

from contextlib import contextmanager
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
        config = sampling.generation_config(self.eos_id, self.pad_id, self.suppress)
        if generators is not None:
            return [self._generate_batch([prompt], sampling, config, generator)[0]
                    for prompt, generator in zip(prompts, generators)]
        return [group for batch in self._batches(prompts) for group in self._generate_batch(batch, sampling, config)]

    def _generate_batch(self, batch: list[PromptInputs], sampling: SamplingSettings, config,
                        generator: torch.Generator | None = None) -> list[Group]:
        """One generate call on `batch` (left-padded), drawing from `generator` when given."""
        collated = collate_prompts(batch, self.pad_id)
        with _drawing_from(generator):
            sequences = self.family.generate(self.model, collated, config)
        completions = sequences[:, collated["input_ids"].shape[1]:]                       # [B*G, C]
        return [self._group(prompt, ids) for prompt, ids in zip(batch, completions.split(sampling.num_generations))]

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


@contextmanager
def _drawing_from(generator: torch.Generator | None):
    """Within the block, the global generator of `generator`'s device IS `generator` (its state goes in, and the
    advanced state comes back out); the caller's global state is restored afterwards. None: a no-op."""
    if generator is None:
        yield
        return
    device = generator.device
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda" if cuda else "cpu"):
        if cuda:
            torch.cuda.set_rng_state(generator.get_state(), device)
        else:
            torch.set_rng_state(generator.get_state())
        yield
        generator.set_state(torch.cuda.get_rng_state(device) if cuda else torch.get_rng_state())
