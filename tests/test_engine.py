"""The rollout engine's contract: one Group per prompt in order, per-prompt random streams, the policy version
from `sync`, batched greedy = one prompt at a time, and the refusals."""

from __future__ import annotations

import pytest
import torch

from echoink.data import load_dataset
from echoink.model import load_thinker
from echoink.model.engine import SharedPrefillEngine, TransformersGenerateEngine, rollout_engine
from echoink.model.generation import SamplingSettings
from echoink.model.inputs import encode_prompt

SAMPLING = SamplingSettings(num_generations=3, max_new_tokens=6)


@pytest.fixture(scope="module")
def setup(tiny_model_dir, mixed_dataset):
    model, processor = load_thinker(tiny_model_dir, dtype="float32")
    records = load_dataset(mixed_dataset / "train" / "omni_rl_format_train.json")
    plain = [r for r in records if not r.data_type.startswith("video")][:3]
    return model, processor, [encode_prompt(r, processor) for r in plain]


def _seeded(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def test_per_prompt_generators_make_a_prompts_samples_independent_of_its_batch_mates(setup):
    model, processor, prompts = setup
    engine = SharedPrefillEngine(model, processor.tokenizer)
    global_state = torch.get_rng_state()
    together = engine.generate(prompts[:2], SAMPLING, _seeded(5, 6))
    alone = engine.generate(prompts[1:2], SAMPLING, _seeded(6))
    assert torch.equal(torch.get_rng_state(), global_state)  # the global generator is untouched
    assert [g.prompt for g in together] == prompts[:2] and all(g.size == 3 for g in together)
    assert torch.equal(together[1].completion_ids, alone[0].completion_ids)
    other_seed = engine.generate(prompts[1:2], SamplingSettings(num_generations=3, max_new_tokens=6), _seeded(7))
    assert not torch.equal(other_seed[0].completion_ids, alone[0].completion_ids)  # the seed does matter


def test_groups_carry_the_policy_version_sync_set(setup):
    model, processor, prompts = setup
    engine = rollout_engine(model, processor.tokenizer, "full", policy_version=4)
    assert engine.generate(prompts[:1], SAMPLING)[0].policy_version == 4
    engine.sync(model, 5)
    assert engine.policy_version == 5 and engine.generate(prompts[:1], SAMPLING)[0].policy_version == 5


def test_batched_greedy_generate_equals_one_prompt_per_call_and_trims_each_group(setup):
    model, processor, prompts = setup
    greedy = SamplingSettings(greedy=True, max_new_tokens=6)
    batched = TransformersGenerateEngine(model, processor.tokenizer, max_batch_prompts=3).generate(prompts, greedy)
    single = TransformersGenerateEngine(model, processor.tokenizer).generate(prompts, greedy)
    for one, other in zip(batched, single):
        assert one.texts == other.texts and torch.equal(one.completion_ids, other.completion_ids)
        assert one.completion_ids.shape[1] == int(one.completion_lengths.max())  # C = the group's longest


def test_the_engines_keep_the_models_training_flag(setup):
    model, processor, prompts = setup
    model.train()
    try:
        for engine in (SharedPrefillEngine(model, processor.tokenizer),
                       TransformersGenerateEngine(model, processor.tokenizer)):
            engine.generate(prompts[:1], SAMPLING)
            assert model.training
    finally:
        model.eval()


def test_refusals(setup):
    model, processor, prompts = setup
    with pytest.raises(ValueError, match="per-prompt generators need the shared-prefill engine"):
        TransformersGenerateEngine(model, processor.tokenizer).generate(prompts[:1], SAMPLING, _seeded(1))
    with pytest.raises(ValueError, match="2 generators for 1 prompts"):
        SharedPrefillEngine(model, processor.tokenizer).generate(prompts[:1], SAMPLING, _seeded(1, 2))
    with pytest.raises(ValueError, match="group_sharing must be one of"):
        rollout_engine(model, processor.tokenizer, "prefill")
    with pytest.raises(ValueError, match="max_batch_prompts must be >= 1"):
        TransformersGenerateEngine(model, processor.tokenizer, max_batch_prompts=0)
