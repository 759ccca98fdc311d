"""A synthetic audio-visual question set in exactly the AVQA-R1 layout: multiple-choice families by default, and
families of the other problem types (counting, numbers, spans, ...) when named.

``write_synthetic_dataset(out, n_train, n_valid, seed)`` writes::

    out/train/omni_rl_format_train.json   out/valid/omni_rl_format_valid.json
    out/train/audios/sample_<id>.wav      (16 kHz mono PCM_16, 1-2 s)
    out/train/images/sample_<id>.jpg      (112x112)
    out/train/videos/sample_<id>.mp4      (112x112, 4 fps, 2 s, h264 + aac track)

Every question has four options. Question families (``FAMILIES``), with the modality the answer needs
(the record's extra ``needs`` field) and the record's ``data_type``:

==================== ============ ============= ==========================================================
family               data_type    needs         question
==================== ============ ============= ==========================================================
image_colour         image        image         colour of a single solid shape on a plain background
audio_pitch          audio        audio         pitch of a pure tone (220 / 440 / 880 / 1760 Hz)
audio_beeps          image_audio  audio         number of beeps (the image is a distractor)
image_shape          image_audio  image         circle / square / triangle / star (the tone is a distractor)
colour_by_beeps      image_audio  audio+image   colour whose count of circles equals the number of beeps
colour_by_pitch      image_audio  audio+image   four circles stand for four pitches: colour of the one heard
video_colour_at_beep video_audio  video+audio   a moving shape changes colour: its colour at the beep
text_arithmetic      text         text          sum of two digits
==================== ============ ============= ==========================================================

Families of the other problem types (``TASK_FAMILIES``; only when named, e.g. ``--families
image_colour,beep_count,tone_span``; records carry no options and ``<answer>`` holds the value):

==================== ============ ================== =====================================================
family               data_type    problem_type       question
==================== ============ ================== =====================================================
beep_count           audio        counting           how many beeps (1 to 5) in 2 s of audio
tone_hz              audio        numerical          frequency of a pure tone in Hz (220 / 440 / 880 / 1760)
tone_hz_regression   audio        regression         frequency of a pure tone in Hz (200 to 2000, 10 Hz steps)
tone_span            video_audio  temporal retrieval when the tone sounds in a 4 s video's audio track;
                                                     ``duration`` 4.0, solution ``[start, end]`` (0.1 s steps)
==================== ============ ================== =====================================================

``image_colour`` and ``audio_pitch`` have very distinct stimuli so a tiny randomly initialised model
can learn them by RL in minutes (the demo); the other families are harder. Options are shuffled so
the answer letters are balanced within each family (A, B, C, D in turn, in random order); with
``shuffle_options=False`` they keep the family's fixed order. The same seed gives byte-identical files:
each item draws from its own generator seeded by (seed, split, position), the mp4 muxer runs in
bit-exact mode (no creation time, no muxer version string) and x264 runs single-threaded without its
macroblock-tree lookahead (which made about one encode in thirty differ between runs).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import av
import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

from echoink.io import write_bytes_atomic, write_json_atomic
from echoink.problem_types import MULTIPLE_CHOICE

__all__ = [
    "COLOURS",
    "FAMILIES",
    "PITCHES",
    "SHAPES",
    "Family",
    "SynthItem",
    "TASK_FAMILIES",
    "encode_mp4",
    "generate_items",
    "write_split",
    "write_synthetic_dataset",
]

SAMPLE_RATE = 16_000
IMAGE_SIZE = 112
VIDEO_FPS = 4
VIDEO_SECONDS = 2.0
OPTION_COUNT = 4
LETTERS = "ABCD"
DATA_SOURCE = "echoink-synth"

#: Colour name -> RGB; very distinct hues so colour questions are easy to learn.
COLOURS: dict[str, tuple[int, int, int]] = {
    "Red": (220, 30, 30),
    "Green": (30, 160, 50),
    "Blue": (30, 60, 220),
    "Yellow": (235, 200, 20),
}
SHAPES = ("Circle", "Square", "Triangle", "Star")
#: Pitch name -> frequency in Hz (one octave apart).
PITCHES: dict[str, float] = {"Very low": 220.0, "Low": 440.0, "High": 880.0, "Very high": 1760.0}
BEEP_HZ = 1000.0


@dataclass
class SynthItem:
    """One generated question before it is written.

    ``choices`` are the option texts in the family's fixed order and ``answer_index`` points into
    them. Media: ``image`` (PIL, RGB), ``audio`` (float32 at 16 kHz; for ``video_audio`` items it is
    the video's sound track) and ``video`` (uint8 frames ``[F, H, W, 3]`` at ``VIDEO_FPS``).
    Other problem types have no choices (``answer_index`` -1) and their answer in ``answer_text``;
    temporal retrieval items carry the clip's ``duration`` in seconds.
    """

    family: str
    data_type: str
    needs: str
    problem: str
    choices: list[str]
    answer_index: int
    image: Image.Image | None = None
    audio: np.ndarray | None = None
    video: np.ndarray | None = None
    problem_type: str = MULTIPLE_CHOICE
    answer_text: str | None = None
    duration: float | None = None


@dataclass(frozen=True)
class Family:
    """A question family: its generator ``(rng) -> SynthItem`` and its share of the mix."""

    name: str
    generate: Callable[[np.random.Generator], SynthItem]
    weight: float


# ---- stimuli ----------------------------------------------------------------------------------------


def _tone(frequency: float, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * SAMPLE_RATE))) / SAMPLE_RATE
    return _fade(amplitude * np.sin(2 * np.pi * frequency * t))


def _fade(signal: np.ndarray, seconds: float = 0.01) -> np.ndarray:
    """Raised-cosine fade in and out, so tones and beeps start and stop without clicks."""
    n = min(int(seconds * SAMPLE_RATE), len(signal) // 2)
    if n > 0:
        ramp = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, n))
        signal = signal.copy()
        signal[:n] *= ramp
        signal[-n:] *= ramp[::-1]
    return signal.astype(np.float32)


def _beeps(count: int, seconds: float, rng: np.random.Generator, beep: float = 0.12, gap: float = 0.16) -> np.ndarray:
    """``count`` short beeps at ``BEEP_HZ`` inside ``seconds`` of silence, starting at a random offset."""
    out = np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32)
    span = count * beep + (count - 1) * gap
    start = rng.uniform(0.05, max(0.05, seconds - span - 0.05))
    for k in range(count):
        _place(out, _tone(BEEP_HZ, beep, 0.5), start + k * (beep + gap))
    return out


def _place(track: np.ndarray, clip: np.ndarray, at_seconds: float) -> None:
    begin = int(round(at_seconds * SAMPLE_RATE))
    end = min(len(track), begin + len(clip))
    track[begin:end] += clip[: end - begin]


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    grey = int(rng.integers(232, 250))
    return (grey, grey, grey)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "Circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "Square":
        side = r * 0.9
        draw.rectangle([cx - side, cy - side, cx + side, cy + side], fill=fill)
    elif shape == "Triangle":
        draw.polygon([(cx, cy - r), (cx - r * 0.95, cy + r * 0.8), (cx + r * 0.95, cy + r * 0.8)], fill=fill)
    elif shape == "Star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=fill)
    else:  # pragma: no cover - programming error
        raise ValueError(f"unknown shape {shape!r}")


def _single_shape_image(rng: np.random.Generator, shape: str, colour: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), _background(rng))
    r = float(rng.uniform(24, 38))
    cx, cy = (float(rng.uniform(r + 4, IMAGE_SIZE - r - 4)) for _ in range(2))
    _draw_shape(ImageDraw.Draw(image), shape, cx, cy, r, colour)
    return image


def _random_shape_image(rng: np.random.Generator) -> Image.Image:
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = list(COLOURS.values())[int(rng.integers(len(COLOURS)))]
    return _single_shape_image(rng, shape, colour)


# ---- families ---------------------------------------------------------------------------------------


def _image_colour(rng: np.random.Generator) -> SynthItem:
    names = list(COLOURS)
    answer = int(rng.integers(len(names)))
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    return SynthItem("image_colour", "image", "image", "What colour is the shape?", names, answer,
                     image=_single_shape_image(rng, shape, COLOURS[names[answer]]))


def _audio_pitch(rng: np.random.Generator) -> SynthItem:
    names = list(PITCHES)
    answer = int(rng.integers(len(names)))
    frequency = PITCHES[names[answer]] * float(rng.uniform(0.97, 1.03))
    audio = _tone(frequency, float(rng.uniform(1.0, 1.5)), float(rng.uniform(0.3, 0.6)))
    return SynthItem("audio_pitch", "audio", "audio", "What is the pitch of the tone?", names, answer, audio=audio)


def _audio_beeps(rng: np.random.Generator) -> SynthItem:
    answer = int(rng.integers(4))
    return SynthItem("audio_beeps", "image_audio", "audio", "How many beeps do you hear?",
                     ["1", "2", "3", "4"], answer, image=_random_shape_image(rng),
                     audio=_beeps(answer + 1, 1.6, rng))


def _image_shape(rng: np.random.Generator) -> SynthItem:
    answer = int(rng.integers(len(SHAPES)))
    colour = list(COLOURS.values())[int(rng.integers(len(COLOURS)))]
    distractor = _tone(list(PITCHES.values())[int(rng.integers(len(PITCHES)))], 1.0, 0.4)
    return SynthItem("image_shape", "image_audio", "image", "What shape is in the picture?", list(SHAPES), answer,
                     image=_single_shape_image(rng, SHAPES[answer], colour), audio=distractor)


def _colour_by_beeps(rng: np.random.Generator) -> SynthItem:
    names = list(COLOURS)
    counts = rng.permutation(4) + 1  # colour i appears counts[i] times: 1, 2, 3 and 4 in some order
    beeps = int(rng.integers(1, 5))
    answer = int(np.flatnonzero(counts == beeps)[0])
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), _background(rng))
    draw = ImageDraw.Draw(image)
    cells = rng.permutation(16)[: int(counts.sum())]
    colours = [name for name, count in zip(names, counts) for _ in range(int(count))]
    for cell, name in zip(cells, colours):
        row, col = divmod(int(cell), 4)
        cx = col * 28 + 14 + float(rng.uniform(-2, 2))
        cy = row * 28 + 14 + float(rng.uniform(-2, 2))
        _draw_shape(draw, "Circle", cx, cy, 10.0, COLOURS[name])
    problem = ("The picture shows circles in four colours, each colour a different number of times. "
               "Which colour appears as many times as the number of beeps you hear?")
    return SynthItem("colour_by_beeps", "image_audio", "audio+image", problem, names, answer,
                     image=image, audio=_beeps(beeps, 1.6, rng))


def _colour_by_pitch(rng: np.random.Generator) -> SynthItem:
    names = list(COLOURS)
    order = rng.permutation(4)  # order[k] = colour drawn at position k (left to right)
    pitch = int(rng.integers(4))
    answer = int(order[pitch])
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), _background(rng))
    draw = ImageDraw.Draw(image)
    cy = float(rng.uniform(30, 82))
    for position, colour_index in enumerate(order):
        _draw_shape(draw, "Circle", 14 + 28 * position, cy, 11.0, COLOURS[names[int(colour_index)]])
    frequency = list(PITCHES.values())[pitch] * float(rng.uniform(0.97, 1.03))
    problem = ("From left to right, the four circles stand for a very low, a low, a high and a very high tone. "
               "Which colour matches the tone you hear?")
    return SynthItem("colour_by_pitch", "image_audio", "audio+image", problem, names, answer,
                     image=image, audio=_tone(frequency, 1.2, 0.5))


def _video_colour_at_beep(rng: np.random.Generator) -> SynthItem:
    names = list(COLOURS)
    sequence = rng.permutation(4)  # colour shown in each quarter of the clip
    beep_quarter = int(rng.integers(4))
    answer = int(sequence[beep_quarter])
    frame_count = int(VIDEO_FPS * VIDEO_SECONDS)
    background = _background(rng)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    cy = float(rng.uniform(30, 82))
    frames = []
    for k in range(frame_count):
        image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
        quarter = k * 4 // frame_count
        cx = 20 + (IMAGE_SIZE - 40) * k / (frame_count - 1)
        _draw_shape(ImageDraw.Draw(image), shape, cx, cy, 16.0, COLOURS[names[int(sequence[quarter])]])
        frames.append(np.asarray(image))
    track = np.zeros(int(VIDEO_SECONDS * SAMPLE_RATE), dtype=np.float32)
    quarter_seconds = VIDEO_SECONDS / 4
    _place(track, _tone(BEEP_HZ, 0.15, 0.5), (beep_quarter + 0.5) * quarter_seconds - 0.075)
    problem = "The shape changes colour as it moves. What colour is the shape when the beep sounds?"
    return SynthItem("video_colour_at_beep", "video_audio", "video+audio", problem, names, answer,
                     audio=track, video=np.stack(frames))


def _text_arithmetic(rng: np.random.Generator) -> SynthItem:
    a, b = (int(v) for v in rng.integers(1, 10, size=2))
    total = a + b
    nearby = [total + d for d in (-3, -2, -1, 1, 2, 3) if total + d >= 0]
    distractors = [int(v) for v in rng.choice(nearby, size=3, replace=False)]
    choices = sorted([total, *distractors])
    return SynthItem("text_arithmetic", "text", "text", f"What is {a} + {b}?", [str(c) for c in choices],
                     choices.index(total))


def _beep_count(rng: np.random.Generator) -> SynthItem:
    count = int(rng.integers(1, 6))
    return SynthItem("beep_count", "audio", "audio", "How many beeps do you hear?", [], -1,
                     audio=_beeps(count, 2.0, rng), problem_type="counting", answer_text=str(count))


def _tone_hz(rng: np.random.Generator) -> SynthItem:
    frequency = list(PITCHES.values())[int(rng.integers(len(PITCHES)))]
    audio = _tone(frequency, float(rng.uniform(1.0, 1.5)), float(rng.uniform(0.3, 0.6)))
    return SynthItem("tone_hz", "audio", "audio", "What is the frequency of the tone, in Hz?", [], -1,
                     audio=audio, problem_type="numerical", answer_text=f"{frequency:.0f}")


def _tone_hz_regression(rng: np.random.Generator) -> SynthItem:
    frequency = 10.0 * int(rng.integers(20, 201))
    audio = _tone(frequency, float(rng.uniform(1.0, 1.5)), float(rng.uniform(0.3, 0.6)))
    return SynthItem("tone_hz_regression", "audio", "audio", "Estimate the frequency of the tone, in Hz.", [], -1,
                     audio=audio, problem_type="regression", answer_text=f"{frequency:.0f}")


SPAN_VIDEO_SECONDS = 4.0


def _tone_span(rng: np.random.Generator) -> SynthItem:
    start = round(float(rng.uniform(0.2, 2.0)), 1)
    end = round(min(SPAN_VIDEO_SECONDS - 0.2, start + float(rng.uniform(0.8, 1.8))), 1)
    frame_count = int(VIDEO_FPS * SPAN_VIDEO_SECONDS)
    image = _random_shape_image(rng)
    frames = np.stack([np.asarray(image)] * frame_count)
    track = np.zeros(int(SPAN_VIDEO_SECONDS * SAMPLE_RATE), dtype=np.float32)
    _place(track, _tone(BEEP_HZ, end - start, 0.5), start)
    return SynthItem("tone_span", "video_audio", "video+audio", "A tone sounds", [], -1, audio=track,
                     video=frames, problem_type="temporal retrieval", answer_text=f"[{start:.1f}, {end:.1f}]",
                     duration=SPAN_VIDEO_SECONDS)


#: Families of the other problem types (not in the default mix; name them).
TASK_FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("beep_count", _beep_count, 2.0),
        Family("tone_hz", _tone_hz, 2.0),
        Family("tone_hz_regression", _tone_hz_regression, 2.0),
        Family("tone_span", _tone_span, 2.0),
    )
}

#: All families, in a fixed order. ``weight`` sets each family's share of a split.
FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("image_colour", _image_colour, 3.0),
        Family("audio_pitch", _audio_pitch, 3.0),
        Family("audio_beeps", _audio_beeps, 2.0),
        Family("image_shape", _image_shape, 2.0),
        Family("colour_by_beeps", _colour_by_beeps, 2.0),
        Family("colour_by_pitch", _colour_by_pitch, 2.0),
        Family("video_colour_at_beep", _video_colour_at_beep, 1.0),
        Family("text_arithmetic", _text_arithmetic, 1.0),
    )
}


_ALL_FAMILIES: dict[str, Family] = {**FAMILIES, **TASK_FAMILIES}


# ---- assembling a split -----------------------------------------------------------------------------


def _allocate(count: int, families: list[Family]) -> list[int]:
    """Split ``count`` items among families by weight (largest remainder); when there are at least as
    many items as families, every family gets one or more."""
    total = sum(f.weight for f in families)
    exact = [count * f.weight / total for f in families]
    counts = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(families)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: count - sum(counts)]:
        counts[i] += 1
    if count >= len(families):
        for i, c in enumerate(counts):
            if c == 0:
                donor = max(range(len(counts)), key=lambda j: (counts[j], -j))
                counts[donor] -= 1
                counts[i] = 1
    return counts


def generate_items(
    count: int,
    seed: int,
    *,
    split: str = "train",
    families: list[str] | tuple[str, ...] | None = None,
) -> list[SynthItem]:
    """Generate ``count`` items (media in memory) from the named families (default: all)."""
    chosen = _choose_families(families)
    split_code = _split_code(split)
    order_rng = np.random.default_rng([seed, split_code, 1_000_003])
    plan = [name for family, n in zip(chosen, _allocate(count, chosen)) for name in [family.name] * n]
    plan = [plan[i] for i in order_rng.permutation(len(plan))]
    return [_ALL_FAMILIES[name].generate(np.random.default_rng([seed, split_code, position]))
            for position, name in enumerate(plan)]


def write_split(
    split_dir: str | Path,
    split: str,
    count: int,
    seed: int,
    *,
    families: list[str] | tuple[str, ...] | None = None,
    shuffle_options: bool = True,
    first_id: int = 0,
) -> dict:
    """Write one split (media and ``omni_rl_format_<split>.json``) into ``split_dir``.

    Problem ids run from ``first_id``. Returns ``{"json": path, "count": n, "families": {name: n}}``.
    """
    split_dir = Path(split_dir)
    for sub in ("audios", "images", "videos"):
        (split_dir / sub).mkdir(parents=True, exist_ok=True)
    items = generate_items(count, seed, split=split, families=families)
    letters_rng = np.random.default_rng([seed, _split_code(split), 2_000_003])
    targets = _balanced_letters(items, letters_rng)

    records = []
    family_counts: dict[str, int] = {}
    for position, (item, target) in enumerate(zip(items, targets)):
        problem_id = first_id + position
        options, letter = _letter_options(item, target if shuffle_options else None,
                                          np.random.default_rng([seed, _split_code(split), position, 7]))
        paths = _write_media(split_dir, problem_id, item)
        record = {
            "problem_id": problem_id,
            "problem": item.problem,
            "data_type": item.data_type,
            "problem_type": item.problem_type,
            "options": options,
            "solution": f"<answer>{letter}</answer>",
            "path": paths,
            "data_source": DATA_SOURCE,
            "needs": item.needs,
            "family": item.family,
        }
        if item.answer_text is not None:  # another problem type: no options, the value as the answer
            del record["options"]
            record["solution"] = f"<answer>{item.answer_text}</answer>"
        if item.duration is not None:
            record["duration"] = item.duration
        records.append(record)
        family_counts[item.family] = family_counts.get(item.family, 0) + 1
    json_path = write_json_atomic(split_dir / f"omni_rl_format_{split}.json", records)
    return {"json": str(json_path), "count": len(records), "families": family_counts}


def write_synthetic_dataset(
    out_dir: str | Path,
    n_train: int,
    n_valid: int,
    seed: int,
    *,
    families: list[str] | tuple[str, ...] | None = None,
    shuffle_options: bool = True,
) -> dict:
    """Write ``out_dir/train`` and ``out_dir/valid`` in the AVQA-R1 layout.

    Problem ids are unique across both splits (valid ids follow train ids). Existing files with the
    same names are replaced; other files in ``out_dir`` are left alone. Returns
    ``{"out_dir": str, "splits": {"train": {...}, "valid": {...}}}`` (see :func:`write_split`).
    """
    if n_train < 0 or n_valid < 0:
        raise ValueError("item counts must be >= 0")
    out_dir = Path(out_dir)
    common = {"families": families, "shuffle_options": shuffle_options}
    return {
        "out_dir": str(out_dir),
        "splits": {
            "train": write_split(out_dir / "train", "train", n_train, seed, first_id=0, **common),
            "valid": write_split(out_dir / "valid", "valid", n_valid, seed, first_id=n_train, **common),
        },
    }


def _choose_families(names: list[str] | tuple[str, ...] | None) -> list[Family]:
    if names is None:
        return list(FAMILIES.values())
    unknown = [name for name in names if name not in _ALL_FAMILIES]
    if unknown or not names:
        raise ValueError(f"unknown synthetic families {unknown}; choose from {', '.join(_ALL_FAMILIES)}")
    return [_ALL_FAMILIES[name] for name in dict.fromkeys(names)]


def _split_code(split: str) -> int:
    return {"train": 0, "valid": 1, "test": 2}.get(split, sum(split.encode()) + 3)


def _balanced_letters(items: list[SynthItem], rng: np.random.Generator) -> list[int]:
    """A target answer slot per item: A, B, C, D in turn within each family, in random order.

    The cycle continues from one family to the next, so the split as a whole is balanced too (letter
    counts differ by at most one overall and within each family)."""
    targets = [0] * len(items)
    by_family: dict[str, list[int]] = {}
    for position, item in enumerate(items):
        if item.choices:  # multiple choice only
            by_family.setdefault(item.family, []).append(position)
    cursor = 0
    for family in sorted(by_family):
        positions = by_family[family]
        slots = [(cursor + k) % OPTION_COUNT for k in range(len(positions))]
        cursor += len(positions)
        for position, slot in zip(positions, rng.permutation(slots)):
            targets[position] = int(slot)
    return targets


def _letter_options(item: SynthItem, target: int | None, rng: np.random.Generator) -> tuple[list[str], str]:
    """Letter the choices; with a ``target`` slot the answer goes there and the others are shuffled."""
    if not item.choices:
        return [], ""
    if target is None:
        ordered = list(range(len(item.choices)))
    else:
        others = [i for i in range(len(item.choices)) if i != item.answer_index]
        others = [others[i] for i in rng.permutation(len(others))]
        ordered = others[:target] + [item.answer_index] + others[target:]
    options = [f"{LETTERS[slot]}. {item.choices[i]}" for slot, i in enumerate(ordered)]
    return options, LETTERS[ordered.index(item.answer_index)]


# ---- writing media ----------------------------------------------------------------------------------


def _write_media(split_dir: Path, problem_id: int, item: SynthItem) -> dict[str, str]:
    paths: dict[str, str] = {}
    if item.video is not None:
        paths["video"] = f"videos/sample_{problem_id}.mp4"
        write_bytes_atomic(split_dir / paths["video"], encode_mp4(item.video, VIDEO_FPS, item.audio, SAMPLE_RATE))
        return paths
    if item.image is not None:
        paths["image"] = f"images/sample_{problem_id}.jpg"
        buffer = io.BytesIO()
        item.image.save(buffer, format="JPEG", quality=95)
        write_bytes_atomic(split_dir / paths["image"], buffer.getvalue())
    if item.audio is not None:
        paths["audio"] = f"audios/sample_{problem_id}.wav"
        buffer = io.BytesIO()
        sf.write(buffer, np.clip(item.audio, -1.0, 1.0), SAMPLE_RATE, format="WAV", subtype="PCM_16")
        write_bytes_atomic(split_dir / paths["audio"], buffer.getvalue())
    return paths


def encode_mp4(frames: np.ndarray, fps: int, audio: np.ndarray | None = None, sample_rate: int = SAMPLE_RATE) -> bytes:
    """Encode uint8 RGB frames ``[F, H, W, 3]`` (H, W even) and an optional mono float track as mp4
    (h264 + aac; mpeg4 video where libx264 is missing). Bit-exact: the same input gives the same bytes."""
    video_codec = "libx264" if _has_encoder("libx264") else "mpeg4"
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4", options={"fflags": "+bitexact"}) as container:
        video = container.add_stream(video_codec, rate=fps)
        video.height, video.width = int(frames.shape[1]), int(frames.shape[2])
        video.pix_fmt = "yuv420p"
        # x264's macroblock-tree lookahead made about 1 encode in 30 differ between runs: turn it off
        video.options = ({"threads": "1", "preset": "veryfast", "crf": "20",
                          "x264-params": "threads=1:sync-lookahead=0:rc-lookahead=0:mbtree=0"}
                         if video_codec == "libx264" else {"threads": "1"})
        video.codec_context.thread_count = 1
        sound = None
        if audio is not None:
            sound = container.add_stream("aac", rate=sample_rate)
            sound.layout = "mono"
            sound.codec_context.thread_count = 1
        for index, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
            frame.pts = index
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if sound is not None:
            track = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)[None, :]
            chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(track), format="fltp", layout="mono")
            chunk.sample_rate = sample_rate
            chunk.pts = 0
            container.mux(sound.encode(chunk))
            container.mux(sound.encode(None))
    return buffer.getvalue()


def _has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except Exception:  # noqa: BLE001 - PyAV raises different errors for unknown codecs across versions
        return False
    return True
