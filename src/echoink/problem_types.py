"""Problem types: how each record's solution is validated, which prompt suffix it gets, how an answer scores.

One registry (:data:`PROBLEM_TYPES`, keyed by the record's ``problem_type``) decides, per record:

* ``parse_solution(answer, record)`` — load time: the content of the solution's answer block, parsed
  for the type (a number, a list of spans, ...), or :class:`SolutionError` with the reason; the loader
  reports it as ``FILE:INDEX:solution: reason``. ``required_fields`` names extra record fields the
  type needs (temporal retrieval: ``duration``), checked by ``check_field``;
* ``suffix`` — the text appended to the prompt (EchoInk-R1's ``TYPE_TEMPLATE`` entries, character for
  character; :data:`ECHOINK_SUFFIXES`) and ``question(problem, record)`` — the question part;
* ``score(answer, solution) -> Score`` — a value in [0, 1] for the stripped content of the completion's
  first answer block (``None`` when it has none) against the parsed solution, and whether the answer
  could be read at all (``parsed``; unparsed answers score 0 and are counted as such in metrics).
  ``binary`` types score 0 or 1 only (reported as accuracy); the others are graded (mean score).

Built-in types: ``multiple choice``, ``numerical``, ``counting``, ``regression``, ``OCR``,
``free-form``, ``temporal retrieval`` (rules in docs/rewards.md). A user type is a class with the same
attributes, named in the config as ``"package.module:Class"`` (``problem_types: [...]``) and added by
:func:`register_problem_types`; **naming it imports that module**, so only name code you trust.

Every scorer is bounded: answers are cut to :data:`MAX_ANSWER_CHARS` characters before anything else;
numbers are read by one anchored regular expression without nested quantifiers; WER and ROUGE-L
(O(n·m)) see at most :data:`MAX_TEXT_TOKENS` tokens of the answer, and solutions longer than that are
a load-time error.

This module sits just above ``echoink.io``: it imports nothing of echoink but ``echoink.user_code``, so ``echoink.data``
validates solutions with it and ``echoink.prompts`` / ``echoink.rewards`` build prompts and score with it.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

from echoink.user_code import load_object

__all__ = [
    "ECHOINK_SUFFIXES",
    "MAX_ANSWER_CHARS",
    "MAX_SPANS",
    "MAX_TEXT_TOKENS",
    "MULTIPLE_CHOICE",
    "NUMBER_WORDS",
    "PROBLEM_TYPES",
    "ProblemType",
    "Score",
    "SolutionError",
    "checked_score",
    "describe_type",
    "get_problem_type",
    "parse_number",
    "parse_spans",
    "register_problem_type",
    "register_problem_types",
    "span_union_iou",
    "unknown_type_message",
]

MULTIPLE_CHOICE = "multiple choice"

#: Answers are cut to this many characters before they are parsed (scoring stays bounded in time).
MAX_ANSWER_CHARS = 20_000
#: WER (OCR) and ROUGE-L (free-form) read at most this many tokens of an answer; longer solutions are
#: refused at load.
MAX_TEXT_TOKENS = 1_000
#: At most this many spans are read from a temporal-retrieval answer (more: the answer is unparsed).
MAX_SPANS = 100

#: EchoInk-R1's per-type prompt suffixes (its ``TYPE_TEMPLATE``), reproduced exactly.
ECHOINK_SUFFIXES: dict[str, str] = {
    "multiple choice": " Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags.",
    "numerical": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
    "OCR": " Please transcribe text from the image/video clearly and provide your text answer within the <answer> </answer> tags.",
    "free-form": " Please provide your text answer within the <answer> </answer> tags.",
    "regression": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
    "temporal retrieval": (
        " The query describes an event in the video. Identify all time spans during which it occurs.\n"
        "List them inside <answer>...</answer>, e.g., <answer>[12.0, 19.0]; [24.0, 29.0]</answer>."
    ),
    "counting": " Please provide the numerical value (e.g., 1 or 7) in <answer> </answer> tags.",
}

#: English number words accepted by ``counting`` (case-insensitive).
NUMBER_WORDS: dict[str, int] = {
    word: value for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split())
}


class SolutionError(ValueError):
    """A solution (or a field a type needs) does not parse for the record's problem type."""


@dataclass(frozen=True)
class Score:
    """One answer's score in [0, 1] and whether the answer could be read for its type."""

    value: float
    parsed: bool


UNPARSED = Score(0.0, False)


class ProblemType:
    """Base of every problem type (built-in or user). Subclasses set ``name`` and override what differs.

    ``binary``: scores are 0 or 1 (metrics report accuracy); otherwise graded (mean score with a
    bootstrap interval). ``suffix``: appended to the prompt (None: the template's ``free_form_suffix``).
    """

    name: ClassVar[str] = ""
    suffix: ClassVar[str | None] = None
    binary: ClassVar[bool] = True
    required_fields: ClassVar[tuple[str, ...]] = ()

    def question(self, problem: str, record: Any) -> str:
        """The question part of the prompt (before the instruction paragraph): the problem as is."""
        return problem

    def check_field(self, name: str, value: Any) -> Any:
        """Validate one of ``required_fields`` (raise :class:`SolutionError`); returns the value to keep."""
        return value

    def parse_solution(self, answer: str, record: Mapping[str, Any]) -> Any:
        """The parsed solution from its answer block's stripped content (raise :class:`SolutionError`)."""
        return answer

    def score(self, answer: str | None, solution: Any) -> Score:
        """Score the stripped content of the completion's first answer block (None: no block)."""
        if answer is None:
            return UNPARSED
        return Score(1.0 if answer == solution else 0.0, True)


# ---- numbers ----------------------------------------------------------------------------------------

# sign, then plain digits or 1-3 digits with comma groups of three, optional decimals; or a fraction a/b.
_NUMBER = re.compile(
    r"(?P<sign>[+-]?)(?:(?P<num>[0-9]++)/(?P<den>[0-9]++)"
    r"|(?P<whole>[0-9]{1,3}(?:,[0-9]{3})++|[0-9]++)(?:\.(?P<frac>[0-9]++))?|\.(?P<bare>[0-9]++))"
)
_UNIT = re.compile(r"(?:\s?+[A-Za-z%°µΩ$€£][A-Za-z%°µΩ/.²³]{0,11})?")
_MAX_NUMBER_CHARS = 64


def parse_number(text: str) -> float | None:
    """A finite number from ``text``, or None.

    Accepted: ASCII digits with an optional sign, thousands separators in groups of three ("1,234"),
    decimals ("3.14", ".5"), a simple fraction of integers ("3/4"), and one trailing unit of at most
    12 letters or symbols after an optional space ("440 Hz", "12%", "3.5s", "20 °C"), which is
    dropped without conversion. Surrounding whitespace and one final period are ignored. Not accepted:
    exponents, words, other digit scripts ("٤٤٠"), NaN or infinity, more than 64 characters.
    """
    text = text.strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    if not text or len(text) > _MAX_NUMBER_CHARS:
        return None
    match = _NUMBER.match(text)
    if match is None or _UNIT.fullmatch(text, match.end()) is None:
        return None
    sign = -1.0 if match["sign"] == "-" else 1.0
    if match["num"] is not None:
        denominator = int(match["den"])
        if denominator == 0:
            return None
        value = int(match["num"]) / denominator
    else:
        whole = (match["whole"] or "0").replace(",", "")
        value = float(f"{whole}.{match['frac'] or match['bare'] or '0'}")
    return sign * value if math.isfinite(value) else None


def _solution_number(answer: str) -> float:
    value = parse_number(answer)
    if value is None:
        raise SolutionError(f"{_shorten(answer)!r} is not a number (see docs/rewards.md for the accepted forms)")
    return value


class MultipleChoice(ProblemType):
    """One option letter; 1 iff the answer block is exactly the solution's letter (unchanged rule).
    The loader checks options and letters (echoink.data.records)."""

    name = MULTIPLE_CHOICE
    suffix = ECHOINK_SUFFIXES[MULTIPLE_CHOICE]

    def score(self, answer: str | None, solution: Any) -> Score:
        if answer is None:
            return UNPARSED
        return Score(1.0 if answer == solution else 0.0, len(answer) == 1 and "A" <= answer <= "Z")


class _NumberType(ProblemType):
    """A number answer (:func:`parse_number`) compared with a number solution by :meth:`compare`."""

    def parse_solution(self, answer: str, record: Mapping[str, Any]) -> float:
        return _solution_number(answer)

    def score(self, answer: str | None, solution: float) -> Score:
        value = parse_number(answer[:MAX_ANSWER_CHARS]) if answer is not None else None
        return UNPARSED if value is None else Score(self.compare(value, solution), True)

    def compare(self, value: float, solution: float) -> float:
        raise NotImplementedError


class Numerical(_NumberType):
    """1 iff the answer's number is within ``abs_tol`` 0.005 (EchoInk-R1 compared after rounding to two
    decimals) or a relative 1e-6 of the solution's."""

    name = "numerical"
    suffix = ECHOINK_SUFFIXES["numerical"]
    abs_tol: ClassVar[float] = 0.005
    rel_tol: ClassVar[float] = 1e-6

    def compare(self, value: float, solution: float) -> float:
        return 1.0 if math.isclose(value, solution, rel_tol=self.rel_tol, abs_tol=self.abs_tol) else 0.0


def _parse_count(text: str) -> int | None:
    """A count: ASCII digits or an English number word up to twenty, with an optional trailing unit."""
    text = text.strip().lower()
    if text.endswith("."):
        text = text[:-1].rstrip()
    if not text or len(text) > _MAX_NUMBER_CHARS:
        return None
    head, _, unit = text.partition(" ")
    if unit and not re.fullmatch(r"[a-z]{1,12}", unit):
        return None
    if head in NUMBER_WORDS:
        return NUMBER_WORDS[head]
    if re.fullmatch(r"\+?[0-9]{1,18}", head):
        return int(head)
    return None


class Counting(ProblemType):
    """1 iff the answer is the solution's count: digits ("7") or an English word ("seven", up to twenty),
    optionally followed by one word ("7 beeps")."""

    name = "counting"
    suffix = ECHOINK_SUFFIXES["counting"]

    def parse_solution(self, answer: str, record: Mapping[str, Any]) -> int:
        count = _parse_count(answer)
        if count is None:
            raise SolutionError(f"{_shorten(answer)!r} is not a count (a non-negative integer or a number word)")
        return count

    def score(self, answer: str | None, solution: int) -> Score:
        count = _parse_count(answer[:MAX_ANSWER_CHARS]) if answer is not None else None
        if count is None:
            return UNPARSED
        return Score(1.0 if count == solution else 0.0, True)


class Regression(_NumberType):
    """``clip(1 - |answer - solution| / |solution|, 0, 1)``; for a zero solution ``clip(1 - |answer|, 0, 1)``
    (the absolute error takes the relative error's place)."""

    name = "regression"
    suffix = ECHOINK_SUFFIXES["regression"]
    binary = False

    def compare(self, value: float, solution: float) -> float:
        error = abs(value - solution) / abs(solution) if solution != 0 else abs(value)
        return _clip(1.0 - error) if math.isfinite(error) else 0.0


# ---- text -------------------------------------------------------------------------------------------

_SPACELESS_SCRIPTS = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\u0e00-\u0e7f\uf900-\ufaff])")
_WORD = re.compile(r"[^\W_]+")


def _words(text: str) -> list[str]:
    """Case-folded runs of Unicode letters and digits; every character of a script written without spaces
    (CJK, kana, Hangul, Thai) is a token of its own."""
    return _WORD.findall(_SPACELESS_SCRIPTS.sub(r" \1 ", text.casefold()))


class _UnicodeRougeTokenizer:
    """rouge-score's tokenizer interface; unlike its default it keeps non-ASCII words (see docs/rewards.md).
    ASCII words longer than 3 letters are Porter-stemmed, as rouge-score does with ``use_stemmer=True``."""

    def __init__(self) -> None:
        from nltk.stem import porter

        self._stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        tokens = _words(text)[:MAX_TEXT_TOKENS]
        return [self._stemmer.stem(t) if len(t) > 3 and t.isascii() else t for t in tokens]


class _TextType(ProblemType):
    binary = False

    def parse_solution(self, answer: str, record: Mapping[str, Any]) -> str:
        words = _words(answer)
        if not words:
            raise SolutionError("the reference text has no words")
        if len(words) > MAX_TEXT_TOKENS:
            raise SolutionError(f"the reference has {len(words)} words; at most {MAX_TEXT_TOKENS} are scored")
        return answer


class OCR(_TextType):
    """``clip(1 - WER(solution, answer), 0, 1)`` with jiwer, on case-folded words (at most 1,000 of the answer)."""

    name = "OCR"
    suffix = ECHOINK_SUFFIXES["OCR"]

    def score(self, answer: str | None, solution: str) -> Score:
        if answer is None:
            return UNPARSED
        import jiwer

        hypothesis = " ".join(_words(answer[:MAX_ANSWER_CHARS])[:MAX_TEXT_TOKENS])
        error = jiwer.wer(" ".join(_words(solution)), hypothesis)
        return Score(_clip(1.0 - error), True)


class FreeForm(_TextType):
    """ROUGE-L F1 (rouge-score) with stemming and a Unicode-aware tokenizer (at most 1,000 answer tokens)."""

    name = "free-form"
    suffix = ECHOINK_SUFFIXES["free-form"]

    def score(self, answer: str | None, solution: str) -> Score:
        if answer is None:
            return UNPARSED
        result = _rouge_l().score(solution, answer[:MAX_ANSWER_CHARS])["rougeL"]
        return Score(_clip(result.fmeasure), True)


@functools.lru_cache(maxsize=1)
def _rouge_l() -> Any:
    """rouge-score's ROUGE-L scorer with our tokenizer (built once, on first use)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_UnicodeRougeTokenizer())


# ---- temporal retrieval ------------------------------------------------------------------------------

_SPAN = re.compile(r"\[\s*+([+-]?[0-9]++(?:\.[0-9]++)?)\s*+,\s*+([+-]?[0-9]++(?:\.[0-9]++)?)\s*+\]")
_SPAN_SEPARATOR = re.compile(r"[\s;,]*+(?:and)?+[\s;,]*+")


def parse_spans(text: str) -> list[tuple[float, float]] | None:
    """``[start, end]`` spans separated by ``;``, ``,``, "and" or whitespace, or None when the text is
    anything else, a span has start > end or a non-finite bound, or there are more than 100 spans."""
    text = text.strip()
    spans: list[tuple[float, float]] = []
    position = 0
    while position < len(text):
        match = _SPAN.match(text, position)
        if match is None:
            return None
        start, end = float(match.group(1)), float(match.group(2))
        if not (math.isfinite(start) and math.isfinite(end)) or start > end or len(spans) >= MAX_SPANS:
            return None
        spans.append((start, end))
        position = _SPAN_SEPARATOR.match(text, match.end()).end()
    return spans or None


def _union(spans: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def span_union_iou(predicted: Sequence[tuple[float, float]], solution: Sequence[tuple[float, float]]) -> float:
    """``|U(predicted) ∩ U(solution)| / |U(predicted) ∪ U(solution)|`` with U the union of the spans.

    Repeating or overlapping spans do not count twice (EchoInk-R1 summed pairwise overlaps, which can
    exceed 1). 0 when the union has zero length. O(k log k) for k spans.
    """
    a, b = _union(predicted), _union(solution)
    intersection, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        intersection += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    total = sum(e - s for s, e in a) + sum(e - s for s, e in b) - intersection
    return _clip(intersection / total) if total > 0 else 0.0


class TemporalRetrieval(ProblemType):
    """Spans ``[start, end]`` in seconds; the score is :func:`span_union_iou`. Records carry ``duration``
    (seconds, > 0); solution spans must lie within ``[0, duration]`` with start < end."""

    name = "temporal retrieval"
    suffix = ECHOINK_SUFFIXES["temporal retrieval"]
    binary = False
    required_fields = ("duration",)

    def question(self, problem: str, record: Any) -> str:
        duration = record.extra["duration"] if hasattr(record, "extra") else record["duration"]
        return f"Query: “{problem}” (The video duration is {duration:.2f} seconds.)"

    def check_field(self, name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise SolutionError(f"must be a positive number of seconds, got {_shorten(repr(value))}")
        return float(value)

    def parse_solution(self, answer: str, record: Mapping[str, Any]) -> list[tuple[float, float]]:
        spans = parse_spans(answer)
        if spans is None:
            raise SolutionError(f"{_shorten(answer)!r} is not a list of [start, end] spans with start <= end")
        duration = record.get("duration")
        for start, end in spans:
            if start >= end:
                raise SolutionError(f"span [{start:g}, {end:g}] has no length (start must be before end)")
            if start < 0 or (isinstance(duration, (int, float)) and end > duration):
                raise SolutionError(f"span [{start:g}, {end:g}] lies outside the video (0 to {duration} s)")
        return spans

    def score(self, answer: str | None, solution: list[tuple[float, float]]) -> Score:
        spans = parse_spans(answer[:MAX_ANSWER_CHARS]) if answer is not None else None
        if spans is None:
            return UNPARSED
        return Score(span_union_iou(spans, solution), True)


# ---- registry ---------------------------------------------------------------------------------------

#: Every known problem type by its ``problem_type`` value (built-ins, then user types as registered).
PROBLEM_TYPES: dict[str, ProblemType] = {
    kind.name: kind() for kind in (MultipleChoice, Numerical, Counting, Regression, OCR, FreeForm, TemporalRetrieval)
}
_BUILT_IN = frozenset(PROBLEM_TYPES)


def unknown_type_message(name: str) -> str:
    """Why ``name`` is not a problem type: a case or spacing slip names the right spelling."""
    folded = {_fold(known): known for known in PROBLEM_TYPES}
    if _fold(name) in folded:
        return f"unknown problem_type {name!r}: did you mean {folded[_fold(name)]!r}? (names are case-sensitive)"
    return (f"unknown problem_type {_shorten(name)!r}; known: {', '.join(repr(k) for k in PROBLEM_TYPES)} "
            "(register your own with problem_types: ['package.module:Class'])")


def get_problem_type(name: str) -> ProblemType:
    """The registered type named ``name`` (KeyError with :func:`unknown_type_message` otherwise)."""
    try:
        return PROBLEM_TYPES[name]
    except (KeyError, TypeError):
        raise KeyError(unknown_type_message(str(name))) from None


def register_problem_type(kind: type[ProblemType] | ProblemType) -> ProblemType:
    """Add a user type (a class or an instance with ``name``, ``suffix``, ``binary``, ``parse_solution``,
    ``score``; subclassing :class:`ProblemType` gives the defaults). Re-registering the same class is a
    no-op; another class under a taken name is an error."""
    spec = _spec(kind if isinstance(kind, type) else type(kind))
    try:
        instance = kind() if isinstance(kind, type) else kind
    except Exception as exc:  # noqa: BLE001 - user code: one line naming it
        raise ValueError(f"problem type {spec}: its constructor raised {type(exc).__name__}: {exc}") from exc
    name = getattr(instance, "name", None)
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"problem type {kind!r} must have a non-empty string attribute 'name'")
    for attribute in ("parse_solution", "score"):
        if not callable(getattr(instance, attribute, None)):
            raise ValueError(f"problem type {name!r} must define {attribute}()")
    _check_attributes(instance, f"problem type {name!r} ({spec})")
    existing = PROBLEM_TYPES.get(name)
    if existing is not None:
        if type(existing) is type(instance):
            return existing
        owner = "a built-in type" if name in _BUILT_IN else f"{type(existing).__module__}.{type(existing).__qualname__}"
        raise ValueError(f"problem type {name!r} is already registered by {owner}")
    PROBLEM_TYPES[name] = instance
    return instance


def _spec(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def describe_type(kind: Any) -> str:
    """"problem type 'name'", with the user type's ``module:Class`` (messages about user code name it)."""
    name = getattr(kind, "name", "?")
    return f"problem type {name!r}" if name in _BUILT_IN else f"problem type {name!r} ({_spec(type(kind))})"


def _check_attributes(instance: Any, label: str) -> None:
    """The class attributes a type declares have the types the code relies on (refused at registration)."""
    suffix, binary, fields = (getattr(instance, "suffix", None), getattr(instance, "binary", True),
                              getattr(instance, "required_fields", ()))
    if suffix is not None and not isinstance(suffix, str):
        raise ValueError(f"{label}: 'suffix' must be a string or None, got {type(suffix).__name__} {suffix!r}")
    if not isinstance(binary, bool):
        raise ValueError(f"{label}: 'binary' must be true or false, got {type(binary).__name__} {binary!r}")
    if not isinstance(fields, (tuple, list)) or not all(isinstance(field, str) for field in fields):
        raise ValueError(f"{label}: 'required_fields' must be a tuple of field names, got {fields!r}")


def checked_score(kind: Any, score: Any) -> Score:
    """A type's ``score()`` result as a Score whose value is a number in [0, 1]; ValueError naming the type."""
    value, parsed = getattr(score, "value", None), getattr(score, "parsed", None)
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if number is None or not math.isfinite(number) or not 0.0 <= number <= 1.0 or parsed not in (True, False):
        raise ValueError(f"{describe_type(kind)}: score() returned {score!r}; it must return Score(value, parsed) "
                         "with value a number in [0, 1] and parsed true or false")
    return Score(float(number), bool(parsed))


def register_problem_types(specs: Sequence[str] | None) -> list[str]:
    """Import and register each ``"package.module:Class"``; returns the type names.

    **Importing runs the module's top-level code**: only name modules you trust.
    """
    names = []
    for spec in specs or []:
        if not isinstance(spec, str) or ":" not in spec or not all(spec.partition(":")[::2]):
            raise ValueError(f"problem type {spec!r} must look like 'package.module:Class'")
        target = load_object(spec, "problem type")
        names.append(register_problem_type(target).name)
    return names


def _fold(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().casefold())


def _clip(value: float) -> float:
    return min(1.0, max(0.0, float(value)))


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
