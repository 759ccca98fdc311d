"""Issue 11, "nothing silent, nothing lost": each fault a user can meet ends in correct behaviour or one
`error:` line naming the file or setting. One test (or a few) per numbered item of the issue; the item
number is in each test's name."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from echoink.cli import app
from echoink.config import ConfigError, TrainConfig, load_config
from echoink.grpo.checkpoint import (
    STATE_FILE,
    CheckpointError,
    changed_settings,
    checkpoint_problems,
    choose_resume_checkpoint,
    read_state,
    run_settings,
    save_checkpoint,
)
from echoink.grpo.run_dir import OutputDirError, check_output_dir, clear_previous_run, previous_run_entries
from echoink.grpo.skips import PromptSkips, RecordSkips, SkipLimitError
from echoink.io import NoSpaceLeftError, append_jsonl, write_json_atomic

REPO = Path(__file__).resolve().parents[1]


def _error_line(result) -> str:
    """The CLI's stderr (CliRunner keeps it apart) ends with exactly one `error:` line (a run that started
    has printed its progress lines before it); no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert result.exit_code == 1 and len(errors) == 1 and lines[-1] == errors[0], (result.exit_code, lines[-5:])
    assert "Traceback" not in result.output
    return errors[0]


# ---- a real (small) accelerate checkpoint ------------------------------------------------------------

@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def _write_checkpoints(accelerator, out: Path, steps=(1, 2), settings: dict | None = None) -> list[Path]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    written = []
    for step in steps:
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
        state = {"step": step, "prompts_seen": step, **(settings or {})}
        written.append(save_checkpoint(accelerator, lambda d: save_file(model.state_dict(), str(d / "model.safetensors")),
                                       out, step, state))
    accelerator._models.clear(), accelerator._optimizers.clear(), accelerator._schedulers.clear()
    return written


def _config(out: Path, *overrides: str) -> TrainConfig:
    return load_config(None, [f"output_dir={out}", *overrides])


# ---- 1. a run directory is never mixed or overwritten -------------------------------------------------

def test_1_rerun_into_a_run_directory_is_refused_naming_it(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert check_output_dir(_config(out)) == []                  # unrelated files: not a run
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "final").mkdir()
    with pytest.raises(OutputDirError) as info:
        check_output_dir(_config(out))
    message = str(info.value)
    assert f"output_dir {out} already holds a run (metrics.jsonl, final)" in message
    assert "overwrite_output_dir=true" in message and "\n" not in message

    # overwrite_output_dir=true clears only what a run writes
    entries = check_output_dir(_config(out, "overwrite_output_dir=true"))
    assert "deleted the previous run" in clear_previous_run(entries)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert previous_run_entries(out) == []


def test_1_resume_without_a_checkpoint_in_a_run_says_so(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    assert check_output_dir(_config(out, "resume=true")) == []   # empty: a fresh start
    (out / "completions.jsonl").write_text('{"step": 1}\n')
    (out / "checkpoint-3").mkdir()                                 # not complete: no trainer_state.json
    with pytest.raises(OutputDirError, match=r"resume=true, but .* holds a run \(completions.jsonl, checkpoint-3\) "
                                             r"without a complete checkpoint"):
        check_output_dir(_config(out, "resume=true"))
    (out / "checkpoint-3" / STATE_FILE).write_text('{"step": 3}')
    assert check_output_dir(_config(out, "resume=true")) == []
    # an explicit checkpoint of this run continues it; one of another run does not mix into it
    assert check_output_dir(_config(out), resume_from=out / "checkpoint-3") == []
    with pytest.raises(OutputDirError, match="already holds a run"):
        check_output_dir(_config(out), resume_from=tmp_path / "elsewhere" / "checkpoint-3")


def test_11_output_dir_that_is_a_file(tmp_path):
    path = tmp_path / "out"
    path.write_text("x")
    with pytest.raises(OutputDirError, match=f"output_dir {path} is a file, not a directory"):
        check_output_dir(_config(path))


# ---- 2 and 3. resume: validated checkpoints, exact or loudly inexact ----------------------------------

def test_3_resume_falls_back_past_a_corrupt_newest_checkpoint(accelerator, tmp_path):
    out = tmp_path / "run"
    first, second = _write_checkpoints(accelerator, out)
    assert checkpoint_problems(second).exact
    weights = second / "trainer_state" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])               # truncated
    choice = choose_resume_checkpoint(_config(out, "resume=true"), None, num_processes=1)
    assert choice.checkpoint == first and choice.state["step"] == 1
    assert len(choice.notes) == 1 and choice.notes[0].startswith(f"skipped checkpoint-2: {weights}: unreadable safetensors")
    # an explicit path fails in one line naming the file
    with pytest.raises(CheckpointError) as info:
        choose_resume_checkpoint(_config(out), second, num_processes=1)
    assert str(info.value).startswith(f"{weights}: unreadable safetensors file") and "\n" not in str(info.value)


@pytest.mark.parametrize("damage, named", [
    (lambda c: (c / "trainer_state" / "optimizer.bin").write_bytes((c / "trainer_state" / "optimizer.bin").read_bytes()[:100]),
     "trainer_state/optimizer.bin: cannot be loaded"),
    (lambda c: (c / "trainer_state" / "scheduler.bin").unlink(), "trainer_state/scheduler.bin: missing"),
    (lambda c: (c / STATE_FILE).write_text("{}"), f'{STATE_FILE}: "step" must be a non-negative integer, got None'),
    (lambda c: (c / STATE_FILE).write_text('{"step": "2"}'), f"{STATE_FILE}: \"step\" must be a non-negative integer, got '2'"),
    (lambda c: (c / STATE_FILE).write_text('[2]'), f"{STATE_FILE}: expected a JSON object, got list"),
    (lambda c: (c / STATE_FILE).write_text('{"step": 2, "data_position": 1.5}'),
     f'{STATE_FILE}: "data_position" must be a non-negative integer, got 1.5'),
    (lambda c: (c / STATE_FILE).write_bytes(b'{"step": \xff}'), f"{STATE_FILE}: not UTF-8 text"),
    (lambda c: (c / "model.safetensors").write_bytes(b"\x10\x00"), "model.safetensors: unreadable safetensors file"),
])
def test_3_each_damaged_file_is_named(accelerator, tmp_path, damage, named):
    out = tmp_path / "run"
    _, second = _write_checkpoints(accelerator, out)
    damage(second)
    with pytest.raises(CheckpointError) as info:
        choose_resume_checkpoint(_config(out), second, num_processes=1)
    assert named in str(info.value)
    fallback = choose_resume_checkpoint(_config(out, "resume=true"), None, num_processes=1)
    assert fallback.checkpoint.name == "checkpoint-1" and named in fallback.notes[0]


def test_3_no_usable_checkpoint_at_all(accelerator, tmp_path):
    out = tmp_path / "run"
    for checkpoint in _write_checkpoints(accelerator, out):
        (checkpoint / STATE_FILE).write_text('{"step": -1}')
    with pytest.raises(CheckpointError, match=r"resume=true: no usable checkpoint in .*: skipped checkpoint-2: .*"
                                              r"; skipped checkpoint-1: "):
        choose_resume_checkpoint(_config(out, "resume=true"), None, num_processes=1)


def test_11_resume_to_a_missing_directory_or_one_without_state(tmp_path, accelerator):
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'nope'}: no such checkpoint directory"):
        choose_resume_checkpoint(_config(tmp_path / "o"), tmp_path / "nope", 1)
    out = tmp_path / "run"
    _write_checkpoints(accelerator, out)
    with pytest.raises(CheckpointError, match=f"{out}: not a complete checkpoint \\(no {STATE_FILE}\\); it is a run "
                                              "directory with checkpoint-1, checkpoint-2"):
        choose_resume_checkpoint(_config(tmp_path / "o"), out, 1)


def test_2_missing_or_truncated_rng_state_refuses_unless_allowed(accelerator, tmp_path):
    out = tmp_path / "run"
    first, second = _write_checkpoints(accelerator, out)
    rng = second / "trainer_state" / "random_states_0.pkl"
    rng.write_bytes(rng.read_bytes()[:50])
    with pytest.raises(CheckpointError) as info:
        choose_resume_checkpoint(_config(out), second, 1)
    assert str(info.value).startswith(f"{rng}: cannot be loaded") and "allow_inexact_resume=true" in str(info.value)
    choice = choose_resume_checkpoint(_config(out, "allow_inexact_resume=true"), second, 1)
    assert choice.checkpoint == second and choice.warnings[0].startswith(f"INEXACT RESUME from {second}: {rng}")
    # resume=true prefers an older exact checkpoint, and says why it skipped the newer one
    choice = choose_resume_checkpoint(_config(out, "resume=true"), None, 1)
    assert choice.checkpoint == first and "allow_inexact_resume=true would resume from it" in choice.notes[0]
    choice = choose_resume_checkpoint(_config(out, "resume=true", "allow_inexact_resume=true"), None, 1)
    assert choice.checkpoint == second and choice.warnings
    # a second process's RNG file is required too
    rng.unlink()
    (first / "trainer_state" / "random_states_0.pkl").unlink()
    with pytest.raises(CheckpointError, match="random_states_0.pkl: missing"):
        choose_resume_checkpoint(_config(out), first, 1)
    assert any("random_states_1.pkl: missing" in p for p in checkpoint_problems(first, num_processes=2).rng_problems)


def test_2_changed_run_settings_are_named(accelerator, tmp_path):
    config = _config(tmp_path, "seed=11", "learning_rate=1e-3", "per_device_train_batch_size=2")
    state = {"step": 2, **run_settings(config, num_processes=1)}
    assert changed_settings(state, config, 1) == []
    changed = _config(tmp_path, "seed=12", "learning_rate=2e-3", "per_device_train_batch_size=2")
    assert changed_settings(state, changed, 2) == ["seed 11 -> 12", "learning_rate 0.001 -> 0.002",
                                                   "num_processes 1 -> 2"]
    assert changed_settings({"step": 2, "seed": 11}, changed, 1) == ["seed 11 -> 12"]  # older checkpoints: what they have


# ---- 5. prompts over max_prompt_length ------------------------------------------------------------------

def test_5_all_prompts_skipped_stops_with_length_statistics():
    config = TrainConfig(max_prompt_length=50, skipped_prompt_check_steps=4, max_skipped_prompt_fraction=0.5)
    skips = PromptSkips(config, prompts_per_step=2)
    lengths = iter([300, 420, 310, 980, 355, 400])
    for step in range(2):
        assert skips.too_long(next(lengths)) and skips.too_long(next(lengths))
        assert skips.end_step() == 2         # a step with no group still counts
    skips.too_long(next(lengths)), skips.too_long(next(lengths))
    with pytest.raises(SkipLimitError) as info:   # 6 of the 8 prompts of 4 steps: certain after step 3
        skips.end_step()
    message = str(info.value)
    assert message.startswith("6 of the 6 prompts of the first 3 step(s) are longer than max_prompt_length=50")
    assert "prompt lengths: min 300, median 378, max 980 tokens" in message and "Raise max_prompt_length" in message


def test_5_a_few_long_prompts_are_only_counted():
    skips = PromptSkips(TrainConfig(max_prompt_length=50, skipped_prompt_check_steps=2), prompts_per_step=4)
    for _ in range(10):                          # 1 of 4 prompts per step is long: 25% < 50%
        assert [skips.too_long(n) for n in (10, 20, 30, 99)] == [False, False, False, True]
        assert skips.end_step() == 1
    assert not PromptSkips(TrainConfig(max_prompt_length=None), 1).too_long(10 ** 6)
    # dynamic sampling draws more rounds than planned: the share is of the prompts seen, not of the plan
    skips = PromptSkips(TrainConfig(max_prompt_length=50, skipped_prompt_check_steps=2), prompts_per_step=4)
    for _ in range(2):
        assert sum(skips.too_long(n) for n in [99] * 3 + [10] * 7) == 3   # 3 of 10 (planned 4): 30%
        assert skips.end_step() == 3


# ---- 9. non-finite numbers --------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("learning_rate=.inf", "learning_rate must be a finite number, got inf"),
    ("reward_weights=[.nan, 1]", "reward_weights must be finite numbers, got [nan, 1]"),
    ("reward_weights=[x, 1]", "reward_weights must be finite numbers, got ['x', 1]"),
    ("num_train_epochs=.inf", "num_train_epochs must be a finite number, got inf"),
    ("max_audio_seconds=.inf", "max_audio_seconds must be a finite number, got inf"),
    ("video_fps=.inf", "video_fps must be a finite number, got inf"),
    ("temperature=.nan", "temperature must be a finite number, got nan"),
    ("max_grad_norm=.inf", "max_grad_norm must be a finite number, got inf"),
])
def test_9_non_finite_settings_are_rejected_at_config_time(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value) == f"overrides: invalid config: {message}"


def test_9_eval_temperature_inf_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["eval", "--model", str(tmp_path), "--data", str(tmp_path / "d.json"),
                                      "--out", str(tmp_path / "p.jsonl"), "--samples", "2", "--temperature", "inf"])
    assert "temperature must be a finite number > 0, got inf" in _error_line(result)


# ---- 11. CLI errors --------------------------------------------------------------------------------

def test_11_non_utf8_config_file(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_bytes(b"beta: 0.1\n# caf\xe9\n")
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--dry-run", "--num-items", "4"])
    assert _error_line(result) == f"error: {config}: not UTF-8 text (byte 15); save the config as UTF-8"


def test_16_dry_run_checks_the_prompt_template_too():
    result = CliRunner().invoke(app, ["train", "--dry-run", "--num-items", "4", "prompt_template={instructoin: x}"])
    assert "unknown prompt setting(s) ['instructoin']" in _error_line(result)


def test_9_several_problems_are_one_line_naming_each():
    result = CliRunner().invoke(app, ["train", "--dry-run", "--num-items", "4", "learning_rate=.inf", "beta=-1",
                                      "eval_batch_size=0"])
    assert _error_line(result) == ("error: overrides: invalid config: beta must be >= 0, got -1.0; eval_batch_size "
                                   "must be >= 1, got 0; learning_rate must be a finite number, got inf")


def test_11_torch_num_threads_minus_one():
    result = CliRunner().invoke(app, ["train", "--dry-run", "--num-items", "4", "torch_num_threads=-1"])
    assert _error_line(result) == ("error: overrides: invalid config: torch_num_threads must be >= 1 or null "
                                   "(null: torch's default), got -1")


def test_11_unknown_demo_override_fails_before_any_work(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo"), "max_stepz=3"])
    assert "unknown config key(s): 'max_stepz' (did you mean 'max_steps'?)" in _error_line(result)
    assert not (tmp_path / "demo").exists()


def test_11_full_disk_while_writing_a_file_or_a_log_names_it(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    write_json_atomic(target, {"old": True})
    log = tmp_path / "metrics.jsonl"
    append_jsonl(log, [{"step": 1}])

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(NoSpaceLeftError) as info:
        write_json_atomic(target, {"new": True})
    assert str(info.value) == f"no space left on {target}"
    with pytest.raises(NoSpaceLeftError, match=f"no space left on {log}"):
        append_jsonl(log, [{"step": 2}])
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"old": True}              # the previous file is intact
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


@pytest.mark.parametrize("how", ["errno", "bare RuntimeError on a full device"])
def test_11_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(accelerator, tmp_path, monkeypatch, how):
    out = tmp_path / "run"
    (first,) = _write_checkpoints(accelerator, out, steps=(1,))

    def full_disk_save(directory):
        (Path(directory) / "model.safetensors").write_bytes(b"partial")
        if how == "errno":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # torch.save's

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 ** 9, 10 ** 9 - 100, 100))
    with pytest.raises(NoSpaceLeftError) as info:
        save_checkpoint(accelerator, full_disk_save, out, 2, {"step": 2})
    (out / "checkpoint-1").rename(out / "checkpoint-1.moved")          # the message looks for checkpoints
    with pytest.raises(NoSpaceLeftError, match="no checkpoint to resume from; free space, then start again with "
                                               "overwrite_output_dir=true"):
        save_checkpoint(accelerator, full_disk_save, out, 2, {"step": 2})
    (out / "checkpoint-1.moved").rename(out / "checkpoint-1")
    monkeypatch.undo()
    assert str(info.value) == (f"no space left on {out}: checkpoint-2 not written; free space, then run again with "
                               "resume=true (it resumes from checkpoint-1)")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]      # no temporary directory left behind
    assert checkpoint_problems(first).exact and read_state(first)["step"] == 1
    choice = choose_resume_checkpoint(_config(out, "resume=true"), None, 1)
    assert choice.checkpoint == first and choice.notes == []


def test_11_other_write_errors_are_not_called_a_full_disk(accelerator, tmp_path):
    out = tmp_path / "run"

    def broken(directory):
        raise RuntimeError("some bug")

    with pytest.raises(RuntimeError, match="some bug"):        # plenty of space: not a full disk
        save_checkpoint(accelerator, broken, out, 1, {"step": 1})


# ---- 16. every setting before the model; bad state files; corrupt media mid-run -------------------------

@pytest.mark.parametrize("override, message", [
    ("eval_batch_size=0", "eval_batch_size must be >= 1, got 0"),
    ("eval_max_new_tokens=0", "eval_max_new_tokens must be >= 1 or null, got 0"),
    ("lora_dropout=1.0", "lora_dropout must be in [0, 1), got 1.0"),
    ("adam_epsilon=0", "adam_epsilon must be > 0, got 0.0"),
    ("report_to=[tensorbord]", "report_to entries must be among"),
    ("save_merged_model=true", "save_merged_model needs use_peft=true"),
    ("max_skipped_records=-1", "max_skipped_records must be >= 0, got -1"),
    ("max_skipped_prompt_fraction=1.5", "max_skipped_prompt_fraction must be in [0, 1], got 1.5"),
])
def test_16_settings_are_validated_at_config_time(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_16_a_bad_trainer_state_names_the_file(tmp_path):
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / STATE_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=f"{checkpoint / STATE_FILE}: not valid JSON"):
        read_state(checkpoint)


def test_16_records_with_undecodable_media_are_skipped_up_to_a_limit():
    from echoink.data.media import MediaError

    skips = RecordSkips(TrainConfig(max_skipped_records=2))
    line = skips.skip(MediaError("data/train.json:3:path.image: /data/images/3.png: cannot decode image: broken"))
    assert "/data/images/3.png: cannot decode image" in line and "max_skipped_records=2" in line
    assert skips.end_step() == 1 and skips.end_step() == 0
    skips.skip(MediaError("data/train.json:5:path.audio: /data/a/5.wav: cannot decode audio"))
    assert skips.end_step() == 1                     # 2 in the run: at the limit
    skips.skip(MediaError("data/train.json:9:path.image: /data/images/9.png: cannot decode image"))
    with pytest.raises(SkipLimitError) as info:
        skips.end_step()
    assert str(info.value).startswith("3 training records had media that cannot be decoded, more than "
                                      "max_skipped_records=2; the last on this rank: data/train.json:9:path.image: "
                                      "/data/images/9.png")
    assert "echoink data validate --check-media" in str(info.value)


# ---- 17. a reward module in the working directory ------------------------------------------------------

def test_17_console_script_imports_a_reward_module_from_the_working_directory(tmp_path):
    (tmp_path / "my_rewards.py").write_text("def length(completions, **columns):\n"
                                            "    return [float(len(c)) for c in completions]\n")
    script = Path(sys.executable).parent / "echoink"                 # the console script, not python -m
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    base = [sys.executable, str(script), "train", "--dry-run", "--num-items", "4"]
    ok = subprocess.run([*base, "reward_funcs=[accuracy,my_rewards:length]"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([*base, "reward_funcs=[accuracy,not_there:length]"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.startswith("error: reward 'not_there:length': cannot import module")


# ---- the same faults through train() and the CLI (tiny model; the refusals come before it loads) ---------

def _train_overrides(model_dir, data: Path, out: Path, *extra: str) -> list[str]:
    return [f"model_path={model_dir}", f"train_data={data}", f"output_dir={out}", "num_generations=2",
            "max_completion_length=4", "per_device_train_batch_size=2", "shuffle_dataset=false", "beta=0.0",
            "max_steps=1", *extra]


def _train_json(dataset_dir: Path) -> Path:
    return dataset_dir / "train" / "omni_rl_format_train.json"


def test_1_and_11_cli_refusals_come_before_the_model_loads(tmp_path, mixed_dataset):
    runner = CliRunner()
    no_model = tmp_path / "no-model-here"                  # loading it would fail: the refusals must come first
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    result = runner.invoke(app, ["train", "--quiet", *_train_overrides(no_model, _train_json(mixed_dataset), run)])
    assert _error_line(result) == (f"error: output_dir {run} already holds a run (metrics.jsonl); choose a new "
                                   "output_dir, or pass overwrite_output_dir=true to delete that run first")
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'
    result = runner.invoke(app, ["train", "--quiet", "resume=true",
                                 *_train_overrides(no_model, _train_json(mixed_dataset), run)])
    assert "holds a run (metrics.jsonl) without a complete checkpoint" in _error_line(result)

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    result = runner.invoke(app, ["train", "--quiet", *_train_overrides(no_model, _train_json(mixed_dataset), a_file)])
    assert _error_line(result) == f"error: output_dir {a_file} is a file, not a directory; choose another output_dir"

    fresh = tmp_path / "fresh"
    for resume, expected in [(tmp_path / "missing", "no such checkpoint directory"),
                             (mixed_dataset, f"not a complete checkpoint (no {STATE_FILE})")]:
        result = runner.invoke(app, ["train", "--quiet", "--resume", str(resume),
                                     *_train_overrides(no_model, _train_json(mixed_dataset), fresh)])
        assert _error_line(result) == f"error: {resume}: {expected}"


def test_5_all_prompts_over_max_prompt_length_stop_the_run(tmp_path, tiny_model_dir, mixed_dataset):
    from echoink.grpo.trainer import train

    config = load_config(None, _train_overrides(tiny_model_dir, _train_json(mixed_dataset), tmp_path / "run",
                                                "max_prompt_length=5", "max_steps=8", "skipped_prompt_check_steps=2"))
    with pytest.raises(SkipLimitError) as info:
        train(config, progress=False)
    message = str(info.value)
    assert message.startswith("4 of the 4 prompts of the first 2 step(s) are longer than max_prompt_length=5")
    assert "prompt lengths: min " in message
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped_prompts"], r["num_groups"]) for r in rows] == [(1, 2.0, 0.0)]  # counted, logged


def test_16_a_corrupt_image_mid_run_is_skipped_and_counted(tmp_path, tiny_model_dir, mixed_dataset, capfd):
    from echoink.grpo.trainer import train

    data = tmp_path / "data"
    shutil.copytree(mixed_dataset, data)
    broken = data / "train" / "images" / "sample_0.jpg"     # record 0: validation checks it exists, not that it decodes
    broken.write_bytes(b"not a jpeg at all")
    out = tmp_path / "run"
    train(load_config(None, _train_overrides(tiny_model_dir, _train_json(data), out)), progress=False)
    row = json.loads((out / "metrics.jsonl").read_text())
    assert row["skipped_records"] == 1.0 and row["num_groups"] == 1.0
    assert f"{broken}: cannot decode image" in capfd.readouterr().err

    with pytest.raises(SkipLimitError, match="1 training records had media that cannot be decoded, more than "
                                             "max_skipped_records=0"):
        train(load_config(None, _train_overrides(tiny_model_dir, _train_json(data), tmp_path / "run0",
                                                 "max_skipped_records=0")), progress=False)


@pytest.mark.slow
def test_2_and_3_resume_through_train(tmp_path, tiny_model_dir, mixed_dataset, capfd):
    from echoink.grpo.trainer import train

    out = tmp_path / "run"
    base = _train_overrides(tiny_model_dir, _train_json(mixed_dataset), out, "save_steps=1", "seed=3",
                            "per_device_train_batch_size=1")  # records 0, 1, 2: images (fast steps)
    train(load_config(None, [*base, "max_steps=2"]), progress=False)
    weights = out / "checkpoint-2" / "trainer_state" / "optimizer.bin"
    weights.write_bytes(weights.read_bytes()[:1000])
    capfd.readouterr()
    train(load_config(None, [*base, "max_steps=3", "resume=true", "seed=4"]), progress=False)
    err = " ".join(capfd.readouterr().err.split())
    assert f"skipped checkpoint-2: {weights}: cannot be loaded" in err
    assert f"resumed from {out / 'checkpoint-1'} at step 1" in err
    assert "warning: resuming with settings that differ from the checkpoint's run: seed 3 -> 4" in err
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


@pytest.mark.slow
def test_11_full_disk_at_a_checkpoint_mid_run_is_one_line_and_resumable(tmp_path, tiny_model_dir, mixed_dataset,
                                                                         monkeypatch):
    import echoink.grpo.checkpoint as checkpoint_module

    out = tmp_path / "run"
    args = ["train", "--quiet", *_train_overrides(tiny_model_dir, _train_json(mixed_dataset), out, "save_steps=1",
                                                  "max_steps=3", "per_device_train_batch_size=1")]
    real_save = checkpoint_module._save_thinker_weights
    calls = []

    def fills_the_disk_on_the_second_save(thinker, state, directory):
        calls.append(directory)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(thinker, state, directory)

    monkeypatch.setattr(checkpoint_module, "_save_thinker_weights", fills_the_disk_on_the_second_save)
    result = CliRunner().invoke(app, args)
    assert _error_line(result) == (f"error: no space left on {out}: checkpoint-2 not written; free space, then run "
                                   "again with resume=true (it resumes from checkpoint-1)")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "completions.jsonl", "metrics.jsonl"]
    monkeypatch.undo()
    result = CliRunner().invoke(app, [*args, "resume=true"])
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (out / "final" / "model.safetensors").is_file()


def test_11_full_disk_while_writing_eval_predictions(tmp_path, tiny_model_dir, mixed_dataset, monkeypatch, capsys):
    import echoink.cli

    predictions = tmp_path / "predictions.jsonl"
    real_fsync, calls = os.fsync, []

    def full_after_the_run_signature(fd):          # predictions.jsonl.run.json is written first, then the rows
        if os.path.realpath(f"/proc/self/fd/{fd}") == str(predictions.resolve()):
            calls.append(fd)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_after_the_run_signature)
    monkeypatch.setattr(sys, "argv", ["echoink", "eval", "--model", str(tiny_model_dir), "--no-progress",
                                      "--data", str(mixed_dataset / "valid" / "omni_rl_format_valid.json"),
                                      "--out", str(predictions), "--max-new-tokens", "2", "--limit", "2"])
    with pytest.raises(SystemExit) as info:
        echoink.cli.main()
    assert info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == (f"error: no space left on {predictions}: free space, then run the command again (an eval "
                         "resumes its predictions file)")


def test_11_full_disk_while_writing_the_final_model(tmp_path, tiny_model_dir, mixed_dataset, monkeypatch):
    import echoink.grpo.checkpoint as checkpoint_module
    from echoink.grpo.trainer import train

    def full(thinker, state, directory):
        (Path(directory) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "_save_thinker_weights", full)
    out = tmp_path / "run"
    with pytest.raises(NoSpaceLeftError) as info:
        train(load_config(None, _train_overrides(tiny_model_dir, _train_json(mixed_dataset), out,
                                                 "per_device_train_batch_size=1")), progress=False)
    assert str(info.value) == (f"no space left on {out / 'final'}: the model not written and no checkpoint to resume "
                               "from; free space, then start again with overwrite_output_dir=true (and save_steps > 0 "
                               "to make a long run resumable)")
    assert sorted(p.name for p in out.iterdir()) == ["completions.jsonl", "metrics.jsonl"]  # no half-written model


@pytest.mark.slow
def test_1_the_demo_run_twice_replaces_its_own_previous_run(tmp_path, tiny_model_dir, capfd):
    from rich.console import Console

    from echoink.data.synth import write_synthetic_dataset
    from echoink.demo import DEMO_FAMILIES, run_demo

    out = tmp_path / "demo"           # data and a "warmed" model already there: the demo reuses them
    write_synthetic_dataset(out / "data", 8, 4, seed=0, families=list(DEMO_FAMILIES), shuffle_options=False)
    shutil.copytree(tiny_model_dir, out / "model_warm")
    overrides = ["max_steps=1", "eval_steps=0", "per_device_train_batch_size=2", "num_generations=2",
                 "max_completion_length=4"]
    console = Console(record=True, width=300)
    run_demo(out, overrides=overrides, console=console)
    assert "previous demo run" not in console.export_text(clear=False)
    run_demo(out, overrides=overrides, console=console)
    assert f"{out / 'run'} holds a previous demo run: this run replaces it" in console.export_text()
    assert f"overwrite_output_dir=true: deleted the previous run in {out / 'run'}" in capfd.readouterr().err
    assert [json.loads(line)["step"] for line in (out / "run" / "metrics.jsonl").read_text().splitlines()] == [1]


class _RunsCodeWhenUnpickled:
    """A pickle payload: unpickling it would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_3_a_tampered_optimizer_pickle_is_refused_by_name_and_never_run(accelerator, tmp_path):
    out = tmp_path / "run"
    _, second = _write_checkpoints(accelerator, out)
    optimizer = second / "trainer_state" / "optimizer.bin"
    marker = tmp_path / "code-ran"
    torch.save({"state": _RunsCodeWhenUnpickled(marker)}, optimizer)
    with pytest.raises(CheckpointError) as info:
        choose_resume_checkpoint(_config(out), second, 1)
    assert str(info.value).startswith(f"{optimizer}: cannot be loaded (UnpicklingError")
    assert not marker.exists()
