"""File durability, in one place: every file echoink writes or appends goes through here.

* whole files: written to a temporary file in the target's directory, fsynced, then ``os.replace``d
  (``write_bytes_atomic``, ``write_text_atomic``, ``write_json_atomic``, ``save_figure_atomic``);
* whole directories: built under a temporary sibling, then swapped into place (``building_directory``,
  ``replace_directory``): a reader never sees a half-written model or checkpoint;
* JSON Lines logs: whole lines appended and fsynced (``append_jsonl``), so a kill can only cut the last
  line; readers either name ``file:line`` of a damaged line (``iter_jsonl``) or drop a cut last line
  (``read_jsonl_tolerant``, ``truncate_jsonl_after``, ``repair_cut_last_line``). Lines end at "\n" and
  nowhere else (``split_jsonl_lines``): text in a value may hold U+0085, U+2028 or U+2029, which
  ``str.splitlines`` would take for line ends;
* strict JSON: every writer (``write_json_atomic``, ``append_jsonl``) writes a float that is not finite
  (NaN, Infinity) as ``null`` (``to_strict_json``), so any JSON parser reads the files; readers take
  ``null`` as "missing";
* a full disk: a write that fails because the device is full raises ``NoSpaceLeftError`` naming the
  file or directory being written ("no space left on <path>"), and leaves what was there before intact
  (``reporting_full_disk`` does the same for writes made by other libraries); a read-only file system or
  a permission error raises ``UnwritableError`` ("cannot write <path>: read-only file system; ...");
  ``check_writable`` probes an output directory before any work is done.
"""

from __future__ import annotations

import errno
import io as _stdio
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml

__all__ = [
    "JsonlError", "NoSpaceLeftError", "UnwritableError", "append_jsonl", "check_writable", "split_jsonl_lines",
    "to_strict_json", "disk_is_full", "reporting_full_disk", "building_directory", "iter_jsonl",
    "read_jsonl_tolerant", "read_object_file",
    "repair_cut_last_line", "replace_directory", "save_figure_atomic", "truncate_jsonl_after",
    "write_bytes_atomic", "write_json_atomic", "write_text_atomic",
]


# ---- a full disk ---------------------------------------------------------------------------------

#: Below this many free bytes a failed write is taken to be a full disk, when the library that wrote
#: did not keep the ENOSPC errno (torch.save reports a failed write as a bare RuntimeError).
NEARLY_FULL_BYTES = 16 * 1024 * 1024


class NoSpaceLeftError(OSError):
    """A write failed because the device holding ``path`` is full. ``str()`` is "no space left on <path>"
    and then ``detail`` (what was not written, how to recover), when given."""

    def __init__(self, path: str | Path, detail: str = "") -> None:
        super().__init__(errno.ENOSPC, "no space left on device", str(path))
        self.detail = detail

    def __str__(self) -> str:
        return f"no space left on {self.filename}" + (f": {self.detail}" if self.detail else "")


#: Why a place cannot be written (other than a full disk), each with what to do.
UNWRITABLE_CAUSES = {
    errno.EROFS: ("read-only file system", "choose a location on a writable file system"),
    errno.EACCES: ("permission denied", "choose a directory you can write to, or fix its permissions"),
    errno.EPERM: ("operation not permitted", "choose a directory you can write to, or fix its permissions"),
}


class UnwritableError(OSError):
    """``path`` cannot be written: a read-only file system or missing permission (not a full disk).

    ``str()`` is "cannot write <path>: <cause>; <what to do>"."""

    def __init__(self, path: str | Path, code: int) -> None:
        super().__init__(code, UNWRITABLE_CAUSES[code][0], str(path))

    def __str__(self) -> str:
        cause, advice = UNWRITABLE_CAUSES[self.errno]
        return f"cannot write {self.filename}: {cause}; {advice}"


def _errnos(error: BaseException) -> list[int]:
    """The errno of every OSError in ``error``'s chain of causes."""
    found, seen = [], error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            found.append(seen.errno)
        seen = seen.__cause__ or seen.__context__
    return found


def disk_is_full(error: BaseException, directory: str | Path) -> bool:
    """Whether ``error``, raised while writing into ``directory``, comes from a full device: an ENOSPC
    (or EDQUOT: quota exceeded) in its chain of causes, or — when no errno says otherwise — an I/O-like
    error (RuntimeError, safetensors' SafetensorError, an OSError without errno) with almost no free space
    left on the device. A read-only file system or a permission error is never a full disk."""
    codes = _errnos(error)
    if errno.ENOSPC in codes or errno.EDQUOT in codes:
        return True
    if codes or not (isinstance(error, (OSError, RuntimeError)) or type(error).__name__ == "SafetensorError"):
        return False
    directory = Path(directory)
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    try:
        return shutil.disk_usage(directory).free < NEARLY_FULL_BYTES
    except OSError:
        return False


@contextmanager
def reporting_full_disk(path: str | Path) -> Iterator[None]:
    """``with reporting_full_disk(target):`` a write inside that fails on a full device raises
    ``NoSpaceLeftError(target)`` (from the original error); other errors pass unchanged."""
    try:
        yield
    except (NoSpaceLeftError, UnwritableError):
        raise
    except Exception as error:
        target = Path(path)
        if disk_is_full(error, target if target.is_dir() else target.parent):
            raise NoSpaceLeftError(target) from error
        unwritable = [code for code in _errnos(error) if code in UNWRITABLE_CAUSES]
        if unwritable:
            raise UnwritableError(target, unwritable[0]) from error
        raise


def check_writable(directory: str | Path, what: str = "") -> Path:
    """Create ``directory`` if needed and write (then remove) a probe file in it, before any work is done.

    Raises UnwritableError (read-only file system, permission denied) or NoSpaceLeftError naming the
    directory (``what`` says which setting it is, e.g. "output_dir"); NotADirectoryError when it is a file.
    """
    directory = Path(directory)
    label = f"{what} {directory}" if what else str(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{label}: is a file, not a directory")
    with reporting_full_disk(label):
        directory.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".echoink-probe-", dir=directory)
        try:
            os.write(handle, b"probe")
            os.fsync(handle)
        finally:
            os.close(handle)
            os.unlink(probe)
    return directory


# ---- whole files ---------------------------------------------------------------------------------

def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parent directories are created)."""
    path = Path(path)
    with reporting_full_disk(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(handle, "wb") as temp:
                temp.write(data)
                temp.flush()
                os.fsync(temp.fileno())
            os.chmod(temp_name, 0o644)
            os.replace(temp_name, path)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, value: Any, *, indent: int | None = 2) -> Path:
    """Write ``value`` as strict JSON (UTF-8, non-ASCII kept, NaN/Infinity as null, trailing newline) to
    ``path`` atomically."""
    return write_text_atomic(path, to_strict_json(value, indent=indent) + "\n")


def _finite_or_null(value: Any) -> Any:
    """``value`` with every float that is not finite (nested in dicts, lists, tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


def to_strict_json(value: Any, *, indent: int | None = None) -> str:
    """``value`` as standard JSON text (non-ASCII kept): NaN, Infinity and -Infinity, which ``json.dumps``
    would write as bare words no other parser reads, become ``null``."""
    try:
        return json.dumps(value, indent=indent, ensure_ascii=False, allow_nan=False)
    except ValueError:  # a non-finite float somewhere inside
        return json.dumps(_finite_or_null(value), indent=indent, ensure_ascii=False, allow_nan=False)


def save_figure_atomic(figure, path: str | Path, dpi: int = 110) -> Path:
    """Render a matplotlib ``Figure`` to PNG in memory, then write it to ``path`` atomically."""
    buffer = _stdio.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return write_bytes_atomic(path, buffer.getvalue())


# ---- whole directories ---------------------------------------------------------------------------

def replace_directory(source: str | Path, target: str | Path) -> Path:
    """Move the complete directory ``source`` to ``target``, replacing an existing ``target``.

    The old ``target`` is first renamed aside and removed only after the new one is in place, so at
    every moment ``target`` is either the old complete directory or the new complete one.
    """
    source, target = Path(source), Path(target)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, target)
    return target


@contextmanager
def building_directory(target: str | Path) -> Iterator[Path]:
    """``with building_directory(out) as tmp:`` write files into ``tmp``; on success ``tmp`` replaces
    ``out`` (see ``replace_directory``); on any error ``tmp`` is removed and ``out`` is untouched."""
    target = Path(target)
    with reporting_full_disk(target.parent):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        with reporting_full_disk(target):
            yield tmp
            replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- JSON Lines ----------------------------------------------------------------------------------

class JsonlError(ValueError):
    """A JSON Lines file could not be read; the message names ``file:line``."""


def append_jsonl(path: str | Path, rows: Iterable[dict], handle=None) -> None:
    """Append whole lines and fsync: a kill never leaves a half-written line behind a complete one.

    ``handle``: an already open append handle for ``path`` (a long run keeps one open); else the file
    is opened for this call.
    """
    data = "".join(to_strict_json(row) + "\n" for row in rows).encode("utf-8")
    if not data:
        return
    with reporting_full_disk(path):
        if handle is None:
            descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                _write_all(descriptor, data)
            finally:
                os.close(descriptor)
            return
        handle.flush()  # nothing is left in its buffer: closing it after a failed write cannot fail again
        _write_all(handle.fileno(), data)


def _write_all(descriptor: int, data: bytes) -> None:
    """Write every byte with os.write (no Python buffer to flush later) and fsync."""
    view = memoryview(data)
    while view:
        view = view[os.write(descriptor, view):]
    os.fsync(descriptor)


def _decode_line(path: Path, line_number: int, line: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        raise JsonlError(f"{path}:{line_number}: invalid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(value, dict):
        raise JsonlError(f"{path}:{line_number}: expected a JSON object, got {type(value).__name__}")
    return value


def split_jsonl_lines(text: str) -> list[str]:
    """The lines of JSON Lines ``text``: split at "\n" only (a "\r" before it is JSON whitespace), never at the
    other characters ``str.splitlines`` breaks on (U+000B, U+000C, U+001C-U+001E, U+0085, U+2028, U+2029),
    which JSON leaves raw inside strings. No empty last item for a final newline."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return split_jsonl_lines(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        raise JsonlError(f"{path}: not UTF-8 text (byte {error.start}); is this the right file?") from None


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line_number, object)`` for every non-blank line of ``path`` (1-based line numbers).

    Raises:
        FileNotFoundError: ``path`` does not exist (or is a directory).
        JsonlError: the file is not UTF-8, or a line is not a JSON object; the message is
            ``"<path>:<line>: <reason>"``.
    """
    path = Path(path)
    for line_number, line in enumerate(_read_lines(path), start=1):
        if line.strip():
            yield line_number, _decode_line(path, line_number, line)


def read_jsonl_tolerant(path: str | Path) -> tuple[list[dict[str, Any]], str | None]:
    """Every non-blank line as a JSON object, like :func:`iter_jsonl`, but a damaged LAST line (a write cut by a
    kill) is dropped, not an error.

    Returns ``(rows, note)``: ``note`` says which line was ignored, or is None. A damaged line before the
    last one is still a ``JsonlError``: that is corruption, not a cut write.
    """
    path = Path(path)
    lines = _read_lines(path)
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows, note = [], None
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(_decode_line(path, index + 1, line))
        except JsonlError as error:
            if index != last:
                raise
            note = f"{error}: ignored (a write cut short)"
    return rows, note


def truncate_jsonl_after(path: str | Path, step: int) -> int:
    """Rewrite ``path`` (atomically) without the rows whose "step" is greater than ``step``, and without a
    half-written last line; returns the number of rows dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in split_jsonl_lines(path.read_bytes().decode("utf-8")):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            dropped += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)) and row["step"] > step:
            dropped += 1
        else:
            kept.append(line + "\n")
    if dropped:
        write_text_atomic(path, "".join(kept))
    return dropped


def repair_cut_last_line(path: str | Path) -> bytes:
    """Truncate bytes after the last newline of ``path`` (a write cut by a kill); return the kept bytes."""
    path = Path(path)
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with path.open("r+b") as handle:
            handle.truncate(end)
            handle.flush()
            os.fsync(handle.fileno())
    return data[:end]


# ---- JSON / YAML object files ----------------------------------------------------------------------------

def read_object_file(path: str | Path, error: type[Exception] = ValueError, *, yaml_text: bool = False,
                     missing: str = "not found", what: str = "file", hint: str = "") -> dict[str, Any]:
    """The one reader of "a file holding one JSON (or YAML) object": -> the dict, or `error` with one line.

    The line names the file and what is wrong: `missing` (no such file), not UTF-8 (the byte; "save the
    `what` as UTF-8"), invalid JSON / YAML (where), or not an object (what it is); `hint` is appended after
    "; ". A UTF-8 byte-order mark is accepted.
    """
    path = Path(path)
    suffix = f"; {hint}" if hint else ""
    if not path.is_file():
        raise error(f"{path}: {missing}{suffix}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start}); save the {what} as UTF-8{suffix}") from None
    if yaml_text:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise error(f"{path}: invalid YAML: {' '.join(str(exc).split())}{suffix}") from None
        value = {} if value is None else value
    else:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise error(f"{path}: not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg}){suffix}") from None
    if not isinstance(value, dict):
        kind = "a mapping (key: value lines)" if yaml_text else "a JSON object"
        raise error(f"{path}: expected {kind}, got {type(value).__name__}{suffix}")
    return value
