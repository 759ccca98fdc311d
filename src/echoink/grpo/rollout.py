"""Sample G completions for one prompt (eval mode, KV cache on).

Two exact paths, chosen by `share_prefill`:

* plain (`share_prefill=False`): transformers' `generate(num_return_sequences=G)`, which repeats the
  prompt G times and so runs the audio encoder and the whole prompt prefill G times.
* shared (`share_prefill=True`): encode the media and prefill the prompt ONCE, repeat the KV cache G
  ways, then sample all G continuations together. It applies the same logits processors in the
  same order and draws from the same RNG in the same shapes as `generate`, so under one seed both
  paths give the same tokens (a test checks this).

Placeholder and boundary tokens (`<|AUDIO|>`, `<|IMAGE|>`, `<|VIDEO|>`, their bos/eos) are never
sampled: a sampled placeholder would make the training forward fail.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessorList
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from echoink.model.prompt_embedding import embed_prompt, prompt_positions
from echoink.grpo.types import Group, PromptInputs

MEDIA_TOKEN_ATTRIBUTES = ("audio_token", "image_token", "video_token", "audio_bos_token", "audio_eos_token",
                          "vision_bos_token", "vision_eos_token")


@dataclass(frozen=True)
class SamplingConfig:
    num_generations: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    greedy: bool = False
    min_new_tokens: int = 0  # EOS is suppressed before this many tokens (benchmarks use it to fix C)


def media_token_ids(tokenizer) -> list[int]:
    """Ids of the multimodal placeholder and boundary tokens (never to be sampled)."""
    ids = {tokenizer.convert_tokens_to_ids(getattr(tokenizer, attr)) for attr in MEDIA_TOKEN_ATTRIBUTES
           if getattr(tokenizer, attr, None)}
    ids.update(tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_pad|>",) if t in tokenizer.get_vocab())
    return sorted(i for i in ids if i is not None and i >= 0)


def completion_mask(completion_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[G, C] ids -> ([G, C] mask of tokens up to and including the first EOS, [G] truncated flags)."""
    is_eos = completion_ids == eos_id
    has_eos = is_eos.any(dim=1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, completion_ids.shape[1], dtype=torch.long))
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device).unsqueeze(0)
    return (positions <= first_eos.unsqueeze(1)).long(), ~has_eos


@torch.no_grad()
def sample_group(model, prompt: PromptInputs, sampling: SamplingConfig, tokenizer,
                 share_prefill: bool = True) -> Group:
    """One prompt -> a Group of `num_generations` sampled completions. `model` must be in eval mode."""
    eos_id, pad_id = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id
    suppress = media_token_ids(tokenizer)
    if share_prefill:
        ids = _sample_shared_prefill(model, prompt, sampling, eos_id, pad_id, suppress)
    else:
        ids = _sample_with_generate(model, prompt, sampling, eos_id, pad_id, suppress)
    mask, truncated = completion_mask(ids, eos_id)
    ids = ids.masked_fill(mask == 0, pad_id)
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    return Group(prompt=prompt, completion_ids=ids, completion_mask=mask, texts=texts, truncated=truncated)


def _generation_config(sampling: SamplingConfig, eos_id: int, pad_id: int, suppress: list[int]) -> GenerationConfig:
    common = dict(max_new_tokens=sampling.max_new_tokens, min_new_tokens=sampling.min_new_tokens or None,
                  num_return_sequences=sampling.num_generations, eos_token_id=eos_id, pad_token_id=pad_id,
                  suppress_tokens=suppress, use_cache=True)
    if sampling.greedy:
        return GenerationConfig(do_sample=False, **common)
    return GenerationConfig(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                            top_k=sampling.top_k or 0, **common)


def _sample_with_generate(model, prompt, sampling, eos_id, pad_id, suppress) -> torch.Tensor:
    config = _generation_config(sampling, eos_id, pad_id, suppress)
    out = model.generate(**prompt.model_kwargs(), generation_config=config)
    return out[:, prompt.length:]


def logits_processors(sampling: SamplingConfig, suppress: list[int], device, prompt_length: int = 0,
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


def _sample_shared_prefill(model, prompt, sampling, eos_id, pad_id, suppress) -> torch.Tensor:
    """Prefill once, repeat the cache G ways, sample. Returns completion ids [G, C]."""
    g = sampling.num_generations
    language_model = model.model.language_model
    embeds = embed_prompt(model, prompt)                           # [1, P, H]
    positions = prompt_positions(model, prompt)                    # [3, 1, P]
    out = language_model(inputs_embeds=embeds, position_ids=positions, use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(g)
    logits = model.lm_head(out.last_hidden_state[:, -1]).float().expand(g, -1)  # [G, V]
    next_position = positions.max() + 1
    processors = logits_processors(sampling, suppress, embeds.device, prompt.length, eos_id)
    sequences = prompt.input_ids.expand(g, -1)                     # [G, P] (what processors see)
    unfinished = torch.ones(g, dtype=torch.bool, device=embeds.device)
    tokens_out = []
    for step in range(sampling.max_new_tokens):
        scores = processors(sequences, logits)
        if sampling.greedy:
            tokens = scores.argmax(dim=-1)
        else:
            tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad_id))
        tokens_out.append(tokens)
        sequences = torch.cat([sequences, tokens[:, None]], dim=1)
        unfinished &= tokens != eos_id
        if not unfinished.any() or step == sampling.max_new_tokens - 1:
            break
        step_positions = (next_position + step).view(1, 1, 1).expand(3, g, 1)
        out = language_model(inputs_embeds=model.get_input_embeddings()(tokens[:, None]),
                             position_ids=step_positions, past_key_values=cache, use_cache=True)
        logits = model.lm_head(out.last_hidden_state[:, -1]).float()
    return torch.stack(tokens_out, dim=1)
