"""Preemption is a checkpoint, not a loss: on SIGTERM or SIGUSR1 the run finishes its step, checkpoints, exits.

Clusters announce a preemption with a signal some time before they kill a job (SLURM: SIGTERM, or the signal
asked for with `--signal=USR1@120`; Kubernetes: SIGTERM then SIGKILL after the grace period). While `train`
runs, `PreemptionNotice` records the first such signal instead of dying from it; after the current step the
trainer asks `requested()` — agreed over every process, so all stop after the same step — writes a checkpoint
(atomically, like any other: resuming from it is bit-for-bit like an uninterrupted run) and raises `Preempted`,
whose message names the checkpoint and the command that resumes. `echoink train` exits with status 75
(EX_TEMPFAIL, "try again"), so a job script can tell a preemption from a failure and requeue.
"""

from __future__ import annotations

import shlex
import signal
import sys
import threading
from pathlib import Path

from echoink.grpo.distributed import sum_over_processes

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
#: The exit status of a preempted `echoink train` (sysexits.h's EX_TEMPFAIL).
PREEMPTED_EXIT_STATUS = 75


class Preempted(Exception):
    """The run stopped on a preemption signal after writing `checkpoint`; the message says how to resume."""

    def __init__(self, signal_name: str, step: int, total_steps: int, checkpoint: Path) -> None:
        self.checkpoint = checkpoint
        super().__init__(f"preempted by {signal_name} after step {step} of {total_steps}: wrote {checkpoint}; "
                         f"resume with: {resume_command()}")


def resume_command() -> str:
    """This command line with resume=true (the trainer picks the newest checkpoint), or a general hint."""
    args = sys.argv[1:]
    if not args or args[0] != "train":
        return "the same echoink train command with resume=true"
    args = [arg for arg in args if not arg.startswith(("resume=", "--resume"))]
    return shlex.join(["echoink", *args, "resume=true"])


class PreemptionNotice:
    """`with PreemptionNotice() as notice:` SIGTERM / SIGUSR1 are recorded, not fatal; the previous handlers
    come back on exit. Installs nothing off the main thread (Python delivers signals to the main thread only)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "PreemptionNotice":
        if threading.current_thread() is threading.main_thread():
            for number in PREEMPTION_SIGNALS:
                self._previous[number] = signal.signal(number, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _record(self, number: int, frame) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(number).name
            print(f"{self.signal_name} received: finishing this step, then writing a checkpoint", file=sys.stderr,
                  flush=True)

    def requested(self, accelerator) -> bool:
        """Whether any process got a preemption signal (call on every process after each step)."""
        local = 1.0 if self.signal_name is not None else 0.0
        if accelerator.num_processes > 1:
            local = sum_over_processes(accelerator, [local])[0]
            if local and self.signal_name is None:
                self.signal_name = "a preemption signal (on another process)"
        return local > 0
