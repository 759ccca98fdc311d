import json
import math

import pytest

from echoink.io import JsonlError
from echoink.eval.metrics import (
    accuracy_summary,
    load_predictions,
    majority_vote_correct,
    mcnemar_exact,
    pass_at_k,
    paired_comparison,
    wilson_interval,
)

GOOD = "<think>The tone rises, so the answer is {0}.</think>\n<answer>{0}</answer>"


def test_wilson_matches_hand_formula():
    k, n, z = 8, 10, 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = wilson_interval(8, 10)
    assert (lo, hi) == pytest.approx((centre - half, centre + half), rel=1e-9)
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # textbook value


def test_wilson_edges_and_errors():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and 0 < hi < 0.35
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and 0.65 < lo < 1
    assert wilson_interval(5, 10, confidence=0.99)[0] < wilson_interval(5, 10)[0]
    with pytest.raises(ValueError):
        wilson_interval(11, 10)
    with pytest.raises(ValueError):
        wilson_interval(1, 10, confidence=1.0)


def test_mcnemar_exact():
    assert mcnemar_exact(1, 7) == pytest.approx(2 * (1 + 8) / 2**8)  # 0.0703125
    assert mcnemar_exact(1, 7) == pytest.approx(0.0703125)
    assert mcnemar_exact(7, 1) == mcnemar_exact(1, 7)
    assert mcnemar_exact(0, 3) == pytest.approx(0.25)
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 0) == 1.0
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def test_pass_at_k_estimator():
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)
    assert pass_at_k(4, 0, 3) == 0.0
    assert pass_at_k(4, 3, 2) == 1.0
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def _row(pid, idx, gt, pred, correct, **extra):
    reply = GOOD.format(pred) if pred is not None else "I cannot tell."
    return {"problem_id": pid, "sample_idx": idx, "gt": gt, "pred": pred, "correct": correct, "reply": reply, **extra}


def _constructed_rows():
    """4 problems x 3 samples; expected numbers are worked out in test_accuracy_summary_on_constructed_file."""
    av = {"data_type": "image_audio"}
    vv = {"data_type": "video_audio"}
    return [
        _row("p1", 0, "A", "A", True, needs=["visual", "audio"], reply_tokens=10, **av),
        _row("p1", 1, "A", "B", False, needs=["visual", "audio"], reply_tokens=20, **av),
        _row("p1", 2, "A", "A", True, needs=["visual", "audio"], reply_tokens=30, **av),
        _row("p2", 0, "B", "C", False, needs="audio", reply_tokens=40, **av),
        _row("p2", 1, "B", None, False, needs="audio", reply_tokens=50, **av),
        _row("p2", 2, "B", "C", False, needs="audio", reply_tokens=60, **av),
        _row("p3", 0, "C", "A", False, **vv),
        _row("p3", 1, "C", "C", True, **vv),
        _row("p3", 2, "C", "C", True, **vv),
        _row("p4", 0, "B", "D", False, **vv),  # D and B tie 1-1: D voted first -> majority wrong
        _row("p4", 1, "B", "B", True, **vv),
        _row("p4", 2, "B", None, False, **vv),
    ]


def test_accuracy_summary_on_constructed_file(tmp_path):
    path = tmp_path / "pred.jsonl"
    rows = _constructed_rows()
    path.write_text("\n".join(json.dumps(row) for row in reversed(rows)) + "\n\n")  # order must not matter
    summary = accuracy_summary(load_predictions(path))

    assert summary["n"] == 12 and summary["n_problems"] == 4 and summary["samples_per_problem"] == 3
    assert summary["accuracy"] == pytest.approx(5 / 12)
    assert (summary["ci_low"], summary["ci_high"]) == pytest.approx(wilson_interval(5, 12))
    assert summary["unparsed_rate"] == pytest.approx(2 / 12)
    assert summary["format_rate"] == pytest.approx(10 / 12)  # the two unparsed replies are badly formatted
    assert summary["mean_reply_tokens"] == pytest.approx(35.0)

    # sample 0: p1 only -> 1/4; sample 1: p3, p4 -> 2/4; sample 2: p1, p3 -> 2/4
    assert summary["per_sample_accuracy"] == pytest.approx([0.25, 0.5, 0.5])
    assert summary["accuracy_mean"] == pytest.approx(5 / 12)
    assert summary["accuracy_std"] == pytest.approx(math.sqrt(1 / 48))
    # majority: p1 A (right), p2 C (wrong), p3 C (right), p4 tie D/B -> D (wrong)
    assert summary["majority_vote_accuracy"] == pytest.approx(0.5)
    # correct counts c = 2, 0, 2, 1 of n = 3
    assert summary["pass_at_k"]["pass@1"] == pytest.approx((2 / 3 + 0 + 2 / 3 + 1 / 3) / 4)
    assert summary["pass_at_k"]["pass@2"] == pytest.approx((1 + 0 + 1 + (1 - 1 / 3)) / 4)
    assert summary["pass_at_k"]["pass@3"] == pytest.approx(0.75)

    assert summary["by_data_type"]["image_audio"]["n"] == 6
    assert summary["by_data_type"]["image_audio"]["accuracy"] == pytest.approx(2 / 6)
    assert summary["by_data_type"]["video_audio"]["accuracy"] == pytest.approx(3 / 6)
    lo, hi = wilson_interval(3, 6)
    assert summary["by_data_type"]["video_audio"]["ci_low"] == pytest.approx(lo)
    assert set(summary["by_needs"]) == {"audio+visual", "audio"}
    assert summary["by_needs"]["audio+visual"]["accuracy"] == pytest.approx(2 / 3)
    json.dumps(summary)  # JSON-serialisable


def test_single_sample_summary_defaults():
    rows = [_row(i, 0, "A", "A", i % 2 == 0) for i in range(4)]
    for row in rows:
        del row["sample_idx"]  # defaults to 0
    summary = accuracy_summary(rows)
    assert summary["accuracy"] == 0.5 and summary["accuracy_std"] == 0.0
    assert summary["pass_at_k"] == {"pass@1": 0.5}
    assert summary["by_data_type"] == {} and summary["by_needs"] == {}
    assert summary["mean_reply_tokens"] is None


def test_majority_vote_ties_and_unparsed():
    rows = [_row("p", 0, "B", "A", False), _row("p", 1, "B", "B", True)]
    assert majority_vote_correct(rows) is False  # tie -> earliest sample's answer A
    assert majority_vote_correct(list(reversed(rows))) is False  # sorted by sample_idx, not by list order
    rows = [_row("p", 0, "B", None, False), _row("p", 1, "B", "B", True)]
    assert majority_vote_correct(rows) is True  # unparsed replies do not vote
    assert majority_vote_correct([_row("p", 0, "B", None, False)]) is False


def test_summary_rejects_bad_rows():
    with pytest.raises(ValueError, match="no prediction rows"):
        accuracy_summary([])
    with pytest.raises(ValueError, match="duplicate"):
        accuracy_summary([_row("p", 0, "A", "A", True), _row("p", 0, "A", "B", False)])
    with pytest.raises(ValueError, match="correct"):
        accuracy_summary([{"problem_id": "p"}])


def test_load_predictions_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_row("p", 0, "A", "A", True)) + "\n{not json\n")
    with pytest.raises(JsonlError, match=r"bad\.jsonl:2: invalid JSON"):
        load_predictions(path)
    path.write_text("\n" + json.dumps({"problem_id": "p"}) + "\n")
    with pytest.raises(JsonlError, match=r"bad\.jsonl:2: .*'correct'"):
        load_predictions(path)
    path.write_text(json.dumps({"problem_id": "p", "correct": "yes"}) + "\n")
    with pytest.raises(JsonlError, match=r"bad\.jsonl:1: 'correct' must be true/false"):
        load_predictions(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(JsonlError, match=r"bad\.jsonl:1: expected a JSON object"):
        load_predictions(path)
    with pytest.raises(FileNotFoundError):
        load_predictions(tmp_path / "missing.jsonl")


def test_paired_comparison():
    rows_a = [_row(i, 0, "A", "A", i < 8) for i in range(11)]  # problem 10 only in A
    rows_b = [_row(i, 0, "A", "A", i in (0, 8)) for i in range(10)]
    result = paired_comparison(rows_a, rows_b, n_boot=500, seed=1)
    # shared 0..9: A right on 0..7, B right on 0 and 8 -> wins 1..7, loss 8, ties 0 and 9
    assert (result["wins"], result["losses"], result["ties"]) == (7, 1, 2)
    assert result["mcnemar_p"] == pytest.approx(0.0703125)
    assert result["n_shared"] == 10 and result["only_a"] == 1 and result["only_b"] == 0
    assert result["accuracy_a"] == pytest.approx(0.8) and result["accuracy_b"] == pytest.approx(0.2)
    assert result["difference"] == pytest.approx(0.6)
    assert result["ci_low"] < 0.6 < result["ci_high"]
    assert -1.0 <= result["ci_low"] and result["ci_high"] <= 1.0
    assert paired_comparison(rows_a, rows_b, n_boot=500, seed=1) == result  # deterministic
    with pytest.raises(ValueError, match="share no problem_id"):
        paired_comparison(rows_a, [_row("other", 0, "A", "A", True)])


def test_paired_comparison_uses_per_problem_mean_over_samples():
    rows_a = [_row("p", i, "A", "A", True) for i in range(4)]
    rows_b = [_row("p", i, "A", "A", i < 2) for i in range(4)]
    result = paired_comparison(rows_a, rows_b, n_boot=10)
    assert result["difference"] == pytest.approx(0.5) and result["wins"] == 1


def test_cli_metrics_json_and_table(tmp_path):
    from typer.testing import CliRunner

    from echoink.cli import app

    path_a, path_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    rows = _constructed_rows()
    path_a.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    path_b.write_text("\n".join(json.dumps(dict(row, correct=not row["correct"])) for row in rows) + "\n")
    runner = CliRunner()
    result = runner.invoke(app, ["metrics", str(path_a), "--against", str(path_b), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["files"][str(path_a)]["accuracy"] == pytest.approx(5 / 12)
    assert payload["against"]["comparisons"][str(path_a)]["n_shared"] == 4
    result = runner.invoke(app, ["metrics", str(path_a), str(path_b), "--against", str(path_b)])
    assert result.exit_code == 0 and "Paired comparison" in result.output
    path_a.write_text("{oops\n")
    result = runner.invoke(app, ["metrics", str(path_a)])
    assert result.exit_code == 1 and "a.jsonl:1" in result.output
