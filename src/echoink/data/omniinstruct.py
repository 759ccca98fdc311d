"""Rebuild AVQA-R1-6K from a local copy of OmniInstruct-v1 (m-a-p/OmniInstruct_v1).

``convert_omniinstruct(source_dir, split, out_dir)`` reads the split's parquet shards under
``source_dir`` (searched recursively; ``data/train-00000-of-000NN.parquet`` style names) with pyarrow,
keeps the rows whose ``source`` is ``"AVQA"``, that have exactly four options and whose answer is one
of them, and writes the AVQA-R1 layout::

    out_dir/omni_rl_format_<split>.json
    out_dir/audios/sample_<idx>.wav      (the source sampling rate, mono, PCM_16)
    out_dir/images/sample_<idx>.jpg

``idx`` (and ``problem_id``) is the row's index in the split: shards in file-name order, rows in file
order, counting every row (also the ones skipped), as Hugging Face ``datasets`` numbers them. The media
columns are Hugging Face ``Image`` / ``Audio`` structs ``{bytes, path}``; their bytes are decoded here
with PIL and soundfile (``datasets`` 5.x would need torchcodec for audio). A row with missing or
corrupt media is skipped and counted. Everything runs offline.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import soundfile as sf
from PIL import Image

from echoink.io import write_bytes_atomic, write_json_atomic
from echoink.problem_types import MULTIPLE_CHOICE

__all__ = [
    "ANSWER_COLUMN",
    "AUDIO_COLUMN",
    "AVQA_SOURCE",
    "DATA_SOURCE",
    "IMAGE_COLUMN",
    "OPTIONS_COLUMN",
    "QUESTION_COLUMN",
    "SOURCE_COLUMN",
    "ConversionReport",
    "convert_omniinstruct",
    "find_split_files",
]

# OmniInstruct-v1 column names (kept here so a schema change is a one-line fix).
SOURCE_COLUMN = "source"
QUESTION_COLUMN = "question"
OPTIONS_COLUMN = "options"
ANSWER_COLUMN = "answer"
IMAGE_COLUMN = "image"
AUDIO_COLUMN = "audio"
COLUMNS = (SOURCE_COLUMN, QUESTION_COLUMN, OPTIONS_COLUMN, ANSWER_COLUMN, IMAGE_COLUMN, AUDIO_COLUMN)

AVQA_SOURCE = "AVQA"
DATA_SOURCE = "OmniInstruct_v1-AVQA"
OPTION_COUNT = 4
LETTERS = "ABCD"
JPEG_QUALITY = 95
_BATCH_ROWS = 64

# skip reasons (the keys of ConversionReport.skipped)
NOT_AVQA = "source is not AVQA"
NOT_FOUR_OPTIONS = "not exactly four options"
ANSWER_NOT_IN_OPTIONS = "answer is not one of the options"
MISSING_QUESTION = "missing question"
MISSING_IMAGE = "missing image"
MISSING_AUDIO = "missing audio"
CORRUPT_IMAGE = "corrupt image"
CORRUPT_AUDIO = "corrupt audio"


@dataclass
class ConversionReport:
    """What a conversion did: rows read, rows kept, rows skipped by reason, files read and written."""

    split: str
    files: list[str]
    total_rows: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    json_path: str = ""

    def summary(self) -> str:
        lines = [f"{self.split}: read {self.total_rows} rows from {len(self.files)} parquet file(s); "
                 f"kept {self.kept}, skipped {sum(self.skipped.values())}"]
        lines += [f"  skipped {count:>7}  {reason}" for reason, count in sorted(self.skipped.items())]
        lines.append(f"wrote {self.json_path}")
        return "\n".join(lines)


def find_split_files(source_dir: str | Path, split: str) -> list[Path]:
    """The split's parquet files under ``source_dir`` (recursive), in file-name order.

    A file belongs to ``split`` when its name is ``<split>.parquet`` or starts with ``<split>-`` or
    ``<split>_``, or when it sits in a directory named ``split``.
    """
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise FileNotFoundError(f"{source_dir}: not a directory")

    def belongs(path: Path) -> bool:
        name = path.name
        return (name == f"{split}.parquet" or name.startswith((f"{split}-", f"{split}_"))
                or split in path.relative_to(source_dir).parts[:-1])

    files = sorted((p for p in source_dir.rglob("*.parquet") if belongs(p)),
                   key=lambda p: (p.name, str(p)))
    if not files:
        raise FileNotFoundError(f"{source_dir}: no parquet files for split {split!r} "
                                f"(expected names like data/{split}-00000-of-00001.parquet)")
    return files


def convert_omniinstruct(source_dir: str | Path, split: str, out_dir: str | Path) -> ConversionReport:
    """Convert the OmniInstruct-v1 ``split`` under ``source_dir`` into AVQA-R1 layout in ``out_dir``."""
    files = find_split_files(source_dir, split)
    out_dir = Path(out_dir)
    (out_dir / "audios").mkdir(parents=True, exist_ok=True)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    report = ConversionReport(split=split, files=[str(f) for f in files])
    records: list[dict] = []
    row_index = 0
    for file in files:
        parquet = pq.ParquetFile(file)
        missing = [c for c in COLUMNS if c not in parquet.schema_arrow.names]
        if missing:
            raise ValueError(f"{file}: missing column(s) {', '.join(missing)} "
                             f"(has {', '.join(parquet.schema_arrow.names)})")
        for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=list(COLUMNS)):
            for row in batch.to_pylist():
                record = _convert_row(row, row_index, out_dir, report.skipped)
                if record is not None:
                    records.append(record)
                row_index += 1
    report.total_rows = row_index
    report.kept = len(records)
    report.json_path = str(write_json_atomic(out_dir / f"omni_rl_format_{split}.json", records))
    return report


def _convert_row(row: dict, index: int, out_dir: Path, skipped: Counter) -> dict | None:
    if row.get(SOURCE_COLUMN) != AVQA_SOURCE:
        skipped[NOT_AVQA] += 1
        return None
    options = row.get(OPTIONS_COLUMN)
    if not isinstance(options, list) or len(options) != OPTION_COUNT:
        skipped[NOT_FOUR_OPTIONS] += 1
        return None
    options = [str(option).strip() for option in options]
    answer = str(row.get(ANSWER_COLUMN) or "").strip()
    if answer not in options:
        skipped[ANSWER_NOT_IN_OPTIONS] += 1
        return None
    question = str(row.get(QUESTION_COLUMN) or "").strip()
    if not question:
        skipped[MISSING_QUESTION] += 1
        return None

    image_bytes = _media_bytes(row.get(IMAGE_COLUMN))
    if image_bytes is None:
        skipped[MISSING_IMAGE] += 1
        return None
    audio_bytes = _media_bytes(row.get(AUDIO_COLUMN))
    if audio_bytes is None:
        skipped[MISSING_AUDIO] += 1
        return None
    jpeg = _as_jpeg(image_bytes)
    if jpeg is None:
        skipped[CORRUPT_IMAGE] += 1
        return None
    wav = _as_wav(audio_bytes)
    if wav is None:
        skipped[CORRUPT_AUDIO] += 1
        return None

    image_path = f"images/sample_{index}.jpg"
    audio_path = f"audios/sample_{index}.wav"
    write_bytes_atomic(out_dir / image_path, jpeg)
    write_bytes_atomic(out_dir / audio_path, wav)
    letter = LETTERS[options.index(answer)]
    return {
        "problem_id": index,
        "problem": question,
        "data_type": "image_audio",
        "problem_type": MULTIPLE_CHOICE,
        "options": [f"{LETTERS[k]}. {option}" for k, option in enumerate(options)],
        "solution": f"<answer>{letter}</answer>",
        "path": {"image": image_path, "audio": audio_path},
        "data_source": DATA_SOURCE,
    }


def _media_bytes(value: object) -> bytes | None:
    """The bytes of a Hugging Face Image/Audio struct ``{"bytes": ..., "path": ...}`` (or raw bytes)."""
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, dict):
        data = value.get("bytes")
    else:
        return None
    return bytes(data) if data else None


def _as_jpeg(data: bytes) -> bytes | None:
    """JPEG bytes for the image: the original bytes when they are already a clean RGB/grey JPEG,
    else the decoded image converted to RGB and re-encoded. None when it cannot be decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                if image.format == "JPEG" and image.mode in ("RGB", "L"):
                    return data
                rgb = image.convert("RGB")
    except Exception:  # noqa: BLE001 - any decoder failure means a corrupt image
        return None
    if rgb.width == 0 or rgb.height == 0:
        return None
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _as_wav(data: bytes) -> bytes | None:
    """Mono PCM_16 WAV at the source sampling rate; None when the audio is corrupt or empty."""
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception:  # noqa: BLE001 - any decoder failure means corrupt audio
        return None
    if samples.shape[0] == 0 or rate <= 0 or not np.isfinite(samples).all():
        return None
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(mono, -1.0, 1.0), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()
