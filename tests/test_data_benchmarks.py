"""Converters of published benchmarks (AVQA, Daily-Omni) into echoink's format: fixtures in the published
layouts with synthetic media; the output loads and decodes with echoink's own loaders; malformed input is one
line naming the file and the record."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmark_fixtures import write_avqa, write_daily_omni
from echoink.data.avqa import convert_avqa
from echoink.data.conversion import ConversionError
from echoink.data.daily_omni import convert_daily_omni
from echoink.data.media import load_record_media
from echoink.data.records import load_dataset


def test_avqa_records_load_and_decode(tmp_path):
    qa, videos = write_avqa(tmp_path, count=4, missing=1)
    report = convert_avqa(qa, videos, tmp_path / "avqa_val.json")
    assert (report.total, report.kept, dict(report.skipped)) == (4, 3, {"video file missing": 1})
    records = load_dataset(tmp_path / "avqa_val.json")
    assert [r.problem_id for r in records] == [100, 101, 102]
    first = records[0]
    assert first.data_type == "video_audio" and first.options == ("A. red", "B. green", "C. blue", "D. yellow")
    assert [r.answer for r in records] == ["A", "B", "C"]          # answer index 0, 1, 2 -> letters
    assert first.extra["question_type"] == "Which" and first.extra["video_name"] == "yt000abcdefg_000000"
    media = load_record_media(first)
    assert media["video"].frames[0, 0, 0].tolist() == pytest.approx([220, 30, 30], abs=12)
    assert np.abs(media["video_audio"]).max() > 0.1                 # the clip's own sound track is read


@pytest.mark.parametrize("mode, data_type, key", [("all", "video_audio", "video"), ("visual", "video", "video"),
                                                  ("audio", "audio", "audio")])
def test_daily_omni_modes(tmp_path, mode, data_type, key):
    qa, videos = write_daily_omni(tmp_path, count=4, missing=1)
    report = convert_daily_omni(qa, videos, tmp_path / f"daily_{mode}.json", mode=mode)
    assert (report.kept, sum(report.skipped.values())) == (2, 2)    # the second video's two questions
    records = load_dataset(tmp_path / f"daily_{mode}.json")
    assert {r.data_type for r in records} == {data_type} and all(set(r.media) == {key} for r in records)
    assert [r.problem_id for r in records] == [0, 1]
    assert records[0].extra["qa_type"] == "AV Event Alignment" and records[1].extra["video_duration"] == "30s"
    media = load_record_media(records[0])
    assert ("audio" in media) == (mode == "audio") and ("video_audio" in media) == (mode == "all")


def test_daily_omni_unlettered_choices_are_lettered_once(tmp_path):
    qa, videos = write_daily_omni(tmp_path, count=2, lettered=False)
    convert_daily_omni(qa, videos, tmp_path / "d.json")
    lettered, = {tuple(r.options) for r in load_dataset(tmp_path / "d.json")}
    assert lettered == ("A. red", "B. green", "C. blue", "D. yellow")
    qa2, _ = write_daily_omni(tmp_path / "x", count=2, lettered=True)
    convert_daily_omni(qa2, tmp_path / "x" / "Videos", tmp_path / "x" / "d.json")
    assert load_dataset(tmp_path / "x" / "d.json")[0].options == lettered


def _rewrite(path, change):
    items = json.loads(path.read_text())
    change(items)
    path.write_text(json.dumps(items))


@pytest.mark.parametrize("change, expected", [
    (lambda items: items[2].update(answer=4), "record 2 (id 102): answer: expected the index of a choice (0 to 3)"),
    (lambda items: items[1].update(multi_choice="red"), "record 1 (id 101): multi_choice: expected a list of strings"),
    (lambda items: items[3].pop("question_text"), "record 3 (id 103): question_text: expected a non-empty string"),
    (lambda items: items[1].update(id=100), "record 1 (id 100): id: the same id as record 0"),
    (lambda items: items[0].update(video_name="../x"), "record 0 (id 100): video_name: '../x' is not a file name"),
    (lambda items: items.__setitem__(2, ["not", "an", "object"]), "record 2: expected a JSON object"),
])
def test_avqa_malformed_is_one_line_naming_file_and_record(tmp_path, change, expected):
    qa, videos = write_avqa(tmp_path)
    _rewrite(qa, change)
    with pytest.raises(ConversionError) as error:
        convert_avqa(qa, videos, tmp_path / "out.json")
    message = str(error.value)
    assert message.startswith(f"{qa}:") and expected in message and "\n" not in message
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("change, expected", [
    (lambda items: items[1].update(Answer="E"), "record 1 (video_id vid00_Xy-z): Answer: expected one of the option letters A, B, C, D"),
    (lambda items: items[2].update(Choice=["A. only"]), "record 2 (video_id vid01_Xy-z): Choice: expected 2 to 26 choices"),
    (lambda items: items[0].update(Choice=["A. red", "B.  "]), "record 0 (video_id vid00_Xy-z): Choice: choice 2 is empty"),
    (lambda items: items[3].update(video_id=7), "record 3: video_id: expected a non-empty string, got 7"),
])
def test_daily_omni_malformed_is_one_line_naming_file_and_record(tmp_path, change, expected):
    qa, videos = write_daily_omni(tmp_path)
    _rewrite(qa, change)
    with pytest.raises(ConversionError) as error:
        convert_daily_omni(qa, videos, tmp_path / "out.json")
    message = str(error.value)
    assert message.startswith(f"{qa}:{expected}") and "\n" not in message


def test_bad_files_and_places(tmp_path):
    qa, videos = write_avqa(tmp_path / "avqa")
    with pytest.raises(ConversionError, match="not under the output file's directory"):
        convert_avqa(qa, videos, tmp_path / "elsewhere" / "out.json")
    qa.write_text('{"id": 1}')
    with pytest.raises(ConversionError, match="expected a JSON array of questions, got a JSON dict"):
        convert_avqa(qa, videos, tmp_path / "avqa" / "out.json")
    qa.write_text('[{"id": 1,}]')
    with pytest.raises(ConversionError, match=r"line 1 column 11: invalid JSON"):
        convert_avqa(qa, videos, tmp_path / "avqa" / "out.json")
    with pytest.raises(ConversionError, match="mode must be one of all, visual, audio"):
        convert_daily_omni(qa, videos, tmp_path / "avqa" / "out.json", mode="video")


def test_cli_convert_commands(tmp_path):
    from typer.testing import CliRunner

    from echoink.cli import app

    runner = CliRunner()
    qa, videos = write_avqa(tmp_path / "avqa", count=3, missing=1)
    result = runner.invoke(app, ["data", "convert-avqa", "--qa", str(qa), "--videos", str(videos),
                                 "--out", str(tmp_path / "avqa" / "avqa_val.json")])
    assert result.exit_code == 0, result.output
    assert "read 3 questions; wrote 2, skipped 1" in result.output and "video file missing" in result.output
    qa, videos = write_daily_omni(tmp_path / "daily", count=2)
    result = runner.invoke(app, ["data", "convert-daily-omni", "--qa", str(qa), "--videos", str(videos),
                                 "--out", str(tmp_path / "daily" / "d.json"), "--mode", "visual"])
    assert result.exit_code == 0, result.output
    assert load_dataset(tmp_path / "daily" / "d.json")[0].data_type == "video"
    _rewrite(qa, lambda items: items[1].update(Answer="Z"))
    result = runner.invoke(app, ["data", "convert-daily-omni", "--qa", str(qa), "--videos", str(videos),
                                 "--out", str(tmp_path / "daily" / "d2.json")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: {qa}:record 1 (video_id vid00_Xy-z): Answer: expected one of the option letters A, B, C, D, got 'Z'"]
