"""Rewards: the one answer parser, EchoInk-R1's accuracy and format rewards, and the reward registry.

* :func:`extract_answer` is the only place that reads an answer out of a completion; evaluation
  imports it (and :func:`answer_letter`) so training and evaluation agree by construction.
* :func:`accuracy_reward` scores each completion by its record's own ``problem_type``
  (:mod:`echoink.problem_types`; multiple choice when the ``problem_type`` column is absent). For
  multiple choice it is 1.0 iff the stripped text inside the *first* ``<answer>...</answer>`` block
  equals the solution's letter exactly ("C" counts; "C.", "c", "C. Police car siren" do not); the
  graded types give values in [0, 1]. :func:`score_answer` is the same rule for one completion
  (evaluation uses it).
* :func:`format_reward` is 1.0 iff the stripped completion is exactly one ``<think>...</think>``
  block, optional whitespace, and exactly one ``<answer>...</answer>`` block.
* Both run in linear time (plain string searches; no backtracking regular expressions).
* Rewards are named in the config (``reward_funcs: [accuracy, format]``, ``reward_weights``); a name is
  a registry key (:data:`REWARDS`) or ``"package.module:function"``, which **imports that module**, so
  only name code you trust. User rewards use TRL's signature ``f(completions, **columns) -> list[float]``.
* :func:`compute_rewards` calls every function and stops with :class:`RewardError`, naming the
  function and the sample, when one raises, returns the wrong number of values or a non-finite value.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from echoink.problem_types import MULTIPLE_CHOICE, Score, checked_score, describe_type, get_problem_type
from echoink.user_code import load_object

__all__ = [
    "REWARDS",
    "RewardError",
    "RewardFunc",
    "accuracy_reward",
    "answer_letter",
    "completion_text",
    "compute_rewards",
    "echoink_r1_answer_letter",
    "extract_answer",
    "format_reward",
    "resolve_reward",
    "resolve_rewards",
    "reward_columns",
    "reward_names",
    "score_answer",
]

RewardFunc = Callable[..., Sequence[float]]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)


class RewardError(RuntimeError):
    """A reward function failed; the message names the function and the sample."""


# ---- answer extraction (shared with evaluation) ------------------------------------------------------


def completion_text(completion: Any) -> str:
    """The text of a completion: a string as is, or the content of TRL's conversational form
    (``[{"role": "assistant", "content": "..."}]`` or one such dict)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        return _content_text(completion.get("content", ""))
    if isinstance(completion, Sequence):
        return "".join(_content_text(m.get("content", "")) if isinstance(m, Mapping) else str(m) for m in completion)
    raise TypeError(f"a completion must be a string or a list of messages, got {type(completion).__name__}")


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):  # [{"type": "text", "text": ...}, ...]
        return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
    return str(content)


def extract_answer(text: str) -> str | None:
    """The stripped content of the first ``<answer>...</answer>`` block, or None when there is none.

    "First block" means the first ``<answer>`` that has a ``</answer>`` after it, closed by the
    nearest such ``</answer>``. Linear time.
    """
    start = text.find(ANSWER_OPEN)
    if start < 0:
        return None
    end = text.find(ANSWER_CLOSE, start + len(ANSWER_OPEN))
    if end < 0:
        return None
    return text[start + len(ANSWER_OPEN) : end].strip()


# Lenient reading (evaluation reports only; never a reward). Possessive quantifiers keep it linear.
_LEADING_LETTER = re.compile(r"\(([A-Z])\)(?=$|[\s.,:;!?])|([A-Z])(?:$|[.:)](?=$|\s))")
_ANSWER_CUE = re.compile(
    r"(?i:\banswer)(?:\s++is\b)?+\s*+[:\-]?+\s*+(?:\(([A-Z])\)|([A-Z])(?=$|[.,;:!?)]|\s++(?:$|[^a-z\s])))"
)
_OPTION_CUE = re.compile(r"(?i:\b(?:option|choice))\s*+\(?+([A-Z])(?![A-Za-z])")


def answer_letter(text: str, lenient: bool = False) -> str | None:
    """The option letter a completion gives, or None.

    Strict (the default) is exactly :func:`accuracy_reward`'s rule: the content of the first answer
    block when it is a single uppercase letter. ``lenient=True`` also reads, inside the answer block
    or, without one, in the text after the last ``</think>``: "(C)", "C.", "C)", "C: ...",
    "C. Police car siren", "Answer: C", "the answer is (C)", "option C". A lone article ("a", or "A"
    followed by a lower-case word, as in "A dog barks") is never read as a letter.
    """
    answer = extract_answer(text)
    if answer is not None and len(answer) == 1 and "A" <= answer <= "Z":
        return answer
    if not lenient:
        return None
    if answer is not None:
        leading = _LEADING_LETTER.match(answer)
        if leading:
            return leading.group(1) or leading.group(2)
        return _first_cue_letter(answer)
    think_end = text.rfind(THINK_CLOSE)
    tail = text[think_end + len(THINK_CLOSE) :] if think_end >= 0 else text
    return _last_cue_letter(tail)


#: EchoInk-R1's evaluation rule (its published 85.77 / 80.53 on AVQA-R1-6K were graded with it; never a reward).
ECHOINK_R1_TAGGED_LETTER = re.compile(r"<answer>\s*([A-D])\s*</answer>", re.IGNORECASE)
ECHOINK_R1_STANDALONE_LETTER = re.compile(r"\b([A-D])\b", re.IGNORECASE)


def echoink_r1_answer_letter(reply: str) -> str | None:
    """EchoInk-R1's answer rule: the first ``<answer> X </answer>`` (X in A-D, any case, spaces allowed), else
    the first standalone A-D letter anywhere in the reply (any case), upper-cased; None when neither exists.

    >>> echoink_r1_answer_letter("<think>...</think><answer> c </answer>")
    'C'
    >>> echoink_r1_answer_letter("I hear a dog barking.")   # the article counts as option A
    'A'
    """
    match = ECHOINK_R1_TAGGED_LETTER.search(reply) or ECHOINK_R1_STANDALONE_LETTER.search(reply)
    return match.group(1).upper() if match else None


def _first_cue_letter(text: str) -> str | None:
    for pattern in (_ANSWER_CUE, _OPTION_CUE):
        match = pattern.search(text)
        if match:
            return next(group for group in match.groups() if group)
    return None


def _last_cue_letter(text: str) -> str | None:
    best: tuple[int, str] | None = None
    for pattern in (_ANSWER_CUE, _OPTION_CUE):
        for match in pattern.finditer(text):
            if best is None or match.start() >= best[0]:
                best = (match.start(), next(group for group in match.groups() if group))
    return best[1] if best else None


def _solution_answer(solution: str) -> str:
    """The expected answer: the content of the solution's answer block, or the stripped solution."""
    inside = extract_answer(solution)
    return inside if inside is not None else solution.strip()


# ---- the two EchoInk-R1 rewards ----------------------------------------------------------------------


def accuracy_reward(completions: Sequence[Any], solutions: Sequence[str] | None = None, **columns: Any) -> list[float]:
    """Each completion scored by its own record's problem type, in [0, 1].

    ``solutions`` are ``"<answer>C</answer>"`` strings (or bare answers). The TRL-style call
    ``accuracy_reward(completions, solution=[...], problem_type=[...], **other_columns)`` scores each
    completion by its ``problem_type`` (temporal retrieval also reads the ``duration`` column); without
    a ``problem_type`` column every completion is multiple choice: 1.0 iff the first answer block's
    stripped content equals the solution's answer exactly.
    """
    if solutions is None:
        solutions = columns.get("solution")
    if solutions is None:
        raise TypeError("accuracy_reward needs the solutions (positional, or the 'solution' column)")
    if len(solutions) != len(completions):
        raise ValueError(f"accuracy_reward got {len(completions)} completions but {len(solutions)} solutions")
    problem_types = columns.get("problem_type")
    if problem_types is None:
        rewards = []
        for completion, solution in zip(completions, solutions):
            given = extract_answer(completion_text(completion))
            rewards.append(1.0 if given is not None and given == _solution_answer(solution) else 0.0)
        return rewards
    if len(problem_types) != len(completions):
        raise ValueError(f"accuracy_reward got {len(completions)} completions but {len(problem_types)} problem types")
    durations = columns.get("duration") or [None] * len(completions)
    return [score_answer(completion, solution, problem_type, {"duration": duration}).value
            for completion, solution, problem_type, duration in zip(completions, solutions, problem_types, durations)]


def score_answer(completion: Any, solution: str, problem_type: str = MULTIPLE_CHOICE,
                 fields: Mapping[str, Any] | None = None) -> Score:
    """One completion's :class:`~echoink.problem_types.Score` (value in [0, 1], parsed or not) for its type.

    ``solution`` is the record's ``"<answer>...</answer>"`` string; ``fields`` holds the record fields
    the type needs (temporal retrieval: ``duration``). An unknown type raises ``ValueError`` naming the
    known ones; a solution that does not parse raises ``ValueError`` (the loader refuses both).
    """
    try:
        kind = get_problem_type(problem_type)
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None
    target = _parsed_solution(kind, _solution_answer(solution), dict(fields or {}))
    try:
        score = kind.score(extract_answer(completion_text(completion)), target)
    except Exception as exc:  # noqa: BLE001 - a user type's code: one line naming it (the caller adds the record)
        raise ValueError(f"{describe_type(kind)}: score() raised {type(exc).__name__}: {exc}") from exc
    return checked_score(kind, score)


def _parsed_solution(kind: Any, answer: str, fields: dict) -> Any:
    key = (kind.name, answer, repr(sorted(fields.items())))
    cached = _SOLUTION_CACHE.get(key)
    if cached is None:
        try:
            parsed = kind.parse_solution(answer, fields)
        except Exception as exc:  # noqa: BLE001 - as above
            raise ValueError(f"{describe_type(kind)}: parse_solution() raised {type(exc).__name__}: {exc}") from exc
        cached = _SOLUTION_CACHE[key] = (parsed,)
        if len(_SOLUTION_CACHE) > 4096:
            _SOLUTION_CACHE.pop(next(iter(_SOLUTION_CACHE)))
    return cached[0]


_SOLUTION_CACHE: dict[tuple, tuple] = {}


def format_reward(completions: Sequence[Any], **columns: Any) -> list[float]:
    """1.0 iff the stripped completion is ``<think>...</think>``, optional whitespace,
    ``<answer>...</answer>`` and nothing else, each tag appearing exactly once."""
    return [1.0 if _well_formed(completion_text(completion)) else 0.0 for completion in completions]


def _well_formed(text: str) -> bool:
    text = text.strip()
    if not (text.startswith(THINK_OPEN) and text.endswith(ANSWER_CLOSE)):
        return False
    if any(text.count(tag) != 1 for tag in _TAGS):
        return False
    think_close = text.find(THINK_CLOSE)
    answer_open = text.find(ANSWER_OPEN)
    if think_close + len(THINK_CLOSE) > answer_open:
        return False
    return not text[think_close + len(THINK_CLOSE) : answer_open].strip()


# ---- registry and user rewards -----------------------------------------------------------------------

#: Built-in rewards by config name.
REWARDS: dict[str, RewardFunc] = {"accuracy": accuracy_reward, "format": format_reward}


def resolve_reward(spec: str | RewardFunc) -> RewardFunc:
    """A reward function from a registry name ("accuracy"), a ``"package.module:function"`` path, or
    a callable (returned as is).

    A ``module:function`` path **imports that module**, running its top-level code: only name modules
    you trust.
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a reward must be a registry name or 'package.module:function', got {spec!r}")
    if spec in REWARDS:
        return REWARDS[spec]
    if ":" not in spec:
        raise ValueError(f"unknown reward {spec!r}: use one of {', '.join(REWARDS)} "
                         "or 'package.module:function' for your own")
    function = load_object(spec, "reward")
    if not callable(function):
        raise ValueError(f"reward {spec!r}: {spec.partition(':')[2]!r} is not callable")
    return function


def reward_names(specs: Sequence[str]) -> list[str]:
    """Column names for logs: the function's name after the colon ("pkg.mod:f" -> "f"), or the full
    spec where two specs would share a short name ("pkg_a:f" and "pkg_b:f" keep their full specs)."""
    short = [spec.rsplit(":", 1)[-1] for spec in specs]
    return [name if short.count(name) == 1 else spec for name, spec in zip(short, specs)]


def resolve_rewards(specs: Sequence[str | RewardFunc]) -> list[tuple[str, RewardFunc]]:
    """``(name, function)`` pairs for the config's ``reward_funcs`` (names must be unique)."""
    if not specs:
        raise ValueError("at least one reward function is needed")
    pairs = []
    for spec in specs:
        name = spec if isinstance(spec, str) else getattr(spec, "__name__", repr(spec))
        pairs.append((name, resolve_reward(spec)))
    names = [name for name, _ in pairs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"reward functions listed twice: {duplicates}")
    return pairs


def reward_columns(records: Sequence[Any]) -> dict[str, list]:
    """The per-sample columns user rewards receive, one entry per record (repeat a prompt's record once
    per completion): ``problem_id, problem, data_type, problem_type, options, solution, answer,
    data_source, needs, record`` (``FILE:INDEX`` of the record) and every extra dataset field (None
    where a record lacks it)."""
    names = ("problem_id", "problem", "data_type", "problem_type", "options", "solution", "answer",
             "data_source", "needs")
    columns: dict[str, list] = {name: [] for name in names}
    for record in records:
        for name in names:
            value = getattr(record, name)
            columns[name].append(list(value) if name == "options" else value)
    columns["record"] = [f"{record.source}:{record.index}" for record in records]
    extra_names = dict.fromkeys(key for record in records for key in record.extra)
    for key in extra_names:
        if key not in columns:
            columns[key] = [record.extra.get(key) for record in records]
    return columns


def compute_rewards(
    funcs: Sequence[tuple[str, RewardFunc]],
    completions: Sequence[Any],
    columns: Mapping[str, Sequence[Any]],
) -> np.ndarray:
    """Call each reward as ``f(completions, **columns)``; return float64 ``[N, R]``.

    ``columns`` are per-sample lists (``solution``, ``problem_id``, any extra dataset field), each of
    length N. Raises :class:`RewardError` naming the function and the sample when a function raises,
    returns a number of values other than N, or returns a value that is not a finite number.
    """
    count = len(completions)
    for column, values in columns.items():
        if len(values) != count:
            raise ValueError(f"column {column!r} has {len(values)} values for {count} completions")
    table = np.zeros((count, len(funcs)), dtype=np.float64)
    for j, (name, function) in enumerate(funcs):
        try:
            values = function(completions, **columns)
        except Exception as exc:  # noqa: BLE001 - any failure stops training, with its location
            raise _locate_failure(name, function, completions, columns, exc) from exc
        try:
            values = list(values)
        except TypeError:
            raise RewardError(f"reward function {name!r} returned {type(values).__name__}, "
                              f"expected a list of {count} numbers") from None
        if len(values) != count:
            raise RewardError(f"reward function {name!r} returned {len(values)} values for {count} completions")
        for i, value in enumerate(values):
            number = _as_number(value)
            if number is None or not math.isfinite(number):
                raise RewardError(f"reward function {name!r} returned {value!r} for {_sample(i, columns)}; "
                                  "rewards must be finite numbers")
            table[i, j] = number
    return table


def _as_number(value: Any) -> float | None:
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _sample(index: int, columns: Mapping[str, Sequence[Any]]) -> str:
    problem_ids, locations = columns.get("problem_id"), columns.get("record")
    where = f"record {locations[index]} " if locations is not None and index < len(locations) else ""
    if problem_ids is not None and index < len(problem_ids):
        return f"{where}sample {index} (problem_id {problem_ids[index]!r})"
    return f"{where}sample {index}"


def _locate_failure(name: str, function: RewardFunc, completions: Sequence[Any],
                    columns: Mapping[str, Sequence[Any]], error: Exception) -> RewardError:
    """Re-run the function one sample at a time to name the sample that makes it raise."""
    for i in range(len(completions)):
        try:
            function(completions[i : i + 1], **{key: values[i : i + 1] for key, values in columns.items()})
        except Exception as exc:  # noqa: BLE001
            return RewardError(f"reward function {name!r} raised on {_sample(i, columns)}: "
                               f"{type(exc).__name__}: {exc}")
    return RewardError(f"reward function {name!r} raised on a batch of {len(completions)} completions: "
                       f"{type(error).__name__}: {error}")
