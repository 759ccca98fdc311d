"""Evaluation faults (issue 11, items 4, 6, 13) and how `echoink metrics` / `--help` read at 80 columns."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from echoink.cli import app
from echoink.config import ConfigError, TrainConfig
from echoink.data import load_dataset
from echoink.data.synth import write_synthetic_dataset
from echoink.eval.metrics import accuracy_summary, load_predictions
from echoink.eval.run import evaluate, first_records, training_evaluator
from echoink.eval.run_files import RunSignatureError, weights_fingerprint
from echoink.model import load_thinker
from echoink.model.tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_guards")
    info = write_synthetic_dataset(root / "data", n_train=0, n_valid=6, seed=2, families=["image_colour"])
    return {"root": root, "data": Path(info["splits"]["valid"]["json"])}


# ---- item 4: the run signature covers the weights, not only the path -------------------------------


def test_replacing_the_model_in_place_is_not_resumed(env, tmp_path):
    model_dir = write_tiny_checkpoint(tmp_path / "model", layout="thinker", seed=0)
    out = tmp_path / "pred.jsonl"
    first = evaluate(model_dir, env["data"], out, limit=2, max_new_tokens=2, progress=False, device="cpu")
    assert first["generated"] == 2
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    assert weights_fingerprint(copy) == weights_fingerprint(model_dir)          # copying keeps the fingerprint
    # another model with the same shapes and file sizes, written to the same path
    write_tiny_checkpoint(tmp_path / "other", layout="thinker", seed=1)
    for name in ("model.safetensors",):
        assert (tmp_path / "other" / name).stat().st_size == (model_dir / name).stat().st_size
        shutil.copyfile(tmp_path / "other" / name, model_dir / name)
    with pytest.raises(RunSignatureError, match="weights"):
        evaluate(model_dir, env["data"], out, limit=2, max_new_tokens=2, progress=False, device="cpu")
    assert weights_fingerprint(tmp_path / "missing") is None


# ---- item 6: one meaning of limit ------------------------------------------------------------------


def test_limit_has_one_meaning_everywhere(env, tmp_path):
    records = load_dataset(env["data"])
    assert first_records(records, None) == records
    assert first_records(records, 0) == []
    assert first_records(records, 2) == records[:2]
    with pytest.raises(ValueError, match="limit must be a whole number >= 0"):
        first_records(records, -1)
    for bad in (-1, 0):
        with pytest.raises(ConfigError, match="eval_limit must be a whole number >= 1"):
            TrainConfig(eval_limit=bad)
    config = TrainConfig(eval_steps=1, eval_data=str(env["data"]), eval_limit=2, max_completion_length=2)
    model, processor = load_thinker(write_tiny_checkpoint(tmp_path / "m", layout="thinker"))
    metrics = training_evaluator(config)(model, processor)
    assert metrics["eval/n"] == 2
    result = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "m"), "--data", str(env["data"]),
                                      "--out", str(tmp_path / "p.jsonl"), "--limit", "-1"])
    assert result.exit_code != 0 and "greater than or equal to 0" in result.output


# ---- item 13: the prompt-length guard runs before the forward ----------------------------------------


def test_long_prompts_are_skipped_before_the_forward(env, tmp_path):
    data = json.loads(env["data"].read_text())
    data[1]["problem"] = "What colour is the shape? " * 4000                    # ~100,000 characters
    long_path = env["data"].with_name("long.json")
    long_path.write_text(json.dumps(data))
    model_dir = write_tiny_checkpoint(tmp_path / "model", layout="thinker")
    model, processor = load_thinker(model_dir)
    calls = []
    original = model.generate

    def counting_generate(**kwargs):
        calls.append(kwargs["input_ids"].shape)
        return original(**kwargs)

    model.generate = counting_generate
    out = tmp_path / "pred.jsonl"
    summary = evaluate((model, processor), long_path, out, limit=3, max_new_tokens=2, progress=False)
    assert summary["skipped"] == 1 and summary["n"] == 3
    assert all(shape[1] <= 2048 for shape in calls)                             # the long prompt never reached it
    rows = {row["problem_id"]: row for row in load_predictions(out)}
    skipped = rows[data[1]["problem_id"]]
    assert skipped["pred"] is None and skipped["correct"] is False and skipped["reply"] == ""
    assert "longer than max_prompt_length 2048" in skipped["skipped"]
    # a batch whose prompts are all too long never calls generate
    calls.clear()
    none_fit = evaluate((model, processor), long_path, tmp_path / "none.jsonl", limit=2, max_new_tokens=2,
                        progress=False, max_prompt_length=1)
    assert none_fit["skipped"] == 2 and none_fit["accuracy"] == 0.0 and calls == []
    # the signature records the limit: another max_prompt_length is another run
    with pytest.raises(RunSignatureError, match="max_prompt_length"):
        evaluate((model, processor), long_path, out, limit=3, max_new_tokens=2, progress=False,
                 max_prompt_length=100_000)


# ---- 80 columns ------------------------------------------------------------------------------------


def _prediction_file(path: Path, correct: list[bool], data_type: str = "image_audio") -> Path:
    rows = [{"problem_id": i, "sample_idx": 0, "gt": "A", "pred": "A" if ok else "B", "correct": ok,
             "reply": f"<think>x</think><answer>{'A' if ok else 'B'}</answer>", "data_type": data_type,
             "reply_tokens": 12} for i, ok in enumerate(correct)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_metrics_reads_at_80_columns(tmp_path):
    deep = tmp_path / ("a-long-directory-name-" * 3) / "predictions_of_the_rl_model_greedy.jsonl"
    files = [_prediction_file(deep, [True, False, True, True]),
             _prediction_file(tmp_path / "base.jsonl", [False, False, True, True], "image")]
    files += [_prediction_file(tmp_path / f"extra{i}.jsonl", [True] * (i + 1)) for i in range(2)]
    result = CliRunner().invoke(app, ["metrics", *map(str, files), "--against", str(files[1])], terminal_width=80)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines if "│" in line or "┃" in line) <= 80
    assert "…" not in result.output                                             # no cut header or value
    assert f"[1] {deep}" in result.output                                       # the full path, once, in the legend
    summary = accuracy_summary(load_predictions(files[0]))
    accuracy_line = next(line for line in lines if line.startswith("│ accuracy "))
    interval_line = lines[lines.index(accuracy_line) + 1]
    assert accuracy_line.split("│")[2].strip() == f"{100 * summary['accuracy']:.1f}"
    assert interval_line.split("│")[2].strip() == f"[{100 * summary['ci_low']:.1f}, {100 * summary['ci_high']:.1f}]"
    assert "(1/2)" in result.output and "(2/2)" in result.output                # 4 files: two tables of <= 3
    assert "[1] by data type" in result.output and "│ image_audio " in result.output      # group tables
    assert "McNemar p" in result.output


def test_help_shows_no_bool_metavar():
    runner = CliRunner()
    for argv in (["--help"], ["eval", "--help"], ["metrics", "--help"], ["data", "synth", "--help"],
                 ["train", "--help"]):
        result = runner.invoke(app, argv, terminal_width=80)
        assert result.exit_code == 0, result.output
        assert "<bool>" not in result.output, (argv, result.output)
    assert "--greedy" in runner.invoke(app, ["eval", "--help"], terminal_width=80).output
