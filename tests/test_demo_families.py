"""`echoink demo --family qwen3-omni`: the demo's whole path on the tiny Qwen3-Omni thinker (a few steps)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner


@pytest.mark.slow
def test_the_qwen3_omni_demo_runs_end_to_end_in_its_own_directories(tmp_path):
    from rich.console import Console

    from echoink.data.synth import write_synthetic_dataset
    from echoink.demo import DEMO_FAMILIES, run_demo
    from echoink.model.loading import read_checkpoint

    out = tmp_path / "demo"  # tiny splits written first: the demo reuses them
    write_synthetic_dataset(out / "data", 8, 4, seed=0, families=list(DEMO_FAMILIES), shuffle_options=False)
    overrides = ["max_steps=2", "eval_steps=0", "per_device_train_batch_size=2", "num_generations=2",
                 "max_completion_length=6"]
    console = Console(record=True, width=300)
    summary = run_demo(out, overrides=overrides, console=console, family="qwen3-omni", warmup_steps=2)

    text = console.export_text()
    assert "tiny random Qwen3-Omni thinker" in text and "2 supervised steps" in text
    for name in ("tiny_init-qwen3-omni", "model_warm-qwen3-omni"):  # the family's own models, Qwen3-Omni ones
        family, _, full = read_checkpoint(out / name)
        assert family.name == "qwen3-omni" and not full
    assert not (out / "model_warm").exists() and not (out / "run").exists()  # the default family's are untouched
    family, _, _ = read_checkpoint(summary["final_model"])
    assert family.name == "qwen3-omni"
    rows = [json.loads(line) for line in (out / "run-qwen3-omni" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    # the family's demo setting (a KL anchor for the tiny mixture of experts) reached the run
    assert json.loads((out / "run-qwen3-omni" / "config.resolved.json").read_text())["beta"] == 0.04
    assert all("kl" in row for row in rows)
    written = json.loads((out / "summary-qwen3-omni.json").read_text())
    assert written["family"] == "qwen3-omni" and written["steps"] == 2 and written["valid_items"] == 4
    assert 0.0 <= written["accuracy_before"] <= 1.0 and 0.0 <= written["accuracy_after"] <= 1.0


def test_the_demo_command_names_the_known_families_for_an_unknown_one(tmp_path):
    from echoink.cli import app

    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--family", "qwen9-omni"])
    assert result.exit_code == 1
    assert "unknown model family 'qwen9-omni' (expected one of qwen2.5-omni, qwen3-omni)" in result.output
    assert not (tmp_path / "demo").exists()  # refused before anything was written
