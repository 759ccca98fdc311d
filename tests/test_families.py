"""The model-family seam: both families (Qwen2.5-Omni, Qwen3-Omni) load in both layouts, encode prompts,
sample, score log-probs, train LoRA and refuse what they cannot do, with one-line errors for bad checkpoints."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from echoink.config import TrainConfig
from echoink.data import load_dataset
from echoink.grpo.logprobs import group_token_logps
from echoink.model.engine import SharedPrefillEngine, TransformersGenerateEngine
from echoink.model.families.qwen_thinker import _repeat_media
from echoink.model import ModelLoadError, load_thinker, save_thinker
from echoink.model.families import (
    FAMILIES,
    UnsupportedModelError,
    family_by_name,
    family_for_model_type,
    family_of_model,
)
from echoink.model.generation import SamplingSettings
from echoink.model.inputs import encode_prompt, generation_prefix
from echoink.model.trainable import lora_targets, prepare_for_training, wrap_lora

DATA_TYPES = ("image_audio", "video_audio", "image", "audio", "text")


def _records(mixed_dataset):
    records = load_dataset(mixed_dataset / "train" / "omni_rl_format_train.json")
    return {t: next(r for r in records if r.data_type == t) for t in DATA_TYPES}


def _logits(model, prompt):
    with torch.no_grad():
        return model(**prompt.model_kwargs()).logits


# ---- loading ----------------------------------------------------------------------------------------


def test_family_is_chosen_from_model_type():
    for family in FAMILIES:
        assert family_for_model_type(family.full_model_type) == (family, True)
        assert family_for_model_type(family.thinker_model_type) == (family, False)
    with pytest.raises(UnsupportedModelError) as info:
        family_for_model_type("llama", "m/config.json")
    message = str(info.value)
    assert message.startswith("m/config.json: unsupported model_type 'llama'") and "\n" not in message
    assert all(f.display_name in message and f.full_model_type in message for f in FAMILIES)


def test_published_layout_loads_the_thinker_only_and_equals_ours(family_dirs, mixed_dataset):
    name, thinker_dir, full_dir = family_dirs
    family = family_by_name(name)
    config = json.loads((full_dir / "config.json").read_text())
    assert config["model_type"] == family.full_model_type
    assert {"thinker_config", *(f"{part}_config" for part in family.other_parts)} <= set(config)
    weight_map = json.loads((full_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert {key.split(".")[0] for key in weight_map} == {"thinker", *family.other_parts}
    # published naming: the text model as thinker.model.*, encoders and lm_head beside it
    assert any(k.startswith("thinker.model.layers.0.") for k in weight_map)
    assert any(k.startswith("thinker.audio_tower.") for k in weight_map)
    assert any(k.startswith("thinker.visual.") for k in weight_map) and "thinker.lm_head.weight" in weight_map

    full, processor = load_thinker(full_dir)
    ours, _ = load_thinker(thinker_dir)
    assert type(full) is family.thinker_class and family_of_model(full) is family
    assert isinstance(processor, family.processor_class)
    assert not any(part in n for n, _ in full.named_modules() for part in family.other_parts)
    prompt = encode_prompt(_records(mixed_dataset)["image_audio"], processor)
    assert torch.equal(_logits(full, prompt), _logits(ours, prompt))


def test_qwen3_published_experts_are_one_tensor_each_and_fused_at_load(qwen3_full_dir):
    weight_map = json.loads((qwen3_full_dir / "model.safetensors.index.json").read_text())["weight_map"]
    experts = {k for k in weight_map if ".mlp.experts." in k}
    assert "thinker.model.layers.0.mlp.experts.7.gate_proj.weight" in experts
    assert "thinker.model.layers.1.mlp.experts.0.down_proj.weight" in experts
    model, _ = load_thinker(qwen3_full_dir)
    experts = model.model.language_model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (8, 2 * 64, 128) and experts.down_proj.shape == (8, 128, 64)
    assert model.config.vision_config.deepstack_visual_indexes == [0]


def test_saved_thinker_loads_with_plain_transformers(family_dirs, mixed_dataset, tmp_path):
    name, thinker_dir, full_dir = family_dirs
    family = family_by_name(name)
    model, processor = load_thinker(full_dir)
    save_thinker(model, processor, tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["model_type"] == family.thinker_model_type
    plain = family.thinker_class.from_pretrained(str(tmp_path / "saved")).eval()
    again, processor_again = load_thinker(tmp_path / "saved")
    prompt = encode_prompt(_records(mixed_dataset)["video_audio"], processor)
    assert torch.equal(_logits(plain, prompt), _logits(model, prompt))
    assert torch.equal(_logits(again, prompt), _logits(model, prompt))
    assert type(processor_again) is type(processor)
    saved = json.loads((tmp_path / "saved" / "preprocessor_config.json").read_text())
    assert saved["processor_class"] == family.processor_class.published_class_name
    assert saved["patch_size"] == family.vision_patch_size


@pytest.mark.parametrize("breakage", ["no_thinker_weights", "missing_thinker_key", "token_ids", "pickle"])
def test_bad_checkpoints_fail_at_load_in_one_line(family_dirs, tmp_path, breakage):
    name, thinker_dir, full_dir = family_dirs
    target = tmp_path / "model"
    shutil.copytree(full_dir if breakage in ("no_thinker_weights", "missing_thinker_key") else thinker_dir, target)
    index_file = target / "model.safetensors.index.json"
    if breakage == "no_thinker_weights":
        index = json.loads(index_file.read_text())
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith("thinker.")}
        index_file.write_text(json.dumps(index))
        expected = f"{index_file}: no thinker weights"
    elif breakage == "missing_thinker_key":
        from safetensors.torch import load_file, save_file

        index = json.loads(index_file.read_text())
        shard = index["weight_map"].pop("thinker.lm_head.weight")
        tensors = load_file(str(target / shard))
        del tensors["thinker.lm_head.weight"]
        save_file(tensors, str(target / shard), metadata={"format": "pt"})
        index_file.write_text(json.dumps(index))
        expected = "thinker weight(s) missing from the checkpoint, e.g. lm_head.weight"
    elif breakage == "token_ids":
        config = json.loads((target / "config.json").read_text())
        suffix = "_id" if "audio_token_id" in config else "_index"  # Qwen2.5-Omni's config says audio_token_index
        config["audio_token" + suffix] = config["image_token" + suffix]
        (target / "config.json").write_text(json.dumps(config))
        expected = "config.json's audio_token_id is"
    else:  # the weights as a pickle: refused by name, never unpickled
        (target / "model.safetensors").unlink()
        torch.save({"x": torch.zeros(1)}, target / "pytorch_model.bin")
        expected = f"{target / 'pytorch_model.bin'}: pickle weight files are not loaded"
    with pytest.raises(ModelLoadError) as info:
        load_thinker(target)
    assert expected in str(info.value) and "\n" not in str(info.value)


# ---- prompts, rollouts, log-probs -------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(request):
    """family name -> (model, processor), loaded once per module."""
    cache: dict = {}

    def get(name: str, thinker_dir):
        if name not in cache:
            cache[name] = load_thinker(thinker_dir, dtype="float32")
        return cache[name]

    return get


def test_prompt_encoding_places_every_feature(family_dirs, mixed_dataset, loaded):
    name, thinker_dir, _ = family_dirs
    model, processor = loaded(name, thinker_dir)
    tokenizer = processor.tokenizer
    for data_type, record in _records(mixed_dataset).items():
        prompt = encode_prompt(record, processor)
        ids = prompt.input_ids[0]
        assert prompt.generation_prefix == ""
        if "input_features" in prompt.media:  # one placeholder per audio-encoder output
            audio = model.get_audio_features(prompt.media["input_features"], prompt.media["feature_attention_mask"])
            assert int((ids == tokenizer.audio_token_id).sum()) == audio.last_hidden_state.shape[0], data_type
        if "pixel_values" in prompt.media:
            merge = (2 * family_by_name(name).vision_patch_size) ** 2  # pixels per image token
            h, w = prompt.media["image_grid_thw"][0, 1:].tolist()
            assert int((ids == tokenizer.image_token_id).sum()) == h * w // 4
            assert merge in (28 * 28, 32 * 32)
        if data_type == "video_audio":
            assert prompt.use_audio_in_video and "pixel_values_videos" in prompt.media
        assert torch.isfinite(_logits(model, prompt)).all()


def test_qwen3_audio_gives_13_tokens_per_second(qwen3_model_dir):
    import numpy as np

    _, processor = load_thinker(qwen3_model_dir)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}],
                                         tokenize=False, add_generation_prompt=True)
    encoded = processor(text=[text], audio=[np.zeros(3 * 16000, dtype=np.float32)], return_tensors="pt")
    assert int((encoded["input_ids"] == processor.tokenizer.audio_token_id).sum()) == 39  # Qwen2.5-Omni: 75


def test_rollout_and_plain_log_probs_match_the_thinker(family_dirs, mixed_dataset, loaded):
    name, thinker_dir, _ = family_dirs
    model, processor = loaded(name, thinker_dir)
    for data_type in ("image_audio", "video_audio"):
        prompt = encode_prompt(_records(mixed_dataset)[data_type], processor)
        torch.manual_seed(3)
        group = TransformersGenerateEngine(model, processor.tokenizer).generate([prompt], SamplingSettings(4, 8))[0]
        assert group.completion_ids.shape[0] == 4 and len(group.texts) == 4
        with torch.no_grad():
            logps = group_token_logps(model, [group], "none")[0]                                    # [G, C]
            ids = torch.cat([prompt.input_ids.expand(4, -1), group.completion_ids], dim=1)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                           use_audio_in_video=prompt.use_audio_in_video, **_repeat_media(prompt.media, 4)).logits
        expected = torch.log_softmax(logits[:, prompt.length - 1:-1].float(), -1)
        expected = expected.gather(-1, group.completion_ids[..., None])[..., 0]
        mask = group.completion_mask.bool()
        torch.testing.assert_close(logps[mask], expected[mask], atol=1e-5, rtol=1e-5)


SHARED_PATHS = (("encoders", "auto"), ("full", "kv"), ("full", "packed"))


def _logps_and_grads(model, group, sharing, prefix):
    model.zero_grad()
    logps = group_token_logps(model, [group], sharing, prefix=prefix)[0]                      # [G, C]
    (logps * group.completion_mask).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach() * group.completion_mask, grads


@pytest.mark.parametrize("checkpointing", [False, True])
def test_group_sharing_paths_equal_the_plain_path(family_dirs, mixed_dataset, checkpointing):
    """fp32: per-token log-probs within 1e-5 and gradients within 1e-4 (relative) of the plain path, on audio + image
    and video + audio-in-video prompts; rollouts that prefill once give the tokens `generate` gives under one seed.
    For Qwen3-Omni this covers the deepstack features (dropping them moves log-probs by ~0.08 on the tiny model)."""
    name, thinker_dir, _ = family_dirs
    model, processor = load_thinker(thinker_dir, dtype="float32", attn_implementation="sdpa")
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for data_type in ("image_audio", "video_audio"):
        prompt = encode_prompt(_records(mixed_dataset)[data_type], processor)
        model.eval()
        torch.manual_seed(7)
        plain = TransformersGenerateEngine(model, processor.tokenizer).generate([prompt], SamplingSettings(3, 8))[0]
        torch.manual_seed(7)
        shared = SharedPrefillEngine(model, processor.tokenizer).generate([prompt], SamplingSettings(3, 8))[0]
        assert torch.equal(plain.completion_ids, shared.completion_ids), data_type
        model.train()
        reference, reference_grads = _logps_and_grads(model, plain, "none", "auto")
        for sharing, prefix in SHARED_PATHS:
            logps, grads = _logps_and_grads(model, plain, sharing, prefix)
            torch.testing.assert_close(logps, reference, atol=1e-5, rtol=0, msg=f"{data_type} {sharing}/{prefix}")
            assert grads.keys() == reference_grads.keys()
            flat = torch.cat([grads[k].flatten() for k in reference_grads])
            expected = torch.cat([reference_grads[k].flatten() for k in reference_grads])
            assert (flat - expected).norm() <= 1e-4 * expected.norm(), f"{data_type} {sharing}/{prefix}"


def test_a_family_whose_shared_paths_are_not_exact_is_refused(qwen3_model_dir):
    from echoink.config import ConfigError
    from echoink.model.families.qwen3_omni import Qwen3Omni

    class Unshareable(Qwen3Omni):
        supports_group_sharing = False

    with pytest.raises(UnsupportedModelError, match="group_sharing: full is not supported for Qwen3-Omni"):
        Unshareable().require_group_sharing("full")
    Unshareable().require_group_sharing("none")
    with pytest.raises(ConfigError, match="router_aux_loss_coef > 0 needs group_sharing: none"):
        TrainConfig(router_aux_loss_coef=0.01, group_sharing="full")


def test_thinking_template_prefix_is_part_of_the_completion(tmp_path, mixed_dataset):
    """A template that pre-inserts `<think>` after the assistant header: the completion the rewards see starts with it."""
    from echoink.model.families.qwen3_omni_tiny import write_tiny_checkpoint
    from echoink.rewards import format_reward

    model, processor = load_thinker(write_tiny_checkpoint(tmp_path / "thinking", generation_prefix="<think>\n"))
    prompt = encode_prompt(_records(mixed_dataset)["audio"], processor)
    assert processor.tokenizer.decode(prompt.input_ids[0]).endswith("<|im_start|>assistant\n<think>\n")
    assert prompt.generation_prefix == "<think>\n"
    assert generation_prefix("<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n") == ""
    torch.manual_seed(0)
    group = TransformersGenerateEngine(model, processor.tokenizer).generate([prompt], SamplingSettings(2, 4))[0]
    assert all(text.startswith("<think>\n") for text in group.texts)
    # what the Thinking model writes (reasoning, then the closing tag and the answer) is well formed with the prefix
    assert format_reward([prompt.generation_prefix + "hmm</think><answer>A</answer>"]) == [1.0]
    assert format_reward(["hmm</think><answer>A</answer>"]) == [0.0]


# ---- training settings ------------------------------------------------------------------------------


def test_lora_targets_per_family(family_dirs):
    name, thinker_dir, _ = family_dirs
    family = family_by_name(name)
    thinker, _ = load_thinker(thinker_dir, dtype="float32")
    modules, parameters = lora_targets(thinker, None)
    leaves = {m.rsplit(".", 1)[-1] for m in modules}
    assert modules and all(".language_model.layers." in m for m in modules) and parameters == []
    if family.mixture_of_experts:
        assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj"}  # attention only: experts are fused parameters
    else:
        assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    peft_model = wrap_lora(thinker, TrainConfig(use_peft=True, lora_r=2))
    trained = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n and ".language_model.layers." in n for n in trained)

    encoders, _ = lora_targets(thinker, ["vision", "audio"])
    assert any(".visual.blocks." in m for m in encoders) and any(".audio_tower.layers." in m for m in encoders)
    assert not any(".language_model." in m for m in encoders)
    if not family.mixture_of_experts:
        with pytest.raises(UnsupportedModelError, match="no mixture-of-experts layers"):
            lora_targets(thinker, ["experts"])


def test_qwen3_expert_lora_trains_and_merges(qwen3_model_dir, mixed_dataset):
    thinker, processor = load_thinker(qwen3_model_dir, dtype="float32")
    base, _ = load_thinker(qwen3_model_dir, dtype="float32")
    peft_model = wrap_lora(thinker, TrainConfig(use_peft=True, lora_r=2, lora_dropout=0.0,
                                                lora_target_modules=["language_model", "experts"]))
    expert_adapters = [n for n, p in peft_model.named_parameters() if p.requires_grad and ".mlp.experts." in n]
    assert expert_adapters
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    prompt = encode_prompt(_records(mixed_dataset)["image_audio"], processor)
    logits = thinker(**prompt.model_kwargs()).logits
    logits.float().logsumexp(-1).sum().backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if n in set(expert_adapters))
    merged = peft_model.merge_and_unload()
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(_logits(merged, prompt), logits.detach(), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(_logits(base, prompt), logits.detach(), atol=1e-3)


def test_router_aux_loss_is_off_by_default_and_adds_its_gradient_when_on(family_dirs, mixed_dataset):
    from echoink.model.trainable import router_aux_loss_metrics

    name, thinker_dir, _ = family_dirs
    family = family_by_name(name)
    model, processor = load_thinker(thinker_dir, dtype="float32")
    if not family.mixture_of_experts:
        with pytest.raises(UnsupportedModelError, match="has no mixture-of-experts router"):
            prepare_for_training(model, TrainConfig(group_sharing="none", router_aux_loss_coef=0.1))
        return
    prompt = encode_prompt(_records(mixed_dataset)["image_audio"], processor)
    torch.manual_seed(0)
    group = TransformersGenerateEngine(model, processor.tokenizer).generate([prompt], SamplingSettings(2, 6))[0]
    model.train()

    def router_grads(coef: float):
        prepare_for_training(model, TrainConfig(group_sharing="none", router_aux_loss_coef=coef,
                                                gradient_accumulation_steps=2))
        model.zero_grad()
        (group_token_logps(model, [group], "none")[0] * group.completion_mask).sum().backward()
        return torch.cat([layer.mlp.gate.weight.grad.flatten() for layer in model.model.language_model.layers])

    off = router_grads(0.0)
    assert router_aux_loss_metrics(model) == {}  # off: nothing computed, nothing logged
    on = router_grads(0.5)
    logged = router_aux_loss_metrics(model)["router_aux_loss"]
    assert logged > 0 and router_aux_loss_metrics(model) == {}  # taken once per step
    # expected: the gradient of 0.5 / 2 (accumulation) x transformers' load-balancing loss on the same tokens
    model.zero_grad()
    ids = torch.cat([prompt.input_ids.expand(2, -1), group.completion_ids], dim=1)
    out = model.model(input_ids=ids, attention_mask=torch.ones_like(ids), output_router_logits=True,
                      **_repeat_media(prompt.media, 2))
    real = torch.cat([torch.ones_like(prompt.input_ids).expand(2, -1), group.completion_mask], dim=1)
    aux = family.router_aux_loss(model, out.router_logits, real)
    assert abs(float(aux.detach()) - logged) < 1e-5
    (0.25 * aux).backward()
    aux_grad = torch.cat([layer.mlp.gate.weight.grad.flatten() for layer in model.model.language_model.layers])
    torch.testing.assert_close(on - off, aux_grad, atol=1e-6, rtol=1e-4)


def test_cli_writes_a_tiny_qwen3_checkpoint(tmp_path):
    out = tmp_path / "q3"
    result = subprocess.run([sys.executable, "-m", "echoink.cli", "model", "tiny", "--family", "qwen3-omni",
                             "--layout", "full", "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Qwen3-Omni" in result.stdout
    model, _ = load_thinker(out)
    assert family_of_model(model).name == "qwen3-omni"
    bad = subprocess.run([sys.executable, "-m", "echoink.cli", "model", "tiny", "--family", "qwen9",
                          "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown model family 'qwen9'" in bad.stderr and "Traceback" not in bad.stderr


def test_a_family_missing_part_of_the_interface_cannot_be_made():
    """OmniFamily's forward and token methods are abstract: a third family that forgets one fails when it is made,
    not in the middle of a rollout."""
    from echoink.model.families import FAMILIES, OmniFamily

    class HalfFamily(OmniFamily):
        def published_thinker_name(self, name: str) -> str:
            return name

    with pytest.raises(TypeError, match="abstract"):
        HalfFamily()
    assert all(isinstance(family, OmniFamily) for family in FAMILIES)


def test_deepstack_inputs_of_stacked_prompts_keep_each_rows_positions():
    """`Deepstack.stack`: prompts of one length as rows; a prompt without visual features gets an all-False row,
    the features stay in row-major order (as the language model reads them), and the kwargs fill one row each."""
    import torch

    from echoink.model.families.qwen_thinker import Deepstack

    a = Deepstack(mask=torch.tensor([[True, False, True]]), embeds=(torch.ones(2, 4),))
    b = Deepstack(mask=torch.tensor([[False, True, False]]), embeds=(2 * torch.ones(1, 4),))
    joined = Deepstack.stack([a, None, b])
    assert joined.mask.tolist() == [[True, False, True], [False, False, False], [False, True, False]]
    assert torch.equal(joined.embeds[0], torch.cat([a.embeds[0], b.embeds[0]]))
    kwargs = joined.language_model_kwargs(3)
    assert torch.equal(kwargs["visual_pos_masks"], joined.mask)
    assert torch.equal(kwargs["deepstack_visual_embeds"][0], joined.embeds[0])
    assert Deepstack.stack([None, None]) is None
    one = a.language_model_kwargs(2, length=5)  # one prompt, two copies, padded to 5 positions: as before
    assert one["visual_pos_masks"].tolist() == [[True, False, True, False, False]] * 2
    assert one["deepstack_visual_embeds"][0].shape == (4, 4)


def test_deepstack_inputs_of_stacked_prompts_fill_only_whole_copies():
    import pytest
    import torch

    from echoink.model.families.qwen_thinker import Deepstack

    two = Deepstack.stack([Deepstack(mask=torch.tensor([[True]]), embeds=(torch.ones(1, 2),))] * 2)
    with pytest.raises(ValueError, match="2 stacked prompts cannot fill 3 rows"):
        two.language_model_kwargs(3)
