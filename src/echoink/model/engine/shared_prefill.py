"""The shared-prefill engine: each prompt's encoders and prefill run ONCE, and the G continuations of MANY
prompts are decoded together in one loop, each group against its own prompt K/V (kept once, never copied G
times, never padded to another prompt's length); finished rows leave the loop (`batched_decode`).

`batch_size` caps the prompts of one loop (None: every prompt of the call, which is what a training round
or an evaluation batch hands over) and `token_budget` the K/V positions a loop holds (prompt + G *
max_new_tokens per prompt; None: no limit); a call over either runs several loops one after another.

It applies `generate`'s logits processors in `generate`'s order and draws from each prompt's generator in
`generate`'s shapes, so under one seed per prompt it gives the tokens transformers' `generate` gives for that
prompt alone — whatever the loop's size or make-up (tests/test_batched_decode.py). `stats` holds what the
last `generate` call cost (loops, decode steps, rows per step, completion tokens).

Prefill sharing is a family capability (`require_group_sharing`); the prefill passes the family's prompt
extras (Qwen3-Omni's deepstack features) to the decoder, whose prompt K/V carry them afterwards.
"""

from __future__ import annotations

from typing import Sequence

import torch

from echoink.model.attention import require_full_attention
from echoink.model.engine.batched_decode import DecodeStats, SpecialTokens, decode_groups
from echoink.model.engine.interface import Group, InProcessEngine
from echoink.model.generation import SamplingSettings
from echoink.model.inputs import PromptInputs


class SharedPrefillEngine(InProcessEngine):
    """`group_sharing: full`'s rollouts and evaluation: prefill once per prompt, many groups per decode loop."""

    def __init__(self, model, tokenizer, policy_version: int = 0, batch_size: int | None = None,
                 token_budget: int | None = None) -> None:
        super().__init__(model, tokenizer, policy_version)
        self.family.require_group_sharing("full")
        require_full_attention(self.family.decoder(model))
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"rollout_batch_size must be >= 1 or None, got {batch_size}")
        if token_budget is not None and token_budget < 1:
            raise ValueError(f"rollout_token_budget must be >= 1 or None, got {token_budget}")
        self.batch_size, self.token_budget = batch_size, token_budget
        self.stats = DecodeStats()

    def _generate(self, prompts: list[PromptInputs], sampling: SamplingSettings,
                  generators: Sequence[torch.Generator] | None) -> list[Group]:
        if not prompts:
            self.stats = DecodeStats()
            return []
        tokens = SpecialTokens(self.eos_id, self.pad_id, tuple(self.suppress))
        ids, self.stats = decode_groups(self.model, prompts, sampling, generators or [None] * len(prompts), tokens,
                                        self.batch_size, self.token_budget)
        return [self._group(prompt, group_ids) for prompt, group_ids in zip(prompts, ids)]
