"""Reflective-reasoning ("aha moment") mining over training completions or evaluation predictions.

Two questions about the ``<think>`` block of each completion:

1. **Reflection**: how often does the model use reflective expressions ("wait", "hmm", "let me re-check", ...)?
   Counted per expression, per completion, and per training step (the share of completions with at least one,
   and the mean number).
2. **Revision**: does the model state a tentative answer while thinking ("so the answer is B") and then commit
   to a different final letter? Given the ground truth, a revision *fixed* the answer (tentative wrong, final
   right), *broke* it (tentative right, final wrong), or merely *changed* it (both wrong, or truth unknown).

Inputs: a run directory holding ``completions.jsonl`` (lines ``{"step", "problem_id", "completion",
"solution" or "gt", "problem_type", "rewards", "advantage"}``) or a predictions file (lines ``{"problem_id", "sample_idx", "gt",
"pred", "correct", "reply"}``). Outputs (written atomically): ``aha_report.json``, ``aha_examples.md`` and, for a
run, ``aha_rate.png``.

Matching rules (documented because they decide the numbers):

* Expressions are literal phrases, matched case-insensitively on word boundaries; inside a phrase any run of
  whitespace matches a space, a hyphen is optional ("re-check" = "recheck" = "re check") and ' matches ’.
  All phrases are combined into one alternation, longest first, so at any position the longest phrase wins and
  matches never overlap ("let me reconsider" counts once, not also as "reconsider"). One pass over the text:
  time linear in its length (times the fixed size of the phrase list).
* A letter counts as a *stated answer* only next to a conclusion cue: after "the answer is / would be / must
  be", "answer:", "so / therefore / thus / hence", "I think (it's)", "I'll go with / choose / pick / select",
  "must be / should be", or before "is correct / is right / is the answer". It must be an upper-case A-H,
  either in parentheses, after "option"/"choice", or followed by punctuation, the end of the text or
  "is / because / since / as". Bare enumerations ("(A) a dog, (B) a cat") are therefore not answers.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from echoink.io import save_figure_atomic, write_json_atomic, write_text_atomic
from echoink.io import JsonlError, iter_jsonl
from echoink.problem_types import MULTIPLE_CHOICE
from echoink.rewards import answer_letter, extract_answer, score_answer

DEFAULT_REFLECTIVE_EXPRESSIONS: tuple[str, ...] = (
    "wait",
    "but wait",
    "hmm",
    "hold on",
    "actually",
    "on second thought",
    "let me re-check",
    "let me check again",
    "let me double-check",
    "double-check",
    "let me verify",
    "let me reconsider",
    "reconsider",
    "re-evaluate",
    "re-examine",
    "let me think again",
    "rethink",
    "I made a mistake",
    "I was wrong",
    "that's not right",
    "oh, I see",
    "oh",
    "aha",
    "looking again",
    "listening again",
    "upon closer inspection",
    "alternatively",
)

COMPLETIONS_FILE = "completions.jsonl"
REPORT_FILE = "aha_report.json"
RATE_PNG = "aha_rate.png"
EXAMPLES_FILE = "aha_examples.md"


# ---- reflective expressions ---------------------------------------------------------------------


def _expression_key(text: str) -> str:
    """Canonical form shared by a phrase and any text it matches: lower case, no whitespace or hyphens, ' for ’."""
    return re.sub(r"[\s\-]+", "", text.lower().replace("\u2019", "'"))


@dataclass(frozen=True)
class ReflectionPatterns:
    """A compiled list of reflective expressions (build with :func:`compile_reflections`)."""

    expressions: tuple[str, ...]
    regex: "re.Pattern[str]"
    by_key: dict[str, str] = field(hash=False, compare=False)


@functools.lru_cache(maxsize=32)
def compile_reflections(expressions: tuple[str, ...] = DEFAULT_REFLECTIVE_EXPRESSIONS) -> ReflectionPatterns:
    """Compile literal phrases into one case-insensitive, word-bounded alternation (longest phrase first).

    Duplicate phrases (same canonical form) keep their first spelling. Raises ValueError for an empty list or a
    phrase without letters or digits.
    """
    by_key: dict[str, str] = {}
    for expression in expressions:
        expression = " ".join(expression.split())
        if not re.search(r"\w", expression):
            raise ValueError(f"reflective expression {expression!r} has no letters")
        by_key.setdefault(_expression_key(expression), expression)
    if not by_key:
        raise ValueError("no reflective expressions given")
    alternatives = []
    for expression in sorted(by_key.values(), key=len, reverse=True):
        pieces = []
        for char in expression:
            if char == " ":
                pieces.append(r"\s++")
            elif char == "-":
                pieces.append(r"[\s\-]?")
            elif char in "'\u2019":
                pieces.append("['\u2019]")
            else:
                pieces.append(re.escape(char))
        alternatives.append("".join(pieces))
    regex = re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)", re.IGNORECASE)
    return ReflectionPatterns(tuple(by_key.values()), regex, by_key)


def _as_patterns(patterns: Union[None, Sequence[str], ReflectionPatterns]) -> ReflectionPatterns:
    if patterns is None:
        return compile_reflections()
    if isinstance(patterns, ReflectionPatterns):
        return patterns
    if isinstance(patterns, str):
        raise TypeError("patterns must be a sequence of phrases, not one string")
    return compile_reflections(tuple(patterns))


def count_reflections(
    think_text: str, patterns: Union[None, Sequence[str], ReflectionPatterns] = None
) -> dict[str, int]:
    """Occurrences of each reflective expression in ``think_text`` (every expression present, zeros included).

    ``patterns``: None (the defaults), a list of phrases, or a :func:`compile_reflections` result.
    """
    compiled = _as_patterns(patterns)
    counts = dict.fromkeys(compiled.expressions, 0)
    for match in compiled.regex.finditer(think_text):
        counts[compiled.by_key[_expression_key(match.group(0))]] += 1
    return counts


def load_patterns(path: Union[str, Path]) -> list[str]:
    """Phrases from a text file: one per line; blank lines and lines starting with ``#`` are ignored."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; --patterns takes a text file with one phrase per line")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such patterns file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start}); the patterns file must be UTF-8, "
                         "one phrase per line") from None
    phrases = [line.strip() for line in text.splitlines()]
    phrases = [phrase for phrase in phrases if phrase and not phrase.startswith("#")]
    if not phrases:
        raise ValueError(f"{path}: no reflective expressions (one phrase per line, # for comments)")
    return phrases


# ---- think blocks and answers -------------------------------------------------------------------

_THINK_OPEN = re.compile(r"<think>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think>", re.IGNORECASE)
_ANSWER_OPEN = re.compile(r"<answer>", re.IGNORECASE)


def extract_think(text: str) -> str:
    """The reasoning part of a completion.

    The content of the first ``<think>...</think>``; with an unclosed ``<think>``, everything after it up to
    ``<answer>`` (or the end); with no ``<think>`` tag at all, everything before ``<answer>`` (the whole text
    when there is no answer tag either), so untagged reasoning is still analysed.
    """
    opening = _THINK_OPEN.search(text)
    start = opening.end() if opening else 0
    closing = _THINK_CLOSE.search(text, start)
    if closing:
        return text[start : closing.start()]
    answer = _ANSWER_OPEN.search(text, start)
    return text[start : answer.start()] if answer else text[start:]


_CHOICE = re.compile(r"^\s*\(?\s*([A-Za-z])\s*\)?\s*(?:[.:)\-]|\s|$)")


def normalize_choice(value: Any) -> Optional[str]:
    """A ground truth or parsed answer as an upper-case option letter when it starts with one ("B", "(b)",
    "B. a dog", "<answer>B</answer>"); otherwise the stripped text; None for None/empty."""
    if value is None:
        return None
    text = str(value).strip()
    tagged = re.search(r"<answer>(.*?)</answer>", text, re.IGNORECASE | re.DOTALL)
    if tagged:
        text = tagged.group(1).strip()
    if not text:
        return None
    match = _CHOICE.match(text)
    if match and (len(text) == 1 or not text[:2].isalpha()):
        return match.group(1).upper()
    return text


def final_answer(text: str) -> Optional[str]:
    """The committed answer of a completion, read by the project's one answer parser:
    ``echoink.rewards.answer_letter(text, lenient=True)`` (the ``<answer>`` letter, leniently, or a cue after
    ``</think>``); failing a letter, the stripped ``<answer>`` content; None when there is neither."""
    return answer_letter(text, lenient=True) or normalize_choice(extract_answer(text))


_LETTER = (
    r"(?:\((?P<{n}p>[A-H])\)"
    r"|(?:option|choice)\s++\(?(?P<{n}o>[A-H])\)?(?!\w)"
    r"|(?<![\w(])(?P<{n}b>[A-H])(?=\s*+(?:[.,;:!?)\"'*]|$)|\s++(?:is|because|since|as)\b))"
)
_CUE_BEFORE = (
    r"(?:\banswer\s++(?:is|would\s++be|should\s++be|must\s++be|might\s++be|could\s++be|seems\s++to\s++be)\s*+:?"
    r"|\banswer\s*+:"
    r"|\b(?:so|therefore|thus|hence),?(?:\s++(?:it'?s|it\s++is|it\s++must\s++be|it\s++should\s++be))?"
    r"|\bI\s++(?:think|believe|guess)(?:\s++(?:it'?s|it\s++is))?"
    r"|\b(?:go\s++with|choose|pick|select)"
    r"|\b(?:must|should)\s++be)\s*+"
)
_CUE_AFTER = r"\s++(?:is|seems\s++to\s++be)\s++(?:correct|right|the\s++(?:correct\s++|right\s++|best\s++)?answer)\b"
_STATED_BEFORE = re.compile(_CUE_BEFORE + _LETTER.format(n="x"), re.IGNORECASE)
_STATED_AFTER = re.compile(_LETTER.format(n="y") + _CUE_AFTER, re.IGNORECASE)


def _letter_of(match: "re.Match[str]") -> Optional[tuple[int, str]]:
    for name, value in match.groupdict().items():
        if value is not None:
            if not value.isupper():  # "so it's a dog": lower-case letters are words, not options
                return None
            return match.start(name), value
    return None


def stated_answers(think_text: str) -> list[str]:
    """Option letters the model states as its answer while thinking, in order of appearance (rules above)."""
    found: dict[int, str] = {}
    for regex in (_STATED_BEFORE, _STATED_AFTER):
        for match in regex.finditer(think_text):
            letter = _letter_of(match)
            if letter is not None:
                found.setdefault(*letter)
    return [found[position] for position in sorted(found)]


@dataclass
class Revision:
    """A completion whose first stated answer differs from its final answer.

    ``outcome``: "fixed" (first wrong, final right), "broke" (first right, final wrong), or "changed"
    (both wrong, or no ground truth).
    """

    first_answer: str
    final_answer: Optional[str]
    stated_answers: list[str]
    gt: Optional[str]
    outcome: str


def find_revisions(text: str, gt: Any = None) -> Optional[Revision]:
    """The revision in one completion, or None when there is none.

    The first stated answer is the first letter of :func:`stated_answers` in the think block; the final answer
    is the ``<answer>`` letter (:func:`final_answer`) or, without a parsable answer, the last stated answer.
    ``gt`` may be a letter or ``"<answer>X</answer>"``. A completion that wavers but ends where it began
    (A -> B -> A) is not a revision.
    """
    stated = stated_answers(extract_think(text))
    if not stated:
        return None
    final = final_answer(text) or stated[-1]
    first = stated[0]
    if first == final:
        return None
    truth = normalize_choice(gt)
    if truth is not None and first != truth and final == truth:
        outcome = "fixed"
    elif truth is not None and first == truth and final != truth:
        outcome = "broke"
    else:
        outcome = "changed"
    return Revision(first, final, stated, truth, outcome)


# ---- mining a run or a predictions file ---------------------------------------------------------


@dataclass
class _Completion:
    source_line: int
    text: str
    problem_id: Any
    step: Optional[int]
    sample_idx: Optional[int]
    gt: Optional[str]
    correct: Optional[bool]


def _read_completions(path: Path) -> tuple[str, list[_Completion]]:
    """``("run" | "predictions", completions)`` from completions.jsonl or a predictions file."""
    kind: Optional[str] = None
    items: list[_Completion] = []
    for line_number, row in iter_jsonl(path):
        row_kind = "run" if "completion" in row else "predictions" if "reply" in row else None
        if row_kind is None:
            raise JsonlError(f"{path}:{line_number}: row has neither 'completion' (run) nor 'reply' (predictions)")
        kind = kind or row_kind
        if row_kind != kind:
            raise JsonlError(f"{path}:{line_number}: mixes {row_kind} rows into a {kind} file")
        text = row["completion"] if kind == "run" else row["reply"]
        if not isinstance(text, str):
            raise JsonlError(f"{path}:{line_number}: the completion text must be a string")
        gt = normalize_choice(row.get("gt", row.get("solution")))
        step = row.get("step")
        if kind == "run" and (isinstance(step, bool) or not isinstance(step, int)):
            raise JsonlError(f"{path}:{line_number}: a completions.jsonl row needs an integer 'step'")
        if kind == "predictions":
            correct = None if row.get("correct") is None else bool(row["correct"])
        else:  # exactly the training accuracy reward, by the row's problem type (older runs: multiple choice)
            correct = _training_correct(path, line_number, row, text)
        items.append(_Completion(line_number, text, row.get("problem_id"), step if kind == "run" else None,
                                 row.get("sample_idx"), gt, correct))
    if kind is None:
        raise ValueError(f"{path}: no completions")
    return kind, items


def _training_correct(path: Path, line_number: int, row: dict, text: str) -> Optional[bool]:
    """Whether a completions.jsonl row's completion scores 1 by the training accuracy reward for the row's
    `problem_type` (and the record `fields` its scoring reads); None without a solution."""
    solution = row.get("solution", row.get("gt"))
    if solution is None:
        return None
    problem_type = row.get("problem_type", MULTIPLE_CHOICE)
    fields = row.get("fields") if isinstance(row.get("fields"), dict) else {}
    try:
        return score_answer(text, str(solution), str(problem_type), fields).value == 1.0
    except ValueError as exc:  # a user problem type not registered here, or a solution it cannot read
        raise JsonlError(f"{path}:{line_number}: {exc} (register user problem types with --problem-types)") from None


def _input_file(path: Path) -> Path:
    if path.is_dir():
        candidate = path / COMPLETIONS_FILE
        if not candidate.is_file():
            raise FileNotFoundError(f"{path}: no {COMPLETIONS_FILE} in this run directory")
        return candidate
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or directory")
    return path


def _mean(values: Iterable[float]) -> Optional[float]:
    values = list(values)
    return sum(values) / len(values) if values else None


def _per_step(items: Sequence[_Completion], totals: Sequence[int]) -> list[dict[str, Any]]:
    by_step: dict[int, list[int]] = {}
    for item, total in zip(items, totals):
        by_step.setdefault(item.step, []).append(total)
    return [
        {"step": step, "n": len(counts), "reflection_rate": sum(c > 0 for c in counts) / len(counts),
         "mean_reflections": sum(counts) / len(counts)}
        for step, counts in sorted(by_step.items())
    ]


def _plot_rate(per_step: Sequence[dict[str, Any]], out_png: Path, title: str) -> Path:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from echoink.analysis.curves import ema

    steps = [row["step"] for row in per_step]
    figure = Figure(figsize=(13, 4.8))
    axes = figure.subplots(1, 2)
    for axis, key, label in (
        (axes[0], "reflection_rate", "Share of completions with >= 1 reflective expression"),
        (axes[1], "mean_reflections", "Reflective expressions per completion"),
    ):
        values = [row[key] for row in per_step]
        if len(values) > 10:
            axis.plot(steps, values, color="tab:orange", linewidth=0.8, alpha=0.35, label="per step")
            axis.plot(steps, ema(values), color="tab:orange", linewidth=2.2, label="smoothed (EMA)")
            axis.legend(loc="best", fontsize=8, frameon=False)
        else:
            axis.plot(steps, values, color="tab:orange", linewidth=1.6, marker="o", markersize=4)
        axis.set_title(label, fontsize=11)
        axis.set_xlabel("step")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(True, alpha=0.3)
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("share")
    axes[1].set_ylabel("count")
    figure.suptitle(title, fontsize=13)
    figure.tight_layout(rect=(0, 0, 1, 0.94))
    return save_figure_atomic(figure, out_png)


def _highlight(text: str, compiled: ReflectionPatterns, limit: int = 1500) -> str:
    if len(text) > limit:
        text = text[:limit] + " [...]"
    text = compiled.regex.sub(lambda m: f"**{m.group(0)}**", text.strip())
    return "\n".join("> " + line for line in text.splitlines()) or "> (empty)"


def _where(item: _Completion) -> str:
    parts = [f"problem `{item.problem_id}`"]
    if item.step is not None:
        parts.append(f"step {item.step}")
    if item.sample_idx is not None:
        parts.append(f"sample {item.sample_idx}")
    return ", ".join(parts)


def _examples_markdown(
    source: Path, items: Sequence[_Completion], totals: Sequence[int], revisions: dict[int, Revision],
    compiled: ReflectionPatterns, per_section: int = 5,
) -> str:
    lines = [f"# Reflective reasoning examples: `{source}`", ""]
    for outcome, heading in (("fixed", "Revisions that fixed the answer"), ("broke", "Revisions that broke it"),
                             ("changed", "Other revisions")):
        chosen = [i for i, revision in revisions.items() if revision.outcome == outcome][:per_section]
        lines += [f"## {heading} ({sum(r.outcome == outcome for r in revisions.values())} in all)", ""]
        if not chosen:
            lines += ["(none)", ""]
        for index in chosen:
            revision, item = revisions[index], items[index]
            lines += [f"### {_where(item)}: {' -> '.join(revision.stated_answers)}, final "
                      f"{revision.final_answer} (ground truth {revision.gt or 'unknown'})", "",
                      _highlight(extract_think(item.text), compiled), ""]
    ranked = sorted((i for i in range(len(items)) if totals[i] > 0), key=lambda i: (-totals[i], i))[:per_section]
    lines += ["## Most reflective completions", ""]
    if not ranked:
        lines += ["(none)", ""]
    for index in ranked:
        item = items[index]
        verdict = "unknown" if item.correct is None else "correct" if item.correct else "wrong"
        lines += [f"### {_where(item)}: {totals[index]} reflective expressions, {verdict}", "",
                  _highlight(extract_think(item.text), compiled), ""]
    return "\n".join(lines)


def mine_aha(
    path: Union[str, Path], out_dir: Union[str, Path], patterns: Union[None, Sequence[str], ReflectionPatterns] = None
) -> dict[str, Any]:
    """Mine a run directory (its ``completions.jsonl``) or a predictions file for reflection and revisions.

    Writes ``out_dir/aha_report.json``, ``out_dir/aha_examples.md`` and, for a run, ``out_dir/aha_rate.png``
    (all atomically) and returns the report:

    * ``source``, ``kind`` ("run" | "predictions"), ``n_completions``, ``expressions`` (the phrase list used);
    * ``expression_counts``: ``{phrase: {"count": total occurrences, "completions": completions containing it}}``,
      most frequent first, phrases that never occur left out;
    * ``reflection_rate`` (share of completions with >= 1 phrase), ``mean_reflections``;
    * ``accuracy_with_reflection`` / ``accuracy_without_reflection`` (None when correctness is unknown; for a
      run, correctness is the training accuracy reward against the row's ``solution`` or ``gt``, scored by the
      row's ``problem_type``, multiple choice for rows written before runs recorded it);
    * ``per_step``: ``[{step, n, reflection_rate, mean_reflections}]`` (empty for predictions);
    * ``revisions``: ``{"n_with_stated_answer", "n", "fixed", "broke", "changed", "records": [...]}``, a record
      per revision with its problem_id, step, sample_idx, source_line and :class:`Revision` fields;
    * ``outputs``: the paths written.
    """
    source = _input_file(Path(path))
    out_dir = Path(out_dir)
    compiled = _as_patterns(patterns)
    kind, items = _read_completions(source)

    totals: list[int] = []
    expression_totals = dict.fromkeys(compiled.expressions, 0)
    expression_completions = dict.fromkeys(compiled.expressions, 0)
    revisions: dict[int, Revision] = {}
    n_with_stated = 0
    for index, item in enumerate(items):
        think = extract_think(item.text)
        counts = count_reflections(think, compiled)
        totals.append(sum(counts.values()))
        for expression, count in counts.items():
            expression_totals[expression] += count
            expression_completions[expression] += count > 0
        if stated_answers(think):
            n_with_stated += 1
        revision = find_revisions(item.text, item.gt)
        if revision is not None:
            revisions[index] = revision

    reflective = [item.correct for item, total in zip(items, totals) if total > 0 and item.correct is not None]
    plain = [item.correct for item, total in zip(items, totals) if total == 0 and item.correct is not None]
    ordered = sorted((e for e in compiled.expressions if expression_totals[e]), key=lambda e: -expression_totals[e])
    report: dict[str, Any] = {
        "source": str(source),
        "kind": kind,
        "n_completions": len(items),
        "expressions": list(compiled.expressions),
        "expression_counts": {e: {"count": expression_totals[e], "completions": expression_completions[e]}
                              for e in ordered},
        "reflection_rate": sum(total > 0 for total in totals) / len(items),
        "mean_reflections": sum(totals) / len(items),
        "accuracy_with_reflection": _mean(reflective),
        "accuracy_without_reflection": _mean(plain),
        "per_step": _per_step(items, totals) if kind == "run" else [],
        "revisions": {
            "n_with_stated_answer": n_with_stated,
            "n": len(revisions),
            **{outcome: sum(r.outcome == outcome for r in revisions.values()) for outcome in ("fixed", "broke", "changed")},
            "records": [
                {"problem_id": items[i].problem_id, "step": items[i].step, "sample_idx": items[i].sample_idx,
                 "source_line": items[i].source_line, **asdict(revision)}
                for i, revision in revisions.items()
            ],
        },
    }

    outputs = {"report": str(out_dir / REPORT_FILE), "examples": str(out_dir / EXAMPLES_FILE), "rate_png": None}
    if kind == "run":
        outputs["rate_png"] = str(_plot_rate(report["per_step"], out_dir / RATE_PNG,
                                             f"Reflective reasoning during training: {source.parent.name}"))
    write_text_atomic(out_dir / EXAMPLES_FILE, _examples_markdown(source, items, totals, revisions, compiled))
    report["outputs"] = outputs
    write_json_atomic(out_dir / REPORT_FILE, report)
    return report
