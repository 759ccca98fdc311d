"""Dataset records in the AVQA-R1 format and their validation.

A dataset is one JSON file (a JSON array of objects, or JSON Lines: one object per line) whose
media paths are relative to the file's own directory, exactly as AVQA-R1-6K ships it (a parquet file or a
`datasets` save_to_disk directory with the same columns is read by :mod:`echoink.data.tables` and validated
the same way)::

    AVQA_R1/train/omni_rl_format_train.json
    AVQA_R1/train/audios/sample_1234.wav
    AVQA_R1/train/images/sample_1234.jpg

One record::

    {"problem_id": 1234, "problem": "What is making the sound?", "data_type": "image_audio",
     "problem_type": "multiple choice",
     "options": ["A. Machine gun", "B. Car engine accelerating", "C. Police car siren", "D. Ambulance siren"],
     "solution": "<answer>C</answer>",
     "path": {"image": "images/sample_1234.jpg", "audio": "audios/sample_1234.wav"},
     "data_source": "OmniInstruct_v1-AVQA"}

:func:`load_dataset` validates every record before returning anything. Each problem is reported as
``FILE:INDEX:FIELD: reason`` and all problems are listed at once (:class:`DatasetError`).

``problem_type`` must be a registered type (:mod:`echoink.problem_types`; a case slip such as
"Multiple Choice" names the right spelling) and the solution must parse for it. Files may start with a
UTF-8 byte-order mark; ``problem_id`` 0 and "0" are the same id (a duplicate).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from echoink.data.tables import EmbeddedMedia, is_table, read_table_items
from echoink.hub_ids import hub_id_hint, looks_like_hub_id
from echoink.io import split_jsonl_lines
from echoink.problem_types import MULTIPLE_CHOICE, PROBLEM_TYPES, SolutionError, describe_type, unknown_type_message

__all__ = [
    "DATA_TYPES",
    "MEDIA_EXTENSIONS",
    "MULTIPLE_CHOICE",
    "DatasetError",
    "Record",
    "load_dataset",
    "validate_dataset",
]

#: Media each ``data_type`` needs, as keys of the record's ``path`` object. ``video_audio`` is a video
#: whose own audio track is used (Qwen2.5-Omni's ``use_audio_in_video``), so it needs only a video file.
DATA_TYPES: dict[str, tuple[str, ...]] = {
    "image_audio": ("image", "audio"),
    "image": ("image",),
    "audio": ("audio",),
    "video": ("video",),
    "video_audio": ("video",),
    "text": (),
}

#: File extensions accepted for each kind of media (lower case, with the dot).
MEDIA_EXTENSIONS: dict[str, frozenset[str]] = {
    "audio": frozenset({".wav", ".flac", ".mp3", ".ogg"}),
    "image": frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}),
    "video": frozenset({".mp4", ".webm", ".mkv", ".avi", ".mov"}),
}

_KNOWN_FIELDS = frozenset(
    {"problem_id", "problem", "data_type", "problem_type", "options", "solution", "path", "data_source", "needs"}
)
_SOLUTION_RE = re.compile(r"<answer>(.*)</answer>", re.DOTALL)
_OPTION_RE = re.compile(r"([A-Z])\. (.*)", re.DOTALL)
_MIN_OPTIONS = 2


@dataclass(frozen=True)
class Record:
    """One validated dataset item.

    ``media`` maps each media kind the ``data_type`` needs ("image", "audio", "video") to an absolute,
    resolved path inside the dataset directory. ``answer`` is the content of ``solution``'s answer
    block (the option letter for multiple choice). ``source`` is the dataset file and ``index`` the
    record's position in it; ``extra`` holds every field not listed here (e.g. ``family`` in the
    synthetic set), so user reward functions can receive them as columns.
    """

    problem_id: int | str
    problem: str
    data_type: str
    problem_type: str
    options: tuple[str, ...]
    solution: str
    answer: str
    media: dict[str, Path]
    data_source: str | None
    needs: str | None
    source: str
    index: int
    extra: dict[str, Any] = field(default_factory=dict)
    target: Any = None  # the solution parsed for its problem type (a letter, a number, spans, ...)

    @property
    def is_multiple_choice(self) -> bool:
        return self.problem_type == MULTIPLE_CHOICE

    @property
    def option_letters(self) -> tuple[str, ...]:
        """The letters of the options, in order ("A", "B", ...)."""
        return tuple(option[0] for option in self.options)


class DatasetError(ValueError):
    """A dataset file failed validation; ``problems`` lists every problem found, one string each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        count = len(self.problems)
        if count == 1:  # one line (a missing file, a Hub id, one bad field)
            super().__init__(f"dataset validation failed: {self.problems[0]}")
            return
        header = f"dataset validation failed with {count} problems:"
        super().__init__("\n".join([header, *self.problems]))


def load_dataset(path: str | Path) -> list[Record]:
    """Load and validate a dataset file; return all records or raise :class:`DatasetError`.

    Nothing is half-loaded: any problem in any record raises, listing all of them.
    """
    records, problems = validate_dataset(path)
    if problems:
        raise DatasetError(problems)
    return records


def validate_dataset(path: str | Path) -> tuple[list[Record], list[str]]:
    """Validate a dataset file without raising.

    Returns the records that passed and the problems found (``FILE:INDEX:FIELD: reason``). Records
    that failed are left out of the first list, so statistics can still be computed on the rest.
    Media files are checked for existence and location only; decoding them is
    :func:`echoink.data.report.decode_all_media`'s job.
    """
    file = str(path)
    path = Path(path)
    if not path.exists() and looks_like_hub_id(path):
        return [], [hub_id_hint(path, "dataset")]
    if is_table(path):  # a save_to_disk directory or a parquet file (data/tables.py)
        raw_items, problems = read_table_items(path, file)
    else:
        raw_items, problems = _read_items(path, file)
    if raw_items is None:
        return [], problems
    if not raw_items:
        return [], problems + [f"{file}: the dataset has no records"]

    # media paths are relative to the file's own directory (links to the file are not followed), or to a
    # save_to_disk directory itself
    root = (path.absolute() if path.is_dir() else path.absolute().parent).resolve()
    records: list[Record] = []
    seen_ids: dict[str, int] = {}
    for index, item in enumerate(raw_items):
        record, item_problems = _validate_item(item, index, file, root)
        if record is not None:
            first = seen_ids.setdefault(str(record.problem_id), index)  # 0 and "0" are one id
            if first != index:
                item_problems.append(f"{file}:{index}:problem_id: duplicate of record {first} ({record.problem_id!r})")
                record = None
        problems.extend(item_problems)
        if record is not None:
            records.append(record)
    return records, problems


# ---- reading the file -----------------------------------------------------------------------------


def _read_items(path: Path, file: str) -> tuple[list[Any] | None, list[str]]:
    """Parse the file as a JSON array, or as JSON Lines (``.jsonl`` / ``.ndjson`` or a file of objects)."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a leading byte-order mark is allowed
    except FileNotFoundError:
        return None, [f"{file}: file not found"]
    except UnicodeDecodeError as exc:
        return None, [f"{file}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                      "save the file as UTF-8"]
    except OSError as exc:
        return None, [f"{file}: cannot read: {exc}"]

    if path.suffix.lower() in {".jsonl", ".ndjson"}:
        return _read_json_lines(text, file)
    try:
        value = _loads(text)
    except RecursionError:
        return None, [f"{file}: JSON nested too deeply to read; records are flat objects"]
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            return _read_json_lines(text, file)  # objects one per line in a .json file
        return None, [f"{file}:line {exc.lineno} column {exc.colno}: invalid JSON: {exc.msg}"]
    if not isinstance(value, list):
        kind = _json_kind(value)
        return None, [f"{file}: not a JSON array of records (the top-level value is {kind}); "
                      "use a .jsonl file for one record per line"]
    return value, []


def _read_json_lines(text: str, file: str) -> tuple[list[Any] | None, list[str]]:
    items: list[Any] = []
    problems: list[str] = []
    for lineno, line in enumerate(split_jsonl_lines(text), start=1):
        if not line.strip():
            continue
        try:
            items.append(_loads(line))
        except RecursionError:
            problems.append(f"{file}:line {lineno}: JSON nested too deeply to read; records are flat objects")
        except json.JSONDecodeError as exc:
            problems.append(f"{file}:line {lineno} column {exc.colno}: invalid JSON: {exc.msg}")
    return (None if problems else items), problems


class _LongInteger:
    """An integer literal too long to be a useful value (Python refuses over 4,300 digits)."""

    def __init__(self, digits: str):
        self.digits = digits


_MAX_INTEGER_DIGITS = 100


def _parse_int(literal: str) -> int | _LongInteger:
    return int(literal) if len(literal.lstrip("-")) <= _MAX_INTEGER_DIGITS else _LongInteger(literal)


def _loads(text: str) -> Any:
    return json.loads(text, parse_int=_parse_int)


def _json_kind(value: Any) -> str:
    if isinstance(value, _LongInteger):
        return f"an integer of {len(value.digits.lstrip('-'))} digits (at most {_MAX_INTEGER_DIGITS})"
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
             int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


# ---- validating one record ------------------------------------------------------------------------


def _validate_item(item: Any, index: int, file: str, root: Path) -> tuple[Record | None, list[str]]:
    if not isinstance(item, dict):
        return None, [f"{file}:{index}: record is not a JSON object (got {_json_kind(item)})"]
    problems: list[str] = []

    def report(field_name: str, reason: str) -> None:
        problems.append(f"{file}:{index}:{field_name}: {reason}")

    problem_id = item.get("problem_id")
    if "problem_id" not in item:
        report("problem_id", "missing")
    elif isinstance(problem_id, bool) or not isinstance(problem_id, (int, str)):
        report("problem_id", f"must be an integer or a string, got {_json_kind(problem_id)}")
    elif isinstance(problem_id, str) and not problem_id.strip():
        report("problem_id", "must not be empty")

    problem = _required_string(item, "problem", report)
    problem_type = _required_string(item, "problem_type", report)
    if problem_type is not None and problem_type not in PROBLEM_TYPES:
        report("problem_type", unknown_type_message(problem_type))
        problem_type = None
    data_type = _required_string(item, "data_type", report)
    if data_type is not None and data_type not in DATA_TYPES:
        report("data_type", f"unknown data_type {data_type!r}; expected one of {', '.join(DATA_TYPES)}")
        data_type = None

    options = _validate_options(item, problem_type, report)
    solution, answer = _validate_solution(item, problem_type, options, report)
    target, fields = _validate_for_type(item, problem_type, answer, report)
    media = _validate_paths(item, data_type, root, report)

    data_source = item.get("data_source")
    if data_source is not None and not isinstance(data_source, str):
        report("data_source", f"must be a string or null, got {_json_kind(data_source)}")
    needs = item.get("needs")
    if needs is not None and not isinstance(needs, str):
        report("needs", f"must be a string or null, got {_json_kind(needs)}")

    if problems:
        return None, problems
    record = Record(
        problem_id=problem_id,
        problem=problem,
        data_type=data_type,
        problem_type=problem_type,
        options=tuple(options),
        solution=solution,
        answer=answer,
        media=media,
        data_source=data_source,
        needs=needs,
        source=file,
        index=index,
        extra={key: fields.get(key, value) for key, value in item.items() if key not in _KNOWN_FIELDS},
        target=target,
    )
    return record, []


def _required_string(item: dict, name: str, report) -> str | None:
    if name not in item:
        report(name, "missing")
        return None
    value = item[name]
    if not isinstance(value, str):
        report(name, f"must be a string, got {_json_kind(value)}")
        return None
    if not value.strip():
        report(name, "must not be empty")
        return None
    return value


def _validate_options(item: dict, problem_type: str | None, report) -> list[str]:
    """Options must be a list of strings lettered "A. ...", "B. ...", ... in order (multiple choice)."""
    multiple_choice = problem_type == MULTIPLE_CHOICE
    if "options" not in item or item["options"] is None:
        if multiple_choice:
            report("options", "missing (required for multiple choice)")
        return []
    options = item["options"]
    if not isinstance(options, list):
        report("options", f"must be a list of strings, got {_json_kind(options)}")
        return []
    good = True
    for position, option in enumerate(options):
        if not isinstance(option, str):
            report(f"options[{position}]", f"must be a string, got {_json_kind(option)}")
            good = False
            continue
        if not multiple_choice:
            continue
        expected = chr(ord("A") + position) if position < 26 else None
        match = _OPTION_RE.fullmatch(option)
        if expected is None:
            report(f"options[{position}]", "more than 26 options")
            good = False
        elif match is None or match.group(1) != expected or not match.group(2).strip():
            report(f"options[{position}]", f"must look like '{expected}. <text>', got {option!r}")
            good = False
    if multiple_choice and len(options) < _MIN_OPTIONS:
        report("options", f"multiple choice needs at least {_MIN_OPTIONS} options, got {len(options)}")
        good = False
    return options if good else []


def _validate_solution(item: dict, problem_type: str | None, options: list[str], report) -> tuple[str, str]:
    """The solution must be ``<answer>X</answer>``; for multiple choice X is one of the option letters."""
    solution = _required_string(item, "solution", report)
    if solution is None:
        return "", ""
    match = _SOLUTION_RE.fullmatch(solution.strip())
    if match is None or "<answer>" in match.group(1) or "</answer>" in match.group(1):
        report("solution", f"must be of the form '<answer>X</answer>', got {_shorten(solution)!r}")
        return "", ""
    answer = match.group(1).strip()
    if not answer:
        report("solution", "the answer block is empty")
        return "", ""
    if problem_type == MULTIPLE_CHOICE and options:
        letters = [option[0] for option in options]
        if answer not in letters:
            report("solution", f"answer {_shorten(answer)!r} is not one of the option letters {', '.join(letters)}")
            return "", ""
    return solution, answer


def _validate_for_type(item: dict, problem_type: str | None, answer: str, report) -> tuple[Any, dict]:
    """Fields the type requires (e.g. ``duration``) and the solution parsed for the type."""
    if problem_type is None:
        return None, {}
    kind = PROBLEM_TYPES[problem_type]
    fields: dict[str, Any] = {}
    for name in kind.required_fields:
        if name not in item:
            report(name, f"missing (problem_type {problem_type!r} needs it)")
            continue
        try:
            fields[name] = kind.check_field(name, item[name])
        except SolutionError as exc:
            report(name, str(exc))
        except Exception as exc:  # noqa: BLE001 - a user type's code failed: name it, keep validating
            report(name, f"{describe_type(kind)}: check_field() raised {type(exc).__name__}: {exc}")
    if not answer or len(fields) < len(kind.required_fields):
        return None, fields
    try:
        return kind.parse_solution(answer, {**item, **fields}), fields
    except SolutionError as exc:
        report("solution", f"{exc} (problem_type {problem_type!r})")
    except Exception as exc:  # noqa: BLE001 - a user type's own parsing error, or a bug in it
        report("solution", f"{describe_type(kind)}: parse_solution() raised {type(exc).__name__}: {exc}")
    return None, fields


def _validate_paths(item: dict, data_type: str | None, root: Path, report) -> dict[str, Path]:
    """Check the ``path`` object: the keys the data_type needs, each a safe relative path to a file."""
    needed = DATA_TYPES.get(data_type, ()) if data_type is not None else None
    paths = item.get("path")
    if paths is None:
        if needed:
            report("path", f"missing (data_type {data_type!r} needs {', '.join(needed)})")
        return {}
    if not isinstance(paths, dict):
        report("path", f"must be an object mapping media kind to file, got {_json_kind(paths)}")
        return {}
    if needed is None:  # data_type itself is broken; its problem is reported already
        return {}

    media: dict[str, Path] = {}
    for key in paths:
        if key not in needed and paths[key] is None and key in MEDIA_EXTENSIONS:
            continue  # a null entry (datasets' to_json writes every key of the path struct)
        if key not in needed:
            known = key in MEDIA_EXTENSIONS
            reason = (f"data_type {data_type!r} does not use {key}" if known
                      else f"unknown media kind {key!r}; expected one of {', '.join(MEDIA_EXTENSIONS)}")
            report(f"path.{key}", reason)
    for key in needed:
        if key not in paths:
            report(f"path.{key}", f"missing (data_type {data_type!r} needs it)")
            continue
        resolved = _resolve_media_path(paths[key], key, root, lambda reason, k=key: report(f"path.{k}", reason))
        if resolved is not None:
            media[key] = resolved
    return media


def _resolve_media_path(value: Any, kind: str, root: Path, report) -> Path | None:
    if isinstance(value, EmbeddedMedia):  # bytes from a table, written to the media cache by content
        if value.path.suffix.lower() not in MEDIA_EXTENSIONS[kind]:
            report(f"{value.name!r} has an unsupported {kind} extension (expected one of "
                   f"{', '.join(sorted(MEDIA_EXTENSIONS[kind]))})")
            return None
        return value.path
    if not isinstance(value, str):
        report(f"must be a string, got {_json_kind(value)}")
        return None
    if not value.strip():
        report("must not be empty")
        return None
    if "\x00" in value:
        report("contains a NUL character")
        return None
    if PurePosixPath(value).is_absolute() or PureWindowsPath(value).is_absolute() or PureWindowsPath(value).drive:
        report(f"must be relative to the dataset directory, got the absolute path {value!r}")
        return None
    candidate = root / value
    try:
        resolved = candidate.resolve()
    except (OSError, RuntimeError) as exc:  # symlink loops
        report(f"cannot resolve {value!r}: {exc}")
        return None
    if not resolved.is_relative_to(root):
        how = "through a symlink" if ".." not in PurePosixPath(value.replace("\\", "/")).parts else "with '..'"
        report(f"{value!r} escapes the dataset directory {str(root)!r} ({how})")
        return None
    if resolved.suffix.lower() not in MEDIA_EXTENSIONS[kind]:
        allowed = ", ".join(sorted(MEDIA_EXTENSIONS[kind]))
        report(f"{value!r} has an unsupported {kind} extension (expected one of {allowed})")
        return None
    if not resolved.exists():
        report(f"media file not found: {value!r} (looked for {str(candidate)!r})")
        return None
    if not resolved.is_file():
        report(f"{value!r} is not a regular file")
        return None
    return resolved


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
