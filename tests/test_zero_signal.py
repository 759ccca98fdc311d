"""No silent training (issue 22, item 11): a warning when every group of several consecutive steps has zero
advantage, naming the likely cause; completions.jsonl records each group's problem type and `echoink aha`
grades training completions with it."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from echoink.cli import app
from echoink.config import load_config
from echoink.grpo.zero_signal import ZERO_SIGNAL_STEPS, ZeroSignalWatch


def _silent(**extra):
    return {"frac_reward_zero_std": 1.0, "rewards/format": 0.5, **extra}


@pytest.mark.parametrize("metrics, cause", [
    ({"rewards/format": 0.0, "all_wrong": 1.0}, "format reward 0: no completion writes <think>"),
    ({"unparsed_by_type/numerical": 1.0}, "no answer parses for its problem type (all answers unparsed)"),
    ({"all_correct": 1.0, "unparsed_by_type/multiple_choice": 0.0}, "every group is all correct"),
    ({"all_wrong": 1.0, "unparsed_by_type/multiple_choice": 0.5}, "every group is all wrong"),
    ({}, "the rewards do not vary within a group"),
])
def test_the_warning_names_the_likely_cause(metrics, cause):
    watch = ZeroSignalWatch()
    said = [watch.observe(step, _silent(**metrics)) for step in range(1, ZERO_SIGNAL_STEPS + 1)]
    assert said[:-1] == [None] * (ZERO_SIGNAL_STEPS - 1)
    assert said[-1].startswith(f"steps 1-{ZERO_SIGNAL_STEPS}: every group had zero advantage")
    assert f"likely cause: {cause}" in said[-1]


def test_one_warning_per_streak_and_a_step_with_signal_ends_it():
    watch = ZeroSignalWatch(steps=2)
    said = [watch.observe(1, _silent()), watch.observe(2, _silent()), watch.observe(3, _silent()),
            watch.observe(4, {"frac_reward_zero_std": 0.5}), watch.observe(5, _silent()),
            watch.observe(6, {"frac_reward_zero_std": float("nan")}),  # no groups: neither signal nor silence
            watch.observe(7, _silent())]
    assert [s is not None for s in said] == [False, True, False, False, False, False, True]
    assert said[-1].startswith("steps 5-7:")


def test_a_run_that_never_writes_the_format_is_warned_about(tiny_model_dir, mixed_dataset, tmp_path, capsys):
    from echoink.grpo.trainer import train

    out = tmp_path / "run"
    # the untrained tiny model writes no <answer> block: accuracy and format 0 in every completion
    cfg = load_config(None, [f"model_path={tiny_model_dir}", f"train_data={mixed_dataset}/train/omni_rl_format_train.json",
                             f"output_dir={out}", "num_generations=2", "max_completion_length=6",
                             f"max_steps={ZERO_SIGNAL_STEPS}", "seed=0"])
    train(cfg, progress=False)
    err = " ".join(capsys.readouterr().err.split())
    assert (f"warning: steps 1-{ZERO_SIGNAL_STEPS}: every group had zero advantage (all completions of each "
            "prompt got the same reward), so nothing was learnt; likely cause: format reward 0") in err
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert rows and all(row["problem_type"] == "multiple choice" for row in rows)


def _completion_row(step, completion, solution, problem_type=None):
    row = {"step": step, "problem_id": f"p{step}", "sample_idx": 0, "solution": solution, "completion": completion,
           "rewards": {"accuracy": 0.0}, "advantage": 0.0}
    if problem_type is not None:
        row["problem_type"] = problem_type
    return row


def test_aha_grades_training_completions_by_their_problem_type(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [_completion_row(1, "<think>Wait, 440 Hz.</think><answer>440.0</answer>", "<answer>440</answer>",
                            "numerical"),
            _completion_row(2, "<think>Hmm, three beeps.</think><answer>three</answer>", "<answer>3</answer>",
                            "counting"),
            _completion_row(3, "<think>Wait.</think><answer>B</answer>", "<answer>B</answer>")]  # an older row
    (run / "completions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = CliRunner().invoke(app, ["aha", str(run)])
    assert result.exit_code == 0, result.output
    report = json.loads((run / "aha" / "aha_report.json").read_text())
    # graded as multiple choice (exact string match) both numbers would be wrong: accuracy 1/3, not 3/3
    assert report["accuracy_with_reflection"] == 1.0


def test_aha_names_an_unregistered_problem_type(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    row = _completion_row(1, "<answer>x</answer>", "<answer>x</answer>", "note name")
    (run / "completions.jsonl").write_text(json.dumps(row) + "\n")
    result = CliRunner().invoke(app, ["aha", str(run)])
    assert result.exit_code == 1
    assert "completions.jsonl:1:" in result.output and "--problem-types" in result.output
    assert len(result.output.strip().splitlines()) == 1
