"""Progress a cluster log can read (issue 22, item 4): with stderr sent to a file, one plain line per logged
step (step/total, reward, accuracy, KL, grad norm, s/step, ETA), per evaluation, per checkpoint and while the
model loads, written while the run goes on; on a terminal the bar starts at the resumed step."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

from rich.console import Console

from echoink.grpo.run_log import RunLog, StepPace, evaluation_line


def test_a_run_with_stderr_to_a_file_writes_step_lines_while_it_runs(tiny_model_dir, mixed_dataset, tmp_path):
    log_file, witness = tmp_path / "train.log", tmp_path / "witness.jsonl"
    # a reward that, each time it is called (during a step), records what the log file holds at that moment
    (tmp_path / "peek_rewards.py").write_text(textwrap.dedent(f"""
        import json
        def peek(completions, **columns):
            text = open({str(log_file)!r}, encoding="utf-8").read()
            with open({str(witness)!r}, "a", encoding="utf-8") as out:
                out.write(json.dumps({{"step1": "step 1/3 |" in text, "step3": "step 3/3 |" in text}}) + "\\n")
            return [0.0] * len(completions)
    """))
    out = tmp_path / "run"
    args = [sys.executable, "-m", "echoink.cli", "train", f"model_path={tiny_model_dir}",
            f"train_data={mixed_dataset}/train/omni_rl_format_train.json", f"output_dir={out}", "num_generations=2",
            "max_completion_length=6", "max_steps=3", "reward_funcs=[accuracy,format,peek_rewards:peek]",
            f"eval_data={mixed_dataset}/valid/omni_rl_format_valid.json", "eval_steps=2", "eval_limit=2",
            "eval_max_new_tokens=4", "save_steps=2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "COLUMNS": "80"}
    with open(log_file, "w", encoding="utf-8") as stderr:
        result = subprocess.run(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                timeout=600)
    text = log_file.read_text(encoding="utf-8")
    assert result.returncode == 0, text
    seen = [json.loads(line) for line in witness.read_text().splitlines()]
    assert any(row["step1"] and not row["step3"] for row in seen)          # a step line came out mid-run
    lines = text.splitlines()
    assert "\r" not in text and "━" not in text                              # no bar, no carriage returns
    assert any(line.startswith("loading the model from ") for line in lines)
    assert any(line.startswith("model loaded in ") for line in lines)
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split(" |")[0] for line in steps] == ["step 1/3", "step 2/3", "step 3/3"]
    for line in steps:
        assert " | reward " in line and " | accuracy " in line and " | kl " in line and " | grad_norm " in line
        assert line.endswith(tuple(f"{s:02d}" for s in range(60))) and " s/step | ETA " in line
    assert any(line.startswith("eval at step 2/3: accuracy ") and "(95% Wilson) over 2 answers" in line
               for line in lines)
    assert f"checkpoint at step 2/3: {out / 'checkpoint-2'}" in lines


def _fake_accelerator():
    return SimpleNamespace(is_main_process=True, num_processes=1, trackers=[], wait_for_everyone=lambda: None)


def test_on_a_terminal_the_bar_starts_at_the_resumed_step(tmp_path):
    log = RunLog(tmp_path, _fake_accelerator(), total_steps=20, enabled=True, log_completions=False)
    log.console = Console(file=io.StringIO(), force_terminal=True, width=80)
    log.bar = True
    log.begin(10)
    assert log.progress.tasks[0].completed == 10 and log.progress.tasks[0].total == 20
    log.step(11, {"reward": 0.5, "eval/accuracy": 0.5, "eval/ci_low": 0.25, "eval/ci_high": 0.75, "eval/n": 8},
             [], ["accuracy"])
    log.checkpoint_saved(11, tmp_path / "checkpoint-11")
    assert log.progress.tasks[0].completed == 11
    log.close()
    shown = log.console.file.getvalue()
    assert "eval at step 11/20: accuracy 50.0% [25.0, 75.0] (95% Wilson) over 8 answers" in shown
    assert f"checkpoint at step 11/20: {tmp_path / 'checkpoint-11'}" in shown


def test_pace_counts_from_the_resumed_step(monkeypatch):
    clock = SimpleNamespace(now=100.0)
    monkeypatch.setattr("echoink.grpo.run_log.time", SimpleNamespace(monotonic=lambda: clock.now))
    pace = StepPace(total=20)
    pace.begin(10)              # resumed at step 10: steps 1-10 are not this run's
    clock.now = 104.0
    pace.done(12)               # two steps in 4 s
    line = pace.line(12, {"reward": 0.5, "rewards/accuracy": 0.25, "kl": 0.00123, "grad_norm": 1.5})
    assert line == "step 12/20 | reward 0.500 | accuracy 0.250 | kl 0.0012 | grad_norm 1.500 | 2.0 s/step | ETA 0:00:16"


def test_evaluation_line_without_graded_answers():
    assert evaluation_line(4, 8, {"eval/n": 0}) == "eval at step 4/8: no accuracy (no answer was graded)"


def test_eval_writes_a_line_every_n_answers_when_stderr_is_not_a_terminal(tiny_model_dir, mixed_dataset, tmp_path,
                                                                          monkeypatch, capsys):
    from echoink.eval.run import evaluate

    monkeypatch.setattr("echoink.eval.run.PROGRESS_LINE_EVERY", 2)
    evaluate(tiny_model_dir, mixed_dataset / "valid" / "omni_rl_format_valid.json", tmp_path / "pred.jsonl",
             batch_size=2, max_new_tokens=4, limit=5, progress=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("eval ")]
    assert [line.split(" |")[0] for line in lines] == ["eval 2/5 answers", "eval 4/5 answers", "eval 5/5 answers"]
    assert all(" | accuracy " in line and " items/s" in line for line in lines)
    assert " | ETA 0:00:00" in lines[-1]


def test_transformers_bars_stay_off_for_the_whole_run(tiny_model_dir, tmp_path):
    """Its "Writing model shards" bar would garble ours: off from the run's start to its end, model loading
    included (loading used to switch them back on)."""
    from transformers.utils import logging as hf_logging

    from echoink.model import load_thinker

    hf_logging.enable_progress_bar()  # as a fresh process has them (an earlier test may have left them off)
    log = RunLog(tmp_path, _fake_accelerator(), total_steps=2, enabled=False, log_completions=False)
    try:
        assert not hf_logging.is_progress_bar_enabled()
        load_thinker(tiny_model_dir)
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        log.close()
    assert hf_logging.is_progress_bar_enabled()
