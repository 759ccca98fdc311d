"""LoRA (peft): only adapters train, the reference is the same model with adapters disabled, the adapter
is saved (in checkpoints too) and the merged thinker reloads with load_thinker and generates."""

from __future__ import annotations

import json

import pytest
import torch

from echoink.config import TrainConfig, load_config
from echoink.data import load_dataset
from echoink.grpo.logprobs import group_token_logps
from echoink.model.engine import SharedPrefillEngine
from echoink.model.generation import SamplingSettings
from echoink.model import load_thinker
from echoink.model.inputs import encode_prompt
from echoink.model.prompt_settings import PromptSettings, read_prompt_settings
from echoink.grpo.logprobs import Policy
from echoink.model.trainable import wrap_lora


@pytest.fixture(scope="module")
def group(tiny_model_dir, mixed_dataset):
    """One sampled group on an image + audio prompt (under the untrained tiny model)."""
    model, processor = load_thinker(tiny_model_dir, dtype="float32")
    record = next(r for r in load_dataset(mixed_dataset / "train" / "omni_rl_format_train.json")
                  if r.data_type == "image_audio")
    torch.manual_seed(0)
    engine = SharedPrefillEngine(model, processor.tokenizer)
    return engine.generate([encode_prompt(record, processor)], SamplingSettings(4, 10))[0]


def _logps(model, group) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return group_token_logps(model, [group])[0] * group.completion_mask


def test_reference_is_the_base_model_with_adapters_disabled(tiny_model_dir, group):
    thinker, _ = load_thinker(tiny_model_dir, dtype="float32")
    peft_model = wrap_lora(thinker, TrainConfig(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0))
    # the trainer keeps calling the thinker: peft injected the adapters into that very object
    assert peft_model.get_base_model() is thinker
    from accelerate import Accelerator

    policy = Accelerator(cpu=True).prepare(Policy(thinker))
    assert Accelerator(cpu=True).unwrap_model(policy).thinker is thinker
    with torch.no_grad():  # make the adapters matter (lora_B starts at zero)
        for name, param in thinker.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)

    base, _ = load_thinker(tiny_model_dir, dtype="float32")
    with peft_model.disable_adapter():
        disabled = _logps(thinker, group)
    assert torch.equal(disabled, _logps(base, group))  # the reference needs no second copy
    assert not torch.allclose(_logps(thinker, group), disabled, atol=1e-3)  # adapters back on afterwards


def test_target_modules(tiny_model_dir):
    thinker, _ = load_thinker(tiny_model_dir, dtype="float32")
    default = wrap_lora(thinker, TrainConfig(use_peft=True, lora_r=2))
    names = [n for n, p in default.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and ".language_model.layers." in n for n in names)
    assert {n.split(".")[-4] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"}

    thinker, _ = load_thinker(tiny_model_dir, dtype="float32")
    both = wrap_lora(thinker, TrainConfig(use_peft=True, lora_r=2, lora_target_modules=["language_model", "audio"]))
    names = [n for n, p in both.named_parameters() if p.requires_grad]
    assert any(".audio_tower.layers." in n for n in names) and any(".language_model." in n for n in names)
    assert not any(".visual." in n for n in names)


@pytest.mark.slow
def test_lora_run_trains_only_adapters_and_saves_a_loadable_merged_model(tmp_path, tiny_model_dir, mixed_dataset,
                                                                        group, monkeypatch):
    import accelerate

    import echoink.grpo.trainer as trainer_module

    captured = {}
    original_end = accelerate.Accelerator.end_training

    def end_training(self):
        captured["thinker"] = self.unwrap_model(self._models[0]).thinker
        captured["optimized"] = [p for g in self._optimizers[0].optimizer.param_groups for p in g["params"]]
        return original_end(self)

    monkeypatch.setattr(accelerate.Accelerator, "end_training", end_training)

    def no_second_copy(*args, **kwargs):
        raise AssertionError("a LoRA run must not build a separate reference model")

    monkeypatch.setattr(trainer_module, "make_reference", no_second_copy)

    out = tmp_path / "lora"
    config = load_config(None, [
        f"model_path={tiny_model_dir}", f"train_data={mixed_dataset / 'train' / 'omni_rl_format_train.json'}",
        f"output_dir={out}", "num_generations=4", "max_completion_length=12", "max_steps=2",
        "per_device_train_batch_size=2", "num_iterations=2", "beta=0.04", "learning_rate=2e-2", "seed=5",
        "use_peft=true", "lora_r=4", "lora_alpha=8", "lora_dropout=0.0", "save_merged_model=true", "save_steps=2",
        "reward_funcs=[_train_worker:spread_reward,format]",  # a reward the random tiny model does earn
    ])
    final = trainer_module.train(config, progress=False)
    assert final == out / "final"

    thinker = captured["thinker"]
    names = {id(p): n for n, p in thinker.named_parameters()}
    optimized = [names[id(p)] for p in captured["optimized"]]
    assert optimized and all("lora_" in n for n in optimized)  # the optimizer only sees adapters

    base, _ = load_thinker(tiny_model_dir, dtype="float32")
    base_state = base.state_dict()
    trained_state = thinker.state_dict()
    lora_b = [v for k, v in trained_state.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # the adapters did train (lora_B starts at 0)
    for key, value in trained_state.items():
        if "lora_" in key:
            continue
        original = key.replace(".base_layer.", ".")
        assert torch.equal(value, base_state[original]), f"{original} changed under LoRA"

    for adapter in (out / "adapter", out / "checkpoint-2" / "adapter"):
        assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
        assert (adapter / "adapter_model.safetensors").is_file()
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    for model_dir in (out / "adapter", out / "checkpoint-2" / "adapter", out / "final"):  # eval's prompt (issue 22)
        assert read_prompt_settings(model_dir) == PromptSettings.from_config(config)

    # the merged thinker: load_thinker reads it, it computes what the adapted model computes, and generates
    merged, processor = load_thinker(out / "final", dtype="float32")
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(_logps(merged, group), _logps(thinker, group), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_logps(merged, group), _logps(base, group), atol=1e-4)
    text = processor.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    ids = processor(text=[text], return_tensors="pt")
    assert merged.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] > ids["input_ids"].shape[1]
