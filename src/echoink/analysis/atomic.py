"""Atomic file writes: write a sibling temporary file, then ``os.replace`` it over the target.

A reader never sees a half-written report or PNG, and an interrupted write leaves the old file intact.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Union


def write_bytes_atomic(path: Union[str, Path], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parent folders are created). Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    return path


def write_text_atomic(path: Union[str, Path], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically. Returns ``path``."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def save_figure_atomic(figure, path: Union[str, Path], dpi: int = 110) -> Path:
    """Render a matplotlib ``Figure`` to PNG in memory, then write it to ``path`` atomically. Returns ``path``."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return write_bytes_atomic(path, buffer.getvalue())
