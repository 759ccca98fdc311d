"""Problem types: EchoInk-R1's suffixes, each type's parser and score, load-time errors, user types,
per-record scoring in accuracy_reward, and adversarial answers."""

from __future__ import annotations

import math
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from data_fixtures import good_record, make_dataset
from echoink.data import DatasetError, load_dataset
from echoink.problem_types import (
    ECHOINK_SUFFIXES,
    MAX_TEXT_TOKENS,
    PROBLEM_TYPES,
    get_problem_type,
    parse_number,
    parse_spans,
    register_problem_types,
    span_union_iou,
    unknown_type_message,
)
from echoink.prompts import build_prompt_text, build_question_text
from echoink.rewards import accuracy_reward, score_answer

# EchoInk-R1's TYPE_TEMPLATE (src/r1-v/src/open_r1/grpo.py), typed out here as the reference.
ECHOINK_TYPE_TEMPLATE = {
    "multiple choice": " Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags.",
    "numerical": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
    "OCR": " Please transcribe text from the image/video clearly and provide your text answer within the <answer> </answer> tags.",
    "free-form": " Please provide your text answer within the <answer> </answer> tags.",
    "regression": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
    "temporal retrieval": " The query describes an event in the video. Identify all time spans during which it occurs.\n"
                          "List them inside <answer>...</answer>, e.g., <answer>[12.0, 19.0]; [24.0, 29.0]</answer>.",
    "counting": " Please provide the numerical value (e.g., 1 or 7) in <answer> </answer> tags.",
}


def _answer(text: str) -> str:
    return f"<think>hmm</think><answer>{text}</answer>"


# ---- prompts ----------------------------------------------------------------------------------------


def test_suffixes_are_echoink_r1s_character_by_character():
    assert ECHOINK_SUFFIXES == ECHOINK_TYPE_TEMPLATE
    for name, suffix in ECHOINK_TYPE_TEMPLATE.items():
        assert PROBLEM_TYPES[name].suffix == suffix


def _records(tmp_path: Path, items: list[dict]):
    return load_dataset(make_dataset(tmp_path, items))


def _typed(problem_id: int, problem_type: str, solution: str, **extra) -> dict:
    record = good_record(problem_id, problem_type=problem_type, solution=f"<answer>{solution}</answer>", **extra)
    del record["options"]
    return record


def test_prompt_per_type(tmp_path):
    records = _records(tmp_path, [
        good_record(0),
        _typed(1, "counting", "3", problem="How many beeps?"),
        _typed(2, "temporal retrieval", "[1.5, 2.25]", problem="A dog barks", duration=12.345),
    ])
    mc, counting, temporal = records
    assert build_prompt_text(mc).endswith(ECHOINK_TYPE_TEMPLATE["multiple choice"])
    assert build_question_text(counting) == "How many beeps?"
    assert build_prompt_text(counting).endswith("</answer> tags." + ECHOINK_TYPE_TEMPLATE["counting"])
    assert build_question_text(temporal) == "Query: “A dog barks” (The video duration is 12.35 seconds.)"
    assert build_prompt_text(temporal).startswith("Query: “A dog barks” (The video duration is 12.35 seconds.)\nPlease think")
    assert build_prompt_text(temporal).endswith(ECHOINK_TYPE_TEMPLATE["temporal retrieval"])


# ---- numbers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [
    ("42", 42.0), ("-3.5", -3.5), ("+1,234.5", 1234.5), ("1,234,567", 1234567.0), ("3/4", 0.75), ("-3/4", -0.75),
    (".5", 0.5), ("440 Hz", 440.0), ("440Hz", 440.0), ("12%", 12.0), ("20 °C", 20.0), ("7.", 7.0), (" 8 ", 8.0),
])
def test_numbers_parse(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("text", [
    "", "abc", "1e3", "nan", "NaN", "inf", "-inf", "1,23", "12,3456", "1/0", "3 4", "٤٤٠", "４２", "9" * 70,
    "4 2 Hz", "1.2.3", "--1", "440 Hertz and more",
])
def test_numbers_rejected(text):
    assert parse_number(text) is None


def test_numerical_tolerance_and_regression():
    numerical = get_problem_type("numerical")
    assert numerical.score("3.144", 3.14).value == 1.0  # within 0.005 (EchoInk-R1 compared at 2 decimals)
    assert numerical.score("3.15", 3.14).value == 0.0
    assert numerical.score("1,000,000.5", 1_000_000.0).value == 1.0  # relative 1e-6
    assert numerical.score("abc", 3.0) == numerical.score(None, 3.0)
    assert not numerical.score("abc", 3.0).parsed
    regression = get_problem_type("regression")
    assert regression.score("450", 400.0).value == pytest.approx(0.875)
    assert regression.score("900", 400.0).value == 0.0  # clipped at 0
    assert regression.score("-400", 400.0).value == 0.0
    assert regression.score("0", 0.0).value == 1.0  # zero solution: 1 - |answer|
    assert regression.score("0.25", 0.0).value == pytest.approx(0.75)
    assert regression.score("5", 0.0).value == 0.0


def test_counting_digits_and_words():
    counting = get_problem_type("counting")
    for text in ("7", "seven", "Seven", "SEVEN beeps", "7 beeps", "7."):
        assert counting.score(text, 7).value == 1.0, text
    assert counting.score("twenty", 20).value == 1.0
    assert counting.score("twenty-one", 21) == counting.score("lots", 7)  # beyond twenty: unparsed
    assert counting.score("6", 7) .value == 0.0 and counting.score("6", 7).parsed
    assert counting.parse_solution("three", {}) == 3
    with pytest.raises(ValueError, match="not a count"):
        counting.parse_solution("3.5", {})


# ---- text -------------------------------------------------------------------------------------------


def test_ocr_is_one_minus_wer_clipped():
    ocr = get_problem_type("OCR")
    assert ocr.score("Hello World", "hello world").value == 1.0
    assert ocr.score("hello there world", "hello world").value == pytest.approx(0.5)  # one insertion / 2 words
    assert ocr.score("a b c d e f", "hello world").value == 0.0  # WER 3 clipped
    assert ocr.score("", "hello world").value == 0.0
    assert ocr.score(None, "hello world") .parsed is False


def test_free_form_rouge_l_with_stemming_and_non_ascii():
    free = get_problem_type("free-form")
    # stemmed: the cat are run / the cat run: LCS 3, precision 3/4, recall 1
    assert free.score("The cats are running", "the cat runs").value == pytest.approx(2 * 0.75 / 1.75)
    assert free.score("sirène de police", "sirène de police").value == 1.0  # rouge-score's default tokenizer drops "sirène"
    assert free.score("警察のサイレン", "警察のサイレン").value == 1.0
    assert free.score("警察", "警察のサイレン").value == pytest.approx(2 * 1 * (2 / 7) / (1 + 2 / 7))
    assert free.score("nothing alike", "a siren").value == 0.0


# ---- temporal retrieval -----------------------------------------------------------------------------


def test_span_parsing():
    assert parse_spans("[12.0, 19.0]; [24.0, 29.0]") == [(12.0, 19.0), (24.0, 29.0)]
    assert parse_spans("[1,2] and [3, 4]") == [(1.0, 2.0), (3.0, 4.0)]
    for bad in ("", "12 to 19", "[19, 12]", "[1, 2] extra", "[1, 2", "[nan, 2]", "[1e3, 2e3]", "[1, 2]" * 101):
        assert parse_spans(bad) is None, bad


def test_union_iou_never_exceeds_one():
    assert span_union_iou([(1, 2)] * 5, [(1, 2)]) == 1.0  # EchoInk-R1's pairwise sum gave 5 / (5 + 1 - 5) = 5
    assert span_union_iou([(0, 2), (1, 3)], [(0, 3)]) == 1.0  # overlapping predictions merge
    assert span_union_iou([(0, 1)], [(0.5, 1.5)]) == pytest.approx(1 / 3)
    assert span_union_iou([(0, 1), (2, 3)], [(0, 3)]) == pytest.approx(2 / 3)
    assert span_union_iou([(5, 6)], [(0, 1)]) == 0.0
    assert span_union_iou([(1, 1)], [(0, 2)]) == 0.0
    temporal = get_problem_type("temporal retrieval")
    assert temporal.score("[3, 1]", [(0.0, 1.0)]) == temporal.score("soon", [(0.0, 1.0)])
    assert not temporal.score("[3, 1]", [(0.0, 1.0)]).parsed


# ---- adversarial answers ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PROBLEM_TYPES))
def test_adversarial_answers_score_in_range(name, tmp_path):
    kind = PROBLEM_TYPES[name]
    solution = {"multiple choice": "C", "numerical": 3.0, "counting": 3, "regression": 3.0, "OCR": "hello world",
                "free-form": "a police siren", "temporal retrieval": [(1.0, 2.0)]}[name]
    answers = ["9" * 100_000, "1" * 5000 + ".5", "nan", "inf", "-inf", "NaN Hz", "٣", "３", "[2, 1]", "[1, 2]" * 20_000,
               "word " * 20_000, "a" * 100_000, "[" * 50_000, "1/" * 50_000, " " * 100_000, "\x00\ud800", ""]
    for answer in answers:
        score = kind.score(answer, solution)
        assert 0.0 <= score.value <= 1.0 and math.isfinite(score.value), (name, answer[:20])


def test_long_texts_are_capped():
    free, ocr = get_problem_type("free-form"), get_problem_type("OCR")
    reference = " ".join(f"w{i}" for i in range(MAX_TEXT_TOKENS))
    assert free.score(reference + " extra" * 50_000, reference).value == 1.0  # only the first 1,000 tokens are read
    assert ocr.score(reference + " extra" * 50_000, reference).value == 1.0
    with pytest.raises(ValueError, match="at most 1000"):
        free.parse_solution(reference + " one more", {})


# ---- per-record scoring -----------------------------------------------------------------------------


def test_accuracy_reward_scores_each_record_by_its_type():
    completions = [_answer("C"), _answer("seven"), _answer("[1, 2]; [1, 2]"), _answer("450"), _answer("C")]
    solutions = ["<answer>C</answer>", "<answer>7</answer>", "<answer>[1, 3]</answer>", "<answer>400</answer>",
                 "<answer>4</answer>"]
    types = ["multiple choice", "counting", "temporal retrieval", "regression", "numerical"]
    rewards = accuracy_reward(completions, solution=solutions, problem_type=types, duration=[None, None, 4.0, None, None])
    assert rewards == [1.0, 1.0, 0.5, pytest.approx(0.875), 0.0]
    # without the problem_type column: multiple choice for all (today's rule)
    assert accuracy_reward(completions, solution=solutions) == [1.0, 0.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="did you mean 'counting'"):
        accuracy_reward([_answer("1")], solution=["<answer>1</answer>"], problem_type=["Counting"])
    assert score_answer(_answer("C."), "<answer>C</answer>") .value == 0.0  # multiple choice stays exact


# ---- load-time validation ---------------------------------------------------------------------------


def _problems(tmp_path: Path, items: list[dict]) -> list[str]:
    with pytest.raises(DatasetError) as caught:
        load_dataset(make_dataset(tmp_path, items))
    return caught.value.problems


@pytest.mark.parametrize(("item", "where", "reason"), [
    (_typed(0, "numerical", "abc"), "solution", "'abc' is not a number"),
    (_typed(0, "regression", "1e9"), "solution", "not a number"),
    (_typed(0, "counting", "-2"), "solution", "not a count"),
    (_typed(0, "temporal retrieval", "[5, 2]", duration=10), "solution", "not a list of [start, end] spans"),
    (_typed(0, "temporal retrieval", "[2, 2]", duration=10), "solution", "no length"),
    (_typed(0, "temporal retrieval", "[2, 12]", duration=10), "solution", "outside the video"),
    (_typed(0, "temporal retrieval", "[2, 3]"), "duration", "missing"),
    (_typed(0, "temporal retrieval", "[2, 3]", duration="10"), "duration", "positive number"),
    (_typed(0, "temporal retrieval", "[2, 3]", duration=-1), "duration", "positive number"),
    (_typed(0, "OCR", "..."), "solution", "no words"),
    (_typed(0, "free-form", "-- --"), "solution", "no words"),
    (good_record(0, problem_type="Multiple Choice"), "problem_type", "did you mean 'multiple choice'"),
    (good_record(0, problem_type="multiple_choice"), "problem_type", "did you mean 'multiple choice'"),
    (good_record(0, problem_type="ocr"), "problem_type", "did you mean 'OCR'"),
    (good_record(0, problem_type="essay"), "problem_type", "known: 'multiple choice', 'numerical'"),
])
def test_bad_solutions_are_load_errors(tmp_path, item, where, reason):
    problems = _problems(tmp_path, [item])
    assert len(problems) == 1 and f":0:{where}: " in problems[0] and reason in problems[0], problems
    assert problems[0].startswith(str(tmp_path))


def test_records_carry_the_parsed_solution(tmp_path):
    records = _records(tmp_path, [
        good_record(0), _typed(1, "numerical", "1,234.5"), _typed(2, "counting", "Seven"),
        _typed(3, "temporal retrieval", "[1, 2]; [3.5, 4]", duration=5), _typed(4, "OCR", "STOP"),
    ])
    assert [r.target for r in records] == ["C", 1234.5, 7, [(1.0, 2.0), (3.5, 4.0)], "STOP"]
    assert records[3].extra["duration"] == 5.0


# ---- user types -------------------------------------------------------------------------------------


USER_TYPE = textwrap.dedent('''
    from echoink.problem_types import ProblemType, Score, SolutionError

    class Chord(ProblemType):
        """A chord name such as "C major": 1 for the exact name, 0.5 for the right root."""
        name = "chord"
        suffix = " Name the chord within the <answer> </answer> tags."
        binary = False

        def parse_solution(self, answer, record):
            if " " not in answer:
                raise SolutionError(f"{answer!r} is not 'ROOT QUALITY'")
            return answer.lower()

        def score(self, answer, solution):
            if not answer or " " not in answer:
                return Score(0.0, False)
            answer = answer.lower()
            return Score(1.0 if answer == solution else 0.5 if answer.split()[0] == solution.split()[0] else 0.0, True)

    class Impostor(ProblemType):
        name = "counting"
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_tasks.py").write_text(USER_TYPE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_tasks"
    PROBLEM_TYPES.pop("chord", None)
    sys.modules.pop("my_tasks", None)


def test_user_type_registered_validated_prompted_and_scored(tmp_path, user_module):
    item = _typed(0, "chord", "C major")
    with pytest.raises(DatasetError, match="unknown problem_type 'chord'"):
        load_dataset(make_dataset(tmp_path / "a", [item]))
    assert register_problem_types([f"{user_module}:Chord"]) == ["chord"]
    assert register_problem_types([f"{user_module}:Chord"]) == ["chord"]  # the same class again: no-op
    (record,) = load_dataset(make_dataset(tmp_path / "b", [item]))
    assert record.target == "c major"
    assert build_prompt_text(record).endswith(" Name the chord within the <answer> </answer> tags.")
    rewards = accuracy_reward([_answer("C major"), _answer("C minor"), _answer("?")], solution=[record.solution] * 3,
                              problem_type=["chord"] * 3)
    assert rewards == [1.0, 0.5, 0.0]
    problems = _problems(tmp_path / "c", [_typed(0, "chord", "Cmaj")])
    assert "solution: 'Cmaj' is not 'ROOT QUALITY'" in problems[0]


def test_user_type_errors(user_module):
    with pytest.raises(ValueError, match="already registered by a built-in type"):
        register_problem_types([f"{user_module}:Impostor"])
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        register_problem_types(["no_such_module:Type"])
    with pytest.raises(ValueError, match="has no attribute 'Missing'"):
        register_problem_types([f"{user_module}:Missing"])
    with pytest.raises(ValueError, match="must look like 'package.module:Class'"):
        register_problem_types(["my_tasks.Chord"])
    assert "chord" not in PROBLEM_TYPES
    assert "register your own" in unknown_type_message("chord")


def test_config_validates_problem_types_and_length_settings():
    from echoink.config import ConfigError, load_config

    config = load_config(None, ["problem_types=[my_tasks:Chord]", "len_control=true"])
    assert config.problem_types == ["my_tasks:Chord"] and config.len_control
    for bad, message in (("problem_types=[my_tasks.Chord]", "package.module:Class"),
                         ("len_control_min_tokens=300", "len_control_min_tokens <= len_control_max_tokens"),
                         ("len_control_bonus=.nan", "len_control_bonus"),
                         ("len_control_threshold=1.5", "len_control_threshold")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [bad])


def test_multiple_choice_record_unchanged(tmp_path):
    (record,) = _records(tmp_path, [good_record(0)])
    assert record.target == record.answer == "C"
    other = replace(record, problem_type="counting")
    assert build_prompt_text(other).endswith(ECHOINK_TYPE_TEMPLATE["counting"])
