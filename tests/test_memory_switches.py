"""Memory switches: gradient checkpointing only in the policy's training forward (never in rollouts),
bf16 through accelerate's mixed precision with fp32 master weights."""

from __future__ import annotations

import json
import math

import torch
from safetensors.torch import load_file

from echoink.config import load_config
from echoink.data import load_dataset
from echoink.model.engine import rollout_engine
from echoink.model.generation import SamplingSettings
from echoink.model import load_thinker
from echoink.model.inputs import encode_prompt
from echoink.grpo.logprobs import Policy


def _count_checkpointed_layers(model) -> dict:
    """Wrap every layer's checkpoint function with a counter (HF calls it only when checkpointing applies)."""
    calls = {"n": 0}
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if func is not None:
            def counted(*args, _func=func, **kwargs):
                calls["n"] += 1
                return _func(*args, **kwargs)
            module._gradient_checkpointing_func = counted
    return calls


def test_gradient_checkpointing_is_off_in_rollouts_and_on_in_the_policy_forward(tiny_model_dir, mixed_dataset):
    thinker, processor = load_thinker(tiny_model_dir, dtype="float32")
    thinker.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    thinker.config.use_cache = False  # what the trainer sets with gradient_checkpointing
    calls = _count_checkpointed_layers(thinker)
    record = next(r for r in load_dataset(mixed_dataset / "train" / "omni_rl_format_train.json")
                  if r.data_type == "image_audio")
    prompt = encode_prompt(record, processor)

    thinker.eval()  # rollouts run in eval mode: checkpointing inactive, KV cache used
    groups = [rollout_engine(thinker, processor.tokenizer, sharing).generate([prompt], SamplingSettings(3, 6))[0]
              for sharing in ("full", "none")]
    assert calls["n"] == 0

    thinker.train()  # the policy's log-prob forward in training: every decoder layer is checkpointed
    logps = Policy(thinker)(groups[:1])[0]
    assert calls["n"] >= thinker.config.text_config.num_hidden_layers
    (logps * groups[0].completion_mask).sum().backward()
    assert thinker.lm_head.weight.grad is not None


def test_bf16_with_gradient_checkpointing_keeps_fp32_master_weights(tmp_path, tiny_model_dir, mixed_dataset):
    from echoink.grpo.trainer import train

    out = tmp_path / "bf16"
    config = load_config(None, [
        f"model_path={tiny_model_dir}", f"train_data={mixed_dataset / 'train' / 'omni_rl_format_train.json'}",
        f"output_dir={out}", "num_generations=2", "max_completion_length=8", "max_steps=1",
        "per_device_train_batch_size=2", "beta=0.04", "bf16=true", "gradient_checkpointing=true",
        "learning_rate=1e-3",
    ])
    final = train(config, progress=False)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert all(math.isfinite(row[k]) for k in ("loss", "kl", "grad_norm"))
    weights = load_file(str(final / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}  # master weights stay fp32
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    assert any(not torch.equal(weights[k], initial[k]) for k in initial)
