"""The report escapes every value it takes from a run directory or a predictions file (issue 23, item 1).

Hostile strings go into every field of metrics.jsonl, completions.jsonl, a predictions file (and its run
signature), the saved config, and into the names of the run directory and the predictions file. The page,
parsed as HTML, must hold no <script> element, event-handler attribute or `javascript:` address but those the
same report holds for a harmless run of the same shape — a check that does not depend on the page's layout.
"""

from __future__ import annotations

import json
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest

from echoink.analysis.report import write_report
from echoink.data.synth import write_synthetic_dataset

# Hostile values: a script element, an attribute break-out with an event handler, a javascript: address, and
# an end tag that would close the report's own script or JSON block early.
HOSTILE = ['"><script>alert(1)</script><img src=x onerror=alert(2)>',
           "'><svg onload=alert(3)>",
           "</script><script>alert(4)</script>",
           "javascript:alert(5)",
           "<a href=\"javascript:alert(6)\">x</a>",
           "<td onmouseover=alert(9)>"]
# Names of files and directories cannot hold '/', so these have none.
HOSTILE_NAMES = ['"><svg onload=alert(7)>', "<script>alert(8)<"]


class _Active(HTMLParser):
    """Records what a browser would run: script elements, on* attributes, javascript: addresses."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.active: list[tuple[str, str]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self.active.append(("script", dict(attrs).get("type") or "text/javascript"))
        for name, value in attrs:
            if name.lower().startswith("on"):
                self.active.append((f"{tag}[{name}]", "handler"))
            if value and value.strip().lower().startswith("javascript:"):
                self.active.append((f"{tag}[{name}]", "javascript:"))

    handle_startendtag = handle_starttag

    def handle_data(self, data):
        self.text.append(data)


def _active(page: str) -> _Active:
    parser = _Active()
    parser.feed(page)
    parser.close()
    return parser


def _write_run(root: Path, name: str, pred_name: str, text: str, step, n, number) -> tuple[Path, Path]:
    """A run directory + predictions file with `text` in every string field.

    `step`, `n` and `number` go where training writes a step, a count and a number: hostile strings there too.
    """
    info = write_synthetic_dataset(root / "data", n_train=4, n_valid=4, seed=0)
    run_dir = root / name
    run_dir.mkdir()
    config = {"train_data": str(info["splits"]["train"]["json"]), "beta": 0.0, text: text, "model": text,
              "reward_funcs": [text, {text: text}], "learning_rate": number}
    (run_dir / "config.resolved.json").write_text(json.dumps(config))
    metrics = [{"step": 1, "reward": 0.5, "kl": 0.0, text: text},
               {"step": 2, "reward": number, "rewards/accuracy": number, "kl": number, text: 1.0},
               {"step": step, "reward": 0.2, "eval/accuracy": 0.5, "eval/ci_low": number, "eval/ci_high": 0.9,
                "eval/n": n, "eval/" + text: text},
               {"step": 3, "eval/accuracy": 0.25, "eval/ci_low": 0.1, "eval/ci_high": 0.6, "eval/n": n}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in metrics) + text)
    completions = []
    for step_value, pid in ((1, text), (2, "p1"), (3, "p2"), (step, "p3")):
        for i, completion in enumerate([f"<think>{text} wait, so B</think><answer>{text}</answer>",
                                        f"<think>{text}</think>{text}"]):
            completions.append({"step": step_value, "problem_id": pid, "sample_idx": text if i else i,
                                "solution": text, "completion": completion,
                                "rewards": {text: float(i), "format": number},
                                "advantage": number if i else 0.5, text: text})
    (run_dir / "completions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in completions))
    predictions = root / pred_name
    rows = [{"problem_id": text, "sample_idx": 0, "gt": text, "pred": text, "correct": False, "reply": text,
             "data_type": text, "needs": [text, "audio"], "problem_type": text, "score": number, text: text},
            {"problem_id": "p2", "sample_idx": 0, "gt": "A", "pred": None, "correct": True, "reply": text,
             "data_type": "image_audio", "needs": text}]
    predictions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    Path(str(predictions) + ".run.json").write_text(json.dumps({"data": text, text: text}))
    return run_dir, predictions


def _page(root: Path, *args) -> str:
    run_dir, predictions = _write_run(root, *args)
    out = root / "out.html"
    write_report(run_dir, [predictions], out)
    return out.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def harmless(tmp_path_factory):
    """What the report itself runs, for a harmless run of the same shape."""
    page = _page(tmp_path_factory.mktemp("harmless"), "run", "pred.jsonl", "plain text", 4, 6, 0.5)
    return Counter(_active(page).active)


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_strings_in_every_field_stay_text(text, tmp_path, harmless):
    page = _page(tmp_path, "run " + HOSTILE_NAMES[0], HOSTILE_NAMES[1] + ".jsonl", text, text, text, text)
    parsed = _active(page)
    assert Counter(parsed.active) == harmless
    assert "alert(" not in "".join(_script_bodies(page))
    # the values are shown as text, not dropped: the in-training step and answer count among them
    shown = "".join(parsed.text)
    assert text in shown and HOSTILE_NAMES[1] in shown and HOSTILE_NAMES[0] in shown


def _script_bodies(page: str) -> list[str]:
    """The text inside every <script> element, as a browser would hand it to the script engine."""

    class Bodies(HTMLParser):
        def __init__(self):
            super().__init__()
            self.inside, self.bodies = False, []

        def handle_starttag(self, tag, attrs):
            if tag == "script":
                self.inside = True
                self.bodies.append("")

        def handle_endtag(self, tag):
            if tag == "script":
                self.inside = False

        def handle_data(self, data):
            if self.inside:
                self.bodies[-1] += data

    parser = Bodies()
    parser.feed(page)
    return parser.bodies


def test_a_hostile_sample_index_in_predictions_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from echoink.cli import app

    run_dir, predictions = _write_run(tmp_path, "run", "pred.jsonl", "plain", 4, 6, 0.5)
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    rows[1]["sample_idx"] = HOSTILE[0]
    predictions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = CliRunner().invoke(app, ["report", str(run_dir), str(predictions), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{predictions}:2" in result.output.replace("\n", "") and "sample_idx" in result.output
