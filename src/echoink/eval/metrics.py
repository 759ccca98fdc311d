"""Evaluation metrics over prediction rows: accuracy with confidence intervals, pass@k, majority vote, paired tests.

A prediction row (one line of ``predictions.jsonl``) is a dict with

    problem_id    any JSON scalar; rows of one problem share it (compared as ``str(problem_id)``)
    sample_idx    int, 0..K-1 when each problem is answered K times (default 0)
    correct       bool, the grader's verdict (``rewards.extract_answer`` + comparison with ``gt``)
    gt, pred      ground-truth letter and parsed answer (``pred`` is None when the reply could not be parsed)
    reply         the model's full reply (used for the format rate)
    data_type     optional, e.g. "image_audio", for the per-type breakdown
    needs         optional, str or list of str (e.g. ["audio", "visual"]), for the per-needs breakdown
    reply_tokens  optional int, generated tokens
    problem_type  optional (default "multiple choice"), for the per-type measures
    score         optional float in [0, 1] (default: ``correct`` as 0/1), the graded types' score

Everything here is a pure function of lists and numbers except :func:`load_predictions`, which reads a file.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

import numpy as np

from echoink.io import JsonlError, iter_jsonl
from echoink.problem_types import MULTIPLE_CHOICE, PROBLEM_TYPES
from echoink.rewards import format_reward

Row = dict[str, Any]


# ---- intervals and tests ------------------------------------------------------------------------


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``k / n``.

    ``p = k/n``, ``z`` = the two-sided normal quantile of ``confidence``::

        centre = (p + z^2 / (2n)) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))

    Returns ``(centre - half, centre + half)`` clipped to [0, 1]; ``(0.0, 1.0)`` when ``n == 0`` (no information).
    """
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n == 0:
        return (0.0, 1.0)
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2.0)
    p = k / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2.0 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n))
    lo = 0.0 if k == 0 else max(0.0, centre - half)  # exact bounds at the edges (no 1e-17 rounding residue)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (lo, hi)


def bootstrap_mean_interval(values: Sequence[float] | np.ndarray, n_boot: int = 2000, seed: int = 0,
                            confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampled with replacement, ``n_boot`` draws).

    Memory stays bounded (draws are made in chunks). ``(nan, nan)`` for no values.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    boot = np.empty(n_boot)
    chunk = max(1, 2_000_000 // values.size)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        boot[start:stop] = values[rng.integers(0, values.size, size=(stop - start, values.size))].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(boot, [tail, 100 - tail])
    return (float(low), float(high))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar test: the p-value of ``b`` vs ``c`` discordant pairs under Binomial(b + c, 1/2).

    ``p = min(1, 2 * sum_{i <= min(b, c)} C(b + c, i) / 2^(b + c))``; 1.0 when there are no discordant pairs.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2.0 * tail / 2.0**n)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``n`` samples of which ``c`` are correct: ``1 - C(n-c, k) / C(n, k)``."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


# ---- rows ---------------------------------------------------------------------------------------


def load_predictions(path: Union[str, Path]) -> list[Row]:
    """Read ``predictions.jsonl``; every row needs ``problem_id`` and ``correct``.

    Raises ``FileNotFoundError`` or ``JsonlError`` (a ValueError) naming ``file:line``.
    """
    rows: list[Row] = []
    for line_number, row in iter_jsonl(path):
        for key in ("problem_id", "correct"):
            if key not in row:
                raise JsonlError(f"{path}:{line_number}: prediction row has no {key!r} field")
        if not _is_verdict(row["correct"]):
            raise JsonlError(f"{path}:{line_number}: 'correct' must be true/false, got {row['correct']!r}")
        sample_idx = row.get("sample_idx", 0)
        if not isinstance(sample_idx, int) or isinstance(sample_idx, bool) or sample_idx < 0:
            raise JsonlError(f"{path}:{line_number}: 'sample_idx' must be a whole number >= 0, got {sample_idx!r}")
        rows.append(row)
    return rows


def _is_verdict(value: Any) -> bool:
    """True/False, or the integers 0/1 that some writers use for them."""
    return isinstance(value, bool) or (isinstance(value, int) and value in (0, 1))


def _check_rows(rows: Sequence[Row]) -> None:
    if not rows:
        raise ValueError("no prediction rows")
    seen: set[tuple[str, int]] = set()
    for index, row in enumerate(rows):
        for key in ("problem_id", "correct"):
            if key not in row:
                raise ValueError(f"prediction row {index} has no {key!r} field")
        if not _is_verdict(row["correct"]):
            raise ValueError(f"prediction row {index}: 'correct' must be a bool, got {row['correct']!r}")
        key_pair = (str(row["problem_id"]), int(row.get("sample_idx", 0)))
        if key_pair in seen:
            raise ValueError(f"prediction row {index}: duplicate (problem_id, sample_idx) = {key_pair}")
        seen.add(key_pair)


def _by_problem(rows: Iterable[Row]) -> dict[str, list[Row]]:
    """``str(problem_id)`` -> that problem's rows sorted by ``sample_idx``."""
    problems: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        problems[str(row["problem_id"])].append(row)
    for samples in problems.values():
        samples.sort(key=lambda row: int(row.get("sample_idx", 0)))
    return dict(problems)


def _accuracy_block(rows: Sequence[Row]) -> dict[str, float]:
    k = sum(bool(row["correct"]) for row in rows)
    lo, hi = wilson_interval(k, len(rows))
    return {"n": len(rows), "accuracy": k / len(rows), "ci_low": lo, "ci_high": hi}


def _needs_key(needs: Any) -> str:
    if isinstance(needs, (list, tuple)):
        return "+".join(sorted(str(item) for item in needs)) or "none"
    return str(needs)


def _breakdown(rows: Sequence[Row], key_of) -> dict[str, dict[str, float]]:
    groups: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        key = key_of(row)
        if key is not None:
            groups[key].append(row)
    return {key: _accuracy_block(groups[key]) for key in sorted(groups)}


def _problem_type(row: Row) -> str:
    return str(row.get("problem_type") or MULTIPLE_CHOICE)


def _row_score(row: Row) -> float:
    score = row.get("score")
    return float(score) if isinstance(score, (int, float)) and not isinstance(score, bool) else float(bool(row["correct"]))


def type_measure(problem_type: str, rows: Sequence[Row], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """One problem type's measure over its rows.

    Binary types (multiple choice, numerical, counting, binary user types; an unregistered type whose
    scores are all 0 or 1): ``measure`` "accuracy", ``value`` = share correct, 95% Wilson interval.
    Graded types (regression, OCR, free-form, temporal retrieval, ...): ``measure`` "mean score",
    ``value`` = mean ``score``, 95% percentile bootstrap interval over rows (``n_boot``, ``seed``).
    Also ``n`` and ``unparsed_rate`` (share of rows whose ``pred`` is None).
    """
    scores = [_row_score(row) for row in rows]
    kind = PROBLEM_TYPES.get(problem_type)
    binary = kind.binary if kind is not None else all(value in (0.0, 1.0) for value in scores)
    block: dict[str, Any] = {"n": len(rows), "unparsed_rate": sum(row.get("pred") is None for row in rows) / len(rows)}
    if binary:
        correct = sum(bool(row["correct"]) for row in rows)
        low, high = wilson_interval(correct, len(rows))
        block.update(measure="accuracy", value=correct / len(rows), ci_low=low, ci_high=high)
    else:
        low, high = bootstrap_mean_interval(scores, n_boot=n_boot, seed=seed)
        block.update(measure="mean score", value=statistics.fmean(scores), ci_low=low, ci_high=high)
    return block


def _type_breakdown(rows: Sequence[Row], key_of) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        groups[key_of(row)].append(row)
    return {key: type_measure(_problem_type(groups[key][0]), groups[key]) for key in sorted(groups)}


def majority_vote_correct(samples: Sequence[Row]) -> bool:
    """Whether the plurality answer of one problem's samples is correct.

    Votes are the parsed ``pred`` values (unparsed replies do not vote). A tie between answers is broken in
    favour of the tied answer whose first vote has the lowest ``sample_idx`` (deterministic, and equal to the
    first sample's answer when all answers differ). The voted answer is correct when a row carrying it is
    marked ``correct``. No parsed answer at all counts as wrong.
    """
    ordered = sorted(samples, key=lambda row: int(row.get("sample_idx", 0)))
    votes = Counter(row.get("pred") for row in ordered if row.get("pred") is not None)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(row["pred"] for row in ordered if row.get("pred") is not None and votes[row["pred"]] == top)
    return any(bool(row["correct"]) for row in ordered if row.get("pred") == winner)


def headline_summary(rows: Sequence[Row]) -> dict[str, Any]:
    """The headline numbers of prediction rows: what `echoink eval` prints and returns, what the trainer logs as
    `eval/*`, and the head of :func:`accuracy_summary` (one definition for all of them).

    * ``n`` rows, ``n_problems``, ``samples_per_problem`` (largest K), ``accuracy`` over all rows with its 95%
      Wilson interval ``ci_low``/``ci_high`` (rows treated as independent).
    * ``unparsed_rate``: share of rows with ``pred`` None; ``format_rate``: mean of ``rewards.format_reward``
      over the rows' ``reply`` (rows without a reply are left out); ``truncated_rate``: share of rows whose
      reply hit max_new_tokens (rows that record ``truncated``); ``mean_reply_tokens``.
    * ``by_data_type``: ``{data_type: {n, accuracy, ci_low, ci_high}}`` (rows without the field left out);
      ``by_problem_type``: each type with its own measure (:func:`type_measure`).

    Rates and the accuracy are None when no row has what they measure (no rows at all: n = 0).
    """
    def rate(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    problems = _by_problem(rows)
    correct = sum(bool(row["correct"]) for row in rows)
    low, high = wilson_interval(correct, len(rows))
    replies = [row["reply"] for row in rows if isinstance(row.get("reply"), str)]
    return {
        "n": len(rows),
        "n_problems": len(problems),
        "samples_per_problem": max((len(samples) for samples in problems.values()), default=0),
        "accuracy": correct / len(rows) if rows else None,
        "ci_low": low,
        "ci_high": high,
        "unparsed_rate": rate([float(row.get("pred") is None) for row in rows]),
        "format_rate": rate(format_reward(replies)),
        "truncated_rate": rate([float(row["truncated"]) for row in rows if isinstance(row.get("truncated"), bool)]),
        "mean_reply_tokens": rate([row["reply_tokens"] for row in rows
                                   if isinstance(row.get("reply_tokens"), (int, float))]),
        "by_data_type": _breakdown(rows, lambda row: None if row.get("data_type") is None else str(row["data_type"])),
        "by_problem_type": _type_breakdown(rows, _problem_type),
    }


def accuracy_summary(rows: Sequence[Row]) -> dict[str, Any]:
    """Accuracy and friends for one prediction file (`echoink metrics`).

    Returns a JSON-serialisable dict: :func:`headline_summary`'s keys (its interval treats rows as independent:
    with K > 1 samples per problem it is optimistic; ``accuracy_std`` below is then the honest spread across
    repeated runs), and

    * ``by_needs``: ``{key: {n, accuracy, ci_low, ci_high}}``; ``needs`` lists are keyed by their sorted items
      joined with "+"; rows without the field are left out.
    * ``by_problem_type_data_type`` (keys "TYPE × DATA_TYPE"): each type with its own measure
      (:func:`type_measure`): accuracy with a Wilson interval for binary types, mean score with a bootstrap
      interval for graded ones; each with its ``unparsed_rate``.
    * ``per_sample_accuracy``: accuracy of sample index 0, 1, ..., K-1 (list, by index);
      ``accuracy_mean`` / ``accuracy_std``: mean and sample standard deviation of that list (std 0 when K = 1).
    * ``majority_vote_accuracy`` (see :func:`majority_vote_correct`).
    * ``pass_at_k``: ``{"pass@k": value}`` for k = 1 .. (fewest samples any problem has), the unbiased
      estimator averaged over problems.
    """
    _check_rows(rows)
    problems = _by_problem(rows)
    summary = headline_summary(rows)
    summary["by_needs"] = _breakdown(rows, lambda row: None if row.get("needs") is None else _needs_key(row["needs"]))
    summary["by_problem_type_data_type"] = _type_breakdown(
        rows, lambda row: f"{_problem_type(row)} × {row.get('data_type', '-')}")

    by_index: dict[int, list[bool]] = defaultdict(list)
    for row in rows:
        by_index[int(row.get("sample_idx", 0))].append(bool(row["correct"]))
    per_sample = [sum(by_index[i]) / len(by_index[i]) for i in sorted(by_index)]
    summary["per_sample_accuracy"] = per_sample
    summary["accuracy_mean"] = statistics.fmean(per_sample)
    summary["accuracy_std"] = statistics.stdev(per_sample) if len(per_sample) > 1 else 0.0

    summary["majority_vote_accuracy"] = sum(majority_vote_correct(s) for s in problems.values()) / len(problems)
    fewest = min(len(samples) for samples in problems.values())
    summary["pass_at_k"] = {
        f"pass@{k}": statistics.fmean(
            pass_at_k(len(samples), sum(bool(row["correct"]) for row in samples), k) for samples in problems.values()
        )
        for k in range(1, fewest + 1)
    }
    return summary


def paired_comparison(
    rows_a: Sequence[Row], rows_b: Sequence[Row], n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Compare two prediction sets on the problems they share.

    Each shared problem gets a score per system: the mean of ``correct`` over its samples (with one sample per
    problem, simply whether sample 0 is correct). Then

    * ``wins`` / ``losses`` / ``ties``: problems where A's score is above / below / equal to B's;
    * ``mcnemar_p``: :func:`mcnemar_exact` on (wins, losses): the exact McNemar test for one sample per problem,
      a sign test on per-problem scores otherwise;
    * ``accuracy_a``, ``accuracy_b``, ``difference`` (A - B) on the shared problems, and ``ci_low``/``ci_high``:
      a 95% percentile bootstrap interval of the difference, resampling problems (``n_boot`` draws, ``seed``);
    * ``n_shared``, ``only_a``, ``only_b``: problem counts.
    """
    _check_rows(rows_a)
    _check_rows(rows_b)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    problems_a, problems_b = _by_problem(rows_a), _by_problem(rows_b)
    shared = sorted(set(problems_a) & set(problems_b))
    if not shared:
        raise ValueError("the two prediction sets share no problem_id")

    def score(samples: list[Row]) -> float:
        return sum(bool(row["correct"]) for row in samples) / len(samples)

    scores_a = np.array([score(problems_a[p]) for p in shared])
    scores_b = np.array([score(problems_b[p]) for p in shared])
    differences = scores_a - scores_b
    wins, losses = int((differences > 0).sum()), int((differences < 0).sum())

    ci_low, ci_high = bootstrap_mean_interval(differences, n_boot=n_boot, seed=seed)

    return {
        "n_shared": len(shared),
        "only_a": len(set(problems_a) - set(problems_b)),
        "only_b": len(set(problems_b) - set(problems_a)),
        "accuracy_a": float(scores_a.mean()),
        "accuracy_b": float(scores_b.mean()),
        "difference": float(differences.mean()),
        "ci_low": float(ci_low),
        "ci_high": float(ci_high),
        "wins": wins,
        "losses": losses,
        "ties": len(shared) - wins - losses,
        "mcnemar_p": mcnemar_exact(wins, losses),
    }

