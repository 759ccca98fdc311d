"""GRPO training end to end on the tiny model, the config, and the dry run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from echoink.config import ConfigError, TrainConfig, load_config
from echoink.data import DatasetError

EXPECTED_KEYS = {
    "reward", "rewards/accuracy", "rewards/format", "reward_std", "completion_length", "kl", "loss", "grad_norm",
    "learning_rate", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "frac_reward_zero_std",
    "all_correct", "all_wrong", "step_seconds", "rollout_seconds", "logprob_seconds", "backward_seconds",
    "tokens_per_second", "step",
}


def _overrides(model_dir, data_dir, out_dir, *extra):
    return [f"model_path={model_dir}", f"train_data={data_dir}/train/omni_rl_format_train.json",
            f"output_dir={out_dir}", "num_generations=3", "max_completion_length=12", "learning_rate=1e-4",
            "seed=0", *extra]


def test_two_step_run_over_mixed_modalities(tiny_model_dir, mixed_dataset, tmp_path):
    from echoink.data import load_dataset
    from echoink.eval.run import training_evaluator
    from echoink.grpo.trainer import train
    from echoink.model import load_thinker

    records = load_dataset(mixed_dataset / "train" / "omni_rl_format_train.json")
    assert {"image_audio", "video_audio", "image", "text", "audio"} <= {r.data_type for r in records}
    out = tmp_path / "run"
    # 16 prompts, 2 steps x 2 prompts x grad-accum 4 = all 16: every data type is trained on
    cfg = load_config(None, _overrides(tiny_model_dir, mixed_dataset, out, "per_device_train_batch_size=2",
                                       "gradient_accumulation_steps=4", "num_iterations=2", "beta=0.04", "max_steps=2",
                                       f"eval_data={mixed_dataset}/valid/omni_rl_format_valid.json", "eval_steps=2",
                                       "eval_limit=4", "eval_max_new_tokens=8"))
    final = train(cfg, progress=False, evaluate=training_evaluator(cfg))

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert EXPECTED_KEYS <= set(row), EXPECTED_KEYS - set(row)
        assert row["num_groups"] == 8
    assert "eval/accuracy" not in rows[0] and rows[1]["eval/n"] == 4
    completions = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert len(completions) == 2 * 8 * 3
    trained_ids = {c["problem_id"] for c in completions}
    assert trained_ids == {r.problem_id for r in records}
    assert all({"problem_id", "completion", "rewards", "advantage", "step"} <= set(c) for c in completions)

    # the analysis tools work on a real run's outputs
    from echoink.analysis.aha import mine_aha
    from echoink.analysis.curves import plot_training_curves

    png = plot_training_curves(out, out / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    report = mine_aha(out, out / "aha")
    assert (out / "aha" / "aha_report.json").is_file() and (out / "aha" / "aha_rate.png").is_file()
    assert report["kind"] == "run" and report["n_completions"] == len(completions)
    assert [row["step"] for row in report["per_step"]] == [1, 2] and all(r["n"] == 8 * 3 for r in report["per_step"])

    model, processor = load_thinker(final)
    # the in-training evaluation at step 2 saw the final weights: it equals a fresh evaluation of the saved model
    from echoink.eval.run import evaluate_loaded

    valid = load_dataset(mixed_dataset / "valid" / "omni_rl_format_valid.json")[:4]
    again = evaluate_loaded(model, processor, valid, batch_size=8, max_new_tokens=8)
    assert rows[1]["eval/accuracy"] == again["accuracy"] and rows[1]["eval/format_rate"] == again["format_rate"]
    base, _ = load_thinker(tiny_model_dir)
    changed = any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))
    assert changed, "training did not change the weights"
    text = processor.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    ids = processor(text=[text], return_tensors="pt")
    out_ids = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out_ids.shape[1] > ids["input_ids"].shape[1]


def test_dataset_is_validated_before_the_model_loads(tmp_path):
    from echoink.grpo.trainer import train

    bad = tmp_path / "omni_rl_format_train.json"
    bad.write_text(json.dumps([{"problem_id": 1, "problem": "Q", "data_type": "image", "problem_type": "multiple choice",
                                "options": ["A. x", "B. y"], "solution": "<answer>Z</answer>",
                                "path": {"image": "images/missing.jpg"}}]))
    cfg = load_config(None, [f"model_path={tmp_path / 'no-model-here'}", f"train_data={bad}", f"output_dir={tmp_path / 'o'}"])
    with pytest.raises(DatasetError) as info:
        train(cfg, progress=False)
    assert f"{bad}:0:" in str(info.value)


@pytest.mark.parametrize("override, message", [
    ("not_a_key=1", "unknown config key(s): 'not_a_key'"),
    ("beta=-1", "beta must be >= 0"),
    ("loss_type=ppo", "loss_type must be one of"),
    ("num_generations=abc", "num_generations: expected int"),
    ("reward_weights=[1.0]", "reward_weights has 1 entries but reward_funcs has 2"),
    ("importance_sampling_level=word", "importance_sampling_level must be one of"),
])
def test_bad_config_values_are_errors(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1e-6\nnum_generations: 16\nreward_funcs: [accuracy]\n")
    cfg = load_config(path, ["beta=0.04", "top_k=null", "learning_rate=2e-6"])
    assert cfg.learning_rate == 2e-6 and cfg.num_generations == 16 and cfg.beta == 0.04 and cfg.top_k is None
    assert cfg.reward_funcs == ["accuracy"]
    defaults = TrainConfig()
    assert (defaults.loss_type, defaults.use_bias_correction_kl, defaults.freeze_vision) == ("grpo", False, False)


def test_recipe_dry_run_prints_echoink_r1_arithmetic():
    result = subprocess.run([sys.executable, "-m", "echoink.cli", "train", "--config", "configs/echoink_r1_7b.yaml",
                             "--dry-run", "--num-processes", "8", "--num-items", "4490"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for line in ("num_generations: 16", "beta: 0.001", "learning_rate: 1.0e-06", "max_completion_length: 768",
                 "prompts_per_step: 8", "completions_per_step: 128", "total_steps: 562", "PROMPTS per device",
                 "group_sharing: full", "gradient_checkpointing: true", "top_p: 0.95", "weight_decay: 0.01",
                 "max_grad_norm: 5.0", "lr_scheduler_type: cosine"):
        assert line in result.stdout, line
