"""The OmniInstruct-v1 -> AVQA-R1 converter, on a small parquet fixture built here."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image
from typer.testing import CliRunner

from echoink.cli import app
from echoink.data import load_dataset
from echoink.data.omniinstruct import (
    ANSWER_NOT_IN_OPTIONS,
    CORRUPT_AUDIO,
    CORRUPT_IMAGE,
    MISSING_AUDIO,
    NOT_AVQA,
    NOT_FOUR_OPTIONS,
    convert_omniinstruct,
    find_split_files,
)

OPTIONS = ["Machine gun", "Car engine accelerating", "Police car siren", "Ambulance siren"]


def _audio_bytes(rate: int, channels: int = 1, fmt: str = "WAV", seconds: float = 0.25) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    tone = 0.3 * np.sin(2 * np.pi * 500 * t)
    data = np.stack([tone] * channels, axis=1) if channels > 1 else tone
    buffer = io.BytesIO()
    sf.write(buffer, data, rate, format=fmt)
    return buffer.getvalue()


def _image_bytes(fmt: str, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (40, 30), (10, 200, 30, 255)[: len(mode)]).save(buffer, format=fmt)
    return buffer.getvalue()


JPEG = _image_bytes("JPEG")


def _row(source="AVQA", question="What is making the sound?", options=OPTIONS, answer="Police car siren",
         image=JPEG, audio=None) -> dict:
    return {
        "source": source,
        "question": question,
        "options": options,
        "answer": answer,
        "image": None if image is None else {"bytes": image, "path": "x.jpg"},
        "audio": None if audio is None else {"bytes": audio, "path": "x.wav"},
        "id": 1,
    }


SCHEMA = pa.schema([
    ("source", pa.string()), ("question", pa.string()), ("options", pa.list_(pa.string())), ("answer", pa.string()),
    ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ("audio", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ("id", pa.int64()),
])


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)


@pytest.fixture()
def source_dir(tmp_path) -> Path:
    root = tmp_path / "OmniInstruct_v1"
    wav8k = _audio_bytes(8000)
    # shard 1 is written first: rows are numbered by file name order, not by creation order
    _write(root / "data/train-00001-of-00002.parquet", [
        _row(answer="Machine gun", audio=wav8k),                                  # 4: kept, A
        _row(image=b"\xff\xd8 not really a jpeg", audio=wav8k),                  # 5: corrupt image
        _row(audio=b"RIFF garbage"),                                              # 6: corrupt audio
        _row(audio=None),                                                         # 7: missing audio
        _row(answer="Ambulance siren", image=_image_bytes("PNG", "RGBA"), audio=wav8k),  # 8: kept, D
    ])
    _write(root / "data/train-00000-of-00002.parquet", [
        _row(audio=_audio_bytes(22_050, channels=2, fmt="FLAC")),                 # 0: kept, C
        _row(source="MusicAVQA", audio=wav8k),                                    # 1: not AVQA
        _row(options=OPTIONS[:3], answer="Machine gun", audio=wav8k),             # 2: three options
        _row(answer="Dog barking", audio=wav8k),                                  # 3: answer not in options
    ])
    _write(root / "data/valid-00000-of-00001.parquet", [_row(audio=wav8k)])
    return root


def test_converter_keeps_the_expected_rows(source_dir, tmp_path):
    out = tmp_path / "AVQA_R1" / "train"
    report = convert_omniinstruct(source_dir, "train", out)
    assert report.total_rows == 9 and report.kept == 3
    assert dict(report.skipped) == {NOT_AVQA: 1, NOT_FOUR_OPTIONS: 1, ANSWER_NOT_IN_OPTIONS: 1,
                                    CORRUPT_IMAGE: 1, CORRUPT_AUDIO: 1, MISSING_AUDIO: 1}
    assert "kept 3, skipped 6" in report.summary()

    json_path = out / "omni_rl_format_train.json"
    assert report.json_path == str(json_path)
    raw = json.loads(json_path.read_text())
    assert [r["problem_id"] for r in raw] == [0, 4, 8]
    assert [r["solution"] for r in raw] == ["<answer>C</answer>", "<answer>A</answer>", "<answer>D</answer>"]
    assert raw[0] == {
        "problem_id": 0,
        "problem": "What is making the sound?",
        "data_type": "image_audio",
        "problem_type": "multiple choice",
        "options": ["A. Machine gun", "B. Car engine accelerating", "C. Police car siren", "D. Ambulance siren"],
        "solution": "<answer>C</answer>",
        "path": {"image": "images/sample_0.jpg", "audio": "audios/sample_0.wav"},
        "data_source": "OmniInstruct_v1-AVQA",
    }
    records = load_dataset(json_path)  # the output is a valid AVQA-R1 dataset
    assert [r.answer for r in records] == ["C", "A", "D"]

    info = sf.info(str(out / "audios/sample_0.wav"))
    assert info.samplerate == 22_050 and info.channels == 1 and info.format == "WAV"
    assert sf.info(str(out / "audios/sample_4.wav")).samplerate == 8000
    assert (out / "images/sample_4.jpg").read_bytes() == JPEG  # a JPEG source is copied as is
    with Image.open(out / "images/sample_8.jpg") as converted:  # a PNG with alpha becomes an RGB JPEG
        assert converted.format == "JPEG" and converted.mode == "RGB"
    assert sorted(p.name for p in (out / "images").iterdir()) == ["sample_0.jpg", "sample_4.jpg", "sample_8.jpg"]


def test_split_selection(source_dir, tmp_path):
    assert [p.name for p in find_split_files(source_dir, "train")] == ["train-00000-of-00002.parquet",
                                                                        "train-00001-of-00002.parquet"]
    report = convert_omniinstruct(source_dir, "valid", tmp_path / "valid")
    assert report.kept == 1 and report.total_rows == 1
    assert (tmp_path / "valid/omni_rl_format_valid.json").exists()
    with pytest.raises(FileNotFoundError, match="no parquet files for split 'test'"):
        find_split_files(source_dir, "test")


def test_missing_column_is_an_error(tmp_path):
    pq.write_table(pa.table({"source": ["AVQA"]}), tmp_path / "train-0.parquet")
    with pytest.raises(ValueError, match="missing column"):
        convert_omniinstruct(tmp_path, "train", tmp_path / "out")


def test_cli_convert(source_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["data", "convert-omniinstruct", "--source", str(source_dir), "--split", "train",
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "kept 3" in result.output and NOT_AVQA in result.output
    result = runner.invoke(app, ["data", "convert-omniinstruct", "--source", str(source_dir), "--split", "nope",
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
