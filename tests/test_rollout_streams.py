"""Training rollouts draw from per-prompt random streams: a run gives the same completions, rewards and weights
whether each round's prompts are decoded in one loop (the default) or `rollout_batch_size` at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def _train(model_dir, data_dir, out: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "echoink.cli", "train", "--quiet", f"model_path={model_dir}",
               f"train_data={data_dir / 'train' / 'omni_rl_format_train.json'}", f"output_dir={out}",
               "num_generations=3", "max_completion_length=8", "max_steps=2", "per_device_train_batch_size=3",
               "beta=0.0", "learning_rate=1e-3", "seed=5", "save_steps=0", "torch_num_threads=1", "logging_steps=1",
               *extra]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "MASTER_", "LOCAL_RANK", "WORLD_SIZE", "RANK"))}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_rollout_batch_size_changes_no_completion(tmp_path, tiny_model_dir, mixed_dataset):
    runs = {size: _train(tiny_model_dir, mixed_dataset, tmp_path / f"bs{size}",
                         *([f"rollout_batch_size={size}"] if size else []))
            for size in (None, 2)}
    for run in runs.values():
        _, err = run.communicate(timeout=600)
        assert run.returncode == 0, err[-4000:]
    rows = {size: [json.loads(line) for line in (tmp_path / f"bs{size}" / "completions.jsonl").read_text().splitlines()]
            for size in runs}
    assert len(rows[None]) == 2 * 3 * 3
    assert [(r["step"], r["completion"], r["advantage"]) for r in rows[None]] == \
        [(r["step"], r["completion"], r["advantage"]) for r in rows[2]]
    metrics = [json.loads(line) for line in (tmp_path / "bsNone" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["rollout_tokens_per_second"] > 0 for m in metrics)
    a, b = (load_file(str(tmp_path / name / "final" / "model.safetensors")) for name in ("bsNone", "bs2"))
    assert all(torch.equal(a[k], b[k]) for k in a)
