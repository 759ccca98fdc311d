"""The original AVQA benchmark (``train_qa.json`` / ``val_qa.json`` over VGGSound clips) -> echoink's format.

AVQA's annotation files are JSON arrays of questions::

    {"id": 183, "video_name": "-HG3Omg_89c_000030", "video_id": 341,
     "question_text": "What happened in the video?",
     "multi_choice": ["motorboat", "Yacht consignment", "Sailboat set sail", "Consignment car"],
     "answer": 1, "question_relation": "View", "question_type": "Happening"}

``answer`` is the 0-based index of the right choice; the clip is ``<videos>/<video_name>.mp4`` (VGGSound's
10-s clips, with their sound track). Each question becomes one ``video_audio`` multiple-choice record (the
video's own audio track is heard, as AVQA intends), ``problem_id`` = AVQA's ``id``, choices lettered A, B, ...
in AVQA's order, ``data_source`` "AVQA"; ``video_name``, ``video_id``, ``question_relation`` and
``question_type`` are kept as extra fields. Questions whose clip is missing are skipped and counted.
"""

from __future__ import annotations

from pathlib import Path

from echoink.data.conversion import (
    LETTERS,
    ConversionError,
    ConversionReport,
    convert_annotations,
    lettered_options,
    relative_media_path,
    require_choices,
    require_object,
    require_string,
)
from echoink.problem_types import MULTIPLE_CHOICE

__all__ = ["AVQA_DATA_SOURCE", "VIDEO_EXTENSION", "convert_avqa"]

AVQA_DATA_SOURCE = "AVQA"
VIDEO_EXTENSION = ".mp4"
KEPT_FIELDS = ("video_name", "video_id", "question_relation", "question_type")
MISSING_VIDEO = "video file missing"


def convert_avqa(qa_path: str | Path, videos_dir: str | Path, out_path: str | Path) -> ConversionReport:
    """Convert AVQA's ``qa_path`` (train_qa.json or val_qa.json) with clips in ``videos_dir`` into the echoink
    JSON file ``out_path`` (whose directory must contain ``videos_dir``). Raises ConversionError (one line)
    on a malformed file or record; writes nothing then."""
    qa_path, videos_dir, out_path = Path(qa_path), Path(videos_dir), Path(out_path)
    seen: dict[str, int] = {}  # id -> first record index (ids must be unique)

    def convert_one(item, index: int) -> dict | None:
        return _convert_question(item, index, qa_path, videos_dir, out_path.parent, seen)

    return convert_annotations(qa_path, videos_dir, out_path, convert_one, MISSING_VIDEO)


def _convert_question(item, index: int, qa_path: Path, videos_dir: Path, out_dir: Path, seen: dict) -> dict | None:
    where = f"{qa_path}:record {index}"
    item = require_object(item, where)
    question_id = item.get("id")
    if isinstance(question_id, bool) or not isinstance(question_id, (int, str)) or str(question_id).strip() == "":
        raise ConversionError(f"{where}: id: expected an integer or a string")
    where = f"{qa_path}:record {index} (id {question_id})"
    if str(question_id) in seen:
        raise ConversionError(f"{where}: id: the same id as record {seen[str(question_id)]}")
    seen[str(question_id)] = index
    question = require_string(item, "question_text", where)
    choices = require_choices(item, "multi_choice", where)
    options = lettered_options(choices, f"{where}: multi_choice")
    answer = item.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ConversionError(f"{where}: answer: expected the index of a choice (0 to {len(choices) - 1}), "
                              f"got {answer!r}")
    video_name = require_string(item, "video_name", where)
    if "/" in video_name or "\\" in video_name or video_name in (".", ".."):
        raise ConversionError(f"{where}: video_name: {video_name!r} is not a file name")
    video = videos_dir / f"{video_name}{VIDEO_EXTENSION}"
    relative = relative_media_path(video, out_dir, where)
    if not video.is_file():
        return None
    record = {
        "problem_id": question_id,
        "problem": question,
        "data_type": "video_audio",
        "problem_type": MULTIPLE_CHOICE,
        "options": options,
        "solution": f"<answer>{LETTERS[answer]}</answer>",
        "path": {"video": relative},
        "data_source": AVQA_DATA_SOURCE,
    }
    record.update({name: item[name] for name in KEPT_FIELDS if name in item})
    return record
