"""Datasets people already have: a `datasets` `save_to_disk` directory or a parquet file with the AVQA-R1
columns (problem_id, problem, data_type, problem_type, options, solution, path, ...), read into the same
record objects the JSON format has, so `records.py` validates them exactly like a JSON file.

Media may be given three ways, per kind (image, audio, video):
* `path.<kind>`: a file path relative to the dataset's directory (the save_to_disk directory, or the
  parquet file's directory), as in the JSON format;
* `path.<kind>` or a top-level `<kind>` column holding `{"bytes": ..., "path": "name.ext"}` (how `datasets`'
  Image / Audio / Video features store a file): the bytes are written once, by content, to echoink's media cache
  (`$ECHOINK_CACHE` or `~/.cache/echoink/media`, named by their SHA-256 with the extension of `path`) and read
  from there by echoink's own loaders (no torchcodec, no torchvision);
* null entries of the `path` struct (a column every row shares) are ignored.
The table is read as stored (pyarrow), without decoding any feature.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from echoink.io import write_bytes_atomic

MEDIA_KINDS = ("image", "audio", "video")
TABLE_SUFFIXES = (".parquet",)
ACCEPTED = ("an AVQA-R1 JSON array or JSON Lines file, a parquet file with the AVQA-R1 columns, or a directory "
            "written by datasets' save_to_disk")


@dataclass(frozen=True)
class EmbeddedMedia:
    """A media file written from a table's bytes into the media cache (already outside the dataset root)."""

    path: Path
    name: str  # the table's own file name, for messages


def is_table(path: Path) -> bool:
    return path.is_dir() or path.suffix.lower() in TABLE_SUFFIXES


def read_table_items(path: Path, file: str) -> tuple[list[Any] | None, list[str]]:
    """The rows of a save_to_disk directory or a parquet file as AVQA-R1 record dicts, media bytes written to
    the cache; or (None, [one problem line])."""
    try:
        rows = _load_rows(path, file)
    except _TableError as exc:
        return None, [str(exc)]
    items, problems = [], []
    for index, row in enumerate(rows):
        item, item_problems = _record_dict(row, index, file)
        items.append(item)
        problems.extend(item_problems)
    return items, problems


class _TableError(ValueError):
    pass


def _load_rows(path: Path, file: str) -> list[dict]:
    import pyarrow as pa

    if not path.exists():
        raise _TableError(f"{file}: file not found")
    try:
        if path.is_dir():
            from datasets import Dataset, DatasetDict, load_from_disk

            if not ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
                raise _TableError(f"{file}: a directory, but not one written by datasets' save_to_disk (no "
                                  f"dataset_info.json); give {ACCEPTED}")
            dataset = load_from_disk(str(path))
            if isinstance(dataset, DatasetDict):
                raise _TableError(f"{file}: holds the splits {', '.join(dataset)}; give one of them, e.g. "
                                  f"{path / next(iter(dataset))}")
            assert isinstance(dataset, Dataset)
            table = dataset.with_format("arrow")[:]  # as stored: no feature is decoded
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
    except _TableError:
        raise
    except (OSError, ValueError, TypeError, pa.ArrowException) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _TableError(f"{file}: cannot read it as {'a save_to_disk dataset' if path.is_dir() else 'parquet'}: "
                          f"{first}") from None
    return table.to_pylist()


def _record_dict(row: dict, index: int, file: str) -> tuple[dict, list[str]]:
    """One table row as the JSON format's record: media columns folded into `path`, bytes cached."""
    problems = []
    item = {key: value for key, value in row.items() if key not in MEDIA_KINDS}
    paths = item.get("path")
    if isinstance(paths, dict):
        paths = {kind: value for kind, value in paths.items() if value is not None}
    for kind in MEDIA_KINDS:
        if row.get(kind) is not None:  # a top-level Image / Audio / Video column
            paths = dict(paths) if isinstance(paths, dict) else {}
            paths[kind] = row[kind]
    if isinstance(paths, dict):
        for kind, value in list(paths.items()):
            if isinstance(value, dict):
                cached = _cache_media(value, kind, lambda reason, k=kind: problems.append(
                    f"{file}:{index}:path.{k}: {reason}"))
                paths[kind] = cached if cached is not None else None
        paths = {kind: value for kind, value in paths.items() if value is not None}  # failures: reported
    if paths is not None or "path" in row:
        item["path"] = paths
    return item, problems


def _cache_media(value: dict, kind: str, report) -> EmbeddedMedia | str | None:
    """`{"bytes", "path"}` -> an EmbeddedMedia in the cache (or the relative path when there are no bytes)."""
    data, name = value.get("bytes"), value.get("path")
    if data is None:
        if isinstance(name, str) and name:
            return name  # datasets stored only the file's path: relative to the dataset, as in JSON
        report("neither bytes nor a path")
        return None
    if not isinstance(data, (bytes, bytearray)):
        report(f"bytes must be binary, got {type(data).__name__}")
        return None
    suffix = Path(name).suffix.lower() if isinstance(name, str) else ""
    if not suffix:
        report(f"{kind} bytes without a file name: the 'path' next to 'bytes' must name the file (its extension "
               "says how to decode it)")
        return None
    target = media_cache_dir() / f"{hashlib.sha256(data).hexdigest()[:32]}{suffix}"
    if not target.is_file():
        write_bytes_atomic(target, bytes(data))
    return EmbeddedMedia(target, name)


def media_cache_dir() -> Path:
    """Where media bytes from tables are written ($ECHOINK_CACHE, or ~/.cache/echoink, + /media)."""
    base = os.environ.get("ECHOINK_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "echoink"
    return Path(base) / "media"
