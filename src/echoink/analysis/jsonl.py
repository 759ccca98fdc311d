"""Reading JSON Lines files (metrics.jsonl, completions.jsonl, predictions.jsonl) with errors that name file:line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Union


class JsonlError(ValueError):
    """A JSON Lines file could not be read; the message names ``file:line``."""


def iter_jsonl(path: Union[str, Path]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line_number, object)`` for every non-blank line of ``path`` (1-based line numbers).

    Raises:
        FileNotFoundError: ``path`` does not exist (or is a directory).
        JsonlError: a line is not valid JSON, or is valid JSON but not an object; the message is
            ``"<path>:<line>: <reason>"``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open("r", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise JsonlError(f"{path}:{line_number}: invalid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(value, dict):
                raise JsonlError(f"{path}:{line_number}: expected a JSON object, got {type(value).__name__}")
            yield line_number, value


def read_jsonl(path: Union[str, Path]) -> list[dict[str, Any]]:
    """Every non-blank line of ``path`` as a JSON object, in file order (errors as :func:`iter_jsonl`)."""
    return [value for _, value in iter_jsonl(path)]
