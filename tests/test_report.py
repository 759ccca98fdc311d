"""`echoink report`: one self-contained HTML page of a run (issue 16, item 4).

The page is checked as HTML here, and in a real headless browser (Debian's chromium) by the test marked
`browser` (`make test-browser` installs chromium and runs it; `make test` leaves it out)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from echoink.analysis.report import write_report
from echoink.cli import app
from echoink.data import load_dataset
from echoink.data.synth import write_synthetic_dataset
from echoink.eval.metrics import accuracy_summary, load_predictions
from echoink.eval.run_files import run_file_path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory as training writes it (metrics with a cut last line, completions, config) + predictions."""
    root = tmp_path_factory.mktemp("report")
    info = write_synthetic_dataset(root / "data", n_train=6, n_valid=6, seed=0)
    train_json, valid_json = Path(info["splits"]["train"]["json"]), Path(info["splits"]["valid"]["json"])
    run_dir = root / "run"
    run_dir.mkdir()
    (run_dir / "config.resolved.json").write_text(json.dumps({"train_data": str(train_json), "beta": 0.0,
                                                              "num_generations": 2}))
    metrics = [{"step": s, "reward": 0.2 * s, "rewards/accuracy": 0.1 * s, "rewards/format": 0.1 * s, "kl": 0.0,
                "completion_length": 20 + s, "reward_std": 0.3} for s in (1, 2, 3)]
    metrics[-1].update({"eval/accuracy": 0.5, "eval/ci_low": 0.2, "eval/ci_high": 0.8, "eval/n": 6})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics) + '{"step": 4, "rew')
    completions = []
    for step, record in zip((1, 2, 3), load_dataset(train_json)):
        texts = [f"<think>I see {record.answer}.</think><answer>{record.answer}</answer>",
                 "<think>Hmm, so the answer is B. Wait, let me check again: so A.</think><answer>A</answer>",
                 "<think>no idea</think>"]
        for i, text in enumerate(texts):
            correct = float(text.endswith(f"<answer>{record.answer}</answer>"))
            completions.append({"step": step, "problem_id": record.problem_id, "sample_idx": i,
                                "solution": record.solution, "completion": text,
                                "rewards": {"accuracy": correct, "format": float(text.endswith("</answer>"))},
                                "advantage": 0.5 - i * 0.5})
    (run_dir / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in completions))
    predictions = run_dir / "pred.jsonl"
    rows = [{"problem_id": r.problem_id, "sample_idx": 0, "gt": r.answer, "pred": "A", "correct": r.answer == "A",
             "reply": "<think>x</think><answer>A</answer>", "data_type": r.data_type, "needs": r.needs}
            for r in load_dataset(valid_json)]
    predictions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_file_path(predictions).write_text(json.dumps({"data": str(valid_json)}))
    return {"dir": run_dir, "predictions": predictions, "train": train_json}


class _Cells(HTMLParser):
    """Collects <td data-file data-measure> values, <img>/<audio> attributes and the media JSON block."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[tuple[str, str], str] = {}
        self.images: list[dict] = []
        self.audio: list[dict] = []
        self._cell: tuple[str, str] | None = None
        self._in_media = False
        self.media_json = ""
        self.body: dict = {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "td" and "data-measure" in attrs:
            self._cell = (attrs["data-file"], attrs["data-measure"])
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "audio":
            self.audio.append(attrs)
        elif tag == "script" and attrs.get("id") == "media":
            self._in_media = True
        elif tag == "body":
            self.body = attrs

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell = None
        if tag == "script":
            self._in_media = False

    def handle_data(self, data):
        if self._cell is not None:
            self.cells[self._cell] = self.cells.get(self._cell, "") + data
        if self._in_media:
            self.media_json += data


def _parse(html_text: str) -> _Cells:
    parser = _Cells()
    parser.feed(html_text)
    return parser


def _check_tables(cells: dict, predictions: Path) -> None:
    summary = accuracy_summary(load_predictions(predictions))
    assert cells[("[1]", "accuracy")] == f"{100 * summary['accuracy']:.1f}"
    assert cells[("[1]", "n")] == str(summary["n"])
    assert cells[("[1]", "ci")] == f"[{100 * summary['ci_low']:.1f}, {100 * summary['ci_high']:.1f}]"
    for group, block in summary["by_data_type"].items():
        assert cells[("[1]", f"data_type={group}")] == f"{100 * block['accuracy']:.1f}"
    assert cells[("training", "eval/accuracy@3")] == "50.0"


def test_report_page_is_self_contained_and_matches_the_metrics(run, tmp_path):
    out = tmp_path / "report.html"
    result = write_report(run["dir"], [run["predictions"]], out)
    page = out.read_text(encoding="utf-8")
    parsed = _parse(page)
    _check_tables(parsed.cells, run["predictions"])
    # the cut last line of metrics.jsonl is ignored and said so
    assert any("metrics.jsonl:4" in note and "ignored" in note for note in result.notes)
    assert "metrics.jsonl:4" in page
    # every media element has its media embedded: decodable JPEG images and Ogg audio, no external reference
    media = json.loads(parsed.media_json)
    assert parsed.audio and all(a["data-media"] in media for a in parsed.audio)
    attached = [img for img in parsed.images if "data-media" in img]
    assert attached and all(img["data-media"] in media for img in attached)
    for uri in media.values():
        kind, payload = re.match(r"data:([a-z]+/[a-z]+);base64,(.*)", uri).groups()
        data = base64.b64decode(payload)
        if kind == "image/jpeg":
            assert Image.open(io.BytesIO(data)).size[0] > 0
        else:
            assert kind == "audio/ogg" and data[:4] == b"OggS"
    assert not re.search(r'(src|href)="(?!data:)', page)                     # nothing loaded from elsewhere
    # every step is browsable, with best / worst and the aha candidate (a revised answer) shown
    assert result.steps_shown == [1, 2, 3]
    assert page.count('class="step"') == 3 and page.count("<b>aha candidate</b>") >= 1
    assert "rewards: accuracy 1, format 1" in page and "advantage +0.500" in page


def test_cli_report_and_bad_input(run, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(run["dir"]), str(run["predictions"]), "--out",
                                 str(tmp_path / "r.html"), "--max-steps", "2"])
    assert result.exit_code == 0, result.output
    assert "note: " in result.output and "ignored" in result.output and "2 steps shown" in result.output
    missing = runner.invoke(app, ["report", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "not a run directory" in missing.output
    broken = tmp_path / "broken_run"
    shutil.copytree(run["dir"], broken)
    lines = (broken / "completions.jsonl").read_text().splitlines()
    (broken / "completions.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    failed = runner.invoke(app, ["report", str(broken)])
    assert failed.exit_code == 1 and "completions.jsonl:2" in failed.output and "Traceback" not in failed.output


@pytest.mark.browser
def test_report_renders_in_headless_chromium(run, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed: `make test-browser` installs it (apt-get install chromium)")
    out = run["dir"] / "report.html"
    write_report(run["dir"], [run["predictions"]], out)
    profile = tmp_path / "profile"
    common = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000"]
    dom = subprocess.run([*common, "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    parsed = _parse(dom)
    expected = _parse(out.read_text(encoding="utf-8"))
    n_images, n_audio = len(expected.images), len(expected.audio)
    assert n_images >= 2 and n_audio >= 1
    assert parsed.body["data-images-loaded"] == str(n_images) and parsed.body["data-images-broken"] == "0"
    assert parsed.body["data-audio-ready"] == str(n_audio) and parsed.body["data-audio-broken"] == "0"
    assert len(parsed.audio) == n_audio
    _check_tables(parsed.cells, run["predictions"])
    screenshot = run["dir"] / "report.png"
    subprocess.run([*common, "--window-size=1280,2400", f"--screenshot={screenshot}", out.as_uri()],
                   capture_output=True, timeout=120, check=True)
    with Image.open(screenshot) as image:
        assert image.size == (1280, 2400)
        assert len(set(image.convert("L").resize((64, 120)).tobytes())) > 8      # a rendered page, not a blank one


# ---- issue 22, item 8: question beside each answer, two files side by side, video clips, phone layout --------


@pytest.fixture(scope="module")
def two_files(tmp_path_factory):
    """Two predictions files on the same six problems (videos among them): the first answers "A", the second
    "B" and is unparsed on the first problem. Returns (first, second, problem_id -> record)."""
    root = tmp_path_factory.mktemp("two_files")
    info = write_synthetic_dataset(root / "data", n_train=0, n_valid=6, seed=1,
                                   families=["video_colour_at_beep", "colour_by_pitch", "image_colour"])
    valid = Path(info["splits"]["valid"]["json"])
    records = {str(r.problem_id): r for r in load_dataset(valid)}
    paths = []
    for name, answer in (("first.jsonl", "A"), ("second.jsonl", "B")):
        rows = [{"problem_id": r.problem_id, "sample_idx": 0, "gt": r.answer, "data_type": r.data_type,
                 "pred": None if (answer == "B" and i == 0) else answer,
                 "correct": r.answer == answer and not (answer == "B" and i == 0),
                 "reply": f"<think>{name} {i}</think>" + ("" if (answer == "B" and i == 0) else f"<answer>{answer}</answer>")}
                for i, r in enumerate(records.values())]
        paths.append(root / name)
        paths[-1].write_text("".join(json.dumps(row) + "\n" for row in rows))
        run_file_path(paths[-1]).write_text(json.dumps({"data": str(valid)}))
    assert any(r.data_type == "video_audio" for r in records.values())
    return paths[0], paths[1], records


def test_report_shows_questions_beside_two_files_and_their_paired_difference(run, two_files, tmp_path):
    from echoink.eval.metrics import paired_comparison

    first, second, records = two_files
    out = tmp_path / "two.html"
    result = write_report(run["dir"], [first, second], out)
    page = out.read_text(encoding="utf-8")
    parsed = _parse(page)
    assert parsed.cells[("[1]", "accuracy")] == f"{100 * accuracy_summary(load_predictions(first))['accuracy']:.1f}"
    assert parsed.cells[("[2]", "accuracy")] == f"{100 * accuracy_summary(load_predictions(second))['accuracy']:.1f}"
    c = paired_comparison(load_predictions(second), load_predictions(first))
    assert parsed.cells[("[2]-[1]", "difference")] == f"{100 * c['difference']:+.1f}"
    assert parsed.cells[("[2]-[1]", "ci")] == f"[{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}]"
    assert parsed.cells[("[2]-[1]", "wins")] == f"{c['wins']} / {c['losses']} / {c['ties']}"
    # every answer block: the question and its options beside the replies of both files
    blocks = page.split('<div class="answer">')[1:]
    answers = [b for b in blocks if "<b>[1]</b>" in b]
    assert answers and all("<b>[2]</b>" in b for b in answers)
    for block in answers:
        problem = re.search(r"problem (\S+) · answer", block).group(1)
        record = records[problem]
        assert html_text(record.problem) in block
        assert all(f"<li>{html_text(option)}</li>" in block for option in record.options)
    assert "answer — · wrong" in page and "answer None" not in page  # an unparsed answer
    assert result.video_clips >= 1 and page.count("<video ") >= 1


def test_a_large_video_is_linked_not_embedded(run, two_files, tmp_path, monkeypatch):
    import echoink.analysis.report as report

    monkeypatch.setattr(report, "VIDEO_EMBED_BYTES", 0)
    out = tmp_path / "sub" / "linked.html"
    result = write_report(run["dir"], [two_files[0]], out)
    page = out.read_text(encoding="utf-8")
    assert result.video_clips == 0 and "<video " not in page
    links = re.findall(r'<a class="clip-link" href="([^"]+)">play ([^ ]+) \(', page)
    assert links and all(href.startswith(("./", "../")) for href, _ in links)
    for href, name in links:
        assert (out.parent / href).resolve().is_file() and href.endswith(name)


def html_text(text: str) -> str:
    import html

    return html.escape(text, quote=True).replace("&#x27;", "&#39;").replace("&quot;", "&#34;")


@pytest.mark.browser
@pytest.mark.parametrize("width", [390, 1280])
def test_report_fits_a_phone_and_a_desktop_in_headless_chromium(run, two_files, tmp_path, width):
    """No horizontal overflow; on the phone every reply takes at least half the width; every image, audio and
    video clip loads."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed: `make test-browser` installs it (apt-get install chromium)")
    first, second, _ = two_files
    out = tmp_path / "report.html"
    write_report(run["dir"], [first, second], out)
    expected = _parse(out.read_text(encoding="utf-8"))
    # headless Chromium's window is at least 500 px wide: the page is laid out in a frame of `width` px, and
    # the frame's <body> data (what the report's script measured there) is copied out for --dump-dom
    frame = tmp_path / "frame.html"
    frame.write_text(f'<!DOCTYPE html><html><body style="margin:0"><iframe id="page" src="{out.name}" '
                     f'style="width:{width}px;height:2000px;border:0"></iframe><script>setInterval(() => {{'
                     "const data = document.getElementById('page').contentDocument.body.dataset;"
                     "for (const key in data) document.body.dataset[key] = data[key]; }, 100);</script></body></html>")
    common = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
              "--allow-file-access-from-files", f"--window-size={width + 200},2100"]
    dom = subprocess.run([*common, "--dump-dom", frame.as_uri()], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    body = _parse(dom).body
    assert body["data-window-width"] == str(width)
    assert body["data-overflow"] == "0"
    if width < 500:
        assert float(body["data-reply-share"]) >= 0.5
    n_videos = out.read_text(encoding="utf-8").count("<video ")
    assert n_videos >= 1
    assert body["data-images-loaded"] == str(len(expected.images)) and body["data-images-broken"] == "0"
    assert body["data-audio-ready"] == str(len(expected.audio)) and body["data-audio-broken"] == "0"
    assert body["data-video-ready"] == str(n_videos) and body["data-video-broken"] == "0"
