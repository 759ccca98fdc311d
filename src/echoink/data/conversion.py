"""What every converter of a published benchmark into echoink's JSON format shares.

A converter reads the benchmark's own annotation file (a JSON array of question objects), checks each
question, and writes one echoink record per question whose media exist. Rules common to all of them:

* a malformed annotation (a missing or ill-typed field, an answer that is not one of the choices) stops the
  conversion with ONE line naming the file, the record's position and its id: ``FILE:record 3 (id 183):
  multi_choice: ...`` (:class:`ConversionError`), and nothing is written;
* a question whose media file is absent is skipped and counted (downloads of YouTube-based sets such as
  VGGSound always miss some clips), never written with a dangling path;
* media are not copied: the records point at the benchmark's files, relative to the output file's directory
  (echoink resolves media paths relative to the data file and refuses paths that leave its directory), so the
  output file must be written in a directory that contains the media (:func:`relative_media_path`);
* the output is written atomically (``io.write_json_atomic``).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from echoink.io import write_json_atomic

__all__ = [
    "ConversionError",
    "ConversionReport",
    "LETTERS",
    "lettered_options",
    "read_annotation_list",
    "relative_media_path",
    "require_choices",
    "require_string",
    "write_records",
]

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
#: A choice that already carries its letter: "A. text", "A) text", "(A) text", "A: text".
_LETTER_PREFIX = re.compile(r"^\(?([A-Z])[.):]\s*")


class ConversionError(ValueError):
    """A malformed annotation file or record; the message is one line naming the file and the record."""


@dataclass
class ConversionReport:
    """What a conversion did: questions read, records written, questions skipped by reason."""

    source: str
    out_path: str = ""
    total: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        lines = [f"{self.source}: read {self.total} questions; wrote {self.kept}, skipped {sum(self.skipped.values())}"]
        lines += [f"  skipped {count:>7}  {reason}" for reason, count in sorted(self.skipped.items())]
        lines.append(f"wrote {self.out_path}")
        return "\n".join(lines)


def read_annotation_list(path: str | Path) -> list[Any]:
    """The JSON array in `path` (UTF-8, a byte-order mark allowed); ConversionError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: annotation file not found")
    try:
        value = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ConversionError(f"{path}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path}:line {exc.lineno} column {exc.colno}: invalid JSON: {exc.msg}") from None
    except RecursionError:
        raise ConversionError(f"{path}: JSON nested too deeply to read") from None
    if not isinstance(value, list):
        raise ConversionError(f"{path}: expected a JSON array of questions, got a JSON {type(value).__name__}")
    return value


def lettered_options(choices: list[str], where: str) -> list[str]:
    """``["A. first", "B. second", ...]`` from choice texts, which may already carry their letters in order
    ("A. first", "(B) second"): those prefixes are replaced, so a choice is never lettered twice."""
    if len(choices) < 2 or len(choices) > len(LETTERS):
        raise ConversionError(f"{where}: expected 2 to {len(LETTERS)} choices, got {len(choices)}")
    texts = []
    for position, choice in enumerate(choices):
        prefix = _LETTER_PREFIX.match(choice)
        text = choice[prefix.end():] if prefix and prefix.group(1) == LETTERS[position] else choice
        text = " ".join(text.split())
        if not text:
            raise ConversionError(f"{where}: choice {position + 1} is empty")
        texts.append(f"{LETTERS[position]}. {text}")
    return texts


def relative_media_path(media: Path, out_dir: Path, where: str) -> str:
    """`media` relative to the output file's directory, in POSIX form; ConversionError when it lies outside it."""
    media, out_dir = Path(os.path.abspath(media)), Path(os.path.abspath(out_dir))
    try:
        return media.relative_to(out_dir).as_posix()
    except ValueError:
        raise ConversionError(
            f"{where}: the media {str(media)!r} are not under the output file's directory {str(out_dir)!r}; echoink "
            "reads media relative to the data file, so write the output file into a directory that contains them"
        ) from None


def convert_annotations(qa_path: Path, videos_dir: Path, out_path: Path, convert_one: Callable[[Any, int], dict | None],
                        missing_reason: str) -> ConversionReport:
    """The loop both benchmark converters share: check the media directory, read the annotation list, convert
    each item with `convert_one(item, index)` (None: its media file is missing, counted under `missing_reason`),
    write the kept records atomically. A ConversionError from any item stops it before anything is written."""
    if not videos_dir.is_dir():
        raise ConversionError(f"{videos_dir}: videos directory not found")
    relative_media_path(videos_dir, out_path.parent, f"--videos {videos_dir}")
    items = read_annotation_list(qa_path)
    report = ConversionReport(source=str(qa_path), total=len(items))
    records = []
    for index, item in enumerate(items):
        record = convert_one(item, index)
        if record is None:
            report.skipped[missing_reason] += 1
        else:
            records.append(record)
    return write_records(records, out_path, report)


def write_records(records: list[dict[str, Any]], out_path: str | Path, report: ConversionReport) -> ConversionReport:
    """Write the records atomically as a JSON array; fill in the report's counts and path."""
    report.kept = len(records)
    report.out_path = str(write_json_atomic(out_path, records))
    return report


def require_object(item: Any, where: str) -> dict:
    """An annotation item must be a JSON object; one line naming `where` otherwise."""
    if not isinstance(item, dict):
        raise ConversionError(f"{where}: expected a JSON object, got a JSON {type(item).__name__}")
    return item


def require_string(item: dict, name: str, where: str) -> str:
    """The non-empty string field `name`, stripped."""
    value = item.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ConversionError(f"{where}: {name}: expected a non-empty string, got {_shown(value)}")
    return value.strip()


def require_choices(item: dict, name: str, where: str) -> list[str]:
    """The list-of-strings field `name`."""
    value = item.get(name)
    if not isinstance(value, list) or not all(isinstance(choice, str) for choice in value):
        raise ConversionError(f"{where}: {name}: expected a list of strings, got {_shown(value)}")
    return value


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=True) if value is not None else "nothing"
    return text if len(text) <= 60 else text[:57] + "..."
