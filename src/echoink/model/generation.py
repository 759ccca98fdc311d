"""Generation pieces every rollout engine uses: one sampling-settings type, completion masks, the logits
processors, and a guard around transformers' `generate`.

* `SamplingSettings`: how completions are drawn, for training rollouts and evaluation alike.
* `completion_mask`: tokens up to and including the first EOS.
* `logits_processors`: what `generate` applies for these settings, in its order (the shared-prefill engine
  applies the same, so both engines draw the same tokens under one seed). The tokens never to sample
  (media placeholders) are the family's (`OmniFamily.media_token_ids`).

* `own_generation_defaults`: in transformers 5 every field a GenerationConfig leaves unset is filled
  from the checkpoint's generation_config.json (Qwen ships sampling defaults there). Swapping in an
  empty config for the call makes our explicit settings the only ones that apply.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessorList
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from echoink.config import sampling_problems


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are drawn: `num_generations` per prompt (GRPO's G; evaluation's K samples).

    Greedy decoding ignores temperature / top_p / top_k / seed and gives one completion per prompt.
    `min_new_tokens` suppresses EOS before that many tokens (benchmarks use it to fix C).
    `seed` seeds evaluation's sampled batches (training rollouts draw from the run's RNG).
    """

    num_generations: int = 1
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    greedy: bool = False
    min_new_tokens: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_generations < 1:
            raise ValueError(f"samples must be >= 1, got {self.num_generations}")
        if self.greedy and self.num_generations != 1:
            raise ValueError(f"greedy decoding gives one answer per problem; samples={self.num_generations} needs "
                             "sampling (greedy=False)")
        problems = [] if self.greedy else sampling_problems(self.temperature, self.top_p, self.top_k)
        if problems:
            raise ValueError("; ".join(problems))

    def as_dict(self) -> dict[str, Any]:
        """The settings that shape the output (greedy: only max_new_tokens matters besides the mode)."""
        if self.greedy:
            return {"greedy": True, "samples": 1, "max_new_tokens": self.max_new_tokens}
        return {"greedy": False, "samples": self.num_generations, "temperature": self.temperature,
                "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed, "max_new_tokens": self.max_new_tokens}

    def generation_config(self, eos_id: int, pad_id: int, suppress: list[int]) -> GenerationConfig:
        """An explicit GenerationConfig: every logits-shaping knob set here, none from the checkpoint."""
        common = dict(max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens or None, num_beams=1,
                      num_return_sequences=self.num_generations, eos_token_id=eos_id, pad_token_id=pad_id,
                      suppress_tokens=suppress, repetition_penalty=1.0, no_repeat_ngram_size=0, use_cache=True)
        if self.greedy:
            return GenerationConfig(do_sample=False, **common)
        return GenerationConfig(do_sample=True, temperature=self.temperature, top_p=self.top_p,
                                top_k=self.top_k or 0, **common)


def completion_mask(completion_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[G, C] ids -> ([G, C] mask of tokens up to and including the first EOS, [G] truncated flags)."""
    is_eos = completion_ids == eos_id
    has_eos = is_eos.any(dim=1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1),
                            torch.full_like(has_eos, completion_ids.shape[1], dtype=torch.long))
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device).unsqueeze(0)
    return (positions <= first_eos.unsqueeze(1)).long(), ~has_eos


def generation_owner(model):
    """The module whose generation_config `generate` reads (the base model under a PEFT wrapper)."""
    base = getattr(model, "get_base_model", None)
    return base() if callable(base) else model


@contextmanager
def own_generation_defaults(model):
    """Within the block, unset generation fields fall back to transformers' neutral defaults."""
    target = generation_owner(model)
    saved = target.generation_config
    target.generation_config = GenerationConfig()
    try:
        yield
    finally:
        target.generation_config = saved


def logits_processors(sampling: SamplingSettings, suppress: list[int], device, prompt_length: int = 0,
                      eos_id: int | None = None) -> LogitsProcessorList:
    """The processors `generate` applies for these settings, in generate's order."""
    processors = LogitsProcessorList()
    if sampling.min_new_tokens > 0 and eos_id is not None:
        processors.append(MinNewTokensLengthLogitsProcessor(prompt_length, sampling.min_new_tokens, eos_id,
                                                            device=device))
    processors.append(SuppressTokensLogitsProcessor(suppress, device=device))
    if sampling.greedy:
        return processors
    if sampling.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k:
        processors.append(TopKLogitsWarper(top_k=sampling.top_k))
    if sampling.top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=sampling.top_p))
    return processors
