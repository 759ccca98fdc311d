"""`echoink metrics` as group x (n, %, interval) tables, and `echoink eval`'s summary, at 80 columns (issue 22,
item 12)."""

from __future__ import annotations

import json
import re

from typer.testing import CliRunner

from echoink.cli import app
from echoink.eval.metrics import accuracy_summary, wilson_interval
from echoink.eval.metrics_table import eval_summary_lines


def _rows() -> list[dict]:
    """12 answers: 3 data types x 2 needs, two problem types (one graded)."""
    rows = []
    for i in range(12):
        data_type = ("image_audio", "video_audio", "audio")[i % 3]
        kind = "multiple choice" if i < 8 else "regression"
        rows.append({"problem_id": f"p{i}", "sample_idx": 0, "gt": "A", "pred": None if i == 5 else "A",
                     "correct": i % 2 == 0, "reply": "<think>x</think><answer>A</answer>", "data_type": data_type,
                     "needs": ["audio"] if i % 2 else ["audio", "visual"], "problem_type": kind,
                     **({"score": 0.25 * (i % 4)} if kind == "regression" else {})})
    return rows


def _table_rows(output: str, title: str) -> dict[str, list[str]]:
    """group -> its cells, from the table printed under `title`."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.rstrip() == title)
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("└"))
    cells = {}
    for line in lines[start + 1:end]:
        parts = [part.strip() for part in re.split(r"[│┃|]", line)[1:-1]]
        if parts and parts[0] and parts[0] != "group":
            cells[parts[0]] = parts[1:]
    return cells


def test_metrics_prints_group_tables_within_80_columns(tmp_path):
    path = tmp_path / "pred.jsonl"
    rows = _rows()
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = CliRunner().invoke(app, ["metrics", str(path)], terminal_width=80)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines[1:]) <= 80  # the first line names the file in full
    assert len(lines) < 75  # 105 lines for this file with a measure per row and 3 rows per group

    by_type = _table_rows(result.output, "by data type")
    image_audio = [row for row in rows if row["data_type"] == "image_audio"]
    correct = sum(row["correct"] for row in image_audio)
    low, high = wilson_interval(correct, len(image_audio))
    assert by_type["image_audio"] == [str(len(image_audio)), f"{100 * correct / len(image_audio):.1f}",
                                      f"[{100 * low:.1f}, {100 * high:.1f}]"]
    assert set(_table_rows(result.output, "by needs")) == {"audio", "audio+visual"}
    problem_types = _table_rows(result.output, "by problem type")
    summary = accuracy_summary(rows)["by_problem_type"]
    assert problem_types["multiple choice"][:2] == ["8", f"{100 * summary['multiple choice']['value']:.1f}"]
    assert problem_types["regression (mean score)"][0] == "4"
    assert problem_types["multiple choice"][3] == f"{100 * summary['multiple choice']['unparsed_rate']:.1f}"


def test_metrics_labels_each_files_group_tables(tmp_path):
    paths = []
    for name in ("a", "b"):
        paths.append(tmp_path / f"{name}.jsonl")
        paths[-1].write_text("".join(json.dumps(row) + "\n" for row in _rows()))
    result = CliRunner().invoke(app, ["metrics", *map(str, paths)], terminal_width=80)
    assert result.exit_code == 0, result.output
    assert "[1] by data type" in result.output and "[2] by data type" in result.output


def test_eval_summary_fits_80_columns():
    rows = _rows()
    for row in rows[8:]:
        row["problem_type"] = "a user problem type with a rather long descriptive name"
    summary = {**accuracy_summary(rows), "truncated_rate": 0.0}
    lines = eval_summary_lines(summary, "ours")
    assert all(len(line) <= 80 for line in lines), lines
    assert lines[0].startswith(f"accuracy {100 * summary['accuracy']:.1f} % [")
    assert any("a user problem type with a rather long descriptive name" in line for line in lines)
    assert any(line.startswith("  multiple choice: accuracy ") for line in lines)
