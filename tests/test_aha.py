import json

import pytest

from echoink.analysis.aha import (
    compile_reflections,
    count_reflections,
    extract_think,
    find_revisions,
    load_patterns,
    mine_aha,
    normalize_choice,
    stated_answers,
)
from echoink.io import JsonlError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_extract_think_variants():
    assert extract_think("<think>because</think><answer>B</answer>") == "because"
    assert extract_think("<think>unclosed <answer>B</answer>") == "unclosed "
    assert extract_think("no tags at all") == "no tags at all"
    assert extract_think("reasoning first <answer>C</answer>") == "reasoning first "
    assert extract_think("<THINK>x</THINK> tail") == "x"


def test_count_reflections_word_boundaries_case_and_longest_match():
    text = ("Wait, the beep is high. Hmm... let me RE-CHECK the audio. Awaiting nothing; "
            "waiter. Let me reconsider: oh, I see, actually the tone falls. On  second\nthought, wait.")
    counts = count_reflections(text)
    assert counts["wait"] == 2  # "Awaiting" and "waiter" are not "wait"
    assert counts["hmm"] == 1
    assert counts["let me re-check"] == 1
    assert counts["let me reconsider"] == 1 and counts["reconsider"] == 0  # longest phrase wins
    assert counts["oh, I see"] == 1 and counts["oh"] == 0
    assert counts["actually"] == 1
    assert counts["on second thought"] == 1  # whitespace runs and newlines match a space
    assert sum(counts.values()) == 8


def test_custom_patterns_hyphen_and_apostrophe():
    patterns = ["re-evaluate", "that's wrong", "Re-evaluate"]  # duplicate canonical form is dropped
    compiled = compile_reflections(tuple(patterns))
    assert compiled.expressions == ("re-evaluate", "that's wrong")
    counts = count_reflections("Reevaluate. re evaluate! That\u2019s wrong. thats wrong", patterns)
    assert counts == {"re-evaluate": 2, "that's wrong": 1}
    with pytest.raises(ValueError):
        compile_reflections(())
    with pytest.raises(TypeError):
        count_reflections("wait", "wait")


def test_count_reflections_is_fast_on_long_text():
    text = "the sound is a bell and " * 40_000 + "wait"  # ~1 MB
    assert count_reflections(text)["wait"] == 1


def test_load_patterns(tmp_path):
    path = tmp_path / "phrases.txt"
    path.write_text("# my phrases\nwait\n\n  let me listen again  \n")
    assert load_patterns(path) == ["wait", "let me listen again"]
    path.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no reflective expressions"):
        load_patterns(path)


@pytest.mark.parametrize(
    "think, expected",
    [
        ("The tone rises so the answer is B.", ["B"]),
        ("So it's (C). Wait, the second beep is lower, therefore D.", ["C", "D"]),
        ("I think it's A because of the bark. Option B is correct though.", ["A", "B"]),
        ("Options: (A) a dog, (B) a cat, (C) a bird. The dog barks.", []),
        ("So a dog is barking. Therefore A dog it is.", []),  # articles, not options
        ("I'll go with option D", ["D"]),
        ("answer: E", ["E"]),
    ],
)
def test_stated_answers(think, expected):
    assert stated_answers(think) == expected


def test_revision_fixed_broke_changed_and_none():
    fixed = "<think>It sounds like a violin, so the answer is A. Wait, the pitch is low: cello, so C.</think><answer>C</answer>"
    revision = find_revisions(fixed, gt="<answer>C</answer>")
    assert revision is not None
    assert (revision.first_answer, revision.final_answer, revision.outcome) == ("A", "C", "fixed")
    assert revision.stated_answers == ["A", "C"]

    broke = "<think>The answer is B. Hmm, maybe not.</think><answer>D</answer>"
    assert find_revisions(broke, gt="B").outcome == "broke"
    assert find_revisions(broke, gt="A").outcome == "changed"
    assert find_revisions(broke).outcome == "changed"  # no ground truth

    # final answer taken from the last stated letter when there is no <answer>
    unanswered = "<think>So it's A. Actually, option B is correct.</think>"
    assert find_revisions(unanswered, gt="B").outcome == "fixed"

    assert find_revisions("<think>So the answer is B.</think><answer>B</answer>", gt="B") is None
    assert find_revisions("<think>So A. No: so B. Hmm, so A.</think><answer>A</answer>") is None  # wavered back
    assert find_revisions("<think>No letter stated.</think><answer>A</answer>") is None


def test_normalize_choice():
    assert normalize_choice("<answer> b </answer>") == "B"
    assert normalize_choice("(C)") == "C"
    assert normalize_choice("D. a bird") == "D"
    assert normalize_choice("Bird") == "Bird"
    assert normalize_choice(None) is None and normalize_choice("  ") is None


def _completion(think, answer):
    return f"<think>{think}</think>\n<answer>{answer}</answer>"


def test_mine_aha_on_run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = []
    for step in range(1, 4):
        rows += [
            {"step": step, "problem_id": "p1", "solution": "<answer>C</answer>", "rewards": {"accuracy": 1.0},
             "advantage": 0.5, "completion": _completion("So the answer is A. Wait, it is a cello, so C.", "C")},
            {"step": step, "problem_id": "p1", "solution": "<answer>C</answer>", "rewards": {"accuracy": 0.0},
             "advantage": -0.5, "completion": _completion("A violin plays.", "A")},
        ]
    rows.append({"step": 3, "problem_id": "p2", "gt": "B", "rewards": {}, "advantage": 0.0,
                 "completion": _completion("Hmm. The answer is B. Hmm, let me re-check: D.", "D")})
    (run / "completions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    out = tmp_path / "aha"
    report = mine_aha(run, out)
    assert report["kind"] == "run" and report["n_completions"] == 7
    assert report["expression_counts"]["wait"] == {"count": 3, "completions": 3}
    assert report["expression_counts"]["hmm"] == {"count": 2, "completions": 1}
    assert report["expression_counts"]["let me re-check"] == {"count": 1, "completions": 1}
    assert report["reflection_rate"] == pytest.approx(4 / 7)
    assert report["mean_reflections"] == pytest.approx(6 / 7)
    assert [s["step"] for s in report["per_step"]] == [1, 2, 3]
    assert report["per_step"][0] == {"step": 1, "n": 2, "reflection_rate": 0.5, "mean_reflections": 0.5}
    assert report["per_step"][2]["n"] == 3 and report["per_step"][2]["reflection_rate"] == pytest.approx(2 / 3)
    # correctness from final answer vs ground truth: the reflective ones are C (right) x3 and D (wrong)
    assert report["accuracy_with_reflection"] == pytest.approx(3 / 4)
    assert report["accuracy_without_reflection"] == 0.0
    revisions = report["revisions"]
    assert (revisions["n"], revisions["fixed"], revisions["broke"], revisions["changed"]) == (4, 3, 1, 0)
    assert revisions["n_with_stated_answer"] == 4
    broke = [r for r in revisions["records"] if r["outcome"] == "broke"][0]
    assert broke["problem_id"] == "p2" and broke["step"] == 3 and broke["source_line"] == 7
    assert (broke["first_answer"], broke["final_answer"], broke["gt"]) == ("B", "D", "B")

    assert json.loads((out / "aha_report.json").read_text())["revisions"]["fixed"] == 3
    png = (out / "aha_rate.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 10_000
    examples = (out / "aha_examples.md").read_text()
    assert "Revisions that fixed the answer (3 in all)" in examples and "**Wait**" in examples
    assert sorted(p.name for p in out.iterdir()) == ["aha_examples.md", "aha_rate.png", "aha_report.json"]


def test_mine_aha_on_predictions(tmp_path):
    pred = tmp_path / "pred.jsonl"
    rows = [
        {"problem_id": 1, "sample_idx": 0, "gt": "A", "pred": "A", "correct": True,
         "reply": _completion("Hmm, the answer is B. Wait, no: A.", "A")},
        {"problem_id": 2, "sample_idx": 0, "gt": "B", "pred": "C", "correct": False,
         "reply": _completion("It is C.", "C")},
    ]
    pred.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report = mine_aha(pred, tmp_path / "out", patterns=["hmm", "wait, no"])
    assert report["kind"] == "predictions" and report["per_step"] == []
    assert report["expression_counts"] == {"hmm": {"count": 1, "completions": 1},
                                           "wait, no": {"count": 1, "completions": 1}}
    assert report["revisions"]["fixed"] == 1
    assert report["accuracy_with_reflection"] == 1.0 and report["accuracy_without_reflection"] == 0.0
    assert report["outputs"]["rate_png"] is None and not (tmp_path / "out" / "aha_rate.png").exists()


def test_mine_aha_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="completions.jsonl"):
        mine_aha(tmp_path, tmp_path / "out")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"step": 1, "completion": "x"}) + "\n" + json.dumps({"foo": 1}) + "\n")
    with pytest.raises(JsonlError, match=r"bad\.jsonl:2: row has neither"):
        mine_aha(bad, tmp_path / "out")
    bad.write_text(json.dumps({"completion": "x"}) + "\n")
    with pytest.raises(JsonlError, match=r"bad\.jsonl:1: .*integer 'step'"):
        mine_aha(bad, tmp_path / "out")


def test_cli_aha_with_patterns_file(tmp_path):
    from typer.testing import CliRunner

    from echoink.cli import app

    pred = tmp_path / "pred.jsonl"
    pred.write_text(json.dumps({"problem_id": 1, "sample_idx": 0, "gt": "A", "pred": "A", "correct": True,
                                "reply": _completion("Hmm, so B. Listen again: so A.", "A")}) + "\n")
    phrases = tmp_path / "phrases.txt"
    phrases.write_text("listen again\n")
    result = CliRunner().invoke(app, ["aha", str(pred), "--patterns", str(phrases)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "pred_aha" / "aha_report.json").read_text())
    assert report["expressions"] == ["listen again"] and report["revisions"]["fixed"] == 1


def test_cli_bad_patterns_and_metrics_files_name_the_file(tmp_path):
    from typer.testing import CliRunner

    from echoink.cli import app

    pred = tmp_path / "pred.jsonl"
    pred.write_text(json.dumps({"problem_id": 1, "sample_idx": 0, "gt": "A", "pred": "A", "correct": True,
                                "reply": _completion("Hmm.", "A")}) + "\n")
    latin1 = tmp_path / "phrases.txt"
    latin1.write_bytes("réfléchir\n".encode("latin-1"))
    runner = CliRunner()
    for patterns, message in ((tmp_path, "is a directory"), (latin1, "not UTF-8 text"),
                              (tmp_path / "missing.txt", "no such patterns file")):
        result = runner.invoke(app, ["aha", str(pred), "--patterns", str(patterns)])
        assert result.exit_code == 1, result.output
        assert result.output.startswith("error: ") and str(patterns) in result.output and message in result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(b'{"step": 1, "note": "\xe9"}\n')
    for argv in (["plot", str(run)], ["aha", str(pred), "--patterns", str(latin1)]):
        result = runner.invoke(app, argv)
        assert result.exit_code == 1 and "not UTF-8" in result.output, result.output
    assert str(run / "metrics.jsonl") in runner.invoke(app, ["plot", str(run)]).output
