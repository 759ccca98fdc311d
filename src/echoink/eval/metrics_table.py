"""`echoink metrics` as tables that read at 80 columns: the main measures with one row per measure and one
column per file; each breakdown (data type, needs, problem type) as a group x (n, %, interval) table.

A file is named by a short label ``[1]``, ``[2]`` ... in the column header and listed in full once, above
its table (:func:`file_legend`), so a long path never squeezes the numbers. Files are shown
`FILES_PER_TABLE` to a table: with more files, several tables follow each other. A proportion and its
interval take two rows ("55.0", then "[45.2, 64.4]"), so a value is at most 14 characters and a measure at
most 22: a table of three files is at most 77 characters wide (a longer group name wraps, it is never cut).
"""

from __future__ import annotations

import math
import textwrap
from typing import Any, Iterator, Sequence

from rich.table import Table

FILES_PER_TABLE = 3


def _interval(low: float | None, high: float | None) -> str:
    if not _finite(low) or not _finite(high):
        return "-"
    return f"[{100 * low:.1f}, {100 * high:.1f}]"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _percent(value: float | None) -> str:
    return f"{100 * value:.1f}" if _finite(value) else "-"


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


#: The breakdowns of an `accuracy_summary` shown as group tables: (summary key, title).
BREAKDOWNS = (("by_data_type", "by data type"), ("by_needs", "by needs"), ("by_problem_type", "by problem type"),
              ("by_problem_type_data_type", "by problem type × data type"))


def group_tables(summaries: dict[str, dict[str, Any]]) -> Iterator[Table]:
    """One table per breakdown of each file's `accuracy_summary` (data type, needs, problem type, problem type
    x data type), one row per group: n, the measure (accuracy, or a graded type's mean score) in %, its 95%
    interval (Wilson for accuracy, bootstrap for a mean score) and, for problem types, the unparsed share.
    With several files each table's title starts with the file's label; empty breakdowns are left out.
    A group name wraps past 30 characters (it is never cut), so a table is at most 77 columns wide."""
    labels = file_labels(list(summaries))
    for key, title in BREAKDOWNS:
        for label, summary in zip(labels, summaries.values()):
            groups = summary.get(key) or {}
            if not groups:
                continue
            typed = key.startswith("by_problem_type")
            table = Table(title=(f"{label} " if len(summaries) > 1 else "") + title, title_justify="left")
            table.add_column("group", overflow="fold", max_width=30)
            table.add_column("n", justify="right", no_wrap=True)
            table.add_column("%", justify="right", no_wrap=True)
            table.add_column("95% interval", justify="right", no_wrap=True)
            if typed:
                table.add_column("unparsed", justify="right", no_wrap=True)
            for group, block in groups.items():
                value = block.get("value", block.get("accuracy"))
                cells = [str(group), str(block["n"]), _percent(value), _interval(block["ci_low"], block["ci_high"])]
                if typed:
                    measure = "" if block.get("measure", "accuracy") == "accuracy" else " (mean score)"
                    cells[0] += measure
                    cells.append(_percent(block.get("unparsed_rate")))
                table.add_row(*cells)
            yield table


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


def eval_summary_lines(summary: dict[str, Any], protocol: str, width: int = 80) -> list[str]:
    """What `echoink eval` prints when it finishes, as lines of at most `width` characters (a longer word, a
    path, is never cut): the accuracy with its interval, the rates, one line per problem type."""
    accuracy = summary.get("accuracy")
    headline = "-" if not _finite(accuracy) else f"{_percent(accuracy)} % {_interval(summary['ci_low'], summary['ci_high'])}"
    lines = [f"accuracy {headline} (95% Wilson), {summary['n']} answers to {summary['n_problems']} problems",
             f"protocol {protocol}; unparsed {_percent(summary.get('unparsed_rate') or 0)}%, "
             f"format {_percent(summary.get('format_rate') or 0)}%, truncated {_percent(summary.get('truncated_rate') or 0)}%"]
    for kind, block in (summary.get("by_problem_type") or {}).items():
        lines.append(f"  {kind}: {block['measure']} {_percent(block['value'])} % "
                     f"{_interval(block['ci_low'], block['ci_high'])}, n {block['n']}, "
                     f"unparsed {_percent(block['unparsed_rate'])}%")
    return [wrapped for line in lines
            for wrapped in textwrap.wrap(line, width, subsequent_indent="    ", break_long_words=False,
                                         break_on_hyphens=False)]


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
