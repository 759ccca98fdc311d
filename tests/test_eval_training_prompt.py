"""A trained model is evaluated with the prompt it was trained with (issue 22, item 2): the run's template,
media caps and problem types are saved with every checkpoint and the final model; `echoink eval` uses them,
says so, and takes `--config RUN/config.resolved.json` instead; in-training and standalone evaluation agree
item for item."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

import echoink.eval.run as eval_run
from echoink.eval.run_files import run_file_path
from echoink.cli import app
from echoink.config import TrainConfig
from echoink.model.prompt_settings import (PROMPT_SETTINGS_FILE, PromptSettings, PromptSettingsError,
                                           read_prompt_settings, settings_for_eval)
from echoink.prompts import DEFAULT_TEMPLATE

TEMPLATE = {"question_template": "Question: {problem}\nChoose one of:\n{options}",
            "instruction": "Think it over in <think> </think>, then answer."}


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, mixed_dataset, tmp_path_factory):
    """A one-step run with a non-default template and media caps, evaluated in training on 4 items; the
    in-training evaluation's rows are captured as it writes them."""
    from echoink.eval.run import training_evaluator
    from echoink.grpo.trainer import train

    out = tmp_path_factory.mktemp("prompt_run") / "run"
    valid = mixed_dataset / "valid" / "omni_rl_format_valid.json"
    config = TrainConfig(model_path=str(tiny_model_dir), train_data=str(mixed_dataset / "train" / "omni_rl_format_train.json"),
                         output_dir=str(out), num_generations=2, max_completion_length=6, max_steps=1, save_steps=1,
                         prompt_template=TEMPLATE, max_audio_seconds=2.0, max_pixels=64 * 28 * 28,
                         video_max_frames=8, eval_data=str(valid), eval_steps=1, eval_limit=4, eval_max_new_tokens=6)
    captured = []
    original = eval_run.evaluate_loaded

    def capturing(*args, **kwargs):
        return original(*args, on_batch=captured.extend, **kwargs)

    eval_run.evaluate_loaded = capturing
    try:
        train(config, progress=False, evaluate=training_evaluator(config))
    finally:
        eval_run.evaluate_loaded = original
    return config, out, valid, captured


def _replies(rows):
    return [(str(row["problem_id"]), row["reply"], row["pred"], row["correct"]) for row in rows]


def _eval(model, valid, out, *extra):
    result = CliRunner().invoke(app, ["eval", "--model", str(model), "--data", str(valid), "--out", str(out),
                                      "--limit", "4", "--max-new-tokens", "6", "--no-progress", *extra])
    assert result.exit_code == 0, result.output
    return result.output.splitlines()[0], [json.loads(line) for line in out.read_text().splitlines()]


def test_settings_are_saved_with_every_model(trained_run):
    config, out, _, _ = trained_run
    expected = PromptSettings.from_config(config)
    assert expected.template.version.startswith("custom-") and expected.media.max_pixels == 64 * 28 * 28
    for model_dir in (out / "final", out / "checkpoint-1"):
        assert read_prompt_settings(model_dir) == expected


def test_standalone_eval_agrees_with_the_in_training_eval_item_for_item(trained_run, tmp_path):
    config, out, valid, in_training = trained_run
    first, rows = _eval(out / "final", valid, tmp_path / "pred.jsonl")
    assert first.startswith(f"prompt {PromptSettings.from_config(config).template.version}, media "
                            "max_audio_seconds=2.0, min_pixels=3136, max_pixels=50176")
    assert first.endswith(f"(saved with the model: {out / 'final' / PROMPT_SETTINGS_FILE})")
    assert len(in_training) == 4 and _replies(rows) == _replies(in_training)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["eval/n"] == 4
    signature = json.loads(run_file_path(tmp_path / "pred.jsonl").read_text())  # the file says which prompt
    assert signature["prompt_version"] == PromptSettings.from_config(config).template.version
    assert signature["media_options"]["max_audio_seconds"] == 2.0


def test_config_overrides_the_saved_settings(trained_run, tmp_path):
    config, out, valid, in_training = trained_run
    bare = tmp_path / "bare"
    shutil.copytree(out / "final", bare)
    (bare / PROMPT_SETTINGS_FILE).unlink()
    first, _ = _eval(bare, valid, tmp_path / "defaults.jsonl")
    assert first.startswith(f"prompt {DEFAULT_TEMPLATE.version}, media max_audio_seconds=10.0")
    assert first.endswith(f"(the defaults: {bare} has no {PROMPT_SETTINGS_FILE} (a base model?))")
    first, rows = _eval(bare, valid, tmp_path / "pred.jsonl", "--config", str(out / "config.resolved.json"))
    assert first.endswith(f"(from {out / 'config.resolved.json'} (--config))")
    assert _replies(rows) == _replies(in_training)


def test_bad_settings_are_one_line(trained_run, tmp_path):
    _, out, valid, _ = trained_run
    broken = tmp_path / "broken"
    shutil.copytree(out / "final", broken)
    (broken / PROMPT_SETTINGS_FILE).write_text('{"prompt_template": {"nonsense": 1}}')
    with pytest.raises(PromptSettingsError, match="cannot read the model's prompt settings"):
        settings_for_eval(broken)
    result = CliRunner().invoke(app, ["eval", "--model", str(broken), "--data", str(valid), "--out",
                                      str(tmp_path / "p.jsonl"), "--protocol", "echoink", "--config", "x.json"])
    assert result.exit_code == 1 and "--protocol echoink uses its own prompt and media caps: drop --config" in result.output


def test_saved_user_problem_types_are_not_imported_without_the_flag(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / PROMPT_SETTINGS_FILE).write_text(json.dumps(
        {**PromptSettings().to_dict(), "problem_types": ["my_tasks:NoteName"]}))
    result = CliRunner().invoke(app, ["eval", "--model", str(model), "--data", "x.json", "--out",
                                      str(tmp_path / "p.jsonl")])
    assert result.exit_code == 1
    assert "pass --problem-types my_tasks:NoteName to import them (trusted code only)" in result.output
