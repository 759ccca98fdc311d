"""Issue 11's data items: each bad input ends in one located problem line or correct behaviour
(BOM, problem_id 0 and "0", non-UTF-8 files, deep nesting, huge integers, image bombs, 16-bit images)."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from data_fixtures import good_record, make_dataset
from echoink.cli import app
from echoink.data import DatasetError, load_dataset
from echoink.data.media import MediaError, image_size, load_image
from echoink.data.report import build_report


def _problems(path: Path) -> list[str]:
    with pytest.raises(DatasetError) as caught:
        load_dataset(path)
    return caught.value.problems


def test_json_with_a_byte_order_mark_is_read(tmp_path):
    path = make_dataset(tmp_path, [good_record(0), good_record(1)])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert [r.problem_id for r in load_dataset(path)] == [0, 1]
    lines = tmp_path / "data.jsonl"
    lines.write_bytes(b"\xef\xbb\xbf" + b"\n".join(json.dumps(good_record(i)).encode() for i in range(2)))
    assert len(load_dataset(lines)) == 2


def test_problem_id_zero_and_string_zero_are_the_same_id(tmp_path):
    problems = _problems(make_dataset(tmp_path, [good_record(0), good_record("0")]))
    assert problems == [f"{tmp_path / 'omni_rl_format_train.json'}:1:problem_id: duplicate of record 0 ('0')"]


def test_non_utf8_file_is_named(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(json.dumps([good_record(0, problem="Qu'est-ce que c'est ? é")], ensure_ascii=False)
                     .encode("latin-1"))
    (problem,) = _problems(path)
    assert problem.startswith(f"{path}: not UTF-8 text (byte 0xe9 at offset ") and "save the file as UTF-8" in problem


def test_deeply_nested_json_is_one_line(tmp_path):
    array = tmp_path / "nested.json"
    array.write_text("[" * 100_000)
    assert _problems(array) == [f"{array}: JSON nested too deeply to read; records are flat objects"]
    lines = tmp_path / "nested.jsonl"
    lines.write_text(json.dumps(good_record(0)) + "\n" + "[" * 100_000 + "\n")
    assert _problems(lines) == [f"{lines}:line 2: JSON nested too deeply to read; records are flat objects"]


def test_five_thousand_digit_problem_id_is_a_record_problem(tmp_path):
    path = make_dataset(tmp_path, [good_record(0)])
    path.write_text(path.read_text().replace('"problem_id": 0', '"problem_id": ' + "7" * 5000))
    (problem,) = _problems(path)
    assert problem == (f"{path}:0:problem_id: must be an integer or a string, "
                       "got an integer of 5000 digits (at most 100)")
    result = CliRunner().invoke(app, ["data", "validate", str(path)])
    assert result.exit_code == 1 and "Traceback" not in result.output


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR claims width x height (8-bit RGB) with one tiny IDAT: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
                     + chunk(b"IEND", b""))
    return path


def test_png_bomb_header_is_a_record_problem(tmp_path):
    record = good_record(0)
    path = make_dataset(tmp_path, [record])
    _png_header_only(tmp_path / record["path"]["image"], 20_000, 20_000)
    with pytest.raises(MediaError, match="too large to decode safely"):
        image_size(tmp_path / record["path"]["image"])
    report = build_report(path)
    assert len(report.problems) == 1 and "sample_0.jpg" in report.problems[0] and "too large" in report.problems[0]
    result = CliRunner().invoke(app, ["data", "validate", str(path), "--check-media"])
    assert result.exit_code == 1 and "Traceback" not in result.output


def test_large_16_bit_grey_png_is_converted_small(tmp_path):
    values = (np.arange(3000 * 2000, dtype=np.uint32).reshape(2000, 3000) % 65536).astype(np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I;16")
    image = load_image(path)
    assert image.mode == "RGB" and image.size[0] * image.size[1] <= 256 * 28 * 28
    pixels = np.asarray(image)
    assert pixels.std() > 0 and (pixels[..., 0] == pixels[..., 1]).all()  # grey, not flattened to one value


def test_16_bit_conversion_sees_only_the_resized_image(tmp_path, monkeypatch):
    """The float conversion runs on the target-size image, never on a full-resolution copy (the issue's
    13000x13000 16-bit PNG peaked at 4.6 GB that way; docs/data_format.md gives the measured peak now)."""
    from echoink.data import media

    seen = []
    convert = media._to_rgb
    monkeypatch.setattr(media, "_to_rgb", lambda image: seen.append((image.mode, image.size)) or convert(image))
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((2400, 3600), 40_000, dtype=np.uint16)).save(path)
    image = load_image(path)
    assert seen == [(seen[0][0], image.size)] and seen[0][0].startswith("I")
    assert np.asarray(image)[0, 0].tolist() == [156, 156, 156]  # 40000 / 65535 * 255, rounded
