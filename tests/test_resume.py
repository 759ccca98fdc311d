"""Checkpoints and exact resumption.

A CLI run killed with SIGKILL after a checkpoint and resumed with `resume=true` must end with the same
weights (bitwise, on CPU with a fixed seed) as an uninterrupted run: the model, optimizer, scheduler and
RNG states come back from the checkpoint and the data order is a pure function of the step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from echoink.grpo.checkpoint import STATE_FILE, checkpoint_dirs, latest_checkpoint, read_state
from echoink.grpo.run_log import truncate_jsonl_after

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 4


def _command(model_dir, data_dir, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "echoink.cli", "train", "--quiet",
            f"model_path={model_dir}", f"train_data={data_dir / 'train' / 'omni_rl_format_train.json'}",
            f"output_dir={out}", "num_generations=4", "max_completion_length=12", f"max_steps={MAX_STEPS}",
            "per_device_train_batch_size=2", "num_iterations=2", "beta=0.04", "learning_rate=1e-3", "seed=11",
            "save_steps=2", "torch_num_threads=1", "logging_steps=1", *extra]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "MASTER_", "LOCAL_RANK", "WORLD_SIZE", "RANK"))}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return env


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _steps(path: Path) -> list[int]:
    return [row["step"] for row in _jsonl(path)] if path.is_file() else []


DYNAMIC = ("dynamic_sampling=true", "skip_zero_advantage_groups=true", "max_sampling_rounds=3")


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [(), DYNAMIC], ids=["fixed", "dynamic-sampling"])
def test_killed_and_resumed_run_matches_an_uninterrupted_one(tmp_path, tiny_model_dir, mixed_dataset, sampling):
    """With dynamic sampling the data position is state (draw rounds consumed): it must come back too."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    logs = tmp_path / "logs"
    logs.mkdir()
    # both runs at once (one thread each): the uninterrupted one, and the one we kill
    reference = subprocess.Popen(_command(tiny_model_dir, mixed_dataset, straight, "save_total_limit=1", *sampling), cwd=REPO,
                                 env=_env(), stdout=open(logs / "a.out", "w"), stderr=open(logs / "a.err", "w"))
    victim = subprocess.Popen(_command(tiny_model_dir, mixed_dataset, killed, *sampling), cwd=REPO, env=_env(),
                              stdout=open(logs / "b.out", "w"), stderr=open(logs / "b.err", "w"))
    # kill -9 once checkpoint-2 is complete and step 3 is logged (so step 3 is redone after the resume)
    deadline = time.monotonic() + 240
    while not ((killed / "checkpoint-2" / STATE_FILE).is_file() and 3 in _steps(killed / "metrics.jsonl")):
        assert victim.poll() is None, (logs / "b.err").read_text()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint-2 in time"
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (killed / "final").exists() and not (killed / "checkpoint-4").exists()

    # leftovers a crash can leave: a half-written checkpoint and a directory without trainer_state.json
    (killed / ".checkpoint-3.tmp" / "trainer_state").mkdir(parents=True)
    (killed / ".checkpoint-3.tmp" / "model.safetensors").write_bytes(b"partial")
    (killed / "checkpoint-3").mkdir()
    assert latest_checkpoint(killed) == killed / "checkpoint-2"

    resumed = subprocess.run(_command(tiny_model_dir, mixed_dataset, killed, "resume=true", *sampling), cwd=REPO, env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from {killed / 'checkpoint-2'} at step 2" in resumed.stderr
    assert reference.wait(timeout=300) == 0, (logs / "a.err").read_text()[-4000:]

    # the same final weights, bitwise
    a = load_file(str(straight / "final" / "model.safetensors"))
    b = load_file(str(killed / "final" / "model.safetensors"))
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a), max((a[k] - b[k]).abs().max().item() for k in a)
    initial = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    assert any(not torch.equal(a[k], initial[k]) for k in a)  # and training did move them

    # logs: every step exactly once, and the redone steps equal the uninterrupted run's
    assert _steps(killed / "metrics.jsonl") == [1, 2, 3, 4]
    completion_steps = _steps(killed / "completions.jsonl")
    assert sorted(set(completion_steps)) == [1, 2, 3, 4] and len(completion_steps) == 4 * 8
    for name in ("metrics.jsonl", "completions.jsonl"):
        for x, y in zip(_jsonl(straight / name), _jsonl(killed / name)):
            for key in ("step", "reward", "loss", "kl", "completion", "advantage", "learning_rate"):
                assert x.get(key) == y.get(key), (name, key, x.get(key), y.get(key))

    # save_total_limit=1 kept only the newest checkpoint; checkpoints reload with load_thinker
    assert [p.name for p in checkpoint_dirs(straight)] == ["checkpoint-4"]
    if not sampling:
        assert read_state(killed / "checkpoint-4") == {"step": 4, "prompts_seen": 8, "seed": 11, "learning_rate": 1e-3,
                                                      "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                                                      "num_generations": 4, "num_processes": 1}
    else:  # at least one draw round per step; the resumed run continued from checkpoint-2's position
        state, rounds = read_state(killed / "checkpoint-4"), [r["sampling_rounds"] for r in _jsonl(killed / "metrics.jsonl")]
        assert state["data_position"] == sum(rounds) >= MAX_STEPS and state["prompts_seen"] == 2 * sum(rounds)
        assert read_state(straight / "checkpoint-4")["data_position"] == state["data_position"]
    _generates(killed / "checkpoint-2")


def _generates(directory: Path) -> None:
    from echoink.model import load_thinker

    model, processor = load_thinker(directory)
    ids = processor.tokenizer("hello", return_tensors="pt").input_ids
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def test_checkpoint_reloads_with_load_thinker_and_resume_path(tmp_path, tiny_model_dir, mixed_dataset):
    """In-process: save_steps writes loadable checkpoints; `train(resume_from=...)` past max_steps is a no-op run."""
    from echoink.config import load_config
    from echoink.grpo.trainer import train

    out = tmp_path / "run"
    overrides = [f"model_path={tiny_model_dir}", f"train_data={mixed_dataset / 'train' / 'omni_rl_format_train.json'}",
                 f"output_dir={out}", "num_generations=2", "max_completion_length=6", "max_steps=2",
                 "per_device_train_batch_size=1", "save_steps=1", "save_total_limit=2", "beta=0.0"]
    train(load_config(None, overrides), progress=False)
    assert [p.name for p in checkpoint_dirs(out)] == ["checkpoint-1", "checkpoint-2"]
    assert not list(out.glob(".checkpoint-*"))  # no temporary directory left behind
    state_files = sorted(p.name for p in (out / "checkpoint-2" / "trainer_state").iterdir())
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"} <= set(state_files)
    _generates(out / "checkpoint-1")

    # an explicit --resume PATH continues from that checkpoint: one more step, appended to the logs
    overrides = [("max_steps=3" if item == "max_steps=2" else item) for item in overrides]
    train(load_config(None, overrides), resume_from=str(out / "checkpoint-2"), progress=False)
    assert _steps(out / "metrics.jsonl") == [1, 2, 3]
    assert [p.name for p in checkpoint_dirs(out)] == ["checkpoint-2", "checkpoint-3"]


def test_latest_checkpoint_ignores_incomplete_directories(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    for name in ("checkpoint-2", "checkpoint-10"):
        (tmp_path / name).mkdir()
        (tmp_path / name / STATE_FILE).write_text(json.dumps({"step": int(name.split("-")[1])}))
    (tmp_path / "checkpoint-12").mkdir()                       # renamed but never completed (impossible, but)
    (tmp_path / ".checkpoint-11.tmp").mkdir()                  # killed while writing
    (tmp_path / ".checkpoint-11.tmp" / STATE_FILE).write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"  # numeric order, not text order
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint-2", "checkpoint-10"]


def test_truncate_jsonl_after(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "reward": s / 10} for s in (1, 2, 3, 3, 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "rew')  # a line cut by a kill
    assert truncate_jsonl_after(path, 2) == 4
    assert _steps(path) == [1, 2]
    assert truncate_jsonl_after(path, 2) == 0
    assert truncate_jsonl_after(tmp_path / "absent.jsonl", 1) == 0
