"""What a training run skips, counted and bounded, so that skipping never hides a broken run.

* `PromptSkips`: a prompt longer than `max_prompt_length` is skipped and counted (`skipped_prompts`),
  never truncated through its media placeholders. A step whose prompts are all skipped trains nothing
  but still counts as a step. Over the first `skipped_prompt_check_steps` steps, once more than
  `max_skipped_prompt_fraction` of their prompts are skipped — as soon as that is certain — the run
  stops with the prompt-length statistics, instead of "training" on almost nothing and exiting 0.
  "Certain": skipped > fraction x (prompts seen + prompts_per_step x checked steps still to come), i.e.
  even if every prompt still to come fits (dynamic sampling may draw more than prompts_per_step). A run
  with fewer steps than the window (`max_steps` 1 or 2) is checked over all its steps, so it is decided by
  its last step at the latest and never ends with exit status 0 and an untrained model.
* `RecordSkips`: a record whose media fail to decode during training (a file `echoink data validate`
  only decodes with `--check-media`) is skipped with its file named and counted (`skipped_records`); one
  more than `max_skipped_records` stops the run.

Both decide on counts summed over every rank, so every rank stops at the same step (a rank that
stopped alone would leave the others waiting in a collective).
"""

from __future__ import annotations

import statistics

from echoink.config import TrainConfig
from echoink.grpo.distributed import sum_over_processes


class SkipLimitError(ValueError):
    """Too much of the data was skipped to go on; the message says what and what to do."""


class PromptSkips:
    """Counts prompts over `max_prompt_length`; stops the run when the first steps skip too many."""

    def __init__(self, config: TrainConfig, prompts_per_step: int, steps_to_run: int | None = None) -> None:
        self.max_length = config.max_prompt_length
        self.max_fraction = config.max_skipped_prompt_fraction
        # a run shorter than the window is checked over all of its steps: decided at its end at the latest
        self.check_steps = min(config.skipped_prompt_check_steps, steps_to_run if steps_to_run is not None
                               else config.skipped_prompt_check_steps)
        self.prompts_per_step = prompts_per_step  # over every rank (the fewest a step draws)
        self.steps_done = 0
        self.step_skipped = self.step_seen = 0   # this rank, this step
        self.skipped = self.seen = 0             # over every rank, in the checked steps
        self.lengths: list[int] = []  # this rank's prompt lengths in the checked steps

    def too_long(self, length: int) -> bool:
        """Whether a prompt of `length` tokens is skipped (and count it)."""
        if self.steps_done < self.check_steps:
            self.lengths.append(int(length))
        skip = bool(self.max_length) and length > self.max_length
        self.step_skipped += skip
        self.step_seen += 1
        return skip

    def end_step(self, accelerator=None) -> int:
        """Close a step (call on every rank); returns this rank's skipped prompts in it.

        Raises SkipLimitError on every rank once the checked steps must skip more than the allowed share.
        """
        local, seen = self.step_skipped, self.step_seen
        self.step_skipped = self.step_seen = 0
        if self.steps_done >= self.check_steps:
            return local
        self.steps_done += 1
        skipped, seen = sum_over_processes(accelerator, [local, seen]) if accelerator is not None else (local, seen)
        self.skipped, self.seen = self.skipped + int(skipped), self.seen + int(seen)
        still_to_come = (self.check_steps - self.steps_done) * self.prompts_per_step
        if self.skipped > self.max_fraction * (self.seen + still_to_come):
            raise SkipLimitError(self._message(accelerator))
        return local

    def _message(self, accelerator) -> str:
        lengths = self.lengths
        if accelerator is not None and accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            lengths = gather_object(lengths)
        over = sum(length > self.max_length for length in lengths)
        stats = (f"min {min(lengths)}, median {statistics.median(lengths):.0f}, max {max(lengths)} tokens"
                 if lengths else "no prompt")
        return (f"{over} of the {len(lengths)} prompts of the first {self.steps_done} step(s) are longer than "
                f"max_prompt_length={self.max_length} and were skipped (more than max_skipped_prompt_fraction="
                f"{self.max_fraction} of the first {self.check_steps} steps' prompts); prompt lengths: {stats}. "
                "Raise max_prompt_length (or set it to null), lower max_pixels / video_max_frames / "
                "max_audio_seconds, or shorten the prompts")


class RecordSkips:
    """Counts records whose media fail to decode mid-run; stops the run past `max_skipped_records`."""

    def __init__(self, config: TrainConfig) -> None:
        self.limit = config.max_skipped_records
        self.total = 0          # over every rank
        self.step_skipped = 0   # this rank, this step
        self.last_error = ""

    def skip(self, error: Exception) -> str:
        """Count a record whose media failed (`error` names its file); returns the line to log."""
        self.step_skipped += 1
        self.last_error = str(error)
        return (f"skipped a record whose media cannot be decoded: {error} "
                f"(skipped_records counts it; at most max_skipped_records={self.limit})")

    def end_step(self, accelerator=None) -> int:
        """Close a step (call on every rank); returns the records skipped in it over every rank.

        Raises SkipLimitError on every rank once more than `max_skipped_records` were skipped in the run.
        """
        local = self.step_skipped
        self.step_skipped = 0
        step_total = local if accelerator is None else int(sum_over_processes(accelerator, [local])[0])
        self.total += step_total
        if self.total > self.limit:
            last = f"; the last on this rank: {self.last_error}" if self.last_error else ""
            raise SkipLimitError(f"{self.total} training records had media that cannot be decoded, more than "
                                 f"max_skipped_records={self.limit}{last}. Run `echoink data validate --check-media "
                                 "TRAIN_DATA` to list them, then fix or remove them (or raise max_skipped_records)")
        return step_total
