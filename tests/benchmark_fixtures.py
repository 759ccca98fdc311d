"""Tiny copies of published benchmark layouts, with synthetic media, for the converter tests and the
lmms-eval check: AVQA (train_qa.json / val_qa.json + VGGSound-style clips) and Daily-Omni (qa.json +
Videos/<id>/<id>_video.mp4 and <id>_audio.wav). Field names and file layouts follow the published sets;
every question, choice and clip is made up here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf

from echoink.data.synth import encode_mp4

RATE = 16_000
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


def clip(colour: str, frequency: float, seconds: float = 1.0, with_audio: bool = True) -> bytes:
    """A small mp4: a solid-colour 64x64 clip at 4 fps with a pure tone as its sound track."""
    frames = np.zeros((int(4 * seconds), 64, 64, 3), dtype=np.uint8)
    frames[:] = COLOURS[colour]
    tone = 0.4 * np.sin(2 * np.pi * frequency * np.arange(int(RATE * seconds)) / RATE)
    return encode_mp4(frames, 4, tone.astype(np.float32) if with_audio else None)


def write_avqa(root: Path, split: str = "val", count: int = 4, missing: int = 0) -> tuple[Path, Path]:
    """`root/<split>_qa.json` and `root/videos/<video_name>.mp4`; the last `missing` clips are not written.
    Returns (qa file, videos directory)."""
    videos = root / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    questions = []
    for k in range(count):
        colour = names[k % len(names)]
        video_name = f"yt{k:03d}abcdefg_{10 * k:06d}"
        questions.append({"id": 100 + k, "video_name": video_name, "video_id": 500 + k,
                          "question_text": "What colour is the scene?", "multi_choice": names,
                          "answer": names.index(colour), "question_relation": "View", "question_type": "Which"})
        if k < count - missing:
            (videos / f"{video_name}.mp4").write_bytes(clip(colour, 440.0 * (1 + k % 3)))
    qa = root / f"{split}_qa.json"
    qa.write_text(json.dumps(questions, indent=1), encoding="utf-8")
    return qa, videos


def write_daily_omni(root: Path, count: int = 4, missing: int = 0, lettered: bool = True) -> tuple[Path, Path]:
    """`root/qa.json` and `root/Videos/<id>/<id>_video.mp4` + `<id>_audio.wav` (two questions per video); the
    media of the last `missing` videos are not written. Returns (qa file, Videos directory)."""
    videos = root / "Videos"
    names = list(COLOURS)
    questions = []
    video_count = (count + 1) // 2
    for k in range(count):
        video = k // 2
        video_id = f"vid{video:02d}_Xy-z"
        colour = names[video % len(names)]
        choices = [f"{letter}. {name}" if lettered else name for letter, name in zip("ABCD", names)]
        questions.append({"Question": "Which colour fills the frames?" if k % 2 == 0 else "Which colour do you see?",
                          "Choice": choices, "Answer": "ABCD"[names.index(colour)], "video_id": video_id,
                          "Type": "Context understanding" if k % 2 else "AV Event Alignment",
                          "video_duration": "30s", "video_category": "synthetic"})
        folder = videos / video_id
        if video < video_count - missing and not folder.exists():
            folder.mkdir(parents=True)
            (folder / f"{video_id}_video.mp4").write_bytes(clip(colour, 330.0 * (1 + video)))
            tone = 0.4 * np.sin(2 * np.pi * 330.0 * (1 + video) * np.arange(RATE) / RATE)
            sf.write(str(folder / f"{video_id}_audio.wav"), tone.astype(np.float32), RATE, subtype="PCM_16")
    qa = root / "qa.json"
    qa.write_text(json.dumps(questions, indent=1), encoding="utf-8")
    return qa, videos
