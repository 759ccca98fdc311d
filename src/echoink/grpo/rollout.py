"""Sample G completions for one prompt (eval mode, KV cache on).

Two exact paths, chosen by `share_prefill`:

* plain (`share_prefill=False`): transformers' `generate(num_return_sequences=G)`, which repeats the
  prompt G times and so runs the audio encoder and the whole prompt prefill G times.
* shared (`share_prefill=True`): encode the media and prefill the prompt ONCE, then sample all G
  continuations together against that one prompt K/V (never copied G times: each decode step's
  attention reads it once for all G x heads queries — `SharedPrefixCache` and
  `shared_prefix_attention` below). It applies the same logits processors in the same order and
  draws from the same RNG in the same shapes as `generate`, so under one seed both paths give the
  same tokens (a test checks this).

`SamplingSettings.min_new_tokens` suppresses EOS before that many tokens, in both paths (the
benchmark uses it to make every completion exactly C tokens long).

Prefill sharing is a family capability (`require_group_sharing`); the prefill passes Qwen3-Omni's
deepstack visual features to the language model (its prompt K/V carry them afterwards).

Placeholder and boundary tokens (`<|AUDIO|>`, `<|IMAGE|>`, `<|VIDEO|>`, their bos/eos) are never
sampled: a sampled placeholder would make the training forward fail.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, LogitsProcessorList
from transformers.cache_utils import Cache, DynamicLayer
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from echoink.grpo.types import Group
from echoink.model.families import family_of_model
from echoink.model.inputs import PromptInputs
from echoink.model.generation import (
    SamplingSettings,
    completion_mask,
    forget_rope_deltas,
    media_token_ids,
    own_generation_defaults,
)
from echoink.model.prompt_embedding import (
    attention_implementation,
    embed_prompt_with_deepstack,
    prompt_positions,
    require_full_attention,
)

@torch.no_grad()
def sample_group(model, prompt: PromptInputs, sampling: SamplingSettings, tokenizer,
                 share_prefill: bool = True) -> Group:
    """One prompt -> a Group of `num_generations` sampled completions. `model` must be in eval mode."""
    eos_id, pad_id = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id
    suppress = media_token_ids(tokenizer)
    if share_prefill:
        family_of_model(model).require_group_sharing("full")
        ids = _sample_shared_prefill(model, prompt, sampling, eos_id, pad_id, suppress)
    else:
        ids = _sample_with_generate(model, prompt, sampling, eos_id, pad_id, suppress)
    mask, truncated = completion_mask(ids, eos_id)
    ids = ids.masked_fill(mask == 0, pad_id)
    texts = [prompt.generation_prefix + text for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return Group(prompt=prompt, completion_ids=ids, completion_mask=mask, texts=texts, truncated=truncated)


def _sample_with_generate(model, prompt, sampling, eos_id, pad_id, suppress) -> torch.Tensor:
    config = sampling.generation_config(eos_id, pad_id, suppress)
    with own_generation_defaults(model):  # our settings only, never the checkpoint's sampling defaults
        out = model.generate(**prompt.model_kwargs(), generation_config=config)
    forget_rope_deltas(model)
    return out[:, prompt.length:]


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


def _sample_shared_prefill(model, prompt, sampling, eos_id, pad_id, suppress) -> torch.Tensor:
    """Prefill once, decode G continuations against the one prompt K/V. Returns completion ids [G, C]."""
    g = sampling.num_generations
    language_model = model.model.language_model
    require_full_attention(language_model)
    embeds, deepstack = embed_prompt_with_deepstack(model, prompt)  # [1, P, H]
    positions = prompt_positions(model, prompt)                    # [3, 1, P]
    out = language_model(inputs_embeds=embeds, position_ids=positions, use_cache=True,
                         **(deepstack.language_model_kwargs() if deepstack else {}))
    cache = SharedPrefixCache(out.past_key_values, g, sampling.max_new_tokens)
    logits = model.lm_head(out.last_hidden_state[:, -1]).float().expand(g, -1)  # [G, V]
    next_position = positions.max() + 1
    processors = logits_processors(sampling, suppress, embeds.device, prompt.length, eos_id)
    sequences = prompt.input_ids.expand(g, -1)                     # [G, P] (what processors see)
    unfinished = torch.ones(g, dtype=torch.bool, device=embeds.device)
    tokens_out = []
    with shared_prefix_attention(language_model):
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
                                 position_ids=step_positions, past_key_values=cache, use_cache=True,
                                 shared_prefix=cache)
            logits = model.lm_head(out.last_hidden_state[:, -1]).float()
    return torch.stack(tokens_out, dim=1)


# ---- decoding G continuations of one prompt without copying its K/V G times ------------------------------
#
# `generate` keeps G copies of the prompt's keys/values and, every step, concatenates each layer's
# whole cache again and attends each completion to its own copy. Here the prompt K/V are kept once
# ([kv_heads, P, d]); each step the G x heads queries attend to them in one matmul, and to the
# completions' own K/V (a preallocated [kv_heads, G, C, d] buffer), with one softmax over both —
# the same attention, without the G copies and the per-step re-concatenation.

SHARED_PREFIX_ATTENTION = "echoink_shared_prefix"


class _SharedPrefixLayer(DynamicLayer):
    """One layer's prompt K/V (once) + the completions' own K/V (written in place, never re-concatenated).

    Layouts: prompt [kv_heads, P, d]; own [kv_heads, G, capacity, d] (head-major, so that the
    attention below needs no transposes).
    """

    def __init__(self, prompt_keys: torch.Tensor, prompt_values: torch.Tensor, batch: int, capacity: int) -> None:
        super().__init__()
        self.lazy_initialization(prompt_keys, prompt_values)
        self.prompt_keys, self.prompt_values = prompt_keys[0], prompt_values[0]      # [kv_heads, P, d]
        shape = (prompt_keys.shape[1], batch, capacity, prompt_keys.shape[3])
        self.own_keys, self.own_values = prompt_keys.new_empty(shape), prompt_values.new_empty(shape)
        self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key/value_states [G, kv_heads, n, d] -> this layer's own K/V so far, [kv_heads, G, t, d]."""
        end = self.length + key_states.shape[-2]
        self.own_keys[:, :, self.length:end] = key_states.transpose(0, 1)
        self.own_values[:, :, self.length:end] = value_states.transpose(0, 1)
        self.length = end
        return self.own_keys[:, :, :end], self.own_values[:, :, :end]

    def get_seq_length(self) -> int:
        return self.prompt_keys.shape[-2] + self.length


class SharedPrefixCache(Cache):
    """A prefilled cache of ONE prompt, decoded `batch` ways (use with `shared_prefix_attention`)."""

    def __init__(self, prefilled: Cache, batch: int, capacity: int) -> None:
        super().__init__(layers=[_SharedPrefixLayer(layer.keys, layer.values, batch, capacity)
                                 for layer in prefilled.layers])


def _shared_prefix_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                                     shared_prefix: SharedPrefixCache | None = None, **kwargs):
    """One new token per completion attends to [shared prompt K/V, its own K/V]: -> [G, 1, heads, d].

    query [G, heads, 1, d]; key/value: the layer's own K/V [kv_heads, G, t, d] (from `update`).
    Query head h uses K/V head h // rep, as in `repeat_kv`.
    """
    if shared_prefix is None or query.shape[2] != 1:  # not a shared-prefix decode step: plain sdpa
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    layer = shared_prefix.layers[module.layer_idx]
    g, heads, _, d = query.shape
    kv_heads, p = layer.prompt_keys.shape[0], layer.prompt_keys.shape[1]
    q = (query * scaling).view(g, kv_heads, heads // kv_heads, d).transpose(0, 1)       # [kvh, G, rep, d]
    prompt_scores = torch.matmul(q.reshape(kv_heads, -1, d), layer.prompt_keys.transpose(1, 2))  # [kvh, G*rep, P]
    own_scores = torch.matmul(q, key.transpose(2, 3))                                   # [kvh, G, rep, t]
    scores = torch.cat([prompt_scores.view(kv_heads, g, -1, p), own_scores], dim=-1)    # [kvh, G, rep, P + t]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs[..., :p].reshape(kv_heads, -1, p), layer.prompt_values)   # [kvh, G*rep, d]
    out = out.view(kv_heads, g, -1, d) + torch.matmul(probs[..., p:], value)            # [kvh, G, rep, d]
    return out.transpose(0, 1).reshape(g, 1, heads, d), None


AttentionInterface.register(SHARED_PREFIX_ATTENTION, _shared_prefix_attention_forward)


def shared_prefix_attention(language_model):
    """Route the language model's attention through `_shared_prefix_attention_forward` for a while."""
    return attention_implementation(language_model, SHARED_PREFIX_ATTENTION)
