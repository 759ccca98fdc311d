"""Every file echoink writes, every echoink reader reads back (issue 22, item 1).

Replies hold arbitrary Unicode, including the characters ``str.splitlines`` breaks lines at (U+0085, U+2028,
U+2029, form feed, ...) which JSON leaves raw inside strings, and metrics hold NaN and infinities, which the
writers store as ``null``. Through completions.jsonl, a predictions file and metrics.jsonl, then back through
`echoink report`, `echoink aha`, `echoink metrics`, eval resume and training resume: no row lost or changed.
"""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from echoink.analysis.aha import mine_aha
from echoink.analysis.curves import load_metrics
from echoink.analysis.report import write_report
from echoink.cli import app
from echoink.eval.metrics import load_predictions
from echoink.eval.run_files import open_run
from echoink.io import (append_jsonl, iter_jsonl, read_jsonl_tolerant, split_jsonl_lines, to_strict_json,
                        truncate_jsonl_after, write_json_atomic)

#: The characters other than "\n" that str.splitlines() takes for line ends, and a few that HTML treats specially.
LINE_BREAKERS = ["\u0085", "\u2028", "\u2029", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\r", "\r\n", "\n"]
HTML_SPECIAL = ["</pre>", "<script>alert(1)</script>", "&amp;", '"', "'", "<!--", "]]>", "{{ x }}", "{% raw %}"]
replies = st.lists(st.one_of(st.text(max_size=40), st.sampled_from(LINE_BREAKERS + HTML_SPECIAL)),
                   max_size=8).map("".join)
any_float = st.floats(allow_nan=True, allow_infinity=True)
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow])


def _null_for_non_finite(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


class _PreTexts(HTMLParser):
    """The text of every <pre> element of a page (entities decoded), in page order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.texts: list[str] = []
        self._inside = False

    def handle_starttag(self, tag, attrs):
        if tag == "pre":
            self._inside = True
            self.texts.append("")

    def handle_endtag(self, tag):
        if tag == "pre":
            self._inside = False

    def handle_data(self, data):
        if self._inside:
            self.texts[-1] += data


def _pre_texts(page: str) -> list[str]:
    parser = _PreTexts()
    parser.feed(page)
    # HTML drops one newline right after <pre>: the page writes one there so that a reply's own leading
    # newline survives in a browser
    return [text[1:] if text.startswith("\n") else text for text in parser.texts]


def _as_html_shows(text: str) -> str:
    """HTML reads every line end ("\r\n", "\r") as "\n"."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def test_split_jsonl_lines_splits_at_newline_only():
    text = "".join(json.dumps({"reply": c}, ensure_ascii=False) + "\n" for c in LINE_BREAKERS)
    lines = split_jsonl_lines(text)
    assert [json.loads(line)["reply"] for line in lines] == LINE_BREAKERS
    assert split_jsonl_lines("") == [] and split_jsonl_lines("a\nb") == ["a", "b"]


def test_strict_json_writes_null_for_nan_and_infinity(tmp_path):
    value = {"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5], "c": {"d": (float("nan"),)}}
    assert to_strict_json(value) == '{"a": null, "b": [null, null, 1.5], "c": {"d": [null]}}'
    write_json_atomic(tmp_path / "x.json", value)
    append_jsonl(tmp_path / "x.jsonl", [value])
    for name in ("x.json", "x.jsonl"):
        text = (tmp_path / name).read_text(encoding="utf-8")
        assert "NaN" not in text and "Infinity" not in text
        json.loads(text, parse_constant=lambda word: pytest.fail(f"{name} holds {word}"))


def _write_run(run_dir: Path, texts: list[str], numbers: list[float]) -> tuple[list[dict], list[dict]]:
    """completions.jsonl (one step per text) and metrics.jsonl as the trainer appends them; returns the rows
    written and the metrics rows as stored (non-finite numbers as None)."""
    completions = [{"step": step, "problem_id": f"p{step}", "sample_idx": 0, "solution": "<answer>A</answer>",
                    "completion": text, "rewards": {"accuracy": 0.0, "format": 1.0}, "advantage": 0.0,
                    "truncated": False, "trained": True, "length": len(text)}
                   for step, text in enumerate(texts, start=1)]
    metrics = [{"step": step, "reward": numbers[step - 1], "kl": numbers[-step], "eval/accuracy": numbers[step - 1],
                "note": text} for step, text in enumerate(texts, start=1)]
    for row in completions:  # the trainer appends one step at a time
        append_jsonl(run_dir / "completions.jsonl", [row])
    for row in metrics:
        append_jsonl(run_dir / "metrics.jsonl", [row])
    return completions, [{key: _null_for_non_finite(value) for key, value in row.items()} for row in metrics]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(replies, min_size=1, max_size=6), numbers=st.lists(any_float, min_size=6, max_size=6),
       resume_step=st.integers(min_value=0, max_value=6))
def test_training_files_read_back_and_resume(tmp_path_factory, texts, numbers, resume_step):
    """completions.jsonl and metrics.jsonl -> the readers, plot's reader, and a training resume's truncation."""
    run_dir = tmp_path_factory.mktemp("run")
    completions, stored_metrics = _write_run(run_dir, texts, numbers)
    assert _rows(run_dir / "completions.jsonl") == completions
    assert read_jsonl_tolerant(run_dir / "metrics.jsonl") == (stored_metrics, None)
    assert load_metrics(run_dir) == stored_metrics

    # a resumed run drops the steps after its checkpoint and keeps every earlier row byte for byte
    before = {name: (run_dir / name).read_bytes() for name in ("completions.jsonl", "metrics.jsonl")}
    assert truncate_jsonl_after(run_dir / "completions.jsonl", len(texts)) == 0
    assert truncate_jsonl_after(run_dir / "completions.jsonl", resume_step) == max(0, len(texts) - resume_step)
    assert truncate_jsonl_after(run_dir / "metrics.jsonl", resume_step) == max(0, len(texts) - resume_step)
    assert _rows(run_dir / "completions.jsonl") == completions[:resume_step]
    assert _rows(run_dir / "metrics.jsonl") == stored_metrics[:resume_step]
    for name, data in before.items():
        assert data.startswith((run_dir / name).read_bytes())


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                HealthCheck.too_slow])
@given(texts=st.lists(replies, min_size=1, max_size=6), numbers=st.lists(any_float, min_size=6, max_size=6))
def test_training_files_through_report_and_aha(tmp_path_factory, texts, numbers):
    """The same files -> `echoink aha` (every completion counted) and `echoink report` (every step's reply shown
    as written). Fewer examples: each draws two figures."""
    run_dir = tmp_path_factory.mktemp("run")
    completions, _ = _write_run(run_dir, texts, numbers)
    report = mine_aha(run_dir, tmp_path_factory.mktemp("aha"))
    assert report["n_completions"] == len(completions)
    assert [entry["n"] for entry in report["per_step"]] == [1] * len(completions)
    assert json.loads((Path(report["outputs"]["report"])).read_text(encoding="utf-8"))["n_completions"] == len(texts)

    result = write_report(run_dir, out=run_dir / "report.html", media=False)
    assert result.steps_shown == list(range(1, len(texts) + 1))
    assert _pre_texts((run_dir / "report.html").read_text(encoding="utf-8")) == [_as_html_shows(t) for t in texts]


@SETTINGS
@given(texts=st.lists(replies, min_size=1, max_size=6), preds=st.lists(st.one_of(st.none(), replies),
                                                                       min_size=6, max_size=6))
def test_predictions_read_back(tmp_path_factory, texts, preds):
    """A predictions file -> eval resume, `echoink metrics`, `echoink aha`, `echoink report`."""
    root = tmp_path_factory.mktemp("pred")
    path = root / "predictions.jsonl"
    signature = {"model": "m", "data": None, "protocol": "ours"}
    assert open_run(path, signature) == []  # a new run: the signature is written, no rows yet
    rows = [{"problem_id": f"q{i}", "sample_idx": 0, "gt": "A", "pred": preds[i], "correct": preds[i] == "A",
             "reply": text, "data_type": text[:5]} for i, text in enumerate(texts)]
    append_jsonl(path, rows[: len(rows) // 2])
    append_jsonl(path, rows[len(rows) // 2:])

    assert open_run(path, signature) == rows  # eval resumes with every row, none "damaged"
    assert load_predictions(path) == rows
    result = CliRunner().invoke(app, ["metrics", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["files"][str(path)]["n"] == len(rows)
    plain = CliRunner().invoke(app, ["metrics", str(path)])
    assert plain.exit_code == 0, plain.output

    report = mine_aha(path, root / "aha")
    assert report["n_completions"] == len(rows)

    run_dir = root / "run"
    run_dir.mkdir()
    write_report(run_dir, [path], out=root / "report.html", media=False)
    shown = _pre_texts((root / "report.html").read_text(encoding="utf-8"))
    assert sorted(shown) == sorted(_as_html_shows(text) for text in texts)


def _rows(path) -> list[dict]:
    return [row for _, row in iter_jsonl(path)]
