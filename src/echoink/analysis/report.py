"""`echoink report RUN_DIR [PRED.jsonl ...] --out report.html`: one self-contained static HTML page of a run.

The page needs no server and no network: the training-curve figure is an embedded PNG, each problem's image
an embedded JPEG, its audio (a video's own track) an embedded Ogg/Vorbis clip and its video a short WebM clip
(VP8, at most `CLIP_SECONDS` seconds, small frames), each stored once in a JSON block and attached to the page's
<img>/<audio>/<video> elements by a few lines of script. A clip larger than `VIDEO_EMBED_BYTES` is not embedded:
the page shows its middle frame and links the video file instead (AVQA-style clips would make a page tens of
MB). The HTML comes from the Jinja2 template `templates/report.html.j2` with autoescaping on: problems, replies,
file names and every other value from a run's files are text, never markup.

    Notes                 lines ignored in the run's files (a write cut by a kill), media that could not be shown
    Training curves       `analysis.curves.training_figure` (β = 0 says so in the KL panel)
    In-training eval      `eval/accuracy` by step with its interval, from metrics.jsonl
    Evaluation            the predictions files side by side ([1], [2], ...): accuracy (95% Wilson), majority
                          vote, pass@k, unparsed and format rates; breakdowns by data_type and needs with
                          intervals; each later file's paired difference from [1]; answers beside their question,
                          options and media (problems the files disagree on first, else wrong answers first);
                          an unparsed answer shows as "—"
    Completions by step   for each shown step (at most `max_steps`, evenly spaced, the last included): the best and
                          the worst completion by total reward and the aha-moment candidates (a revised answer or a
                          reflective expression, `analysis.aha`), each beside its question, with rewards, advantage
                          and media
    Settings              RUN_DIR/config.resolved.json (collapsed)

Readable on a phone: a viewport tag, and answers laid out as question | replies side by side on a wide screen,
one under the other on a narrow one; wide tables scroll inside their own box. Every number in a table cell
carries `data-file` / `data-measure` attributes, and the page's script records on <body> how many media loaded
and how the layout fits the window, so tests read both back. The dataset for the questions and media comes from
the run's config (train_data) and each predictions file's run signature (`PRED.jsonl.run.json`); when it cannot
be read the page says so and shows the replies alone.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote

import numpy as np
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from echoink.analysis.aha import count_reflections, extract_think, find_revisions
from echoink.analysis.curves import run_beta, training_figure
from echoink.data import DatasetError, load_dataset
from echoink.data.media import MediaError, load_record_media
from echoink.eval.metrics import accuracy_summary, load_predictions, paired_comparison
from echoink.eval.run_files import run_file_path
from echoink.io import read_jsonl_tolerant, write_text_atomic

__all__ = ["ReportResult", "write_report"]

COMPLETIONS_FILE = "completions.jsonl"
METRICS_FILE = "metrics.jsonl"
TEMPLATE = "report.html.j2"
#: Thumbnails: at most this many pixels (the image's aspect kept); audio and video clips: at most this many seconds.
THUMBNAIL_PIXELS = 96 * 28 * 28
CLIP_SECONDS = 10.0
AUDIO_RATE = 16000
#: Video clips: frames per second and pixels per frame; a clip whose WebM is larger is linked, not embedded.
CLIP_FPS = 4.0
CLIP_PIXELS = 160 * 28 * 28
VIDEO_EMBED_BYTES = 2 * 1024 * 1024
MAX_AHA_PER_STEP = 2
#: Answers shown per evaluation (problems the files disagree on first, then wrong answers first).
PREDICTION_EXAMPLES = 6
UNPARSED = "—"


@dataclass
class ReportResult:
    path: Path
    notes: list[str] = field(default_factory=list)
    steps_shown: list[int] = field(default_factory=list)
    images: int = 0
    audio_clips: int = 0
    video_clips: int = 0


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
    page = _Media(media, out.parent)
    metrics = page.read_log(run_dir / METRICS_FILE)
    completions = page.read_log(run_dir / COMPLETIONS_FILE)
    config = page.read_config(run_dir / "config.resolved.json")
    train_records = page.dataset(config.get("train_data"), "the run's train_data") if completions else {}
    steps = _shown_steps(completions, max_steps)
    title = f"echoink report: {run_dir.resolve().name}"
    context = {
        "title": title, "run_path": str(run_dir.resolve()),
        "curves": _curves_uri(metrics, run_dir, page), "in_training": _in_training_rows(metrics),
        "evaluation": _evaluation(list(map(Path, predictions)), page),
        "steps": _step_blocks(completions, steps, train_records, page),
        "steps_intro": (f"{len(steps)} of {len({str(r.get('step')) for r in completions})} logged steps shown "
                        "(evenly spaced, the last included). Each: the best and the worst completion by total "
                        "reward, and aha-moment candidates (an answer revised while thinking, or reflective "
                        "expressions)."),
        "settings": _settings_rows(config),
    }
    context.update(notes=page.notes, media_json=_script_json(page.media), style=Markup(_STYLE),
                   script=Markup(_SCRIPT))
    write_text_atomic(out, _environment().get_template(TEMPLATE).render(**context))
    return ReportResult(out, page.notes, steps, page.images, page.audio_clips, page.video_clips)


def _environment() -> Environment:
    return Environment(loader=PackageLoader("echoink.analysis", "templates"), undefined=StrictUndefined,
                       autoescape=select_autoescape(default=True, default_for_string=True))


def _script_json(value: Any) -> Markup:
    """JSON for a <script type="application/json"> block: no "<" inside, so nothing can end the block."""
    return Markup(json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


# ---- files and media ---------------------------------------------------------------------------------


class _Media:
    """The page's notes and embedded media (each problem's media decoded and stored once)."""

    def __init__(self, enabled: bool, page_dir: Path) -> None:
        self.notes: list[str] = []
        self.enabled = enabled
        self.page_dir = page_dir
        self.media: dict[str, str] = {}          # media id -> data URI
        self.images = self.audio_clips = self.video_clips = 0
        self._of: dict[tuple[str, str], dict] = {}

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
        if not path:
            self.notes.append(f"questions and media not shown for {what}: the dataset path is unknown")
            return {}
        try:
            return {str(record.problem_id): record for record in load_dataset(path)}
        except (DatasetError, FileNotFoundError, ValueError, TypeError) as exc:
            self.notes.append(f"questions and media not shown for {what}: {str(exc).splitlines()[0]}")
            return {}

    def of(self, record: Any) -> dict | None:
        """The media ids of a record: {"image", "audio", "video", "link", "link_text", "alt"} (None: none)."""
        if record is None or not self.enabled:
            return None
        key = (record.source, str(record.problem_id))
        if key not in self._of:
            self._of[key] = self._encode(record)
        return self._of[key]

    def _add(self, prefix: str, uri: str) -> str:
        media_id = f"{prefix}{len(self.media)}"
        self.media[media_id] = uri
        return media_id

    def _encode(self, record: Any) -> dict:
        ids: dict[str, Any] = {"image": None, "audio": None, "video": None, "link": None, "link_text": "",
                               "alt": f"{record.data_type} item {record.problem_id}"}
        try:
            loaded = load_record_media(record, max_audio_seconds=CLIP_SECONDS, min_pixels=4 * 28 * 28,
                                       max_pixels=THUMBNAIL_PIXELS, video_fps=CLIP_FPS, video_min_frames=4,
                                       video_max_frames=int(CLIP_SECONDS * CLIP_FPS), video_max_pixels=CLIP_PIXELS)
        except (MediaError, OSError, ValueError) as exc:
            self.notes.append(f"media of problem {record.problem_id} not shown: {str(exc).splitlines()[0]}")
            return ids
        picture = loaded.get("image")
        if picture is None and "video" in loaded:
            from PIL import Image

            frames = loaded["video"].frames                                   # [F, H, W, 3] uint8
            picture = Image.fromarray(np.asarray(frames[len(frames) // 2], dtype=np.uint8))
        if picture is not None:
            ids["image"] = self._add("i", _jpeg_data_uri(picture))
            self.images += 1
        sound = loaded.get("audio", loaded.get("video_audio"))
        if sound is not None and len(sound):
            ids["audio"] = self._add("a", _audio_data_uri(np.asarray(sound, dtype=np.float32)))
            self.audio_clips += 1
        if "video" in loaded:
            clip = _webm_clip(loaded["video"].frames, loaded["video"].fps)
            if len(clip) <= VIDEO_EMBED_BYTES:
                ids["video"] = self._add("v", "data:video/webm;base64," + base64.b64encode(clip).decode())
                self.video_clips += 1
            else:
                source = Path(record.media["video"])
                relative = Path(os.path.relpath(source, self.page_dir)).as_posix()
                # "./" first: a file named "javascript:..." stays a relative address, never a scheme
                ids["link"] = quote(relative if relative.startswith("../") else f"./{relative}")
                ids["link_text"] = f"play {source.name} ({len(clip) / 1024**2:.1f} MB as a clip: linked, not embedded)"
        return ids


def _jpeg_data_uri(picture) -> str:
    buffer = io.BytesIO()
    picture.convert("RGB").save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


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


def _webm_clip(frames: np.ndarray, fps: float) -> bytes:
    """Frames [F, H, W, 3] uint8 (H, W even) -> a silent VP8 WebM clip at `fps` frames per second."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="webm") as container:
        stream = container.add_stream("libvpx", rate=max(1, round(fps)))
        stream.height, stream.width = int(frames.shape[1]), int(frames.shape[2])
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 400_000
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


# ---- sections ----------------------------------------------------------------------------------------


def _curves_uri(rows: list[dict], run_dir: Path, page: _Media) -> str | None:
    rows = [row for row in rows if _number(row.get("step"))]
    if not rows:
        return None
    figure = training_figure(rows, run_dir.resolve().name, run_beta(run_dir / METRICS_FILE))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    page.images += 1
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _settings_rows(config: dict) -> list[list[str]]:
    return [[str(key), json.dumps(value) if isinstance(value, (list, dict)) else str(value)]
            for key, value in config.items() if value not in (None, "", [], {})]


def _in_training_rows(rows: list[dict]) -> list[list[Any]]:
    body = []
    for row in rows:
        if not _number(row.get("eval/accuracy")):
            continue
        ci = (f"[{_pct(row['eval/ci_low'])}, {_pct(row['eval/ci_high'])}]"
              if _number(row.get("eval/ci_low")) and _number(row.get("eval/ci_high")) else "-")
        body.append([str(row.get("step")), _cell(_pct(row["eval/accuracy"]), "training", f"eval/accuracy@{row.get('step')}"),
                     ci, str(row.get("eval/n", "-"))])
    return body


def _evaluation(paths: list[Path], page: _Media) -> dict | None:
    """The Evaluation section: the files side by side, breakdowns, paired differences, answers."""
    if not paths:
        return None
    labels = [f"[{i}]" for i in range(1, len(paths) + 1)]
    rows = [load_predictions(path) for path in paths]
    summaries = [accuracy_summary(file_rows) for file_rows in rows]
    measures = []
    for name, key in _MEASURES:
        measures.append([name] + [_cell(_summary_value(summary, key), label, key)
                                  for label, summary in zip(labels, summaries)])
    breakdowns = []
    for by in ("data_type", "needs"):
        groups = sorted({group for summary in summaries for group in summary[f"by_{by}"]})
        if groups:
            header = [f"{label} {what}" for label in labels for what in ("n", "accuracy (%)", "95% Wilson CI")]
            body = []
            for group in groups:
                cells: list[Any] = [group]
                for label, summary in zip(labels, summaries):
                    block = summary[f"by_{by}"].get(group)
                    cells += (["-", "-", "-"] if block is None else
                              [str(block["n"]), _cell(_pct(block["accuracy"]), label, f"{by}={group}"),
                               f"[{_pct(block['ci_low'])}, {_pct(block['ci_high'])}]"])
                body.append(cells)
            breakdowns.append({"by": by, "header": header, "rows": body})
    records = [page.dataset(_signature_data(path), path.name) for path in paths]
    return {"files": [{"label": label, "path": str(path)} for label, path in zip(labels, paths)],
            "labels": labels, "measures": measures, "breakdowns": breakdowns,
            "paired": [_paired(rows[0], rows[i], labels[i], labels[0]) for i in range(1, len(paths))],
            "answers_title": ("Answers side by side (problems the files disagree on first)" if len(paths) > 1
                              else "Answers (wrong ones first)"),
            "answers": _answers(rows, labels, records, page)}


_MEASURES = (("answers", "n"), ("problems", "n_problems"), ("accuracy (%)", "accuracy"), ("95% Wilson CI", "ci"),
             ("samples per problem", "samples_per_problem"), ("majority vote (%)", "majority_vote_accuracy"),
             ("pass@k (%)", "pass_at_k"), ("unparsed (%)", "unparsed_rate"), ("format (%)", "format_rate"))


def _summary_value(summary: dict, key: str) -> str:
    if key in ("n", "n_problems", "samples_per_problem"):
        return str(summary[key])
    if key == "ci":
        return f"[{_pct(summary['ci_low'])}, {_pct(summary['ci_high'])}]"
    if key == "pass_at_k":
        passes = summary["pass_at_k"]
        return f"{_pct(passes.get(f'pass@{len(passes)}'))} (k={len(passes)})"
    return _pct(summary[key])


def _paired(rows_a: list[dict], rows_b: list[dict], label_b: str, label_a: str) -> dict:
    """`label_b` against `label_a` (the first file) on the problems both answered."""
    try:
        c = paired_comparison(rows_b, rows_a)
    except ValueError as exc:
        return {"labels": f"{label_b} − {label_a}", "a": label_b, "b": label_a, "n_shared": 0,
                "rows": [["not computed", str(exc)]]}
    pair = f"{label_b}-{label_a}"
    return {"labels": f"{label_b} − {label_a}", "a": label_b, "b": label_a, "n_shared": c["n_shared"],
            "rows": [["shared problems", _cell(str(c["n_shared"]), pair, "n_shared")],
                     [f"accuracy {label_b} (%)", _cell(_pct(c["accuracy_a"]), pair, "accuracy_a")],
                     [f"accuracy {label_a} (%)", _cell(_pct(c["accuracy_b"]), pair, "accuracy_b")],
                     ["difference (points)", _cell(f"{100 * c['difference']:+.1f}", pair, "difference")],
                     ["95% bootstrap CI", _cell(f"[{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}]", pair, "ci")],
                     ["better / worse / tied", _cell(f"{c['wins']} / {c['losses']} / {c['ties']}", pair, "wins")],
                     ["McNemar p", _cell(f"{c['mcnemar_p']:.3g}", pair, "mcnemar_p")]]}


def _answers(rows: list[list[dict]], labels: list[str], records: list[dict], page: _Media) -> list[dict]:
    """Up to PREDICTION_EXAMPLES problems, each with every file's first sample for it."""
    by_file = [{str(row["problem_id"]): row for row in sorted(file_rows, key=lambda r: r.get("sample_idx", 0),
                                                              reverse=True)} for file_rows in rows]
    problems = list(dict.fromkeys(str(row["problem_id"]) for row in rows[0]))
    for other in by_file[1:]:
        problems += [p for p in other if p not in problems]

    def order(problem: str) -> tuple:
        verdicts = [bool(f[problem]["correct"]) for f in by_file if problem in f]
        return (len(set(verdicts)) < 2, all(verdicts), problem)

    items = []
    for problem in sorted(problems, key=order)[:PREDICTION_EXAMPLES]:
        record = next((r[problem] for r in records if problem in r), None)
        first = next(f[problem] for f in by_file if problem in f)
        replies = []
        for label, answers in zip(labels, by_file):
            row = answers.get(problem)
            if row is None:
                replies.append({"label": label if len(labels) > 1 else "", "meta": "not answered", "text": ""})
                continue
            pred = UNPARSED if row.get("pred") is None else str(row["pred"])
            replies.append({"label": label if len(labels) > 1 else "",
                            "meta": f"sample {row.get('sample_idx', 0)} · answer {pred} · "
                                    f"{'correct' if row['correct'] else 'wrong'}",
                            "text": str(row.get("reply", ""))})
        items.append({"problem_id": problem, "gt": str(first.get("gt", "-")), "question": _question(record),
                      "media": page.of(record), "replies": replies})
    return items


def _question(record: Any) -> dict | None:
    return None if record is None else {"problem": record.problem, "options": list(record.options)}


def _signature_data(path: Path) -> Any:
    try:
        return json.loads(run_file_path(path).read_text(encoding="utf-8")).get("data")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None


def _shown_steps(completions: list[dict], max_steps: int) -> list[int]:
    steps = sorted({row["step"] for row in completions if isinstance(row.get("step"), int)
                    and not isinstance(row.get("step"), bool)})
    if len(steps) <= max_steps:
        return steps
    picks = {steps[round(i * (len(steps) - 1) / (max_steps - 1))] for i in range(max_steps)}
    return sorted(picks)


def _step_blocks(completions: list[dict], steps: list[int], records: dict, page: _Media) -> list[dict]:
    by_step: dict[int, list[dict]] = {}
    for row in completions:
        if row.get("step") in steps and isinstance(row.get("completion"), str):
            by_step.setdefault(row["step"], []).append(row)
    blocks = []
    for step in steps:
        rows = by_step.get(step, [])
        if not rows:
            continue
        ranked = sorted(rows, key=_total_reward)
        chosen = [("best", ranked[-1]), ("worst", ranked[0])] if len(ranked) > 1 else [("only", ranked[0])]
        chosen += [("aha candidate", row) for row in _aha_candidates(rows, exclude=[r for _, r in chosen])]
        cards = []
        for role, row in chosen:
            rewards = ", ".join(f"{name} {value:.3g}" for name, value in (row.get("rewards") or {}).items()
                                if _number(value))
            advantage = row.get("advantage")
            record = records.get(str(row.get("problem_id")))
            cards.append({"question": _question(record), "media": page.of(record), "reply": {
                "label": role, "text": row["completion"],
                "meta": (f"problem {row.get('problem_id')} · sample {row.get('sample_idx')} · rewards: "
                         f"{rewards or '-'} · advantage {f'{advantage:+.3f}' if _number(advantage) else '-'}")}})
        mean = sum(_total_reward(r) for r in rows) / len(rows)
        blocks.append({"step": step, "n": len(rows), "mean": f"{mean:.3f}", "open": step == steps[-1],
                       "cards": cards})
    return blocks


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


def _cell(value: str, file_label: str, measure: str) -> dict:
    """A table cell the template marks with data-file / data-measure."""
    return {"value": value, "file": file_label, "measure": measure}


def _total_reward(row: dict) -> float:
    rewards = row.get("rewards")
    return float(sum(v for v in rewards.values() if _number(v))) if isinstance(rewards, dict) else 0.0


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}" if _number(value) else "-"


_STYLE = """
*{box-sizing:border-box}
body{font-family:system-ui,sans-serif;margin:1rem auto;max-width:1200px;color:#222;padding:0 .8rem;line-height:1.4}
h1{font-size:1.4rem;overflow-wrap:anywhere}h2{border-bottom:1px solid #ccc;margin-top:2rem}
.path{color:#666;font-size:.85rem;overflow-wrap:anywhere}
.scroll{max-width:100%;overflow-x:auto}table{border-collapse:collapse;margin:.5rem 0}
td,th{border:1px solid #ccc;padding:.2rem .5rem;text-align:right;overflow-wrap:anywhere}
td:first-child,th:first-child{text-align:left}img.curves{max-width:100%;height:auto}
.answer{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,2fr);gap:1rem;border:1px solid #ddd;
        border-radius:6px;padding:.6rem;margin:.6rem 0}
.context,.replies,.reply{min-width:0}.replies{display:grid;gap:.6rem;
        grid-template-columns:repeat(auto-fit,minmax(min(100%,18rem),1fr))}
.question .problem{margin:.2rem 0;overflow-wrap:anywhere}.options{margin:.2rem 0;padding-left:1.4rem}
.media{display:flex;flex-direction:column;gap:.4rem;margin-top:.4rem}
.media img,.media video{max-width:100%;height:auto}.media audio{width:100%}
pre{white-space:pre-wrap;overflow-wrap:anywhere;background:#f7f7f7;padding:.5rem;margin:0}
.meta{margin:0 0 .3rem 0;font-size:.9rem;overflow-wrap:anywhere}details.step{margin:.4rem 0}
summary{cursor:pointer;font-weight:600}.notes li{color:#8a4b00;overflow-wrap:anywhere}.files{padding-left:1.2rem}
@media (max-width:700px){.answer{grid-template-columns:minmax(0,1fr)}body{padding:0 .4rem}}
"""

# Attaches each element's media from the JSON block. Records on <body> how many images decoded and how many
# audio and video clips loaded their metadata, and how the layout fits the window (what a headless browser test
# reads back): data-overflow (page width beyond the window, px), data-reply-share (narrowest reply / window).
_SCRIPT = """
(function(){
  const media = JSON.parse(document.getElementById('media').textContent);
  const body = document.body;
  const loaded = new Set(), broken = new Set(), ready = new Set(), failed = new Set();
  const videoReady = new Set(), videoFailed = new Set();
  function mark(){
    body.dataset.imagesLoaded = loaded.size; body.dataset.imagesBroken = broken.size;
    body.dataset.audioReady = ready.size; body.dataset.audioBroken = failed.size;
    body.dataset.videoReady = videoReady.size; body.dataset.videoBroken = videoFailed.size;
    const root = document.scrollingElement || document.documentElement;
    body.dataset.overflow = Math.max(0, root.scrollWidth - window.innerWidth);
    const widths = Array.from(document.querySelectorAll('.reply'), r => r.getBoundingClientRect().width);
    body.dataset.replyShare = widths.length ? (Math.min(...widths) / window.innerWidth).toFixed(3) : '';
    body.dataset.windowWidth = window.innerWidth;
  }
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
  for (const video of document.querySelectorAll('video')) {
    video.addEventListener('loadedmetadata', () => { videoReady.add(video); mark(); });
    video.addEventListener('error', () => { videoFailed.add(video); mark(); });
    if (video.dataset.poster) video.poster = media[video.dataset.poster];
    video.src = media[video.dataset.media];
    video.load();
  }
  window.addEventListener('resize', mark);
  mark();
})();
"""
