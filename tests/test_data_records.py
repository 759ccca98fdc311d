"""Dataset loading and validation: the AVQA-R1 record format and every reported problem."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from data_fixtures import good_record, make_dataset, write_jpg, write_wav
from echoink.data import DatasetError, Record, load_dataset, validate_dataset


def test_valid_dataset_loads_with_absolute_media_paths(tmp_path):
    path = make_dataset(tmp_path, [good_record(0), good_record(1, solution="<answer>A</answer>", family="x")])
    records = load_dataset(path)
    assert len(records) == 2
    first = records[0]
    assert isinstance(first, Record)
    assert first.problem_id == 0 and first.answer == "C" and first.solution == "<answer>C</answer>"
    assert first.options == ("A. Machine gun", "B. Car engine accelerating", "C. Police car siren", "D. Ambulance siren")
    assert first.option_letters == ("A", "B", "C", "D")
    assert first.media["image"] == (tmp_path / "images/sample_0.jpg").resolve()
    assert first.media["audio"].is_absolute()
    assert first.source == str(path) and first.index == 0
    assert first.data_source == "OmniInstruct_v1-AVQA" and first.needs is None
    assert records[1].answer == "A" and records[1].extra == {"family": "x"}
    with pytest.raises(Exception):
        first.problem = "changed"  # frozen


def test_jsonl_is_accepted(tmp_path):
    array_path = make_dataset(tmp_path, [good_record(0), good_record(1)])
    lines = "\n".join(json.dumps(r) for r in json.loads(array_path.read_text())) + "\n\n"
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text(lines)
    assert [r.problem_id for r in load_dataset(jsonl)] == [0, 1]
    objects_in_json = tmp_path / "lines.json"  # objects one per line in a .json file
    objects_in_json.write_text(lines)
    assert len(load_dataset(objects_in_json)) == 2


def test_other_data_types_and_free_form(tmp_path):
    records = [
        {"problem_id": "t1", "problem": "What is 2 + 2?", "data_type": "text", "problem_type": "multiple choice",
         "options": ["A. 3", "B. 4"], "solution": "<answer>B</answer>"},
        good_record(1, data_type="image", path={"image": "images/sample_1.jpg"}),
        good_record(2, data_type="audio", path={"audio": "audios/sample_2.wav"}),
        good_record(3, data_type="video_audio", path={"video": "videos/sample_3.mp4"}, needs="video+audio"),
        {"problem_id": 4, "problem": "Describe the sound.", "data_type": "audio", "problem_type": "free-form",
         "solution": "<answer> a siren </answer>", "path": {"audio": "audios/sample_4.wav"}},
    ]
    loaded = load_dataset(make_dataset(tmp_path, records))
    assert loaded[0].media == {} and loaded[0].answer == "B"
    assert set(loaded[3].media) == {"video"} and loaded[3].needs == "video+audio"
    assert loaded[4].answer == "a siren" and loaded[4].options == ()


def _problems(tmp_path: Path, records: list, **kwargs) -> list[str]:
    path = make_dataset(tmp_path, records, **kwargs)
    with pytest.raises(DatasetError) as caught:
        load_dataset(path)
    return caught.value.problems


@pytest.mark.parametrize(
    ("record", "where", "reason"),
    [
        (dict(good_record(0), problem_id=1.5), "problem_id", "integer or a string"),
        (dict(good_record(0), problem_id=True), "problem_id", "integer or a string"),
        ({k: v for k, v in good_record(0).items() if k != "problem"}, "problem", "missing"),
        (good_record(0, problem=7), "problem", "must be a string"),
        (good_record(0, problem="  "), "problem", "empty"),
        (good_record(0, data_type="smell"), "data_type", "unknown data_type"),
        ({k: v for k, v in good_record(0).items() if k != "problem_type"}, "problem_type", "missing"),
        (good_record(0, options="A. x"), "options", "list of strings"),
        ({k: v for k, v in good_record(0).items() if k != "options"}, "options", "missing"),
        (good_record(0, options=["A. x", "C. y", "B. z"]), "options[1]", "'B. <text>'"),
        (good_record(0, options=["A. x", "B) y", "C. z"]), "options[1]", "'B. <text>'"),
        (good_record(0, options=["Machine gun", "B. y", "C. z"]), "options[0]", "'A. <text>'"),
        (good_record(0, options=["A. x", 3, "C. z"]), "options[1]", "must be a string"),
        (good_record(0, options=["A. x"], solution="<answer>A</answer>"), "options", "at least 2"),
        (good_record(0, solution="C"), "solution", "<answer>X</answer>"),
        (good_record(0, solution="<answer>C</answer> because"), "solution", "<answer>X</answer>"),
        (good_record(0, solution="<answer></answer>"), "solution", "empty"),
        (good_record(0, solution="<answer>E</answer>"), "solution", "not one of the option letters"),
        (good_record(0, solution="<answer>c</answer>"), "solution", "not one of the option letters"),
        (good_record(0, solution=["<answer>C</answer>"]), "solution", "must be a string"),
        (good_record(0, path="images/sample_0.jpg"), "path", "must be an object"),
        ({k: v for k, v in good_record(0).items() if k != "path"}, "path", "missing"),
        (good_record(0, path={"image": "images/sample_0.jpg"}), "path.audio", "missing"),
        (good_record(0, data_type="image"), "path.audio", "does not use audio"),
        (good_record(0, path={"image": "images/sample_0.jpg", "audio": "audios/sample_0.wav", "smell": "x"}),
         "path.smell", "unknown media kind"),
        (good_record(0, path={"image": 5, "audio": "audios/sample_0.wav"}), "path.image", "must be a string"),
        (good_record(0, path={"image": "images/sample_0.txt", "audio": "audios/sample_0.wav"}),
         "path.image", "unsupported image extension"),
        (good_record(0, data_source=3), "data_source", "string or null"),
        (good_record(0, needs=["audio"]), "needs", "string or null"),
    ],
)
def test_each_malformed_field_is_reported_with_file_index_and_field(tmp_path, record, where, reason):
    problems = _problems(tmp_path, [good_record(5), record])
    path = str(tmp_path / "omni_rl_format_train.json")
    assert any(p.startswith(f"{path}:1:{where}: ") and reason in p for p in problems), problems


def test_missing_media_file(tmp_path):
    path = make_dataset(tmp_path, [good_record(0), good_record(1)])
    (tmp_path / "audios/sample_1.wav").unlink()
    with pytest.raises(DatasetError) as caught:
        load_dataset(path)
    (problem,) = caught.value.problems
    assert problem.startswith(f"{path}:1:path.audio: media file not found")


def test_media_path_that_is_a_directory(tmp_path):
    (tmp_path / "images/dir.jpg").mkdir(parents=True)
    problems = _problems(tmp_path, [good_record(0, path={"image": "images/dir.jpg", "audio": "audios/sample_0.wav"})])
    assert any(":0:path.image: " in p and "not a regular file" in p for p in problems)


@pytest.mark.parametrize("bad", ["/etc/passwd.jpg", "../outside.jpg", "images/../../outside.jpg",
                                 "C:\\images\\x.jpg", "\\\\server\\share\\x.jpg"])
def test_path_escapes_are_rejected(tmp_path, bad):
    root = tmp_path / "ds"
    write_jpg(tmp_path / "outside.jpg")
    problems = _problems(root, [good_record(0, path={"image": bad, "audio": "audios/sample_0.wav"})])
    assert len(problems) == 1
    assert problems[0].startswith(f"{root / 'omni_rl_format_train.json'}:0:path.image: ")
    assert "absolute" in problems[0] or "escapes the dataset directory" in problems[0]


def test_symlink_escape_is_rejected_but_inner_symlink_is_fine(tmp_path):
    root = tmp_path / "ds"
    outside = write_jpg(tmp_path / "secret.jpg")
    (root / "images").mkdir(parents=True)
    os.symlink(outside, root / "images/link.jpg")
    os.symlink(tmp_path, root / "up")  # a directory link pointing outside
    inner = write_jpg(root / "images/real.jpg")
    os.symlink(inner, root / "images/alias.jpg")
    records = [
        good_record(0, path={"image": "images/link.jpg", "audio": "audios/sample_0.wav"}),
        good_record(1, path={"image": "up/secret.jpg", "audio": "audios/sample_1.wav"}),
        good_record(2, path={"image": "images/alias.jpg", "audio": "audios/sample_2.wav"}),
    ]
    path = make_dataset(root, records)
    loaded, problems = validate_dataset(path)
    assert [r.index for r in loaded] == [2]
    assert len(problems) == 2
    assert problems[0].startswith(f"{path}:0:path.image: ") and "through a symlink" in problems[0]
    assert problems[1].startswith(f"{path}:1:path.image: ") and "escapes" in problems[1]


def test_all_problems_listed_at_once_and_nothing_half_loaded(tmp_path):
    records = [good_record(0), good_record(1, solution="<answer>Z</answer>"), good_record(2),
               good_record(3, options=["A. a", "B. b", "D. d", "C. c"], problem=None), "not an object"]
    path = make_dataset(tmp_path, records)
    with pytest.raises(DatasetError) as caught:
        load_dataset(path)
    error = caught.value
    assert isinstance(error, ValueError)
    indices = sorted({p.split(f"{path}:", 1)[1].split(":", 1)[0] for p in error.problems})
    assert indices == ["1", "3", "4"]
    assert f"{path}:4: record is not a JSON object" in str(error)
    lines = str(error).splitlines()
    assert lines[0].startswith("dataset validation failed with 5 problems") and lines[1:] == error.problems
    loaded, problems = validate_dataset(path)
    assert [r.index for r in loaded] == [0, 2] and problems == error.problems


def test_duplicate_problem_id(tmp_path):
    problems = _problems(tmp_path, [good_record(7), good_record(8), good_record(7)])
    assert problems == [f"{tmp_path / 'omni_rl_format_train.json'}:2:problem_id: duplicate of record 0 (7)"]


def test_not_a_json_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"problem_id": 0}, indent=2))
    with pytest.raises(DatasetError, match=r"d\.json: not a JSON array"):
        load_dataset(path)


def test_bad_json_reports_line_and_column(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"problem_id": 0,\n   "problem": "x",,\n  }\n]')
    with pytest.raises(DatasetError) as caught:
        load_dataset(path)
    assert caught.value.problems == [f"{path}:line 3 column 19: invalid JSON: Expecting property name enclosed "
                                     "in double quotes"]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps(good_record(0)) + "\n{oops\n")
    with pytest.raises(DatasetError, match=r"d\.jsonl:line 2 column 2: invalid JSON"):
        load_dataset(jsonl)


def test_missing_file_and_empty_dataset(tmp_path):
    with pytest.raises(DatasetError, match="file not found"):
        load_dataset(tmp_path / "nope.json")
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DatasetError, match="no records"):
        load_dataset(empty)


def test_paths_are_relative_to_the_json_files_directory(tmp_path, monkeypatch):
    root = tmp_path / "AVQA_R1" / "train"
    path = make_dataset(root, [good_record(0)])
    monkeypatch.chdir(tmp_path)
    (record,) = load_dataset(Path("AVQA_R1/train/omni_rl_format_train.json"))
    assert record.media["audio"] == (root / "audios/sample_0.wav").resolve()
    assert record.source == "AVQA_R1/train/omni_rl_format_train.json"
    write_wav(tmp_path / "audios/sample_0.wav")  # a same-named file next to the cwd is not used
    assert load_dataset(path)[0].media["audio"].parent == (root / "audios").resolve()
