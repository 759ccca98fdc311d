"""The shared-prefill engine's batched decoder (model/engine/batched_decode.py), fp32, both families, all five data
types: loops of 1, 3 and 8 prompts give token-identical groups; greedy decoding equals transformers' `generate`;
sampling equals `generate` seeded per prompt (also when rows finish at different steps and are compacted out)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from echoink.data import load_dataset
from echoink.model import load_thinker
from echoink.model.engine import SharedPrefillEngine, prompt_generators, prompt_seed
from echoink.model.engine.batched_decode import SpecialTokens, plan_loops
from echoink.model.families import family_of_model
from echoink.model.generation import SamplingSettings
from echoink.model.inputs import encode_prompt

DATA_TYPES = ("image_audio", "video_audio", "image", "audio", "text")
DEVICE = os.environ.get("ECHOINK_TEST_DEVICE", "cpu")  # benchmarks/gpu_suite.sh runs these on cuda


@pytest.fixture(scope="module", params=["qwen2.5-omni", "qwen3-omni"])
def family_setup(request, mixed_dataset):
    """(model, EOS-biased copy, tokenizer, special tokens, 8 prompts covering every data type, processor)."""
    thinker_dir = request.getfixturevalue({"qwen2.5-omni": "tiny_model_dir", "qwen3-omni": "qwen3_model_dir"}
                                          [request.param])
    model, processor = load_thinker(thinker_dir, dtype="float32")
    model.to(DEVICE).eval()
    tokenizer = processor.tokenizer
    records = load_dataset(mixed_dataset / "train" / "omni_rl_format_train.json")
    records += load_dataset(mixed_dataset / "valid" / "omni_rl_format_valid.json")
    chosen = [next(r for r in records if r.data_type == t) for t in DATA_TYPES]
    chosen += [r for r in records if r not in chosen][:3]
    assert {r.data_type for r in chosen} == set(DATA_TYPES)
    prompts = [encode_prompt(r, processor).to(DEVICE) for r in chosen]
    family = family_of_model(model)
    eos_id = family.eos_id(tokenizer)
    special = SpecialTokens(eos_id, tokenizer.pad_token_id, tuple(family.media_token_ids(tokenizer)))
    stopping = copy.deepcopy(model)  # EOS made likely: rows end at different steps and are compacted out
    bias = torch.zeros(stopping.lm_head.out_features, device=DEVICE)
    bias[eos_id] = 2.5
    stopping.lm_head.bias = torch.nn.Parameter(bias)
    return model, stopping, tokenizer, special, prompts, processor


def _generate(model, prompt, sampling: SamplingSettings, special: SpecialTokens, seed: int) -> torch.Tensor:
    """transformers' generate for one prompt under torch.manual_seed(seed) -> [G, C] ids, pad after EOS."""
    config = sampling.generation_config(special.eos_id, special.pad_id, list(special.suppress))
    torch.manual_seed(seed)
    with torch.no_grad():
        return family_of_model(model).generate(model, prompt.model_kwargs(), config)[:, prompt.length:]


def _decode(model, tokenizer, prompts, sampling, seeds, batch_size=None):
    """-> ([G, C] ids per prompt, the engine's stats) through the shared-prefill engine, one stream per prompt."""
    engine = SharedPrefillEngine(model, tokenizer, batch_size=batch_size)
    groups = engine.generate(prompts, sampling, prompt_generators(seeds, DEVICE))
    return [g.completion_ids for g in groups], engine.stats


CASES = {  # (settings, EOS made likely, loop sizes compared)
    "sampled": (SamplingSettings(num_generations=4, max_new_tokens=8), False, (1, 3, 8)),
    "ragged": (SamplingSettings(num_generations=4, max_new_tokens=8, temperature=0.7, top_p=0.9, top_k=40), True,
               (1, 3, 8)),
    "greedy": (SamplingSettings(num_generations=1, max_new_tokens=8, greedy=True), False, (3, 8)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loop_size_changes_no_token_and_equals_generate(family_setup, case):
    model, stopping_model, tokenizer, special, prompts, _ = family_setup
    sampling, stopping, sizes = CASES[case]
    model = stopping_model if stopping else model
    seeds = [prompt_seed(42, 3, position) for position in range(len(prompts))]
    by_size = {}
    for batch_size in sizes:
        by_size[batch_size], stats = _decode(model, tokenizer, prompts, sampling, seeds, batch_size)
        assert stats.loops == -(-len(prompts) // batch_size) and stats.prompts == len(prompts)
    for b, prompt in enumerate(prompts):
        assert all(torch.equal(by_size[8][b], by_size[size][b]) for size in sizes), b
        expected = _generate(model, prompt, sampling, special, seeds[b])
        assert torch.equal(by_size[8][b], expected), (b, by_size[8][b], expected)
    if stopping:  # rows really left the loop at different steps
        lengths = [int(n) for ids in by_size[8] for n in ((ids != special.pad_id).sum(dim=1))]
        assert len(set(lengths)) > 2 and min(lengths) < sampling.max_new_tokens, lengths


def test_each_group_draws_from_its_own_stream(family_setup):
    """A prompt's completions depend on its own seed only: changing another prompt's seed or dropping it from
    the loop leaves them as they were; two seeds give different samples."""
    model, _, tokenizer, _, prompts, _ = family_setup
    sampling = CASES["sampled"][0]
    seeds = [prompt_seed(1, 0, p) for p in range(4)]
    base, _ = _decode(model, tokenizer, prompts[:4], sampling, seeds)
    other, _ = _decode(model, tokenizer, prompts[:4], sampling, [seeds[0] + 1] + seeds[1:])
    alone, _ = _decode(model, tokenizer, prompts[2:3], sampling, seeds[2:3])
    assert all(torch.equal(a, b) for a, b in zip(base[1:], other[1:]))
    assert not torch.equal(base[0], other[0])
    assert torch.equal(alone[0], base[2])


def test_min_new_tokens_fixes_every_length(family_setup):
    _, stopping_model, tokenizer, special, prompts, _ = family_setup
    sampling = SamplingSettings(num_generations=3, max_new_tokens=6, min_new_tokens=6)
    ids, stats = _decode(stopping_model, tokenizer, prompts[:3], sampling, [5, 6, 7])
    assert all(group.shape == (3, 6) and bool((group != special.pad_id).all()) for group in ids)
    assert stats.completion_tokens == 3 * 3 * 6 and stats.decode_steps == 5 and stats.rows_per_step == 9


def test_loop_plans_respect_size_and_token_budget():
    lengths = [100, 200, 300, 50]
    assert plan_loops(lengths, 4, 10) == [[0, 1, 2, 3]]
    assert plan_loops(lengths, 4, 10, batch_size=3) == [[0, 1, 2], [3]]
    # costs P + G * max_new_tokens: 140, 240, 340, 90
    assert plan_loops(lengths, 4, 10, token_budget=400) == [[0, 1], [2], [3]]
    assert plan_loops(lengths, 4, 10, token_budget=100) == [[0], [1], [2], [3]]  # over the budget: alone
    with pytest.raises(ValueError, match="rollout_batch_size"):
        plan_loops(lengths, 4, 10, batch_size=0)


def test_prompt_seeds_are_stable_and_distinct():
    assert prompt_seed(42, 3, 1) == prompt_seed(42, 3, 1)
    seeds = {prompt_seed(s, step, p) for s in (0, 1) for step in range(5) for p in range(8)}
    assert len(seeds) == 80 and all(0 <= s < 2**63 for s in seeds)


def test_prompts_of_one_length_share_a_prefill_call(family_setup, mixed_dataset):
    """Prompts of equal length run through the decoder as the rows of one call (`prefill_prompts`): each row's K/V,
    logits and first position equal that prompt's own prefill (float rounding), its deepstack features included
    (Qwen3-Omni, image prompts), and a loop of them gives the tokens each gives alone."""
    from echoink.model.engine.batched_decode import prefill_prompts

    model, _, tokenizer, _, _, processor = family_setup
    records = load_dataset(mixed_dataset / "train" / "omni_rl_format_train.json")
    records += load_dataset(mixed_dataset / "valid" / "omni_rl_format_valid.json")
    by_length: dict[int, list] = {}
    for record in records:
        if record.data_type in ("image", "image_audio"):
            prompt = encode_prompt(record, processor).to(DEVICE)
            by_length.setdefault(prompt.length, []).append(prompt)
    prompts = max(by_length.values(), key=len)[:3]
    assert len(prompts) >= 2, f"no two image prompts of one length in the fixture: {sorted(by_length)}"
    assert not torch.equal(prompts[0].media["pixel_values"], prompts[1].media["pixel_values"])  # distinct images
    with torch.no_grad():
        stacked = prefill_prompts(model, prompts)
        alone = [prefill_prompts(model, [prompt])[0] for prompt in prompts]
    for together, single in zip(stacked, alone):
        for a, b in zip(together.keys + together.values, single.keys + single.values):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(together.logits, single.logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(together.first_position, single.first_position)
    sampling = SamplingSettings(num_generations=4, max_new_tokens=8)
    seeds = [prompt_seed(7, 0, position) for position in range(len(prompts))]
    together, _ = _decode(model, tokenizer, prompts, sampling, seeds)
    for prompt, seed, ids in zip(prompts, seeds, together):
        assert torch.equal(ids, _decode(model, tokenizer, [prompt], sampling, [seed])[0][0])


def test_stacked_prefill_calls_hold_a_bounded_number_of_tokens(family_setup, monkeypatch):
    """With room for two prompts a call, four prompts of one length take two calls (and a prompt over the limit
    one call of its own); the results are those of one call each."""
    from echoink.model.engine import batched_decode

    model, _, _, _, prompts, _ = family_setup
    prompt = prompts[0]
    calls = []
    family = family_of_model(model)
    real_run = type(family).run_decoder
    monkeypatch.setattr(type(family), "run_decoder",
                        lambda self, *args, **kwargs: calls.append(args[1].shape[0]) or real_run(self, *args, **kwargs))
    monkeypatch.setattr(batched_decode, "PREFILL_TOKENS_PER_CALL", 2 * prompt.length)
    with torch.no_grad():
        four = batched_decode.prefill_prompts(model, [prompt] * 4)
    assert calls == [2, 2]
    monkeypatch.setattr(batched_decode, "PREFILL_TOKENS_PER_CALL", prompt.length - 1)
    calls.clear()
    with torch.no_grad():
        batched_decode.prefill_prompts(model, [prompt] * 2)
    assert calls == [1, 1]
    torch.testing.assert_close(four[3].logits, four[0].logits, rtol=1e-5, atol=1e-5)
