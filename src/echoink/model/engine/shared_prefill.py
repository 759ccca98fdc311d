"""The shared-prefill engine: each prompt's encoders and prefill run ONCE, then its G continuations are
decoded together against that one prompt K/V (never copied G times: each decode step's attention reads
it once for all G x heads queries — `attention.SharedPrefixCache`, `attention.shared_prefix_attention`).

It applies the same logits processors in the same order and draws from the same random generator in the
same shapes as transformers' `generate`, so under one seed it gives the tokens the transformers-generate
engine gives (tests/test_group_sharing.py checks it, for both families). Prompts are decoded one after
another (decoding many groups in one loop is the next step; the interface already takes them all).

Prefill sharing is a family capability (`require_group_sharing`); the prefill passes the family's prompt
extras (Qwen3-Omni's deepstack features) to the decoder, whose prompt K/V carry them afterwards.
"""

from __future__ import annotations

from typing import Sequence

import torch

from echoink.model.attention import SharedPrefixCache, require_full_attention, shared_prefix_attention
from echoink.model.engine.interface import Group, InProcessEngine
from echoink.model.generation import SamplingSettings, logits_processors
from echoink.model.inputs import PromptInputs


class SharedPrefillEngine(InProcessEngine):
    """`group_sharing: full`'s rollouts: prefill once per prompt, decode its G completions together."""

    def __init__(self, model, tokenizer, policy_version: int = 0) -> None:
        super().__init__(model, tokenizer, policy_version)
        self.family.require_group_sharing("full")
        require_full_attention(self.family.decoder(model))

    def _generate(self, prompts: list[PromptInputs], sampling: SamplingSettings,
                  generators: Sequence[torch.Generator] | None) -> list[Group]:
        return [self._group(prompt, self._decode(prompt, sampling, generators[i] if generators else None))
                for i, prompt in enumerate(prompts)]

    def _decode(self, prompt: PromptInputs, sampling: SamplingSettings,
                generator: torch.Generator | None) -> torch.Tensor:
        """Prefill once, decode G continuations against the one prompt K/V. Returns completion ids [G, C]."""
        model, family, g = self.model, self.family, sampling.num_generations
        head, decoder = family.output_head(model), family.decoder(model)
        embedded = family.embed_prompt(model, prompt)                                      # [1, P, H]
        out = family.run_decoder(model, embedded.embeds, embedded.positions, prompt=embedded, use_cache=True)
        cache = SharedPrefixCache(out.cache, g, sampling.max_new_tokens)
        logits = head(out.hidden[:, -1]).float().expand(g, -1)                            # [G, V]
        processors = logits_processors(sampling, self.suppress, embedded.embeds.device, prompt.length, self.eos_id)
        sequences = prompt.input_ids.expand(g, -1)                                         # [G, P] (what processors see)
        unfinished = torch.ones(g, dtype=torch.bool, device=embedded.embeds.device)
        tokens_out = []
        with shared_prefix_attention(decoder):
            for step in range(sampling.max_new_tokens):
                scores = processors(sequences, logits)
                if sampling.greedy:
                    tokens = scores.argmax(dim=-1)
                else:
                    probs = torch.softmax(scores, dim=-1)
                    tokens = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
                tokens = torch.where(unfinished, tokens, torch.full_like(tokens, self.pad_id))
                tokens_out.append(tokens)
                sequences = torch.cat([sequences, tokens[:, None]], dim=1)
                unfinished &= tokens != self.eos_id
                if not unfinished.any() or step == sampling.max_new_tokens - 1:
                    break
                positions = family.positions_after_prompt(embedded, step, 1, rows=g)         # [.., G, 1]
                out = family.run_decoder(model, family.embed_tokens(model, tokens[:, None]), positions, cache=cache,
                                         use_cache=True, shared_prefix=cache)
                logits = head(out.hidden[:, -1]).float()
        return torch.stack(tokens_out, dim=1)
