"""Daily-Omni (``qa.json`` over ``Videos/<id>/<id>_video.mp4`` + ``<id>_audio.wav``) -> echoink's format.

Daily-Omni's ``qa.json`` is a JSON array of questions::

    {"Question": "What sound accompanies the moment the dog jumps?", "Choice": ["A. ...", "B. ...", "C. ...", "D. ..."],
     "Answer": "B", "video_id": "bswbQtOPk6E", "Type": "AV Event Alignment", "video_duration": "30s",
     "video_category": "..."}

with the media of video ``<id>`` in ``<videos>/<id>/<id>_video.mp4`` (a clip with its sound track) and
``<videos>/<id>/<id>_audio.wav`` (the same sound on its own). Daily-Omni evaluates three input modes; each is a
conversion mode here (``mode``), and each has the echoink ablation that asks the same question while keeping the
prompt's shape:

=========  ==============================================  ==============================================
mode       records written                                  the same question as an ablation of ``all``
=========  ==============================================  ==============================================
``all``    ``video_audio``: the clip and its own track      (none)
``visual`` ``video``: the clip's frames only                ``echoink eval --ablate mute-audio``
``audio``  ``audio``: ``<id>_audio.wav`` only               ``echoink eval --ablate blank-image``
=========  ==============================================  ==============================================

The modes drop the other modality's tokens (as Daily-Omni's own scripts do); the ablations keep them and feed
silence or grey frames. ``problem_id`` is the question's position in ``qa.json`` (Daily-Omni has no question
ids); ``Type``, ``video_duration``, ``video_category`` and ``video_id`` are kept as extra fields
(``qa_type``, ``video_duration``, ``video_category``, ``video_id``). ``Choice`` entries may carry their letters
("A. ...") or not; ``Answer`` is one option letter. Questions whose media file is missing are skipped and
counted.
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

__all__ = ["DAILY_OMNI_DATA_SOURCE", "DAILY_OMNI_MODES", "convert_daily_omni"]

DAILY_OMNI_DATA_SOURCE = "Daily-Omni"
#: mode -> (data_type, path key, file name pattern under <videos>/<id>/)
DAILY_OMNI_MODES = {
    "all": ("video_audio", "video", "{id}_video.mp4"),
    "visual": ("video", "video", "{id}_video.mp4"),
    "audio": ("audio", "audio", "{id}_audio.wav"),
}
#: Daily-Omni field -> the extra field kept on the record
KEPT_FIELDS = {"Type": "qa_type", "video_duration": "video_duration", "video_category": "video_category",
               "video_id": "video_id"}
MISSING_MEDIA = "media file missing"


def convert_daily_omni(qa_path: str | Path, videos_dir: str | Path, out_path: str | Path,
                       mode: str = "all") -> ConversionReport:
    """Convert Daily-Omni's ``qa_path`` with media under ``videos_dir`` into the echoink JSON file ``out_path``
    (whose directory must contain ``videos_dir``) for input `mode` (all | visual | audio). Raises
    ConversionError (one line) on a malformed file or record; writes nothing then."""
    if mode not in DAILY_OMNI_MODES:
        raise ConversionError(f"mode must be one of {', '.join(DAILY_OMNI_MODES)}, got {mode!r}")
    qa_path, videos_dir, out_path = Path(qa_path), Path(videos_dir), Path(out_path)

    def convert_one(item, index: int) -> dict | None:
        return _convert_question(item, index, qa_path, videos_dir, out_path.parent, mode)

    return convert_annotations(qa_path, videos_dir, out_path, convert_one, MISSING_MEDIA)


def _convert_question(item, index: int, qa_path: Path, videos_dir: Path, out_dir: Path, mode: str) -> dict | None:
    where = f"{qa_path}:record {index}"
    item = require_object(item, where)
    video_id = require_string(item, "video_id", where)
    where = f"{qa_path}:record {index} (video_id {video_id})"
    if "/" in video_id or "\\" in video_id or video_id in (".", ".."):
        raise ConversionError(f"{where}: video_id: {video_id!r} is not a directory name")
    question = require_string(item, "Question", where)
    options = lettered_options(require_choices(item, "Choice", where), f"{where}: Choice")
    answer = require_string(item, "Answer", where)
    letter = answer.upper()[0] if len(answer) == 1 or answer[1:2] in (".", ")", ":", " ") else answer
    if letter not in LETTERS[: len(options)]:
        raise ConversionError(f"{where}: Answer: expected one of the option letters "
                              f"{', '.join(LETTERS[: len(options)])}, got {answer!r}")
    data_type, key, pattern = DAILY_OMNI_MODES[mode]
    media = videos_dir / video_id / pattern.format(id=video_id)
    relative = relative_media_path(media, out_dir, where)
    if not media.is_file():
        return None
    record = {
        "problem_id": index,
        "problem": question,
        "data_type": data_type,
        "problem_type": MULTIPLE_CHOICE,
        "options": options,
        "solution": f"<answer>{letter}</answer>",
        "path": {key: relative},
        "data_source": DAILY_OMNI_DATA_SOURCE,
    }
    record.update({kept: item[name] for name, kept in KEPT_FIELDS.items() if name in item})
    return record
