"""Nothing lost, nothing silent, round 3 (issue 23): bounded dynamic sampling, short runs whose prompts are all
skipped, unwritable places, user code that fails, non-finite weights."""

from __future__ import annotations

import json
import random

import pytest
import torch
from typer.testing import CliRunner

from echoink.cli import app
from echoink.config import MAX_SAMPLING_ROUNDS, ConfigError, load_config
from echoink.grpo.sampling import GroupSelection, informative


def constant_reward(completions, **columns):
    """A reward that never tells completions apart: no group is ever informative."""
    return [0.5] * len(completions)


def _one_line_error(result, *needles: str) -> str:
    output = result.output
    assert result.exit_code == 1, output
    assert "Traceback" not in output, output
    flat = output.replace("\n", " ")
    for needle in needles:
        assert needle in flat, output
    return flat


def _train_args(tiny_model_dir, mixed_dataset, out, *extra) -> list[str]:
    return ["train", f"model_path={tiny_model_dir}", f"train_data={mixed_dataset}/train/omni_rl_format_train.json",
            f"output_dir={out}", "num_generations=2", "max_completion_length=4", "seed=0",
            "per_device_train_batch_size=1", "save_steps=0", "eval_steps=0", *extra]


# ---- item 3: dynamic sampling in bounded memory ------------------------------------------------------------

def _group(total: float, informative_group: bool) -> tuple:
    rewards = torch.tensor([[total], [total + (1.0 if informative_group else 0.0)]])  # [G=2, R=1]
    return (f"record-{random.random()}", None, rewards)


def _unbounded_choice(items, wanted, weights):
    """The rule dynamic sampling had when it kept every round: first `wanted` informative, newest fillers."""
    useful = [item for item in items if informative(item[2], weights)][:wanted]
    fillers = [item for item in items if not informative(item[2], weights)][::-1][: wanted - len(useful)]
    return useful + fillers, len(items) - len(useful) - len(fillers)


@pytest.mark.parametrize("seed", range(20))
def test_group_selection_chooses_what_keeping_every_round_chose(seed):
    rng = random.Random(seed)
    weights = torch.ones(1)
    wanted = rng.randint(1, 4)
    selection = GroupSelection(wanted, weights)
    items = []
    for _ in range(rng.randint(1, 12)):  # rounds of `wanted` prompts
        batch = [_group(rng.random(), rng.random() < 0.3) for _ in range(rng.randint(0, wanted))]
        selection.add(batch)
        items += batch
    chosen, surplus = _unbounded_choice(items, wanted, weights)
    assert [id(item) for item in selection.chosen()] == [id(item) for item in chosen]
    assert selection.surplus == surplus and selection.seen == len(items)


def test_group_selection_holds_at_most_twice_the_batch_however_many_rounds():
    selection = GroupSelection(4, torch.ones(1))
    for _ in range(20_000):
        selection.add([_group(0.5, False)])
        assert len(selection.useful) + len(selection.fillers) <= 8
    assert selection.seen == 20_000 and selection.informative_seen == 0 and len(selection.chosen()) == 4


def test_max_sampling_rounds_has_a_ceiling():
    with pytest.raises(ConfigError, match=f"max_sampling_rounds must be between 1 and {MAX_SAMPLING_ROUNDS}, "
                                          "got 1000000000"):
        load_config(None, ["max_sampling_rounds=1000000000"])
    assert load_config(None, [f"max_sampling_rounds={MAX_SAMPLING_ROUNDS}"]).max_sampling_rounds == MAX_SAMPLING_ROUNDS


def test_dynamic_sampling_says_how_it_is_going(tiny_model_dir, mixed_dataset, tmp_path):
    result = CliRunner().invoke(app, _train_args(tiny_model_dir, mixed_dataset, tmp_path / "run", "max_steps=1",
                                                 "dynamic_sampling=true", "max_sampling_rounds=9", "--quiet",
                                                 "reward_funcs=[test_reliability:constant_reward]"))
    assert result.exit_code == 0, result.output
    assert ("dynamic sampling, step 1, micro-batch 1: 8 rounds so far (max_sampling_rounds=9), 0 of 8 groups "
            "informative (0.0%)") in result.output
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["sampling_rounds"] == 9 and row["surplus_groups"] == 8 and row["informative_groups"] == 0


# ---- item 4: a short run whose prompts are all skipped fails -----------------------------------------------

@pytest.mark.parametrize("steps", [1, 2])
def test_a_short_run_with_every_prompt_skipped_fails(tiny_model_dir, mixed_dataset, tmp_path, steps):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, _train_args(tiny_model_dir, mixed_dataset, out, f"max_steps={steps}",
                                                 "max_prompt_length=8", "--quiet"))
    _one_line_error(result, f"of the first {steps} step(s) are longer than max_prompt_length=8")
    assert not (out / "final").exists()


# ---- item 5: unwritable places get their own message, before work is done ------------------------------------

@pytest.fixture
def read_only(monkeypatch):
    """Make a directory behave like a read-only mount (as root, permission bits do not stop writes)."""
    import builtins
    import errno
    import os
    import tempfile

    roots: list[str] = []

    def blocked(path) -> bool:
        try:
            resolved = os.path.realpath(os.fspath(path))
        except TypeError:
            return False
        return any(resolved == root or resolved.startswith(root + os.sep) for root in roots)

    def refuse(path):
        raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
    real_mkstemp, real_mkdtemp, real_replace = tempfile.mkstemp, tempfile.mkdtemp, os.replace

    def fake_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") and blocked(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and blocked(path):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if blocked(path):
            refuse(path)
        return real_mkdir(path, *args, **kwargs)

    def fake_mkstemp(*args, dir=None, **kwargs):
        if dir is not None and blocked(dir):
            refuse(dir)
        return real_mkstemp(*args, dir=dir, **kwargs)

    def fake_mkdtemp(*args, dir=None, **kwargs):
        if dir is not None and blocked(dir):
            refuse(dir)
        return real_mkdtemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    monkeypatch.setattr(tempfile, "mkstemp", fake_mkstemp)
    monkeypatch.setattr(tempfile, "mkdtemp", fake_mkdtemp)

    def make(path):
        path.mkdir(parents=True, exist_ok=True)
        roots.append(os.path.realpath(path))
        return path

    return make


def test_a_read_only_place_is_not_called_a_full_disk(tmp_path, monkeypatch):
    import errno
    import shutil

    from echoink.io import NoSpaceLeftError, UnwritableError, disk_is_full, reporting_full_disk

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=1024))  # almost full, too
    assert not disk_is_full(OSError(errno.EROFS, "Read-only file system"), tmp_path)
    assert not disk_is_full(PermissionError(errno.EACCES, "Permission denied"), tmp_path)
    assert disk_is_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert disk_is_full(RuntimeError("write failed"), tmp_path)  # no errno: the free space decides
    with pytest.raises(UnwritableError, match=f"cannot write {tmp_path}/x: read-only file system; choose a "
                                              "location on a writable file system"):
        with reporting_full_disk(tmp_path / "x"):
            raise OSError(errno.EROFS, "Read-only file system")
    with pytest.raises(UnwritableError, match="permission denied; choose a directory you can write to"):
        with reporting_full_disk(tmp_path / "x"):
            raise PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(NoSpaceLeftError):
        with reporting_full_disk(tmp_path / "x"):
            raise OSError(errno.ENOSPC, "No space left on device")


def test_the_installed_command_is_the_one_with_the_catch_all():
    import tomllib
    from pathlib import Path

    import echoink.cli

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    module, attribute = pyproject["project"]["scripts"]["echoink"].split(":")
    assert module == "echoink.cli" and getattr(echoink.cli, attribute) is echoink.cli.main


def test_every_command_names_a_read_only_output_place(tiny_model_dir, mixed_dataset, tmp_path, read_only):
    runner = CliRunner()
    run_dir = tmp_path / "run"   # a finished run to report, plot and mine, then made read-only
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 0.5}) + "\n")
    (run_dir / "completions.jsonl").write_text(json.dumps({"step": 1, "problem_id": 1, "sample_idx": 0,
                                                           "completion": "<think>wait</think><answer>A</answer>",
                                                           "rewards": {"accuracy": 1.0}}) + "\n")
    read_only(run_dir)
    ro = read_only(tmp_path / "ro")
    cause = "read-only file system; choose a location on a writable file system"
    train = runner.invoke(app, _train_args(tiny_model_dir, mixed_dataset, ro / "out", "max_steps=1"))
    _one_line_error(train, f"cannot write {ro}", cause)
    resume = runner.invoke(app, _train_args(tiny_model_dir, mixed_dataset, run_dir, "resume=true"))
    _one_line_error(resume, f"cannot write {run_dir}", cause)
    evaluation = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--data",
                                     f"{mixed_dataset}/valid/omni_rl_format_valid.json", "--out", str(ro / "p.jsonl")])
    _one_line_error(evaluation, f"cannot write {ro}", cause)
    for command in (["report", str(run_dir)], ["plot", str(run_dir)], ["aha", str(run_dir)],
                    ["data", "synth", "--out", str(ro / "data"), "--train", "1", "--valid", "1"],
                    ["export", "--model", str(tiny_model_dir), "--out", str(ro / "export"), "--layout", "thinker"]):
        _one_line_error(runner.invoke(app, command), "cannot write", cause)


def test_report_out_an_existing_directory_is_one_line(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 0.5}) + "\n")
    result = CliRunner().invoke(app, ["report", str(run_dir), "--out", str(tmp_path)])
    _one_line_error(result, f"--out {tmp_path}: is a directory; give the HTML file to write")


# ---- item 6: eval on a full disk ends in one line -------------------------------------------------------------

def test_eval_on_a_full_disk_is_one_line(tiny_model_dir, mixed_dataset, tmp_path, monkeypatch):
    import errno
    import os

    out = tmp_path / "p.jsonl"
    real_write = os.write

    def full_disk_write(descriptor, data):
        if os.path.realpath(f"/proc/self/fd/{descriptor}") == str(out.resolve()):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(descriptor, data)

    monkeypatch.setattr(os, "write", full_disk_write)
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--data",
                                      f"{mixed_dataset}/valid/omni_rl_format_valid.json", "--out", str(out),
                                      "--limit", "2", "--max-new-tokens", "4", "--no-progress"])
    flat = _one_line_error(result, f"no space left on {out}: free space, then run the command again")
    assert flat.count("error:") == 1
