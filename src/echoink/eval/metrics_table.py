"""`echoink metrics` as tables that read at 80 columns: one row per measure, one column per file.

A file is named by a short label ``[1]``, ``[2]`` ... in the column header and listed in full once, above
its table (:func:`file_legend`), so a long path never squeezes the numbers. Files are shown
`FILES_PER_TABLE` to a table: with more files, several tables follow each other. A proportion and its
interval take two rows ("55.0", then "[45.2, 64.4]"), so a value is at most 14 characters and a measure at
most 22: a table of three files is at most 77 characters wide (a longer group name wraps, it is never cut).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

from rich.table import Table

FILES_PER_TABLE = 3


def percent_ci(value: float, low: float, high: float) -> str:
    """``55.0 [45.2, 64.4]``: a proportion and its interval, in percent."""
    return f"{100 * value:.1f} {_interval(low, high)}"


def _interval(low: float, high: float) -> str:
    return f"[{100 * low:.1f}, {100 * high:.1f}]"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def summary_measures(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The main table's rows for one file's `accuracy_summary`: (measure, formatted value)."""
    k = summary["samples_per_problem"]
    passes = summary["pass_at_k"]
    pass_k = passes.get(f"pass@{len(passes)}")
    return [
        ("rows (answers)", str(summary["n"])),
        ("problems", str(summary["n_problems"])),
        ("accuracy", _percent(summary["accuracy"])),
        ("  95% Wilson CI", _interval(summary["ci_low"], summary["ci_high"])),
        ("samples/problem K", str(k)),
        ("mean±std over samples", f"{100 * summary['accuracy_mean']:.1f}±{100 * summary['accuracy_std']:.1f}"),
        ("majority vote", _percent(summary["majority_vote_accuracy"])),
        (f"pass@k (k={len(passes)})", _percent(pass_k)),
        ("unparsed", _percent(summary["unparsed_rate"])),
        ("format", _percent(summary["format_rate"])),
        ("reply tokens (mean)", "-" if summary["mean_reply_tokens"] is None else f"{summary['mean_reply_tokens']:.0f}"),
    ]


def breakdown_measures(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """Three rows per group of the per-type and per-needs breakdowns: ``type image_audio`` (accuracy), its
    interval and its number of rows."""
    rows = []
    for by, short in (("data_type", "type"), ("needs", "needs")):
        for group, block in summary[f"by_{by}"].items():
            rows += [(f"{short} {group}", _percent(block["accuracy"])),
                     (f"{short} {group}: CI", _interval(block["ci_low"], block["ci_high"])),
                     (f"{short} {group}: n", str(block["n"]))]
    return rows


def problem_type_measures(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """Four rows per problem type (and per type x data type): its own measure (accuracy with a Wilson
    interval, or mean score with a bootstrap interval), the interval, n and the unparsed share."""
    rows = []
    for key in ("by_problem_type", "by_problem_type_data_type"):
        for group, block in summary.get(key, {}).items():
            rows += [(f"{group}: {block['measure']}", _percent(block["value"])),
                     (f"{group}: CI", _interval(block["ci_low"], block["ci_high"])),
                     (f"{group}: n", str(block["n"])),
                     (f"{group}: unparsed", _percent(block["unparsed_rate"]))]
    return rows


def comparison_measures(comparison: dict[str, Any]) -> list[tuple[str, str]]:
    """The paired-comparison rows for one file against the baseline."""
    c = comparison
    return [
        ("shared problems", str(c["n_shared"])),
        ("accuracy (this file)", _percent(c["accuracy_a"])),
        ("accuracy (baseline)", _percent(c["accuracy_b"])),
        ("difference, points", f"{100 * c['difference']:+.1f}"),
        ("  95% bootstrap CI", f"[{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}]"),
        ("wins/losses/ties", f"{c['wins']}/{c['losses']}/{c['ties']}"),
        ("McNemar p", f"{c['mcnemar_p']:.4g}"),
    ]


def file_labels(names: Sequence[str]) -> list[str]:
    return [f"[{i}]" for i in range(1, len(names) + 1)]


def file_legend(names: Sequence[str]) -> str:
    """``[1] /path/to/a.jsonl`` lines: what each column label stands for."""
    return "\n".join(f"{label} {name}" for label, name in zip(file_labels(names), names))


def measure_tables(title: str, per_file: dict[str, list[tuple[str, str]]]) -> Iterator[Table]:
    """Tables with one row per measure and one column per file (`FILES_PER_TABLE` files each).

    `per_file` maps a file name to its (measure, value) rows; a measure missing for a file shows "-". The
    measures are listed in first-seen order across the files.
    """
    names = list(per_file)
    labels = file_labels(names)
    measures: list[str] = []
    for rows in per_file.values():
        measures.extend(m for m, _ in rows if m not in measures)
    for start in range(0, len(names), FILES_PER_TABLE):
        chunk = list(range(start, min(len(names), start + FILES_PER_TABLE)))
        part = f" ({start // FILES_PER_TABLE + 1}/{-(-len(names) // FILES_PER_TABLE)})" \
            if len(names) > FILES_PER_TABLE else ""
        table = Table(title=title + part, title_justify="left")
        table.add_column("measure", overflow="fold", max_width=22)
        for i in chunk:
            table.add_column(labels[i], justify="right", no_wrap=True)
        values = [dict(per_file[names[i]]) for i in chunk]
        for measure in measures:
            if any(measure in v for v in values):
                table.add_row(measure, *(v.get(measure, "-") for v in values))
        yield table
