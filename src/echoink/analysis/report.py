"""`echoink report RUN_DIR [PRED.jsonl ...] --out report.html`: one self-contained static HTML page of a run.

The page needs no server and no network: the training-curve figure is an embedded PNG, each problem's image
(a video's middle frame) an embedded JPEG and its audio (a video's own track) an embedded Ogg/Vorbis clip,
each stored once in a JSON block and attached to the page's <img>/<audio> elements by a few lines of script.

    Notes                 lines ignored in the run's files (a write cut by a kill), media that could not be shown
    Training curves       `analysis.curves.training_figure` (β = 0 says so in the KL panel)
    In-training eval      `eval/accuracy` by step with its interval, from metrics.jsonl
    Evaluation            per predictions file: accuracy (95% Wilson), majority vote, pass@k, unparsed and format
                          rates; breakdowns by data_type and needs with intervals; a few answers with their media
    Completions by step   for each shown step (at most `max_steps`, evenly spaced, the last included): the best and
                          the worst completion by total reward and the aha-moment candidates (a revised answer or a
                          reflective expression, `analysis.aha`), each with its rewards, advantage and media
    Settings              RUN_DIR/config.resolved.json (collapsed)

Every number in a table cell carries `data-file` / `data-measure` attributes, so tests read the tables back.
The dataset for the media comes from the run's config (train_data) and each predictions file's run signature
(`PRED.jsonl.run.json`); when it cannot be read the page says so and shows the text alone.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from echoink.analysis.aha import count_reflections, extract_think, find_revisions
from echoink.analysis.curves import run_beta, training_figure
from echoink.data import DatasetError, load_dataset
from echoink.data.media import MediaError, load_record_media
from echoink.eval.metrics import accuracy_summary, load_predictions
from echoink.eval.run import run_file_path
from echoink.io import JsonlError, read_jsonl_tolerant, write_text_atomic

__all__ = ["ReportResult", "write_report"]

COMPLETIONS_FILE = "completions.jsonl"
METRICS_FILE = "metrics.jsonl"
#: Thumbnails: at most this many pixels (the image's aspect kept); audio clips: at most this many seconds.
THUMBNAIL_PIXELS = 96 * 28 * 28
CLIP_SECONDS = 10.0
AUDIO_RATE = 16000
MAX_AHA_PER_STEP = 2
PREDICTION_EXAMPLES = 6


@dataclass
class ReportResult:
    path: Path
    notes: list[str] = field(default_factory=list)
    steps_shown: list[int] = field(default_factory=list)
    images: int = 0
    audio_clips: int = 0


def write_report(run_dir: str | Path, predictions: Sequence[str | Path] = (), out: str | Path | None = None,
                 *, max_steps: int = 30, media: bool = True) -> ReportResult:
    """Build the page (see the module docstring) and write it atomically to `out` (default RUN_DIR/report.html).

    Raises FileNotFoundError / ValueError with one line naming the file for a missing run directory, a damaged
    line before the last one, or a predictions file that cannot be read.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: not a run directory")
    out = Path(out) if out is not None else run_dir / "report.html"
    page = _Page(media=media)
    metrics = page.read_log(run_dir / METRICS_FILE)
    completions = page.read_log(run_dir / COMPLETIONS_FILE)
    config = page.read_config(run_dir / "config.resolved.json")
    train_records = page.dataset(config.get("train_data"), "the run's train_data") if completions else {}

    page.section("Training curves", _curves_html(metrics, run_dir, page))
    page.section("In-training evaluation", _in_training_eval_html(metrics))
    for index, path in enumerate(predictions, start=1):
        page.section(f"Evaluation [{index}]: {Path(path).name}", _predictions_html(Path(path), index, page))
    steps_shown = _shown_steps(completions, max_steps)
    page.section("Completions by step", _completions_html(completions, steps_shown, train_records, page))
    page.section("Settings", _settings_html(config))
    write_text_atomic(out, page.render(title=f"echoink report: {run_dir.resolve().name}", run_dir=run_dir))
    return ReportResult(out, page.notes, steps_shown, page.images, page.audio_clips)


# ---- the page ----------------------------------------------------------------------------------------


class _Page:
    def __init__(self, media: bool) -> None:
        self.sections: list[str] = []
        self.notes: list[str] = []
        self.media_enabled = media
        self.media: dict[str, str] = {}          # media id -> data URI (each problem's media stored once)
        self.images = 0
        self.audio_clips = 0
        self._media_of: dict[tuple[str, str], tuple[str | None, str | None]] = {}

    def section(self, title: str, body: str) -> None:
        anchor = "".join(c if c.isalnum() else "-" for c in title.lower())
        self.sections.append(f'<section id="{anchor}"><h2>{_e(title)}</h2>\n{body}\n</section>')

    def read_log(self, path: Path) -> list[dict]:
        if not path.is_file():
            self.notes.append(f"{path}: not found")
            return []
        rows, note = read_jsonl_tolerant(path)
        if note:
            self.notes.append(note)
        return rows

    def read_config(self, path: Path) -> dict:
        if not path.is_file():
            self.notes.append(f"{path}: not found (the run has not finished, or predates it): no settings shown")
            return {}
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            self.notes.append(f"{path}: unreadable ({type(exc).__name__}): no settings shown")
            return {}
        return value if isinstance(value, dict) else {}

    def dataset(self, path: Any, what: str) -> dict[str, Any]:
        """str(problem_id) -> Record of the dataset at `path` ({} and a note when it cannot be read)."""
        if not self.media_enabled:
            return {}
        if not path:
            self.notes.append(f"media not shown for {what}: the dataset path is unknown")
            return {}
        try:
            return {str(record.problem_id): record for record in load_dataset(path)}
        except (DatasetError, FileNotFoundError, ValueError) as exc:
            self.notes.append(f"media not shown for {what}: {str(exc).splitlines()[0]}")
            return {}

    def media_html(self, record: Any) -> str:
        """<img>/<audio> elements for a record (its media decoded and stored once per source file)."""
        if record is None:
            return ""
        key = (record.source, str(record.problem_id))
        if key not in self._media_of:
            self._media_of[key] = self._encode_media(record)
        image_id, audio_id = self._media_of[key]
        parts = []
        if image_id:
            parts.append(f'<img data-media="{image_id}" alt="{_e(record.data_type)} item {_e(record.problem_id)}">')
        if audio_id:
            parts.append(f'<audio controls preload="metadata" data-media="{audio_id}"></audio>')
        return f'<div class="media">{"".join(parts)}</div>' if parts else ""

    def _encode_media(self, record: Any) -> tuple[str | None, str | None]:
        try:
            loaded = load_record_media(record, max_audio_seconds=CLIP_SECONDS, min_pixels=4 * 28 * 28,
                                       max_pixels=THUMBNAIL_PIXELS, video_min_frames=4, video_max_frames=4,
                                       video_max_pixels=THUMBNAIL_PIXELS)
        except (MediaError, OSError, ValueError) as exc:
            self.notes.append(f"media of problem {record.problem_id} not shown: {str(exc).splitlines()[0]}")
            return None, None
        image_id = audio_id = None
        picture = loaded.get("image")
        if picture is None and "video" in loaded:
            from PIL import Image

            frames = loaded["video"].frames                                   # [F, H, W, 3] uint8
            picture = Image.fromarray(np.asarray(frames[len(frames) // 2], dtype=np.uint8))
        if picture is not None:
            buffer = io.BytesIO()
            picture.convert("RGB").save(buffer, format="JPEG", quality=85)
            image_id = f"i{len(self.media)}"
            self.media[image_id] = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
            self.images += 1
        sound = loaded.get("audio", loaded.get("video_audio"))
        if sound is not None and len(sound):
            audio_id = f"a{len(self.media)}"
            self.media[audio_id] = _audio_data_uri(np.asarray(sound, dtype=np.float32))
            self.audio_clips += 1
        return image_id, audio_id

    def render(self, title: str, run_dir: Path) -> str:
        notes = "".join(f"<li>{_e(note)}</li>" for note in self.notes) or "<li>none</li>"
        media_json = json.dumps(self.media).replace("</", "<\\/")
        return "\n".join([
            "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{_e(title)}</title>", f"<style>{_STYLE}</style></head><body>",
            f"<h1>{_e(title)}</h1>", f'<p class="path">{_e(str(run_dir.resolve()))}</p>',
            f'<section id="notes"><h2>Notes</h2><ul class="notes">{notes}</ul></section>',
            *self.sections,
            f'<script type="application/json" id="media">{media_json}</script>',
            f"<script>{_SCRIPT}</script>", "</body></html>", ""])


# ---- sections ----------------------------------------------------------------------------------------


def _curves_html(rows: list[dict], run_dir: Path, page: _Page) -> str:
    rows = [row for row in rows if _number(row.get("step"))]
    if not rows:
        return "<p>No logged steps.</p>"
    figure = training_figure(rows, run_dir.resolve().name, run_beta(run_dir / METRICS_FILE))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    page.images += 1
    return (f'<img class="curves" alt="training curves" '
            f'src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">')


def _settings_html(config: dict) -> str:
    if not config:
        return "<p>Not available.</p>"
    rows = [(key, json.dumps(value) if isinstance(value, (list, dict)) else str(value))
            for key, value in config.items() if value not in (None, "", [], {})]
    table = _table(["setting", "value"], [[_e(k), f"<code>{_e(v)}</code>"] for k, v in rows])
    return f"<details><summary>{len(rows)} settings (config.resolved.json)</summary>{table}</details>"


def _in_training_eval_html(rows: list[dict]) -> str:
    evals = [row for row in rows if _number(row.get("eval/accuracy"))]
    if not evals:
        return "<p>No in-training evaluation was logged.</p>"
    body = []
    for row in evals:
        ci = (f"[{_pct(row['eval/ci_low'])}, {_pct(row['eval/ci_high'])}]"
              if _number(row.get("eval/ci_low")) and _number(row.get("eval/ci_high")) else "-")
        body.append([_e(row["step"]), _cell(_pct(row["eval/accuracy"]), "training", f"eval/accuracy@{row['step']}"),
                     ci, _e(row.get("eval/n", "-"))])
    return _table(["step", "accuracy (%)", "95% CI", "answers"], body)


def _predictions_html(path: Path, index: int, page: _Page) -> str:
    rows = load_predictions(path)
    summary = accuracy_summary(rows)
    label = f"[{index}]"
    passes = summary["pass_at_k"]
    pass_k = passes.get(f"pass@{len(passes)}")
    measures = [
        ("answers", "n", str(summary["n"])), ("problems", "n_problems", str(summary["n_problems"])),
        ("accuracy (%)", "accuracy", _pct(summary["accuracy"])),
        ("95% Wilson CI", "ci", f"[{_pct(summary['ci_low'])}, {_pct(summary['ci_high'])}]"),
        ("samples per problem", "samples_per_problem", str(summary["samples_per_problem"])),
        ("majority vote (%)", "majority_vote_accuracy", _pct(summary["majority_vote_accuracy"])),
        (f"pass@{len(passes)} (%)", "pass_at_k", _pct(pass_k)),
        ("unparsed (%)", "unparsed_rate", _pct(summary["unparsed_rate"])),
        ("format (%)", "format_rate", _pct(summary["format_rate"])),
    ]
    parts = [f'<p class="path">{_e(str(path))}</p>',
             _table(["measure", label], [[name, _cell(value, label, key)] for name, key, value in measures])]
    for by in ("data_type", "needs"):
        groups = summary[f"by_{by}"]
        if groups:
            parts.append(f"<h3>By {by}</h3>")
            parts.append(_table([by, "answers", "accuracy (%)", "95% Wilson CI"], [
                [_e(group), str(block["n"]), _cell(_pct(block["accuracy"]), label, f"{by}={group}"),
                 f"[{_pct(block['ci_low'])}, {_pct(block['ci_high'])}]"] for group, block in groups.items()]))
    records = page.dataset(_signature_data(path, page), f"{path.name}")
    examples = sorted(rows, key=lambda row: (bool(row["correct"]), str(row["problem_id"])))[:PREDICTION_EXAMPLES]
    parts.append("<h3>Answers (wrong ones first)</h3>")
    for row in examples:
        meta = (f"problem {_e(row['problem_id'])} · sample {_e(row.get('sample_idx', 0))} · gt {_e(row.get('gt'))} · "
                f"pred {_e(row.get('pred'))} · {'correct' if row['correct'] else 'wrong'}")
        parts.append(_card(meta, str(row.get("reply", "")), page.media_html(records.get(str(row["problem_id"])))))
    return "\n".join(parts)


def _signature_data(path: Path, page: _Page) -> Any:
    sidecar = run_file_path(path)
    try:
        return json.loads(sidecar.read_text(encoding="utf-8")).get("data")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None


def _shown_steps(completions: list[dict], max_steps: int) -> list[int]:
    steps = sorted({row["step"] for row in completions if isinstance(row.get("step"), int)})
    if len(steps) <= max_steps:
        return steps
    picks = {steps[round(i * (len(steps) - 1) / (max_steps - 1))] for i in range(max_steps)}
    return sorted(picks)


def _completions_html(completions: list[dict], steps: list[int], records: dict, page: _Page) -> str:
    if not completions:
        return "<p>No completions were logged.</p>"
    by_step: dict[int, list[dict]] = {}
    for row in completions:
        if row.get("step") in steps and isinstance(row.get("completion"), str):
            by_step.setdefault(row["step"], []).append(row)
    parts = [f"<p>{len(steps)} of {len({r.get('step') for r in completions})} logged steps shown "
             "(evenly spaced, the last included). Each: the best and the worst completion by total reward, and "
             "aha-moment candidates (an answer revised while thinking, or reflective expressions).</p>"]
    for step in steps:
        rows = by_step.get(step, [])
        if not rows:
            continue
        ranked = sorted(rows, key=_total_reward)
        chosen = [("best", ranked[-1]), ("worst", ranked[0])] if len(ranked) > 1 else [("only", ranked[0])]
        chosen += [("aha candidate", row) for row in _aha_candidates(rows, exclude=[r for _, r in chosen])]
        cards = []
        for role, row in chosen:
            rewards = ", ".join(f"{_e(name)} {value:.3g}" for name, value in (row.get("rewards") or {}).items()
                                if _number(value))
            advantage = row.get("advantage")
            meta = (f"<b>{role}</b> · problem {_e(row.get('problem_id'))} · sample {_e(row.get('sample_idx'))} · "
                    f"rewards: {rewards or '-'} · advantage "
                    f"{f'{advantage:+.3f}' if _number(advantage) else '-'}")
            cards.append(_card(meta, row["completion"], page.media_html(records.get(str(row.get("problem_id"))))))
        mean = sum(_total_reward(r) for r in rows) / len(rows)
        parts.append(f'<details class="step" data-step="{step}"{" open" if step == steps[-1] else ""}>'
                     f"<summary>step {step}: {len(rows)} completions, mean total reward {mean:.3f}</summary>"
                     + "".join(cards) + "</details>")
    return "\n".join(parts)


def _aha_candidates(rows: list[dict], exclude: list[dict]) -> list[dict]:
    scored = []
    for row in rows:
        if any(row is other for other in exclude):
            continue
        revision = find_revisions(row["completion"], row.get("solution"))
        reflections = sum(count_reflections(extract_think(row["completion"])).values())
        if revision is not None or reflections:
            scored.append((revision is not None and revision.outcome == "fixed", revision is not None, reflections,
                           row))
    scored.sort(key=lambda item: item[:3], reverse=True)
    return [item[3] for item in scored[:MAX_AHA_PER_STEP]]


# ---- helpers -----------------------------------------------------------------------------------------


def _audio_data_uri(samples: np.ndarray) -> str:
    """16-kHz mono samples [N] -> an Ogg/Vorbis data URI (a WAV one when libsndfile cannot write Vorbis)."""
    import soundfile

    buffer = io.BytesIO()
    try:
        soundfile.write(buffer, samples, AUDIO_RATE, format="OGG", subtype="VORBIS")
        mime = "audio/ogg"
    except (soundfile.LibsndfileError, ValueError, TypeError):
        buffer = io.BytesIO()
        soundfile.write(buffer, samples, AUDIO_RATE, format="WAV", subtype="PCM_16")
        mime = "audio/wav"
    return f"data:{mime};base64," + base64.b64encode(buffer.getvalue()).decode()


def _card(meta: str, text: str, media: str) -> str:
    return f'<div class="sample">{media}<div class="body"><p class="meta">{meta}</p><pre>\n{_e(text)}</pre></div></div>'


def _table(header: Iterable[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" if not c.startswith("<td") else c for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: str, file_label: str, measure: str) -> str:
    return f'<td data-file="{_e(file_label)}" data-measure="{_e(measure)}">{_e(value)}</td>'


def _total_reward(row: dict) -> float:
    return float(sum(v for v in (row.get("rewards") or {}).values() if _number(v)))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}" if _number(value) else "-"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem auto;max-width:1200px;color:#222;padding:0 1rem}
h1{font-size:1.5rem}h2{border-bottom:1px solid #ccc;margin-top:2rem}.path{color:#666;font-size:.85rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.2rem .6rem;text-align:right}
td:first-child,th:first-child{text-align:left}img.curves{max-width:100%}
.sample{display:flex;gap:1rem;border:1px solid #ddd;border-radius:6px;padding:.6rem;margin:.5rem 0}
.media{display:flex;flex-direction:column;gap:.4rem;min-width:200px}.media img{max-width:200px}
.body{flex:1;min-width:0}pre{white-space:pre-wrap;word-break:break-word;background:#f7f7f7;padding:.5rem;margin:0}
.meta{margin:0 0 .3rem 0;font-size:.9rem}details.step{margin:.4rem 0}summary{cursor:pointer;font-weight:600}
.notes li{color:#8a4b00}
"""

# Attaches each element's media from the JSON block; records on <body> how many images decoded and how many
# audio clips loaded their metadata (what a headless browser test reads back).
_SCRIPT = """
(function(){
  const media = JSON.parse(document.getElementById('media').textContent);
  const body = document.body;
  const loaded = new Set(), broken = new Set(), ready = new Set(), failed = new Set();
  function mark(){ body.dataset.imagesLoaded = loaded.size; body.dataset.imagesBroken = broken.size;
                   body.dataset.audioReady = ready.size; body.dataset.audioBroken = failed.size; }
  for (const img of document.querySelectorAll('img')) {
    img.addEventListener('load', () => { loaded.add(img); mark(); });
    img.addEventListener('error', () => { broken.add(img); mark(); });
    if (img.dataset.media) img.src = media[img.dataset.media];
    else if (img.complete && img.naturalWidth > 0) loaded.add(img);
  }
  for (const audio of document.querySelectorAll('audio')) {
    audio.addEventListener('loadedmetadata', () => { ready.add(audio); mark(); });
    audio.addEventListener('error', () => { failed.add(audio); mark(); });
    audio.src = media[audio.dataset.media];
    audio.load();
  }
  mark();
})();
"""
