"""Small media and dataset builders shared by the data-layer tests (kept tiny so tests stay fast)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from PIL import Image


def write_wav(path: Path, seconds: float = 0.5, rate: int = 16_000, channels: int = 1, frequency: float = 440.0,
              subtype: str = "PCM_16", fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    mono = 0.5 * np.sin(2 * np.pi * frequency * t)
    data = np.stack([mono] * channels, axis=1) if channels > 1 else mono
    sf.write(str(path), data.astype(np.float32), rate, subtype=subtype, format=fmt)
    return path


def write_jpg(path: Path, size: tuple[int, int] = (64, 48), colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="JPEG")
    return path


def good_record(problem_id: int = 0, **changes: Any) -> dict:
    """An AVQA-R1 style image_audio record pointing at images/ and audios/ sample files."""
    record = {
        "problem_id": problem_id,
        "problem": "What is making the sound?",
        "data_type": "image_audio",
        "problem_type": "multiple choice",
        "options": ["A. Machine gun", "B. Car engine accelerating", "C. Police car siren", "D. Ambulance siren"],
        "solution": "<answer>C</answer>",
        "path": {"image": f"images/sample_{problem_id}.jpg", "audio": f"audios/sample_{problem_id}.wav"},
        "data_source": "OmniInstruct_v1-AVQA",
    }
    record.update(changes)
    return record


def make_dataset(root: Path, records: list[dict], name: str = "omni_rl_format_train.json",
                 create_media: bool = True) -> Path:
    """Write ``records`` as a JSON array in ``root`` and create the media files they name."""
    root.mkdir(parents=True, exist_ok=True)
    if create_media:
        for record in records:
            paths = record.get("path") if isinstance(record, dict) else None
            if not isinstance(paths, dict):
                continue
            for kind, rel in paths.items():
                if not isinstance(rel, str) or rel.startswith("/") or ".." in rel:
                    continue
                target = root / rel
                if target.exists():
                    continue
                if kind == "audio":
                    write_wav(target, 0.2)
                elif kind == "image":
                    write_jpg(target)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(b"\x00")
    path = root / name
    path.write_text(json.dumps(records, indent=1))
    return path
