"""Many groups in one decode loop: each prompt's K/V kept once, each prompt's own random stream.

    decode_groups(model, prompts, sampling, seeds, tokens)  -> ([G, C_b] completion ids per prompt, DecodeStats)

A loop takes B prompts and answers each G times (B*G rows):

* **prefill**: each prompt's media are encoded and its prompt run through the language model once
  (`prefill_prompts`); its keys/values are kept once per layer, [kv_heads, P_b, d], never copied G times
  and never padded to another prompt's length.
* **decode**: every step runs ONE language-model forward for the rows still generating, of all groups
  together. Attention (`_batched_prefix_attention_forward`) reads, for the rows of group b, group b's
  prompt K/V (one matmul per group: no padding shared across groups) and each row's own K/V (one
  batched matmul over all rows), with one softmax over both. Each row has its own M-RoPE position
  (group b's completion token t sits at max(prompt b positions) + 1 + t).
* **compaction**: a row that has produced EOS leaves the computation. The completions' own K/V buffer
  [kv_heads, rows, capacity, d] has one length for all rows, so leaving is an index-select of the rows
  that remain (in place, into the same buffer); a step costs in proportion to the rows still running.

Random streams. Group b draws from its own `torch.Generator`, seeded by the caller (`seeds[b]`,
e.g. from (run seed, step, the prompt's place in the step's plan): `prompt_seed`). `torch.multinomial`
on a [G, V] matrix consumes the same random numbers whatever the values, so each decode step a group
draws from a full [G, V] matrix — its finished rows given a uniform placeholder distribution — exactly
as transformers' `generate(num_return_sequences=G)` does for one prompt under `torch.manual_seed(seed)`.
A group's draws therefore depend on that group alone: not on which prompts share the loop, the loop's
size, the number of processes, or when rows are compacted (tests compare with `generate`).

Logits processors are the ones `generate` applies, in its order (`logits_processors`); each acts on
every row alike, so they run once for all rows.

Loops. `plan_loops` cuts the prompts into loops of at most `batch_size` prompts (None: all in one) and
at most `token_budget` K/V positions (sum over the loop of P_b + G * max_new_tokens; None: no limit);
a prompt over the budget alone runs in a loop of its own. Since every group's draws are its own, how
the prompts are cut changes no token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
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

from echoink.model.generation import SamplingSettings
from echoink.model.inputs import PromptInputs
from echoink.model.prompt_embedding import (
    attention_implementation,
    embed_prompt_with_deepstack,
    prompt_positions,
    require_full_attention,
)

BATCHED_PREFIX_ATTENTION = "echoink_batched_prefix"


# ---- random streams and loop plans ----------------------------------------------------------------------

def prompt_seed(*parts: int) -> int:
    """A 63-bit seed from integers such as (run seed, step, position in the step's plan)."""
    words = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(words[0]) << 32 | int(words[1])) & ((1 << 63) - 1))


def prompt_generator(seed: int, device) -> torch.Generator:
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


def plan_loops(prompt_lengths: Sequence[int], group_size: int, max_new_tokens: int, batch_size: int | None = None,
               token_budget: int | None = None) -> list[list[int]]:
    """Prompt indices per decode loop, in order: at most `batch_size` prompts and `token_budget` K/V positions
    (P_b + G * max_new_tokens per prompt) in a loop; a prompt over the budget runs alone."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"rollout_batch_size must be >= 1 or None, got {batch_size}")
    loops: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index, length in enumerate(prompt_lengths):
        cost = int(length) + group_size * max_new_tokens
        full = batch_size is not None and len(current) >= batch_size
        over = token_budget is not None and used + cost > token_budget
        if current and (full or over):
            loops.append(current)
            current, used = [], 0
        current.append(index)
        used += cost
    if current:
        loops.append(current)
    return loops


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


@dataclass(frozen=True)
class SpecialTokens:
    """The ids decoding needs: EOS ends a row, pad fills after it, `suppress` are never sampled."""

    eos_id: int
    pad_id: int
    suppress: tuple[int, ...]


@dataclass(frozen=True)
class DecodeStats:
    """What decoding cost: loops, decode forwards, rows summed over those forwards, completion tokens
    (up to and including EOS) and prompts prefilled."""

    loops: int = 0
    decode_steps: int = 0
    row_steps: int = 0
    completion_tokens: int = 0
    prompts: int = 0

    def __add__(self, other: "DecodeStats") -> "DecodeStats":
        return DecodeStats(*(a + b for a, b in zip(self.as_tuple(), other.as_tuple())))

    def as_tuple(self) -> tuple[int, ...]:
        return (self.loops, self.decode_steps, self.row_steps, self.completion_tokens, self.prompts)

    @property
    def rows_per_step(self) -> float:
        return self.row_steps / self.decode_steps if self.decode_steps else 0.0


# ---- prefill ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PrefilledPrompt:
    """One prompt after its prefill: per-layer keys/values [kv_heads, P, d], the last position's logits [1, V]
    and the position of the first completion token (a 0-d tensor, M-RoPE's max + 1)."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    logits: torch.Tensor
    next_position: torch.Tensor


def prefill_prompt(model, prompt: PromptInputs) -> PrefilledPrompt:
    """Encode the prompt's media and run the prompt through the language model once."""
    language_model = model.model.language_model
    embeds, deepstack = embed_prompt_with_deepstack(model, prompt)  # [1, P, H]
    positions = prompt_positions(model, prompt)                    # [3, 1, P]
    out = language_model(inputs_embeds=embeds, position_ids=positions, use_cache=True,
                         **(deepstack.language_model_kwargs() if deepstack else {}))
    layers = out.past_key_values.layers
    return PrefilledPrompt(keys=tuple(layer.keys[0] for layer in layers),
                           values=tuple(layer.values[0] for layer in layers),
                           logits=model.lm_head(out.last_hidden_state[:, -1]).float(),
                           next_position=positions.max() + 1)


# ---- the cache: prompt K/V once per group, own K/V for every running row --------------------------------

class _BatchedPrefixLayer(DynamicLayer):
    """One layer: each group's prompt K/V [kv_heads, P_b, d] and the running rows' own K/V, written in place
    into [kv_heads, rows, capacity, d] (head-major, so that attention needs no transposes)."""

    def __init__(self, prompt_keys: list[torch.Tensor], prompt_values: list[torch.Tensor], rows: int,
                 capacity: int) -> None:
        super().__init__()
        self.lazy_initialization(prompt_keys[0][None], prompt_values[0][None])
        self.prompt_keys, self.prompt_values = prompt_keys, prompt_values
        kv_heads, _, head_dim = prompt_keys[0].shape
        shape = (kv_heads, rows, capacity, head_dim)
        self.own_keys, self.own_values = prompt_keys[0].new_empty(shape), prompt_values[0].new_empty(shape)
        self.rows, self.length = rows, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key/value_states [rows, kv_heads, 1, d] -> this layer's own K/V so far, [kv_heads, rows, t, d]."""
        end = self.length + key_states.shape[-2]
        self.own_keys[:, : self.rows, self.length:end] = key_states.transpose(0, 1)
        self.own_values[:, : self.rows, self.length:end] = value_states.transpose(0, 1)
        self.length = end
        return self.own_keys[:, : self.rows, :end], self.own_values[:, : self.rows, :end]

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Keep only the rows `keep` (ascending indices), moved to the front of the same buffers."""
        n = int(keep.numel())
        self.own_keys[:, :n, : self.length] = self.own_keys[:, keep, : self.length]
        self.own_values[:, :n, : self.length] = self.own_values[:, keep, : self.length]
        self.rows = n

    def get_seq_length(self) -> int:
        return self.length  # the mask is never built (the attention below needs none); positions are explicit


class BatchedPrefixCache(Cache):
    """A loop's cache: per-group prompt K/V, the running rows' own K/V, and which rows belong to which group.

    `slices`: (group index, first row, end row) of every group with running rows, rows grouped by group.
    """

    def __init__(self, prefilled: Sequence[PrefilledPrompt], group_size: int, capacity: int) -> None:
        layers = [_BatchedPrefixLayer([p.keys[i] for p in prefilled], [p.values[i] for p in prefilled],
                                      len(prefilled) * group_size, capacity)
                  for i in range(len(prefilled[0].keys))]
        super().__init__(layers=layers)
        self.slices = [(b, b * group_size, (b + 1) * group_size) for b in range(len(prefilled))]

    def keep_rows(self, keep: torch.Tensor, groups: torch.Tensor) -> None:
        """Keep rows `keep` [n] (ascending), whose groups are `groups` [n] (ascending too)."""
        for layer in self.layers:
            layer.keep_rows(keep)
        ids, counts = torch.unique_consecutive(groups, return_counts=True)
        ends = np.cumsum(counts.tolist())
        self.slices = [(b, int(end - count), int(end)) for b, count, end in zip(ids.tolist(), counts.tolist(), ends)]


def _batched_prefix_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                                      batched_prefix: BatchedPrefixCache | None = None, **kwargs):
    """One new token per running row attends to [its group's prompt K/V, its own K/V]: -> [rows, 1, heads, d].

    query [rows, heads, 1, d]; key/value: the layer's own K/V [kv_heads, rows, t, d] (from `update`).
    Query head h uses K/V head h // rep, as in `repeat_kv`. The arithmetic of a group's rows is the same
    whatever other groups share the loop.
    """
    if batched_prefix is None or query.shape[2] != 1:  # not a batched decode step: plain sdpa
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    layer = batched_prefix.layers[module.layer_idx]
    rows, heads, _, d = query.shape
    kv_heads = key.shape[0]
    rep = heads // kv_heads
    q = (query * scaling).view(rows, kv_heads, rep, d).transpose(0, 1)                   # [kvh, rows, rep, d]
    own_scores = torch.matmul(q, key.transpose(2, 3))                                   # [kvh, rows, rep, t]
    outputs = []
    for group, start, end in batched_prefix.slices:
        prompt_keys, prompt_values = layer.prompt_keys[group], layer.prompt_values[group]  # [kvh, P_b, d]
        n, p = end - start, prompt_keys.shape[1]
        prompt_scores = torch.matmul(q[:, start:end].reshape(kv_heads, n * rep, d), prompt_keys.transpose(1, 2))
        scores = torch.cat([prompt_scores.view(kv_heads, n, rep, p), own_scores[:, start:end]], dim=-1)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)       # [kvh, n, rep, P_b + t]
        out = torch.matmul(probs[..., :p].reshape(kv_heads, n * rep, p), prompt_values)  # [kvh, n*rep, d]
        outputs.append(out.view(kv_heads, n, rep, d) + torch.matmul(probs[..., p:], value[:, start:end]))
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)                # [kvh, rows, rep, d]
    return out.transpose(0, 1).reshape(rows, 1, heads, d), None


AttentionInterface.register(BATCHED_PREFIX_ATTENTION, _batched_prefix_attention_forward)


# ---- the loop ----------------------------------------------------------------------------------------------

class _Sampler:
    """Next tokens of the running rows: the processors on all rows at once, then each group draws from its own
    generator on a full [G, V] matrix (finished rows: a uniform placeholder), as `generate` would for it alone."""

    def __init__(self, sampling: SamplingSettings, tokens: SpecialTokens, generators: Sequence[torch.Generator | None],
                 device) -> None:
        self.sampling, self.generators = sampling, generators
        self.processors = logits_processors(sampling, list(tokens.suppress), device, 0, tokens.eos_id)

    def __call__(self, logits: torch.Tensor, step: int, slices, local_rows: torch.Tensor) -> torch.Tensor:
        """logits [rows, V] (float32) -> tokens [rows]; `local_rows` [rows]: each row's index in its group."""
        rows, vocab = logits.shape
        scores = self.processors(torch.empty((rows, step), dtype=torch.long, device=logits.device), logits)  # shape only
        if self.sampling.greedy:
            return scores.argmax(dim=-1)
        probs = torch.softmax(scores, dim=-1)
        size = self.sampling.num_generations
        tokens = []
        for group, start, end in slices:
            group_probs = probs[start:end]
            if end - start < size:
                group_probs = probs.new_ones(size, vocab).index_copy_(0, local_rows[start:end], group_probs)
            drawn = torch.multinomial(group_probs, num_samples=1, generator=self.generators[group]).squeeze(1)
            tokens.append(drawn if end - start == size else drawn[local_rows[start:end]])
        return tokens[0] if len(tokens) == 1 else torch.cat(tokens)


def decode_loop(model, prompts: Sequence[PromptInputs], sampling: SamplingSettings, tokens: SpecialTokens,
                generators: Sequence[torch.Generator | None]) -> tuple[list[torch.Tensor], DecodeStats]:
    """ONE loop over `prompts` -> ([G, C_b] completion ids per prompt (pad after EOS), its stats).

    C_b is the number of steps group b ran: until all its rows produced EOS, or `max_new_tokens`.
    `generators[b]` is group b's random stream (unused when greedy).
    """
    language_model = model.model.language_model
    require_full_attention(language_model)
    size, max_new = sampling.num_generations, sampling.max_new_tokens
    prefilled = [prefill_prompt(model, prompt) for prompt in prompts]
    device = prefilled[0].logits.device
    logits = torch.cat([p.logits.expand(size, -1) for p in prefilled])                  # [B*G, V]
    start_positions = torch.stack([p.next_position for p in prefilled]).repeat_interleave(size)  # [B*G]
    row_ids = torch.arange(len(prompts) * size, device=device)                          # original row of each running row
    out = torch.full((len(prompts) * size, max_new), tokens.pad_id, dtype=torch.long, device=device)
    steps_run = [0] * len(prompts)
    cache = BatchedPrefixCache(prefilled, size, max_new)
    sampler = _Sampler(sampling, tokens, generators, device)
    embeddings = model.get_input_embeddings()
    decode_steps = row_steps = 0
    with attention_implementation(language_model, BATCHED_PREFIX_ATTENTION):
        for step in range(max_new):
            next_tokens = sampler(logits, step, cache.slices, row_ids % size)
            out[row_ids, step] = next_tokens
            for group, _, _ in cache.slices:
                steps_run[group] = step + 1
            running = next_tokens != tokens.eos_id
            if step == max_new - 1 or not running.any():
                break
            if not running.all():
                keep = running.nonzero().squeeze(1)
                row_ids, next_tokens, start_positions = row_ids[keep], next_tokens[keep], start_positions[keep]
                cache.keep_rows(keep, row_ids // size)
            rows = row_ids.shape[0]
            positions = (start_positions + step).view(1, rows, 1).expand(3, rows, 1)
            hidden = language_model(inputs_embeds=embeddings(next_tokens[:, None]), position_ids=positions,
                                    past_key_values=cache, use_cache=True, batched_prefix=cache).last_hidden_state
            logits = model.lm_head(hidden[:, -1]).float()
            decode_steps, row_steps = decode_steps + 1, row_steps + rows
    completions = [out[b * size:(b + 1) * size, :steps_run[b]] for b in range(len(prompts))]
    generated = sum(_completion_tokens(ids, tokens.eos_id) for ids in completions)
    return completions, DecodeStats(loops=1, decode_steps=decode_steps, row_steps=row_steps,
                                    completion_tokens=generated, prompts=len(prompts))


def _completion_tokens(ids: torch.Tensor, eos_id: int) -> int:
    """Tokens up to and including each row's first EOS, summed over the rows of [G, C] ids."""
    is_eos = ids == eos_id
    first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), torch.full_like(ids[:, 0], ids.shape[1] - 1))
    return int((first + 1).sum())


@torch.no_grad()
def decode_groups(model, prompts: Sequence[PromptInputs], sampling: SamplingSettings, seeds: Sequence[int] | None,
                  tokens: SpecialTokens, batch_size: int | None = None,
                  token_budget: int | None = None) -> tuple[list[torch.Tensor], DecodeStats]:
    """All `prompts` -> ([G, C_b] completion ids per prompt, in order; the loops' stats), in as few loops as
    `batch_size` / `token_budget` allow. `seeds[b]` seeds prompt b's stream (None only when greedy)."""
    if not prompts:
        return [], DecodeStats()
    if seeds is None and not sampling.greedy:
        raise ValueError("sampling needs one seed per prompt")
    device = prompts[0].input_ids.device
    generators = [None] * len(prompts) if sampling.greedy else [prompt_generator(s, device) for s in seeds]
    completions: list[torch.Tensor | None] = [None] * len(prompts)
    stats = DecodeStats()
    for loop in plan_loops([p.length for p in prompts], sampling.num_generations, sampling.max_new_tokens,
                           batch_size, token_budget):
        ids, loop_stats = decode_loop(model, [prompts[i] for i in loop], sampling, tokens,
                                      [generators[i] for i in loop])
        for i, group_ids in zip(loop, ids):
            completions[i] = group_ids
        stats = stats + loop_stats
    return completions, stats
