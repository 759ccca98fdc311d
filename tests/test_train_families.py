"""GRPO training through the one trainer on each model family (tiny models, 1-2 steps): μ > 1 with β > 0 and
frozen encoders, LoRA with a merged model, exact resume, group sharing, evaluation batch 6 = batch 1, the recipes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from echoink.config import load_config
from echoink.data import load_dataset
from echoink.grpo.trainer import train
from echoink.model import load_thinker
from echoink.model.families import family_by_name


def _config(model_dir, data_dir, out_dir, *extra):
    return load_config(None, [
        f"model_path={model_dir}", f"train_data={data_dir}/train/omni_rl_format_train.json", f"output_dir={out_dir}",
        "num_generations=3", "max_completion_length=10", "learning_rate=1e-3", "seed=0", "group_sharing=none",
        "per_device_train_batch_size=2", *extra])


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _changed(model_a, model_b) -> list[str]:
    b = model_b.state_dict()
    return [k for k, v in model_a.state_dict().items() if not torch.equal(v, b[k])]


def test_grpo_with_iterations_kl_and_frozen_encoders(family_dirs, mixed_dataset, tmp_path):
    name, thinker_dir, _ = family_dirs
    moe = family_by_name(name).mixture_of_experts
    out = tmp_path / "run"
    extra = ["router_aux_loss_coef=0.01"] if moe else []
    final = train(_config(thinker_dir, mixed_dataset, out, "max_steps=1", "num_iterations=2", "beta=0.04",
                          "freeze_vision=true", "freeze_audio=true", *extra), progress=False)
    rows = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1] and rows[0]["num_groups"] == 2
    assert {"kl", "loss", "grad_norm", "clip_ratio/region_mean"} <= set(rows[0])
    assert ("router_aux_loss" in rows[0]) == moe and (not moe or rows[0]["router_aux_loss"] > 0)
    trained, _ = load_thinker(final, dtype="float32")
    base, _ = load_thinker(thinker_dir, dtype="float32")
    changed = _changed(trained, base)
    assert any(".language_model." in k for k in changed)
    assert not any(".visual." in k or ".audio_tower." in k for k in changed)  # frozen encoders stay as they were
    assert json.loads((final / "config.json").read_text())["model_type"] == family_by_name(name).thinker_model_type


def test_lora_run_saves_an_adapter_and_a_merged_thinker(family_dirs, mixed_dataset, tmp_path):
    name, thinker_dir, _ = family_dirs
    family = family_by_name(name)
    out = tmp_path / "lora"
    final = train(_config(thinker_dir, mixed_dataset, out, "max_steps=2", "beta=0.04", "use_peft=true", "lora_r=4",
                          "num_generations=2", "max_completion_length=6",
                          "lora_alpha=8", "lora_dropout=0.0", "learning_rate=5e-2", "save_merged_model=true",
                          "reward_funcs=[_train_worker:spread_reward,format]"), progress=False)
    assert final == out / "final"
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4
    assert all(".language_model.layers." in m for m in adapter["target_modules"])
    merged = family.thinker_class.from_pretrained(str(final))  # plain transformers reads the merged thinker
    base, _ = load_thinker(thinker_dir, dtype="float32")
    changed = _changed(merged, base)
    assert changed and all(".language_model.layers." in k and ".self_attn." in k or ".mlp." in k for k in changed)
    if family.mixture_of_experts:
        assert not any("experts" in k or "mlp.gate" in k for k in changed)  # attention-only default


def test_resume_from_a_checkpoint_is_exact(family_dirs, mixed_dataset, tmp_path):
    name, thinker_dir, _ = family_dirs
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    settings = ("max_steps=2", "save_steps=1", "beta=0", "num_generations=2", "max_completion_length=6")
    train(_config(thinker_dir, mixed_dataset, straight, *settings), progress=False)
    shutil.copytree(straight, resumed)  # as if killed after the first checkpoint
    shutil.rmtree(resumed / "checkpoint-2")
    shutil.rmtree(resumed / "final")
    train(_config(thinker_dir, mixed_dataset, resumed, *settings, "resume=true"), progress=False)
    assert [r["step"] for r in _rows(resumed / "metrics.jsonl")] == [1, 2]
    a = load_file(str(straight / "final" / "model.safetensors"))
    b = load_file(str(resumed / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_qwen3_trains_with_group_sharing(qwen3_model_dir, mixed_dataset, tmp_path):
    out = tmp_path / "shared"
    final = train(_config(qwen3_model_dir, mixed_dataset, out, "max_steps=1", "group_sharing=full", "beta=0.04"),
                  progress=False)
    assert [r["step"] for r in _rows(out / "metrics.jsonl")] == [1]
    trained, _ = load_thinker(final, dtype="float32")
    base, _ = load_thinker(qwen3_model_dir, dtype="float32")
    assert any(".language_model." in k for k in _changed(trained, base))


def test_qwen3_eval_batch_six_equals_batch_one(qwen3_model_dir, mixed_dataset, tmp_path):
    from echoink.eval.run import evaluate_loaded

    model, processor = load_thinker(qwen3_model_dir)
    records = load_dataset(mixed_dataset / "valid" / "omni_rl_format_valid.json")
    rows = {}
    for batch_size in (1, 6):
        out = tmp_path / f"bs{batch_size}.jsonl"
        evaluate_loaded(model, processor, records, out_path=out, batch_size=batch_size, max_new_tokens=8)
        rows[batch_size] = {r["problem_id"]: (r["reply"], r["reply_tokens"]) for r in _rows(out)}
    assert len(rows[1]) == len(records) and rows[6] == rows[1]


@pytest.mark.parametrize("name", ["qwen3_omni_30b_a3b_lora.yaml", "qwen3_omni_30b_a3b_full_zero3.yaml"])
def test_qwen3_recipes_validate_and_use_gspo(name):
    from pathlib import Path

    from echoink.config import describe_run

    path = Path(__file__).resolve().parents[1] / "configs" / name
    config = load_config(path)
    assert "Qwen3-Omni-30B-A3B" in config.model_path and config.group_sharing == "full"
    assert config.importance_sampling_level == "sequence" and config.num_iterations > 1  # GSPO, mu > 1
    assert config.epsilon < 0.01 and config.epsilon_high < 0.01 and config.router_aux_loss_coef == 0
    assert config.use_peft == ("lora" in name)
    text = describe_run(config, 4490, 8)
    assert "prompts_per_step: 8" in text and "completions_per_step: 128" in text and "total_steps: 562" in text
    launch = next(line for line in path.read_text().splitlines() if line.startswith("# Launch:"))
    accelerate_file = Path(__file__).resolve().parents[1] / launch.split("--config_file ")[1].split()[0]
    assert accelerate_file.is_file()
