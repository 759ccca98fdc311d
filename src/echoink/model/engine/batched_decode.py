"""Many groups in one decode loop: each prompt's K/V kept once, each prompt's own random stream.

    decode_groups(model, prompts, sampling, generators, tokens, batch_size, token_budget)
        -> ([G, C_b] completion ids per prompt, DecodeStats)          (the shared-prefill engine's decoder)

A loop takes B prompts and answers each G times (B*G rows):

* **prefill**: each prompt's media are encoded and its prompt run through the decoder once
  (`prefill_prompts`, through the model's family); prompts of the same length share one decoder call, as its
  rows (no padding); each prompt's keys/values are kept once per layer, [kv_heads, P_b, d], never copied G
  times and never padded to another prompt's length.
* **decode**: every step runs ONE language-model forward for the rows still generating, of all groups
  together. Attention (`attention.BatchedPrefixCache`, `attention.batched_prefix_attention`) reads, for the rows of group b, group b's
  prompt K/V (one matmul per group: no padding shared across groups) and each row's own K/V (one
  batched matmul over all rows), with one softmax over both. Each row has its own M-RoPE position
  (the family's positions after prompt b, plus t for completion token t).
* **compaction**: a row that has produced EOS leaves the computation. The completions' own K/V buffer
  [kv_heads, rows, capacity, d] has one length for all rows, so leaving is an index-select of the rows
  that remain (in place, into the same buffer); a step costs in proportion to the rows still running.

Random streams. Group b draws from its own `torch.Generator`, given by the caller (`streams.prompt_generators`:
seeded from (run seed, step, the prompt's place in the step's plan) in training). `torch.multinomial`
on a [G, V] matrix consumes the same random numbers whatever the values, so each decode step a group
draws from a full [G, V] matrix — its finished rows given a uniform placeholder distribution — exactly
as transformers' `generate(num_return_sequences=G)` does for one prompt under `torch.manual_seed(seed)`.
A group's draws therefore depend on that group alone: not on which prompts share the loop, the loop's
size, the number of processes, or when rows are compacted (tests compare with `generate`).

Logits processors are the ones `generate` applies, in its order (`logits_processors`); each acts on
every row alike, so they run once for all rows.

Prefills: the media encoders run one prompt at a time; the decoder runs the prompts of one length in one call
(their rows are independent: same causal attention, no padding). An earlier right-padded batch of prompts of
different lengths was not faster on 2 CPU cores (the padding adds work) and changes each prompt's arithmetic;
stacking equal lengths pays where prompts share a template and media sizes (evaluation of one answer per
prompt: docs/performance.md). Like decoding many rows at once, a row's last bits can differ with the number
of rows a linear layer sees; the batch-size tests check that no token moves.

Loops. `plan_loops` cuts the prompts into loops of at most `batch_size` prompts (None: all in one) and
at most `token_budget` K/V positions (sum over the loop of P_b + G * max_new_tokens; None: no limit);
a prompt over the budget alone runs in a loop of its own. Since every group's draws are its own, how
the prompts are cut changes no token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from echoink.model.attention import BatchedPrefixCache, batched_prefix_attention, require_full_attention
from echoink.model.families import family_of_model
from echoink.model.generation import SamplingSettings, logits_processors
from echoink.model.inputs import PromptInputs


# ---- loop plans -------------------------------------------------------------------------------------------

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
    and the positions of its first completion token ([..., 1, 1], the family's layout: Qwen M-RoPE [3, 1, 1])."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    logits: torch.Tensor
    first_position: torch.Tensor


#: At most this many prompt tokens in one stacked prefill call: bounds the call's activations (a 7B model's MLP
#: holds [tokens, 18944] at once) whatever the loop's size.
PREFILL_TOKENS_PER_CALL = 16_384


def prefill_prompts(model, prompts: Sequence[PromptInputs]) -> list[PrefilledPrompt]:
    """Encode each prompt's media (one prompt at a time), then run the prompts through the decoder: prompts of
    one length together, as the rows of one call (no padding: each row's attention sees its own prompt only),
    at most `PREFILL_TOKENS_PER_CALL` tokens a call."""
    family = family_of_model(model)
    embedded = [family.embed_prompt(model, prompt) for prompt in prompts]              # [1, P_b, H] each
    calls: list[list[int]] = []   # prompt indices per decoder call
    open_call: dict[int, list[int]] = {}  # prompt length -> the call still taking prompts of that length
    for index, prompt in enumerate(embedded):
        call = open_call.get(prompt.length)
        if call is None or (len(call) + 1) * prompt.length > PREFILL_TOKENS_PER_CALL:  # a long prompt: alone
            call = open_call[prompt.length] = []
            calls.append(call)
        call.append(index)
    prefilled: list[PrefilledPrompt | None] = [None] * len(prompts)
    for indices in calls:
        rows = family.stack_prompts([embedded[i] for i in indices]) if len(indices) > 1 else embedded[indices[0]]
        out = family.run_decoder(model, rows.embeds, rows.positions, prompt=rows, use_cache=True)
        logits = family.output_head(model)(out.hidden[:, -1]).float()                     # [n, V]
        layers = out.cache.layers
        for row, index in enumerate(indices):
            prefilled[index] = PrefilledPrompt(keys=tuple(layer.keys[row] for layer in layers),
                                               values=tuple(layer.values[row] for layer in layers),
                                               logits=logits[row:row + 1],
                                               first_position=family.positions_after_prompt(embedded[index], 0, 1))
    return prefilled


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
    family = family_of_model(model)
    decoder, head = family.decoder(model), family.output_head(model)
    require_full_attention(decoder)
    size, max_new = sampling.num_generations, sampling.max_new_tokens
    prefilled = prefill_prompts(model, prompts)
    device = prefilled[0].logits.device
    logits = torch.cat([p.logits.expand(size, -1) for p in prefilled])                  # [B*G, V]
    first_positions = torch.cat([p.first_position.expand(*p.first_position.shape[:-2], size, 1)
                                 for p in prefilled], dim=-2)                           # [..., B*G, 1]
    row_ids = torch.arange(len(prompts) * size, device=device)                          # original row of each running row
    out = torch.full((len(prompts) * size, max_new), tokens.pad_id, dtype=torch.long, device=device)
    steps_run = [0] * len(prompts)
    cache = BatchedPrefixCache([(p.keys, p.values) for p in prefilled], size, max_new)
    sampler = _Sampler(sampling, tokens, generators, device)
    decode_steps = row_steps = 0
    with batched_prefix_attention(decoder):
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
                row_ids, next_tokens = row_ids[keep], next_tokens[keep]
                first_positions = first_positions.index_select(-2, keep)
                cache.keep_rows(keep, row_ids // size)
            hidden = family.run_decoder(model, family.embed_tokens(model, next_tokens[:, None]), first_positions + step,
                                        cache=cache, use_cache=True, batched_prefix=cache).hidden
            logits = head(hidden[:, -1]).float()
            decode_steps, row_steps = decode_steps + 1, row_steps + row_ids.shape[0]
    completions = [out[b * size:(b + 1) * size, :steps_run[b]] for b in range(len(prompts))]
    generated = sum(_completion_tokens(ids, tokens.eos_id) for ids in completions)
    return completions, DecodeStats(loops=1, decode_steps=decode_steps, row_steps=row_steps,
                                    completion_tokens=generated, prompts=len(prompts))


def _completion_tokens(ids: torch.Tensor, eos_id: int) -> int:
    """Tokens up to and including each row's first EOS, summed over the rows of [G, C] ids."""
    is_eos = ids == eos_id
    first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), torch.full_like(ids[:, 0], ids.shape[1] - 1))
    return int((first + 1).sum())


def decode_groups(model, prompts: Sequence[PromptInputs], sampling: SamplingSettings,
                  generators: Sequence[torch.Generator | None], tokens: SpecialTokens, batch_size: int | None = None,
                  token_budget: int | None = None) -> tuple[list[torch.Tensor], DecodeStats]:
    """All `prompts` -> ([G, C_b] completion ids per prompt, in order; the loops' stats), in as few loops as
    `batch_size` / `token_budget` allow. `generators[b]`: prompt b's random stream (None: torch's global one,
    whose draws then depend on the loop's make-up)."""
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
