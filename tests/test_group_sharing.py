"""Group sharing is exact: the shared paths give the plain path's log-probs, gradients and rollouts.

Log-probs: "none" (G copies, what other trainers do) vs "encoders" (encoders once per prompt) vs
"full" (prompt once: prompt K/V shared, or one packed sequence with a block-causal mask), on
audio + image and video + audio-in-video prompts, ragged completions, two groups per call, with
and without gradient checkpointing. Rollouts: `generate(num_return_sequences=G)` vs prefill once,
token for token under one seed. Tiny model, fp32.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import pytest
import torch

from echoink.data import load_dataset
from echoink.data.synth import write_synthetic_dataset
from echoink.grpo.logprobs import group_token_logps
from echoink.model.engine import Group, rollout_engine
from echoink.model.families import family_of_model
from echoink.model.group_forward import full_sharing_path
from echoink.model.generation import SamplingSettings, completion_mask
from echoink.model.inputs import encode_prompt
from echoink.model.tiny import TINY, build_tiny_thinker

LOGP_TOL = 1e-5
GRAD_REL, GRAD_ABS = 1e-4, 1e-7
PATHS = [("encoders", "auto"), ("full", "kv"), ("full", "packed")]


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny_thinker(TINY, seed=0)
    return model, processor


@pytest.fixture(scope="module")
def prompts(tiny, tmp_path_factory):
    """{"image_audio": PromptInputs, "video_audio": PromptInputs} (the video uses its own audio track)."""
    _, processor = tiny
    out = tmp_path_factory.mktemp("sharing_data")
    info = write_synthetic_dataset(out, 2, 0, seed=3, families=["colour_by_beeps", "video_colour_at_beep"])
    records = {r.data_type: r for r in load_dataset(info["splits"]["train"]["json"])}
    encoded = {kind: encode_prompt(records[kind], processor) for kind in ("image_audio", "video_audio")}
    assert set(encoded["image_audio"].media) >= {"input_features", "pixel_values"}
    assert "pixel_values_videos" in encoded["video_audio"].media and encoded["video_audio"].use_audio_in_video
    return encoded


def make_group(prompt, lengths: list[int], tokenizer, seed: int) -> Group:
    """A group with completions of the given lengths: random text tokens, EOS at the end, pad after."""
    eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id
    generator = torch.Generator().manual_seed(seed)
    c = max(lengths)
    first_special = tokenizer.convert_tokens_to_ids("<|endoftext|>")  # special tokens follow the BPE vocabulary
    ids = torch.randint(0, first_special, (len(lengths), c), generator=generator)
    for i, length in enumerate(lengths):
        if length < c or i % 2 == 0:  # some completions end with EOS early, one full-length one is truncated
            ids[i, length - 1] = eos
    mask, truncated = completion_mask(ids, eos)
    assert mask.sum(1).tolist() == lengths
    ids = ids.masked_fill(mask == 0, pad)
    return Group(prompt=prompt, completion_ids=ids, completion_mask=mask, texts=[""] * len(lengths),
                 truncated=truncated)


@pytest.fixture(scope="module")
def groups(tiny, prompts):
    """Two groups per call (per_device_train_batch_size = 2), ragged within and across groups."""
    tokenizer = tiny[1].tokenizer
    return [make_group(prompts["image_audio"], [7, 3, 7, 1], tokenizer, seed=1),
            make_group(prompts["video_audio"], [2, 9, 5, 9], tokenizer, seed=2)]


@contextmanager
def training_mode(model, gradient_checkpointing: bool, reentrant: bool = False):
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    try:
        yield
    finally:
        model.eval()
        if gradient_checkpointing:
            model.activation_checkpointing_disable()
        model.zero_grad(set_to_none=True)


def logps_and_grads(model, groups, sharing: str, prefix: str = "auto"):
    """Per-token log-probs and the gradients of a loss that weighs every token differently."""
    model.zero_grad(set_to_none=True)
    logps = group_token_logps(model, groups, sharing=sharing, prefix=prefix)
    weights = torch.Generator().manual_seed(0)
    loss = sum((lp * g.completion_mask * torch.randn(lp.shape, generator=weights)).sum()
               for lp, g in zip(logps, groups))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return [lp.detach() for lp in logps], grads


def assert_logps_close(actual, expected, groups):
    for a, e, group in zip(actual, expected, groups):
        assert a.shape == e.shape == group.completion_ids.shape
        real = group.completion_mask.bool()
        assert torch.isfinite(a[real]).all()
        torch.testing.assert_close(a[real], e[real], rtol=0, atol=LOGP_TOL)


def assert_grads_close(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for name, ref in expected.items():
        diff = (actual[name] - ref).norm().item()
        assert diff <= GRAD_REL * ref.norm().item() + GRAD_ABS, f"{name}: |diff| {diff:.3g} vs |ref| {ref.norm():.3g}"


# ---- log-probs and gradients ------------------------------------------------------------------------

@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_paths_agree_on_logps_and_gradients(tiny, groups, gradient_checkpointing):
    model, _ = tiny
    with training_mode(model, gradient_checkpointing):
        reference_logps, reference_grads = logps_and_grads(model, groups, "none")
        # every parameter of the language model, both encoders and the lm head gets a gradient
        assert any(n.startswith("model.audio_tower.") for n in reference_grads)
        assert any(n.startswith("model.visual.") for n in reference_grads)
        assert "lm_head.weight" in reference_grads
        for sharing, prefix in PATHS:
            logps, grads = logps_and_grads(model, groups, sharing, prefix)
            assert_logps_close(logps, reference_logps, groups)
            assert_grads_close(grads, reference_grads)
        # what the shared paths switch for the duration of a call is back as it was
        assert model.config.text_config._attn_implementation == "sdpa"
        for layer in model.model.language_model.layers:
            assert "_can_checkpoint_with_cache" not in vars(layer)
            if gradient_checkpointing:
                assert layer._gradient_checkpointing_func.keywords == {"use_reentrant": False}


@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_prompt_kv_path_in_completion_chunks(tiny, groups, gradient_checkpointing, monkeypatch):
    """Completions split over several language-model calls (2 per call here) change nothing."""
    import echoink.model.group_forward as group_forward

    model, _ = tiny
    with training_mode(model, gradient_checkpointing):
        reference_logps, reference_grads = logps_and_grads(model, groups, "none")
        monkeypatch.setattr(group_forward, "COMPLETION_TOKENS_PER_CHUNK", 16)  # 2 completions per call
        logps, grads = logps_and_grads(model, groups, "full", "kv")
    assert_logps_close(logps, reference_logps, groups)
    assert_grads_close(grads, reference_grads)


def test_prompt_kv_path_with_the_matmul_attention_kernel(tiny, groups, monkeypatch):
    """The shared-prompt attention's kernel for devices without CPU flash attention, run here on CPU."""
    import echoink.model.attention as attention

    model, _ = tiny
    with training_mode(model, gradient_checkpointing=False):
        reference_logps, reference_grads = logps_and_grads(model, groups, "none")
        monkeypatch.setattr(attention, "default_kernel", lambda device: "matmul")
        logps, grads = logps_and_grads(model, groups, "full", "kv")
    assert_logps_close(logps, reference_logps, groups)
    assert_grads_close(grads, reference_grads)


def assert_no_grad_paths_match_plain(model, groups):
    with torch.no_grad():
        reference = group_token_logps(model, groups, sharing="none")
        for sharing, prefix in PATHS:
            assert_logps_close(group_token_logps(model, groups, sharing=sharing, prefix=prefix), reference, groups)


def test_no_grad_paths_agree_in_eval_mode(tiny, groups):
    """Old-policy / reference passes: eval mode, no grad."""
    assert_no_grad_paths_match_plain(tiny[0], groups)


def test_temperature_scales_logits_the_same_way(tiny, groups):
    model, _ = tiny
    with torch.no_grad():
        reference = group_token_logps(model, groups, sharing="none", temperature=0.7)
        plain_t1 = group_token_logps(model, groups, sharing="none")
        assert not torch.allclose(reference[0], plain_t1[0])
        assert_logps_close(group_token_logps(model, groups, sharing="full", temperature=0.7), reference, groups)


def test_single_token_completions(tiny, prompts):
    """C = 1 (every completion is just EOS): only the last prompt state predicts anything."""
    model, processor = tiny
    group = [make_group(prompts["image_audio"], [1, 1, 1], processor.tokenizer, seed=5)]
    assert_no_grad_paths_match_plain(model, group)


def test_auto_path_choice(tiny, groups):
    """Prompt K/V sharing everywhere, except under a reentrant checkpoint (packed sequence there)."""
    model, _ = tiny
    assert full_sharing_path(model) == "kv"
    with training_mode(model, gradient_checkpointing=True):
        assert full_sharing_path(model) == "kv"
    with training_mode(model, gradient_checkpointing=True, reentrant=True):
        assert full_sharing_path(model) == "packed"
        reference_logps, reference_grads = logps_and_grads(model, groups[:1], "none")
        logps, grads = logps_and_grads(model, groups[:1], "full")
        assert_logps_close(logps, reference_logps, groups[:1])
        assert_grads_close(grads, reference_grads)
    # the cache flag we set on checkpointed layers is gone afterwards
    assert all("_can_checkpoint_with_cache" not in vars(layer) for layer in model.model.language_model.layers)


def test_packed_path_with_eager_attention(tiny, groups):
    """Eager attention takes an additive float mask (a bool one would be added, not applied)."""
    model, _ = tiny
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    assert eager.config._attn_implementation == "eager"
    with torch.no_grad():
        reference = group_token_logps(model, groups, sharing="none")
        for prefix in ("kv", "packed"):
            assert_logps_close(group_token_logps(eager, groups, sharing="full", prefix=prefix), reference, groups)


def test_frozen_encoders_run_without_grad(tiny, groups):
    """Frozen encoders run under no_grad; trainable ones build a graph; results do not change."""
    model, _ = tiny
    frozen = copy.deepcopy(model)
    frozen.model.audio_tower.requires_grad_(False)
    frozen.model.visual.requires_grad_(False)
    grad_enabled = {}
    def record(name):
        return lambda module, inputs, output: grad_enabled.__setitem__(name, torch.is_grad_enabled())

    hooks = [module.register_forward_hook(record(name))
             for name, module in (("audio", frozen.model.audio_tower), ("vision", frozen.model.visual))]
    frozen.train()
    embeds = family_of_model(frozen).embed_prompt(frozen, groups[0].prompt).embeds
    assert grad_enabled == {"audio": False, "vision": False}
    assert embeds.requires_grad  # the token embeddings are still trainable
    frozen.model.visual.requires_grad_(True)
    family_of_model(frozen).embed_prompt(frozen, groups[0].prompt)
    assert grad_enabled == {"audio": False, "vision": True}
    frozen.model.visual.requires_grad_(False)
    for hook in hooks:
        hook.remove()

    reference_logps, reference_grads = logps_and_grads(frozen, groups, "none")
    assert not any(n.startswith(("model.audio_tower.", "model.visual.")) for n in reference_grads)
    for sharing, prefix in PATHS:
        logps, grads = logps_and_grads(frozen, groups, sharing, prefix)
        assert_logps_close(logps, reference_logps, groups)
        assert_grads_close(grads, reference_grads)


def test_unknown_sharing_is_rejected(tiny, groups):
    with pytest.raises(ValueError, match="sharing"):
        group_token_logps(tiny[0], groups, sharing="prompt")
    with pytest.raises(ValueError, match="prefix"):
        group_token_logps(tiny[0], groups, sharing="full", prefix="dense")


# ---- rollouts -----------------------------------------------------------------------------------------

SAMPLINGS = {
    "default": SamplingSettings(num_generations=4, max_new_tokens=12),
    "t0.7-p0.9-k50": SamplingSettings(num_generations=4, max_new_tokens=12, temperature=0.7, top_p=0.9, top_k=50),
    "t1.3-p0.8": SamplingSettings(num_generations=4, max_new_tokens=12, temperature=1.3, top_p=0.8),
    "greedy": SamplingSettings(num_generations=1, max_new_tokens=8, greedy=True),  # generate: greedy needs G = 1
}


def sample_both_ways(model, prompt, sampling, tokenizer, seed: int = 123):
    out = []
    for sharing in ("none", "full"):  # transformers' generate, then the shared-prefill engine
        torch.manual_seed(seed)
        out.append(rollout_engine(model, tokenizer, sharing).generate([prompt], sampling)[0])
    return out


@pytest.mark.parametrize("kind", ["image_audio", "video_audio"])
@pytest.mark.parametrize("setting", list(SAMPLINGS))
def test_rollouts_identical_with_and_without_shared_prefill(tiny, prompts, kind, setting):
    model, processor = tiny
    plain, shared = sample_both_ways(model, prompts[kind], SAMPLINGS[setting], processor.tokenizer)
    assert plain.completion_ids.shape[0] == SAMPLINGS[setting].num_generations
    assert torch.equal(plain.completion_ids, shared.completion_ids)
    assert torch.equal(plain.completion_mask, shared.completion_mask)
    assert torch.equal(plain.truncated, shared.truncated)
    assert plain.texts == shared.texts
    if SAMPLINGS[setting].num_generations > 1:
        assert len({tuple(row.tolist()) for row in shared.completion_ids}) > 1  # really sampled
    assert model.config.text_config._attn_implementation == "sdpa"  # the decode-time switch is undone


def test_rollouts_identical_with_eager_attention(tiny, prompts):
    model, processor = tiny
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    plain, shared = sample_both_ways(eager, prompts["image_audio"], SAMPLINGS["t0.7-p0.9-k50"], processor.tokenizer)
    assert torch.equal(plain.completion_ids, shared.completion_ids)
    assert eager.config.text_config._attn_implementation == "eager"


@pytest.fixture(scope="module")
def eos_happy(tiny):
    """The tiny model with EOS made likely, so completions end at different steps."""
    model, processor = tiny
    eager_to_stop = copy.deepcopy(model)
    bias = torch.zeros(eager_to_stop.lm_head.out_features)
    bias[processor.tokenizer.convert_tokens_to_ids("<|im_end|>")] = 3.0  # the random model's logits spread ~0.2
    eager_to_stop.lm_head.bias = torch.nn.Parameter(bias)
    return eager_to_stop


def test_rollouts_identical_when_completions_end_early(tiny, prompts, eos_happy):
    _, processor = tiny
    sampling = SamplingSettings(num_generations=6, max_new_tokens=16, temperature=0.9, top_p=0.95)
    plain, shared = sample_both_ways(eos_happy, prompts["image_audio"], sampling, processor.tokenizer, seed=7)
    assert torch.equal(plain.completion_ids, shared.completion_ids)
    assert torch.equal(plain.completion_mask, shared.completion_mask)
    lengths = shared.completion_lengths.tolist()
    assert len(set(lengths)) > 1, lengths  # ragged: really exercises finished rows


def test_min_new_tokens_fixes_the_length_in_both_paths(tiny, prompts, eos_happy):
    _, processor = tiny
    sampling = SamplingSettings(num_generations=4, max_new_tokens=10, min_new_tokens=10)
    plain, shared = sample_both_ways(eos_happy, prompts["video_audio"], sampling, processor.tokenizer, seed=11)
    assert torch.equal(plain.completion_ids, shared.completion_ids)
    assert shared.completion_ids.shape == (4, 10)
    assert shared.truncated.all() and shared.completion_mask.all()
