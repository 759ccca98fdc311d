"""One writer at a time: an exclusive lock on a run directory (train, demo) or a predictions file (eval).

    with hold_lock(directory_lock(output_dir), f"output_dir {output_dir}"):
        ...   # the whole run

The lock is a small file (`<dir>/.echoink.lock`, `<predictions>.lock`), removed when its holder ends normally
(a killed holder leaves it behind, recognised as stale). Holding it means both of these:

* an exclusive `flock` on it, which the kernel drops when the holder exits in any way (a kill included), so a
  killed run never blocks its own resume on the same host;
* its content naming the holder: host, pid, start time, the command, and a heartbeat time that a background
  thread refreshes every `HEARTBEAT_SECONDS`.

A lock whose flock can be taken is *stale* (its holder ended) when the holder is on this host and its pid is
no longer running, when the content says it was released, or — for a holder on another host — when its
heartbeat is older than `STALE_AFTER_SECONDS`. The heartbeat is what makes the lock trustworthy on NFS, where
multi-node runs keep their output: `flock` there is either forwarded to the server (and works across hosts)
or, with `local_lock=flock` / `nolock` mounts, only excludes processes of one host. So a run started on
another host within `STALE_AFTER_SECONDS` of a kill there is refused, and two hosts breaking the same stale
lock in the same second could both win (docs/faults.md says so).

In a multi-process run only the main process (RANK 0, or no RANK) takes the lock, before the process group
forms: the other processes cannot start work without it, and a launcher stops them when it fails.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from echoink.io import check_writable, reporting_full_disk

__all__ = ["LockedError", "directory_lock", "file_lock", "hold_lock", "is_main_launch_process"]

LOCK_NAME = ".echoink.lock"
HEARTBEAT_SECONDS = 20.0
STALE_AFTER_SECONDS = 120.0


class LockedError(Exception):
    """Another process holds the lock; the message names it (pid, host, start time) and what to do."""


def directory_lock(directory: str | Path) -> Path:
    """The lock file of a run directory: `<dir>/.echoink.lock`."""
    return Path(directory) / LOCK_NAME


def file_lock(path: str | Path) -> Path:
    """The lock file of an output file: `<file>.lock`."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


def is_main_launch_process() -> bool:
    """Whether this process is the main one of a launch (`RANK` 0, or no launcher): the one that locks."""
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


@contextmanager
def hold_lock(path: str | Path, what: str) -> Iterator[Path]:
    """Hold the lock file `path` for the `with` block; raises LockedError naming the holder when it is held.

    `what` names the locked thing in the message ("output_dir /runs/a", "predictions file p.jsonl").
    """
    path = Path(path)
    check_writable(path.parent)  # a read-only or full place: one line now, before any work
    handle = _open_and_take(path, what)
    try:
        stop = threading.Event()
        beat = threading.Thread(target=_heartbeat, args=(handle, stop), daemon=True, name="echoink-lock")
        beat.start()
        try:
            yield path
        finally:
            stop.set()
            beat.join()
            try:  # removed while still held: whoever opened it meanwhile sees another file and tries again
                _write_holder(handle, {"released": _now()})
                path.unlink(missing_ok=True)
            except OSError:  # a full disk: the flock still drops; another host waits for the heartbeat to age
                pass
    finally:
        os.close(handle)  # drops the flock


def _open_and_take(path: Path, what: str) -> int:
    """Open (or create) the lock file and take it; the descriptor stays open while the lock is held."""
    for _ in range(10):
        with reporting_full_disk(path):
            handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                _take(handle, path, what)
                if _same_file(handle, path):
                    return handle
            except BaseException:
                os.close(handle)
                raise
        os.close(handle)  # the holder removed it as we opened it: take the new one
    raise LockedError(f"{what}: its lock file {path} keeps being replaced; is another program deleting it?")


def _same_file(handle: int, path: Path) -> bool:
    try:
        opened, named = os.fstat(handle), os.stat(path)
    except FileNotFoundError:
        return False
    return (opened.st_dev, opened.st_ino) == (named.st_dev, named.st_ino)


def _take(handle: int, path: Path, what: str) -> None:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        flock_held = True
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise LockedError(_message(path, what, _read_holder(handle))) from None
        flock_held = False  # ENOLCK: no locking on this file system; the content alone decides
    holder = _read_holder(handle)
    # on one host a free flock proves the holder ended; across hosts only the heartbeat does (see above)
    if not (flock_held and holder.get("host") == socket.gethostname()) and _alive(holder):
        raise LockedError(_message(path, what, holder))
    _write_holder(handle, {"host": socket.gethostname(), "pid": os.getpid(), "started": _now(),
                           "heartbeat": time.time(), "command": " ".join(sys.argv)[:300]})


def _alive(holder: dict) -> bool:
    """Without a flock to go by: a holder on this host is alive while its pid runs, one on another host while
    its heartbeat is fresh."""
    if not holder or "released" in holder or "pid" not in holder:
        return False
    if holder.get("host") == socket.gethostname():
        return _pid_running(holder.get("pid")) and holder.get("pid") != os.getpid()
    beat = holder.get("heartbeat")
    return isinstance(beat, (int, float)) and time.time() - beat < STALE_AFTER_SECONDS


def _pid_running(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _heartbeat(handle: int, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_SECONDS):
        holder = _read_holder(handle)
        if holder.get("pid") == os.getpid():
            try:
                _write_holder(handle, {**holder, "heartbeat": time.time()})
            except OSError:  # a full or vanished disk: the run itself reports it
                return


def _read_holder(handle: int) -> dict:
    try:
        data = os.pread(handle, 4096, 0)
        value = json.loads(data.decode("utf-8")) if data.strip() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {"unreadable": True}
    return value if isinstance(value, dict) else {"unreadable": True}


def _write_holder(handle: int, holder: dict) -> None:
    data = (json.dumps(holder) + "\n").encode("utf-8")
    os.ftruncate(handle, 0)
    os.pwrite(handle, data, 0)
    os.fsync(handle)


def _message(path: Path, what: str, holder: dict) -> str:
    if holder.get("pid") is None:
        who = "another process (its details are unreadable)"
    else:
        who = (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
               + (f" ({holder['command']})" if holder.get("command") else ""))
    return (f"{what} is in use by {who}; wait for it to finish, or choose another one (lock file {path}; if that "
            f"process has ended on another host, the lock frees itself {STALE_AFTER_SECONDS:.0f} s after it ended)")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
