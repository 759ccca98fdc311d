"""The synthetic AVQA-R1-layout set: layout, validity, determinism, balance, and that answers follow the media."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from echoink.cli import app
from echoink.data import load_dataset
from echoink.data.media import load_audio, load_image, load_video, load_video_audio
from echoink.data.report import build_report
from echoink.data.synth import COLOURS, FAMILIES, PITCHES, generate_items, write_synthetic_dataset


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(out, 24, 10, seed=3)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_validation(synth_dir):
    for split, count in (("train", 24), ("valid", 10)):
        split_dir = synth_dir / split
        assert {p.name for p in split_dir.iterdir()} == {"audios", "images", "videos", f"omni_rl_format_{split}.json"}
        report = build_report(split_dir / f"omni_rl_format_{split}.json", check_media=True)
        assert report.ok, report.problems
        assert len(report.records) == count
    train = load_dataset(synth_dir / "train/omni_rl_format_train.json")
    valid = load_dataset(synth_dir / "valid/omni_rl_format_valid.json")
    ids = [r.problem_id for r in train + valid]
    assert len(set(ids)) == len(ids)  # unique across splits
    for record in train:
        assert record.problem_type == "multiple choice" and len(record.options) == 4
        assert record.needs in {"audio", "image", "audio+image", "video+audio", "text"}
        assert record.data_source == "echoink-synth" and record.extra["family"] in FAMILIES
        for kind, path in record.media.items():
            assert path.name.startswith(f"sample_{record.problem_id}.")
            assert path.parent.name == {"image": "images", "audio": "audios", "video": "videos"}[kind]
    assert {r.extra["family"] for r in train} == set(FAMILIES)  # every family present
    assert {r.data_type for r in train} == {"image", "audio", "image_audio", "video_audio", "text"}


def test_same_seed_gives_byte_identical_files(synth_dir, tmp_path):
    write_synthetic_dataset(tmp_path, 24, 10, seed=3)
    assert _files(tmp_path) == _files(synth_dir)
    other = tmp_path / "other"
    write_synthetic_dataset(other, 24, 10, seed=4)
    assert _files(other) != _files(synth_dir)


def test_answer_letters_are_balanced(tmp_path):
    write_synthetic_dataset(tmp_path, 64, 0, seed=0)
    records = load_dataset(tmp_path / "train/omni_rl_format_train.json")
    overall = Counter(r.answer for r in records)
    assert max(overall.values()) - min(overall.values()) <= 1 and set(overall) == set("ABCD")
    by_family: dict[str, Counter] = {}
    for record in records:
        by_family.setdefault(record.extra["family"], Counter())[record.answer] += 1
    for counts in by_family.values():
        assert max(counts.values()) - min(counts.get(letter, 0) for letter in "ABCD") <= 1


def test_family_subset_and_fixed_option_order(tmp_path):
    write_synthetic_dataset(tmp_path, 12, 4, seed=1, families=["image_colour", "audio_pitch"], shuffle_options=False)
    records = load_dataset(tmp_path / "train/omni_rl_format_train.json")
    assert Counter(r.extra["family"] for r in records) == {"image_colour": 6, "audio_pitch": 6}
    for record in records:
        names = list(COLOURS) if record.extra["family"] == "image_colour" else list(PITCHES)
        assert [option[3:] for option in record.options] == names
    with pytest.raises(ValueError, match="unknown synthetic families"):
        write_synthetic_dataset(tmp_path / "x", 2, 0, seed=0, families=["smell"])


def _dominant_hz(audio: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(audio))
    return float(np.argmax(spectrum)) * 16_000 / len(audio)


def _beep_count(audio: np.ndarray) -> int:
    envelope = np.convolve(np.abs(audio), np.ones(160) / 160, mode="same") > 0.1
    return int(np.count_nonzero(np.diff(envelope.astype(int)) == 1))


def test_answers_follow_the_media():
    colours = {name: np.array(rgb) for name, rgb in COLOURS.items()}
    for item in generate_items(40, seed=5):
        answer = item.choices[item.answer_index]
        if item.family == "image_colour":
            pixels = np.asarray(item.image).reshape(-1, 3).astype(int)
            counts = {name: int((np.abs(pixels - rgb).sum(axis=1) < 40).sum()) for name, rgb in colours.items()}
            assert max(counts, key=counts.get) == answer
        elif item.family == "audio_pitch":
            assert _dominant_hz(item.audio) == pytest.approx(PITCHES[answer], rel=0.05)
        elif item.family == "audio_beeps":
            assert _beep_count(item.audio) == int(answer)
        elif item.family == "text_arithmetic":
            a, b = (int(v) for v in item.problem.removeprefix("What is ").rstrip("?").split(" + "))
            assert int(answer) == a + b and len(set(item.choices)) == 4
        elif item.family == "video_colour_at_beep":
            beep_frame = int(np.argmax(np.abs(item.audio)) / 16_000 * 4)
            centre = item.video[beep_frame].reshape(-1, 3).astype(int)
            near = (np.abs(centre - colours[answer]).sum(axis=1) < 40).sum()
            assert near > 100
        assert len(item.choices) == 4 and len(set(item.choices)) == 4


def test_written_media_decode_as_expected(synth_dir):
    records = load_dataset(synth_dir / "train/omni_rl_format_train.json")
    video_record = next(r for r in records if r.data_type == "video_audio")
    video = load_video(video_record.media["video"])
    assert video.frames.shape == (4, 112, 112, 3) and video.fps == pytest.approx(2.0)
    assert 1.5 * 16_000 < len(load_video_audio(video_record.media["video"])) <= 10 * 16_000
    pitch = next(r for r in records if r.extra["family"] == "audio_pitch")
    options = {o[0]: o[3:] for o in pitch.options}
    assert _dominant_hz(load_audio(pitch.media["audio"])) == pytest.approx(PITCHES[options[pitch.answer]], rel=0.05)
    image_record = next(r for r in records if "image" in r.media)
    assert load_image(image_record.media["image"]).size == (112, 112)
    assert image_record.media["image"].stat().st_size < 10_000


def test_cli_synth_then_validate_check_media(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["data", "synth", "--out", str(tmp_path), "--train", "10", "--valid", "4", "--seed", "7"])
    assert result.exit_code == 0, result.output
    for split in ("train", "valid"):
        result = runner.invoke(app, ["data", "validate", str(tmp_path / split / f"omni_rl_format_{split}.json"),
                                     "--check-media"])
        assert result.exit_code == 0, result.output
        assert "ok" in result.output and "answer letters" in result.output
    data = json.loads((tmp_path / "train/omni_rl_format_train.json").read_text())
    data[0]["solution"] = "<answer>Q</answer>"
    (tmp_path / "train/omni_rl_format_train.json").write_text(json.dumps(data))
    result = runner.invoke(app, ["data", "validate", str(tmp_path / "train/omni_rl_format_train.json")])
    assert result.exit_code == 1
    assert ":0:solution:" in result.output
