"""Problem types through training and evaluation: the length reward, per-type step metrics, reward
names and failures, per-type evaluation measures, and the synthetic families of the new types."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from data_fixtures import good_record, make_dataset
from echoink.cli import app
from echoink.data import load_dataset
from echoink.data.media import load_video_audio
from echoink.data.synth import TASK_FAMILIES, write_synthetic_dataset
from echoink.eval.metrics import accuracy_summary, bootstrap_mean_interval, type_measure
from echoink.grpo.scoring import LengthReward, RewardSet, score_group
from echoink.grpo.step_metrics import step_metrics
from echoink.grpo.types import ScoredGroup
from echoink.model.engine import Group
from echoink.rewards import RewardError, compute_rewards, reward_columns


def _group(texts: list[str], lengths: list[int]) -> Group:
    width = max(lengths)
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])                    # [G, C]
    return Group(prompt=None, completion_ids=torch.zeros_like(mask), completion_mask=mask, texts=texts,
                 truncated=torch.zeros(len(texts), dtype=torch.bool))


def _scored(rewards: RewardSet, record, texts: list[str], lengths: list[int]) -> ScoredGroup:
    group = _group(texts, lengths)
    table = score_group(rewards, group, record)                                            # [G, R]
    return ScoredGroup(group=group, record=record, rewards=table, advantages=torch.zeros(group.size))


def _typed(problem_id: int, problem_type: str, solution: str, **extra) -> dict:
    record = good_record(problem_id, problem_type=problem_type, solution=f"<answer>{solution}</answer>", **extra)
    del record["options"]
    return record


@pytest.fixture
def records(tmp_path):
    return load_dataset(make_dataset(tmp_path, [
        good_record(0), _typed(1, "counting", "3"), _typed(2, "temporal retrieval", "[1, 3]", duration=4),
    ]))


def _answer(text: str) -> str:
    return f"<think>x</think><answer>{text}</answer>"


# ---- the length reward ------------------------------------------------------------------------------


def test_length_bonus_follows_echoink_r1():
    bonus = LengthReward()  # 160-256 tokens, +0.2, accuracy > 0.1
    accuracy = torch.tensor([1.0, 1.0, 0.05, 0.5, 1.0])
    lengths = torch.tensor([200, 300, 200, 160, 256])
    assert bonus(accuracy, lengths).tolist() == pytest.approx([0.2, 0.0, 0.0, 0.2, 0.2])
    only_one = torch.tensor([1.0, 0.0, 0.0, 0.05, 0.1])  # one completion above 0.1: no bonus for anyone
    assert bonus(only_one, lengths).tolist() == [0.0] * 5


def test_length_column_in_score_group_and_weights(records):
    rewards = RewardSet.from_config(["accuracy", "format"], [1.0, 1.0], LengthReward(2, 5))
    assert rewards.names == ["accuracy", "format", "length"] and rewards.weights.tolist() == [1.0, 1.0, 1.0]
    table = _scored(rewards, records[0], [_answer("C"), _answer("C"), _answer("A"), "C"], [3, 9, 3, 3]).rewards
    assert table[:, 2].tolist() == pytest.approx([0.2, 0.0, 0.0, 0.0])
    assert RewardSet.from_config(["accuracy"], [1.0]).names == ["accuracy"]


def test_reward_set_from_train_config():
    from echoink.config import load_config

    config = load_config(None, ["len_control=true", "len_control_min_tokens=10", "len_control_max_tokens=20",
                                "len_control_bonus=0.5"])
    rewards = RewardSet.for_config(config)
    assert rewards.length == LengthReward(10, 20, 0.5, 0.1) and rewards.names[-1] == "length"
    assert RewardSet.for_config(load_config(None, [])).length is None


# ---- reward names and failures ----------------------------------------------------------------------


def test_same_function_name_in_two_modules_keeps_two_columns(tmp_path, monkeypatch):
    for package in ("pkg_a", "pkg_b"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text(
            f"def f(completions, **columns):\n    return [{1.0 if package == 'pkg_a' else 0.5}] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rewards = RewardSet.from_config(["pkg_a:f", "pkg_b:f", "format"], [1.0, 1.0, 1.0])
    assert rewards.names == ["pkg_a:f", "pkg_b:f", "format"]


def test_reward_error_names_reward_record_and_value(records):
    columns = reward_columns([records[1]] * 2)
    for function, expected in (
        (lambda completions, **c: [0.0, math.nan], "'bad' returned nan for record "),
        (lambda completions, **c: [None, 0.0], "'bad' returned None for record "),
        (lambda completions, **c: [0.0], "'bad' returned 1 values for 2 completions"),
    ):
        with pytest.raises(RewardError, match=expected) as caught:
            compute_rewards([("bad", function)], ["a", "b"], columns)
        assert "\n" not in str(caught.value)
        if "record" in expected:
            assert f"{records[1].source}:1 sample" in str(caught.value) and "(problem_id 1)" in str(caught.value)

    def raises(completions, **c):
        raise KeyError("solution_text")

    with pytest.raises(RewardError, match=r"'bad' raised on record .*:1 sample 0 \(problem_id 1\): KeyError"):
        compute_rewards([("bad", raises)], ["a", "b"], columns)


# ---- per-type step metrics --------------------------------------------------------------------------


def test_step_metrics_per_type_all_equal_and_binary_only_outcomes(records):
    rewards = RewardSet.from_config(["accuracy", "format"], [1.0, 1.0])
    mc = _scored(rewards, records[0], [_answer("C")] * 4, [3] * 4)                # all correct, all equal
    counting = _scored(rewards, records[1], [_answer("3"), _answer("2"), _answer("2"), "3"], [3] * 4)
    temporal = _scored(rewards, records[2], [_answer("[1, 3]"), _answer("[0, 2]"), _answer("[0, 1]"),
                                             _answer("[2, 3]")], [3] * 4)
    assert temporal.rewards[:, 0].tolist() == pytest.approx([1.0, 1 / 3, 0.0, 0.5])
    metrics = step_metrics([mc, counting, temporal], rewards, 4)
    assert metrics["all_equal"] == pytest.approx(1 / 3)
    assert metrics["all_correct"] == pytest.approx(1 / 2) and metrics["all_wrong"] == 0.0  # over mc + counting
    assert metrics["reward_by_type/multiple_choice"] == pytest.approx(2.0)
    assert metrics["accuracy_by_type/counting"] == pytest.approx(0.25)  # the bare "3" has no answer block
    assert metrics["reward_by_type/counting"] == pytest.approx((2 + 1 + 1 + 0) / 4)  # accuracy + format
    assert metrics["accuracy_by_type/temporal_retrieval"] == pytest.approx((1 + 1 / 3 + 0.5) / 4)
    assert metrics["unparsed_by_type/multiple_choice"] == 0.0
    assert metrics["unparsed_by_type/counting"] == pytest.approx(1 / 4)  # the bare "3": no answer block
    spans = _scored(rewards, records[2], [_answer("[1, 3]"), _answer("soon"), _answer("[3, 1]"), _answer("[0, 1]")],
                    [3] * 4)
    assert step_metrics([spans], rewards, 4)["unparsed_by_type/temporal_retrieval"] == pytest.approx(2 / 4)
    graded_only = step_metrics([temporal], rewards, 4)
    assert "all_correct" not in graded_only and "all_wrong" not in graded_only and graded_only["all_equal"] == 0.0


# ---- evaluation measures ----------------------------------------------------------------------------


def _row(i: int, problem_type: str, score: float, data_type: str = "audio", pred="x") -> dict:
    return {"problem_id": i, "correct": score == 1.0, "score": score, "problem_type": problem_type,
            "data_type": data_type, "pred": pred, "reply": _answer("x")}


def test_type_measures_and_breakdowns():
    rows = ([_row(i, "multiple choice", float(i % 2), "image") for i in range(10)]
            + [_row(10 + i, "temporal retrieval", s) for i, s in enumerate([0.2, 0.4, 0.6, 0.8, 0.0])]
            + [_row(20, "temporal retrieval", 0.0, "video_audio", pred=None)])
    summary = accuracy_summary(rows)
    mc, temporal = summary["by_problem_type"]["multiple choice"], summary["by_problem_type"]["temporal retrieval"]
    assert mc["measure"] == "accuracy" and mc["value"] == 0.5 and mc["n"] == 10
    assert temporal["measure"] == "mean score" and temporal["value"] == pytest.approx(2.0 / 6)
    assert temporal["unparsed_rate"] == pytest.approx(1 / 6)
    assert temporal["ci_low"] < temporal["value"] < temporal["ci_high"]
    assert set(summary["by_problem_type_data_type"]) == {"multiple choice × image", "temporal retrieval × audio",
                                                         "temporal retrieval × video_audio"}
    assert type_measure("my type", [_row(0, "my type", 1.0), _row(1, "my type", 0.0)])["measure"] == "accuracy"
    assert type_measure("my type", [_row(0, "my type", 0.5)])["measure"] == "mean score"
    low, high = bootstrap_mean_interval([0.5] * 20)
    assert low == high == 0.5 and all(math.isnan(v) for v in bootstrap_mean_interval([]))


def test_rows_without_type_fields_are_multiple_choice():
    rows = [{"problem_id": i, "correct": i < 3, "pred": "A"} for i in range(4)]
    block = accuracy_summary(rows)["by_problem_type"]["multiple choice"]
    assert block["value"] == 0.75 and block["measure"] == "accuracy"


# ---- synthetic families of the new types ------------------------------------------------------------


def _sounding_spans(track: np.ndarray, rate: int = 16_000, frame: float = 0.05) -> list[tuple[float, float]]:
    """Where the track's RMS in 50 ms frames is above a tenth of its peak."""
    size = int(rate * frame)
    frames = track[: len(track) // size * size].reshape(-1, size)
    loud = np.sqrt((frames ** 2).mean(axis=1)) > 0.1 * np.abs(track).max()
    spans, start = [], None
    for k, on in enumerate([*loud, False]):
        if on and start is None:
            start = k
        elif not on and start is not None:
            spans.append((start * frame, k * frame))
            start = None
    return spans


def test_task_families_validate_and_their_answers_match_the_media(tmp_path):
    families = ["image_colour", *TASK_FAMILIES]
    write_synthetic_dataset(tmp_path, 15, 0, seed=1, families=families)
    records = load_dataset(tmp_path / "train/omni_rl_format_train.json")
    by_type = {r.problem_type for r in records}
    assert by_type == {"multiple choice", "counting", "numerical", "regression", "temporal retrieval"}
    for record in records:
        family = record.extra["family"]
        if family == "beep_count":
            audio, rate = sf.read(record.media["audio"])
            assert len(_sounding_spans(audio, rate)) == record.target
        elif family in ("tone_hz", "tone_hz_regression"):
            audio, rate = sf.read(record.media["audio"])
            spectrum = np.abs(np.fft.rfft(audio))
            peak = np.fft.rfftfreq(len(audio), 1 / rate)[int(spectrum.argmax())]
            assert abs(peak - record.target) < 3.0
        elif family == "tone_span":
            assert record.data_type == "video_audio" and record.extra["duration"] == 4.0
            (start, end), = _sounding_spans(load_video_audio(record.media["video"]))
            (want_start, want_end), = record.target
            assert abs(start - want_start) < 0.1 and abs(end - want_end) < 0.1
    result = CliRunner().invoke(app, ["data", "validate", str(tmp_path / "train/omni_rl_format_train.json")])
    assert result.exit_code == 0 and "temporal retrieval" in result.output


def test_default_synthetic_set_stays_multiple_choice(tmp_path):
    write_synthetic_dataset(tmp_path, 10, 0, seed=0)
    assert {r.problem_type for r in load_dataset(tmp_path / "train/omni_rl_format_train.json")} == {"multiple choice"}
    result = CliRunner().invoke(app, ["data", "synth", "--out", str(tmp_path / "x"), "--train", "2", "--valid", "0",
                                      "--families", "beep_count,nonsense"])
    assert result.exit_code == 1 and "unknown synthetic families ['nonsense']" in result.output


# ---- evaluation end to end on the tiny model --------------------------------------------------------


def test_eval_scores_each_type_and_metrics_report_it(tmp_path, tiny_model_dir):
    write_synthetic_dataset(tmp_path / "data", 0, 6, seed=2, families=["audio_pitch", "beep_count", "tone_span"])
    data = tmp_path / "data/valid/omni_rl_format_valid.json"
    out = tmp_path / "pred.jsonl"
    runner = CliRunner()
    result = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out),
                                 "--max-new-tokens", "4", "--no-progress"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {row["problem_type"] for row in rows} == {"multiple choice", "counting", "temporal retrieval"}
    for row in rows:
        assert 0.0 <= row["score"] <= 1.0 and row["correct"] == (row["score"] == 1.0)
    assert "temporal retrieval: mean score" in result.output and "counting: accuracy" in result.output
    shown = runner.invoke(app, ["metrics", str(out)])
    assert shown.exit_code == 0 and "by problem type" in shown.output
    assert "│ temporal retrieval (mean" in shown.output and "│ counting " in shown.output  # a graded type says so
    as_json = json.loads(runner.invoke(app, ["metrics", str(out), "--json"]).output)
    assert set(as_json["files"][str(out)]["by_problem_type"]) == {"multiple choice", "counting", "temporal retrieval"}
