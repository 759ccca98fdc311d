"""One run per output directory: a new run never mixes its steps into, or overwrites, a previous one.

`locked_output_dir` holds the directory's lock for the whole run: a second run into it fails at once, naming the
one that holds it (`echoink.run_lock`). `check_output_dir` then runs, before anything is loaded or written:

    output_dir is a file                        -> error
    output_dir holds no run                     -> start (a missing or empty directory, or unrelated files)
    holds a run, resume=true, a checkpoint      -> resume (the logs are cut back to the checkpoint's step)
    holds a run, resume=true, no checkpoint     -> error: nothing to resume; say so instead of starting over
    holds a run, --resume PATH inside it        -> resume from PATH
    holds a run, otherwise                      -> error naming the run, offering resume=true or a new
                                                   output_dir; `overwrite_output_dir=true` clears it first

"Holds a run" means one of the entries a run writes exists (`RUN_ENTRIES`, checkpoints, their temporary
directories). Clearing removes only those entries, never other files a user keeps in the directory.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

from echoink.config import ConfigError, TrainConfig
from echoink.grpo.checkpoint import checkpoint_dirs
from echoink.run_lock import directory_lock, hold_lock, is_main_launch_process

#: What a training run writes in output_dir besides checkpoints ("echoink": report_to trackers' logs).
RUN_ENTRIES = ("metrics.jsonl", "completions.jsonl", "config.resolved.json", "final", "adapter", ".final.tmp",
               ".adapter.tmp", "curves.png", "aha", "echoink")


class OutputDirError(ConfigError):
    """output_dir cannot be used as asked; the message names it and what to do."""


def previous_run_entries(output_dir: str | Path) -> list[Path]:
    """The entries of a previous run in `output_dir` (empty when it holds none)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [output_dir / name for name in RUN_ENTRIES if (output_dir / name).exists()]
    found += sorted(p for p in output_dir.iterdir()
                    if p.name.startswith(("checkpoint-", ".checkpoint-")) and p.is_dir())
    return found


@contextmanager
def locked_output_dir(output_dir: str | Path) -> Iterator[None]:
    """Hold `output_dir`'s lock for the `with` block (the main process of a launch only: one lock for the run).

    Raises OutputDirError for an output_dir that is a file, LockedError (naming the holder) when another run
    holds it. See `echoink.run_lock`.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(f"output_dir {output_dir} is a file, not a directory; choose another output_dir")
    lock = hold_lock(directory_lock(output_dir), f"output_dir {output_dir}") if is_main_launch_process() \
        else nullcontext()
    with lock:
        yield


def check_output_dir(config: TrainConfig, resume_from: str | Path | None = None) -> list[Path]:
    """Refuse an output_dir that would mix or overwrite runs (see the module docstring).

    Returns the entries to clear before starting (`overwrite_output_dir=true`; empty otherwise): the
    caller removes them with `clear_previous_run` on the main process. Raises OutputDirError.
    """
    output_dir = Path(config.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(f"output_dir {output_dir} is a file, not a directory; choose another output_dir")
    entries = previous_run_entries(output_dir)
    if not entries:
        return []
    explicit = resume_from or config.resume_from_checkpoint
    if explicit and Path(explicit).resolve().parent == output_dir.resolve():
        return []  # continues this run from one of its own checkpoints
    if config.resume and not explicit:
        if checkpoint_dirs(output_dir):
            return []
        if config.overwrite_output_dir:
            return entries
        raise OutputDirError(f"resume=true, but {output_dir} holds a run ({_describe(entries)}) without a complete "
                             "checkpoint to resume from; to start over pass overwrite_output_dir=true (it deletes "
                             "that run), or choose a new output_dir")
    if config.overwrite_output_dir:
        return entries
    offer = " or resume=true to continue it" if checkpoint_dirs(output_dir) and not explicit else ""
    raise OutputDirError(f"output_dir {output_dir} already holds a run ({_describe(entries)}); choose a new "
                         f"output_dir{offer}, or pass overwrite_output_dir=true to delete that run first")


def clear_previous_run(entries: list[Path]) -> str:
    """Delete a previous run's entries (main process only); returns the line to log."""
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)
    return (f"overwrite_output_dir=true: deleted the previous run in {entries[0].parent} "
            f"({_describe(entries)})") if entries else ""


def _describe(entries: list[Path]) -> str:
    names = [entry.name for entry in entries]
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
