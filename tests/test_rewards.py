"""Rewards: EchoInk-R1's accuracy and format rules, reward hacking, linear time, registry and user rewards."""

from __future__ import annotations

import math
import sys
import textwrap
import time

import numpy as np
import pytest

from echoink.rewards import (
    REWARDS,
    RewardError,
    accuracy_reward,
    answer_letter,
    compute_rewards,
    extract_answer,
    format_reward,
    resolve_reward,
    resolve_rewards,
    reward_columns,
)

GOOD = "<think>The siren rises and falls. Hmm, a police car.</think>\n<answer>C</answer>"


# ---- extraction and accuracy --------------------------------------------------------------------------


def test_extract_answer():
    assert extract_answer(GOOD) == "C"
    assert extract_answer("<answer>  B \n</answer>") == "B"
    assert extract_answer("<answer>A</answer><answer>B</answer>") == "A"
    assert extract_answer("no tags") is None
    assert extract_answer("<answer>unclosed") is None
    assert extract_answer("</answer>C<answer>") is None
    assert extract_answer("<answer></answer>") == ""
    assert extract_answer("<answer>multi\nline</answer>") == "multi\nline"


@pytest.mark.parametrize(
    ("completion", "reward"),
    [
        (GOOD, 1.0),
        ("<answer>C</answer>", 1.0),
        ("<think>x</think><answer> C </answer>", 1.0),
        ("<think>x</think><answer>\nC\n</answer>", 1.0),
        ("<think>x</think><answer>C.</answer>", 0.0),
        ("<think>x</think><answer>c</answer>", 0.0),
        ("<think>x</think><answer>C. Police car siren</answer>", 0.0),
        ("<think>x</think><answer>(C)</answer>", 0.0),
        ("<think>x</think><answer>B</answer>", 0.0),
        ("C", 0.0),  # no answer block: no credit
        ("The answer is C.", 0.0),
        ("", 0.0),
    ],
)
def test_accuracy_rule(completion, reward):
    assert accuracy_reward([completion], ["<answer>C</answer>"]) == [reward]


def test_accuracy_accepts_trl_style_columns_and_bare_solutions():
    completions = [GOOD, "<answer>A</answer>"]
    assert accuracy_reward(completions, solution=["<answer>C</answer>", "<answer>B</answer>"], problem_id=[1, 2]) == [1.0, 0.0]
    assert accuracy_reward(completions, ["C", "A"]) == [1.0, 1.0]
    conversational = [[{"role": "assistant", "content": GOOD}]]
    assert accuracy_reward(conversational, ["<answer>C</answer>"]) == [1.0]
    assert format_reward(conversational) == [1.0]
    with pytest.raises(TypeError, match="solutions"):
        accuracy_reward(completions)
    with pytest.raises(ValueError, match="2 completions but 1 solutions"):
        accuracy_reward(completions, ["C"])


# ---- format -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "reward"),
    [
        (GOOD, 1.0),
        ("  <think>a</think><answer>B</answer>\n", 1.0),
        ("<think>a</think> \n\t <answer>B</answer>", 1.0),
        ("<think>\nmulti\nline\n</think>\n<answer>\nB\n</answer>", 1.0),
        ("<think></think><answer></answer>", 1.0),  # EchoInk-R1's format rule allows empty blocks
        ("<answer>B</answer>", 0.0),
        ("<think>a</think>", 0.0),
        ("<think>a</think>text<answer>B</answer>", 0.0),
        ("<think>a</think><answer>B</answer> trailing", 0.0),
        ("preamble <think>a</think><answer>B</answer>", 0.0),
        ("<answer>B</answer><think>a</think>", 0.0),
        ("<think>a <think>b</think><answer>B</answer>", 0.0),
        ("<think>a</think></think><answer>B</answer>", 0.0),
        ("<think>a</think><answer>A</answer><answer>B</answer>", 0.0),
        ("<think>a <answer>B</answer></think><answer>B</answer>", 0.0),
        ("<think>a</think><answer>B <answer> C</answer>", 0.0),
        ("<think>a</think><answer>B", 0.0),
        ("<Think>a</Think><Answer>B</Answer>", 0.0),
        ("", 0.0),
    ],
)
def test_format_rule(completion, reward):
    assert format_reward([completion]) == [reward]


# ---- reward hacking -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "accuracy", "form"),
    [
        ("<think>hmm</think><answer></answer>", 0.0, 1.0),                     # empty answer
        ("<think>hmm</think><answer>A or C</answer>", 0.0, 1.0),               # hedging
        ("<think>hmm</think><answer>A, B, C, D</answer>", 0.0, 1.0),           # listing every option
        ("<think>hmm</think><answer>A</answer><answer>C</answer>", 0.0, 0.0),  # two blocks: only the first counts
        ("<think>hmm</think><answer>C</answer><answer>A</answer>", 1.0, 0.0),  # ... and it breaks the format
        ("<think>it is <answer>C</answer></think>", 1.0, 0.0),                 # answer only inside think
        ("<think>it is <answer>A</answer></think><answer>C</answer>", 0.0, 0.0),
        ("<answer>C</answer>" * 50, 1.0, 0.0),                                 # spamming blocks
        ("<think>hmm</think><answer><answer>C</answer></answer>", 0.0, 0.0),   # nested tags
    ],
)
def test_reward_hacking_completions_never_get_full_reward(completion, accuracy, form):
    assert accuracy_reward([completion], ["<answer>C</answer>"]) == [accuracy]
    assert format_reward([completion]) == [form]
    assert accuracy + form < 2.0


@pytest.mark.parametrize(
    "completion",
    [
        "<think>" + "a" * 100_000,
        "<think>" * 20_000,
        "<answer>" * 12_500,
        "<think>" + " " * 100_000 + "</think>" + " " * 100_000 + "<answer>",
        ("<think>" + "x" * 50_000 + "</think>") * 2 + "<answer>C</answer>",
        "answer" + " " * 100_000,
        "the answer is " * 7_000 + "a dog",
        "</think>" + "answer: " * 12_000,
        "option" + " " * 100_000 + "(",
        "(" * 100_000,
    ],
)
def test_adversarial_completions_run_in_linear_time(completion):
    started = time.perf_counter()
    for _ in range(3):
        accuracy_reward([completion], ["<answer>C</answer>"])
        format_reward([completion])
        answer_letter(completion, lenient=True)
        answer_letter(completion + "<answer>" + completion[:50_000] + "</answer>", lenient=True)
    assert time.perf_counter() - started < 2.0  # catastrophic backtracking would take minutes


# ---- answer letters (strict = accuracy rule; lenient for evaluation reports) -------------------------


@pytest.mark.parametrize(
    ("text", "strict", "lenient"),
    [
        ("<answer>C</answer>", "C", "C"),
        ("<answer> D </answer>", "D", "D"),
        ("<answer>(C)</answer>", None, "C"),
        ("<answer>C.</answer>", None, "C"),
        ("<answer>C)</answer>", None, "C"),
        ("<answer>C. Police car siren</answer>", None, "C"),
        ("<answer>(B) Car engine</answer>", None, "B"),
        ("<answer>Answer: C</answer>", None, "C"),
        ("<answer>The answer is (D).</answer>", None, "D"),
        ("<answer>option B</answer>", None, "B"),
        ("<answer>c</answer>", None, None),
        ("<answer>A dog is barking</answer>", None, None),
        ("<answer>a siren</answer>", None, None),
        ("<answer>A or B</answer>", None, None),
        ("<answer></answer>", None, None),
        ("The answer is C.", None, "C"),
        ("Answer: B", None, "B"),
        ("the answer is a dog", None, None),
        ("The answer is A dog barking loudly", None, None),
        ("I think option A is right.", None, "A"),
        ("<think>the answer is A</think> so the answer is B", None, "B"),
        ("<think>the answer is A</think> no idea", None, None),
        ("A dog barks. A car passes.", None, None),
        ("", None, None),
    ],
)
def test_answer_letter(text, strict, lenient):
    assert answer_letter(text) == strict
    assert answer_letter(text, lenient=True) == lenient
    if strict is not None:
        assert accuracy_reward([text], [f"<answer>{strict}</answer>"]) == [1.0]


# ---- registry, user rewards, compute_rewards -----------------------------------------------------------


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def length_penalty(completions, **columns):
            return [-len(c) / 100 for c in completions]

        def uses_family(completions, family, **columns):
            return [1.0 if f == "colour" else 0.0 for f in family]

        class Holder:
            @staticmethod
            def nested(completions, **columns):
                return [0.5] * len(completions)

        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def test_registry_and_user_rewards(user_module):
    assert REWARDS["accuracy"] is accuracy_reward and REWARDS["format"] is format_reward
    assert resolve_reward("accuracy") is accuracy_reward
    penalty = resolve_reward("my_rewards:length_penalty")
    assert penalty(["abcd"]) == [-0.04]
    assert resolve_reward("my_rewards:Holder.nested")(["x", "y"]) == [0.5, 0.5]
    assert resolve_reward(format_reward) is format_reward
    pairs = resolve_rewards(["accuracy", "format", "my_rewards:uses_family"])
    assert [name for name, _ in pairs] == ["accuracy", "format", "my_rewards:uses_family"]
    for bad, match in [("accuracyy", "unknown reward"), ("no_such_module_xyz:f", "cannot import"),
                       ("my_rewards:missing", "has no attribute"), ("my_rewards:NOT_CALLABLE", "not callable"),
                       ("", "registry name")]:
        with pytest.raises(ValueError, match=match):
            resolve_reward(bad)
    with pytest.raises(ValueError, match="listed twice"):
        resolve_rewards(["accuracy", "accuracy"])


def test_compute_rewards_table_with_columns(user_module):
    funcs = resolve_rewards(["accuracy", "format", "my_rewards:uses_family"])
    completions = [GOOD, "<answer>B</answer>", "nothing"]
    columns = {"solution": ["<answer>C</answer>"] * 3, "problem_id": [10, 11, 12], "family": ["colour", "x", "colour"]}
    table = compute_rewards(funcs, completions, columns)
    assert table.shape == (3, 3) and table.dtype == np.float64
    np.testing.assert_array_equal(table, [[1, 1, 1], [0, 0, 0], [0, 0, 1]])


def _raises_on_second(completions, **columns):
    return [1.0 / (0 if "boom" in c else 1) for c in completions]


@pytest.mark.parametrize(
    ("function", "match"),
    [
        (_raises_on_second, r"'bad' raised on sample 1 \(problem_id 'p1'\): ZeroDivisionError"),
        (lambda completions, **c: [1.0], r"'bad' returned 1 values for 2 completions"),
        (lambda completions, **c: [1.0, math.nan], r"'bad' returned nan for sample 1 \(problem_id 'p1'\)"),
        (lambda completions, **c: [math.inf, 1.0], r"'bad' returned inf for sample 0 \(problem_id 'p0'\)"),
        (lambda completions, **c: [1.0, None], r"'bad' returned None for sample 1"),
        (lambda completions, **c: ["1", 1.0], r"'bad' returned '1' for sample 0"),
        (lambda completions, **c: 3.0, r"'bad' returned float"),
    ],
)
def test_compute_rewards_stops_on_bad_reward(function, match):
    funcs = [("accuracy", accuracy_reward), ("bad", function)]
    columns = {"solution": ["<answer>C</answer>"] * 2, "problem_id": ["p0", "p1"]}
    with pytest.raises(RewardError, match=match):
        compute_rewards(funcs, ["<answer>C</answer>", "boom"], columns)


def test_compute_rewards_batch_only_failure_and_column_lengths():
    def batch_only(completions, **columns):
        if len(completions) > 1:
            raise RuntimeError("needs one at a time")
        return [0.0]

    with pytest.raises(RewardError, match="raised on a batch of 2 completions: RuntimeError"):
        compute_rewards([("b", batch_only)], ["x", "y"], {})
    with pytest.raises(ValueError, match="column 'solution' has 1 values for 2"):
        compute_rewards([("accuracy", accuracy_reward)], ["x", "y"], {"solution": ["C"]})
    values = compute_rewards([("np", lambda c, **k: np.array([True, False]))], ["x", "y"], {})
    np.testing.assert_array_equal(values[:, 0], [1.0, 0.0])


def test_reward_columns_from_records(tmp_path, user_module):
    from data_fixtures import good_record, make_dataset
    from echoink.data import load_dataset

    records = load_dataset(make_dataset(tmp_path / "ds", [good_record(0, family="colour"), good_record(1)]))
    columns = reward_columns([records[0], records[0], records[1]])
    assert columns["solution"] == ["<answer>C</answer>"] * 3
    assert columns["problem_id"] == [0, 0, 1] and columns["answer"] == ["C", "C", "C"]
    assert columns["family"] == ["colour", "colour", None]
    assert columns["options"][0] == list(records[0].options)
    funcs = resolve_rewards(["accuracy", "my_rewards:uses_family"])
    table = compute_rewards(funcs, [GOOD, "<answer>A</answer>", GOOD], columns)
    np.testing.assert_array_equal(table, [[1, 1], [0, 1], [1, 0]])
