"""What a training run writes and shows: metrics.jsonl, completions.jsonl, progress (a rich bar on a terminal;
one plain line per logged step, evaluation and checkpoint when stderr is a file), optional accelerate trackers
(TensorBoard / W&B via `report_to`).

Metrics are averaged over ranks (each rank's value weighted by its number of groups), so the logged
reward is the mean over every rank's groups. Only the main process writes files.
"""

from __future__ import annotations

from contextlib import contextmanager

import json
import time
from pathlib import Path

from rich.console import Console
from transformers.utils import logging as hf_logging
from rich.table import Table
from rich.text import Text
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from echoink.io import append_jsonl, truncate_jsonl_after
from echoink.grpo.trackers import PROJECT, tracker_metrics
from echoink.model.engine import Group


@contextmanager
def transformers_bars_as_found():
    """Whatever ends a run (an error included), transformers' progress bars are left as the run found them:
    RunLog turns them off while it lasts and only its close() turns them back on."""
    enabled = hf_logging.is_progress_bar_enabled()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()


class RunLog:
    def __init__(self, output_dir: Path, accelerator, total_steps: int, enabled: bool = True,
                 log_completions: bool = True, num_completions_to_print: int = 0,
                 logging_first_step: bool = False) -> None:
        """log_completions: write completions.jsonl; num_completions_to_print: show that many of each logged
        step's completions (best and worst reward first) in the console; logging_first_step: step 1 is logged
        whatever the logging interval."""
        self.logging_first_step = logging_first_step
        self.output_dir = Path(output_dir)
        self.log_completions = log_completions
        self.num_completions_to_print = num_completions_to_print
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.console = Console(stderr=True)
        self.pace = StepPace(total_steps)
        # a bar only on a terminal: sent to a file (nohup, SLURM, | tee) rich would show nothing until the end,
        # so there each logged step is one plain line; without a bar (--quiet, disable_tqdm) too
        self.bar = enabled and self.console.is_terminal
        self.progress = None
        # transformers' own bars ("Loading weights", "Writing model shards") would garble the bar and fill a log
        # file with carriage returns: off while the run lasts (our lines say when the model loads and saves)
        self._transformers_bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        if self.main:
            self.output_dir.mkdir(parents=True, exist_ok=True)

    def announce(self, config, arithmetic: dict, num_items: int) -> None:
        """Print the global batch arithmetic at start (prompts, not completions, per device)."""
        if not self.main:
            return
        self.console.print(
            f"[bold]echoink GRPO[/bold]: {num_items} training prompts, {arithmetic['num_processes']} process(es); "
            f"per step {arithmetic['prompts_per_step']} prompts x {config.num_generations} completions = "
            f"{arithmetic['completions_per_step']} completions "
            f"(per_device_train_batch_size={config.per_device_train_batch_size} PROMPTS per device, "
            f"gradient_accumulation_steps={config.gradient_accumulation_steps}); {arithmetic['total_steps']} steps")
        if config.report_to:
            self.accelerator.init_trackers(PROJECT, config=_flat(config.to_dict()))

    def begin(self, start_step: int) -> None:
        """The loop starts at `start_step` (after a resume: the checkpoint's step): the bar and the pace
        count from there."""
        self.pace.begin(start_step)
        if self.main and self.bar:
            self.progress = Progress(TextColumn("[bold]GRPO"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("reward {task.fields[reward]}"), TimeElapsedColumn(),
                                     TextColumn("ETA"), TimeRemainingColumn(), console=self.console)
            self.task = self.progress.add_task("train", total=self.pace.total, completed=start_step, reward="-")
            self.progress.start()

    def checkpoint_saved(self, step: int, path: Path) -> None:
        self.note(f"checkpoint at step {step}/{self.pace.total}: {path}")

    def truncate_after(self, step: int) -> None:
        """Drop rows of steps after `step` (a resumed run redoes them): no step is logged twice."""
        if self.main:
            for name in ("metrics.jsonl", "completions.jsonl"):
                truncate_jsonl_after(self.output_dir / name, step)
        self.accelerator.wait_for_everyone()

    def note(self, message: str) -> None:
        if self.main:
            # one line, whatever the path length; markup off: a path or value in [...] is shown as written
            self.console.print(message, soft_wrap=True, highlight=False, markup=False)

    def warn(self, message: str) -> None:
        """A line the user must not miss (an inexact resume, changed settings)."""
        if self.main:
            self.console.print(Text.assemble(("warning: ", "bold yellow"), message), soft_wrap=True, highlight=False)

    def step(self, step: int, metrics: dict, groups: list[Group], reward_names: list[str], every: int = 1) -> dict:
        """Log one step; returns its metrics averaged over ranks (on every rank)."""
        metrics = self._average_over_ranks(metrics)
        metrics["step"] = step
        logged = step % every == 0 or (step == 1 and self.logging_first_step)
        wanted = self.log_completions or (self.num_completions_to_print > 0 and logged)
        completions = self._gather_completions(step, groups, reward_names) if wanted else []
        if not self.main:
            return metrics
        if logged:
            append_jsonl(self.output_dir / "metrics.jsonl", [metrics])
            if self.accelerator.trackers:
                self.accelerator.log(tracker_metrics(metrics), step=step)
            self._print_completions(step, completions)
        if self.log_completions:
            append_jsonl(self.output_dir / "completions.jsonl", completions)
        self.pace.done(step)
        if logged and not self.bar:
            self.note(self.pace.line(step, metrics))
        if any(key.startswith("eval/") for key in metrics):
            self.note(evaluation_line(step, self.pace.total, metrics))
        if self.progress is not None:
            self.progress.update(self.task, completed=step, reward=f"{metrics.get('reward', float('nan')):.3f}")
        return metrics

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self._transformers_bars:
            hf_logging.enable_progress_bar()

    # ------------------------------------------------------------------------------------------
    def _print_completions(self, step: int, rows: list[dict]) -> None:
        """The step's best- and worst-rewarded completions, `num_completions_to_print` in all."""
        n = self.num_completions_to_print
        if n <= 0 or not rows:
            return
        ranked = sorted(rows, key=lambda row: sum(row["rewards"].values()), reverse=True)
        shown = ranked[: (n + 1) // 2] + ranked[len(ranked) - n // 2:] if n < len(ranked) else ranked
        table = Table(title=f"step {step}: completions (best, then worst)", show_lines=True)
        for column in ("problem_id", "rewards", "advantage", "completion"):
            table.add_column(column, overflow="fold")
        for row in shown:
            rewards = ", ".join(f"{k} {v:.2f}" for k, v in row["rewards"].items())
            table.add_row(Text(str(row["problem_id"])), Text(rewards), f"{row['advantage']:+.2f}",
                          Text(row["completion"][:300]))  # model and data text shown literally (no markup)
        self.console.print(table)

    def _average_over_ranks(self, metrics: dict) -> dict:
        if self.accelerator.num_processes == 1:
            return dict(metrics)
        # ranks may report different keys (a rank without groups, problem types seen on one rank only):
        # each key is averaged over the ranks that report it, weighted by their num_groups
        from accelerate.utils import gather_object

        per_rank = gather_object([{k: float(v) for k, v in metrics.items()}])
        averaged = {}
        for key in sorted({k for rank in per_rank for k in rank}):
            reporting = [rank for rank in per_rank if key in rank]
            weights = [rank.get("num_groups", 1.0) for rank in reporting]
            total = sum(weights)
            averaged[key] = (sum(w * rank[key] for w, rank in zip(weights, reporting)) / total if total > 0
                             else sum(rank[key] for rank in reporting) / len(reporting))
        averaged["num_groups"] = sum(rank.get("num_groups", 0.0) for rank in per_rank)
        return averaged

    def _gather_completions(self, step: int, groups: list[Group], reward_names: list[str]) -> list[dict]:
        rows = []
        for group in groups:
            for i, text in enumerate(group.texts):
                rows.append({
                    "step": step, "problem_id": group.record.problem_id, "sample_idx": i,
                    "solution": group.record.solution, "problem_type": group.record.problem_type,
                    **({"fields": group.record.extra} if group.record.extra else {}),  # what the type's scoring reads
                    "completion": text,
                    "rewards": {name: float(group.rewards[i, j]) for j, name in enumerate(reward_names)},
                    "advantage": float(group.advantages[i]), "truncated": bool(group.truncated[i]),
                    "trained": group.trained,
                    "length": int(group.completion_lengths[i]),
                })
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            rows = gather_object(rows)
        return rows


class StepPace:
    """Seconds per step and the time left, measured from the step the loop started at (a resumed run does
    not count the steps it did not do)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.start_step, self.started, self.last_step, self.last_time = 0, time.monotonic(), 0, time.monotonic()

    def begin(self, start_step: int) -> None:
        self.start_step = self.last_step = start_step
        self.started = self.last_time = time.monotonic()

    def done(self, step: int) -> None:
        self.last_step, self.last_time = step, time.monotonic()

    def seconds_per_step(self) -> float | None:
        steps = self.last_step - self.start_step
        return (self.last_time - self.started) / steps if steps > 0 else None

    def line(self, step: int, metrics: dict) -> str:
        """`step 12/562 | reward 0.812 | accuracy 0.750 | kl 0.0012 | grad_norm 1.23 | 41.2 s/step | ETA 6:12:05`"""
        parts = [f"step {step}/{self.total}"]
        for key, label, digits in (("reward", "reward", 3), ("rewards/accuracy", "accuracy", 3), ("kl", "kl", 4),
                                   ("grad_norm", "grad_norm", 3)):
            if isinstance(metrics.get(key), (int, float)):
                parts.append(f"{label} {metrics[key]:.{digits}f}")
        pace = self.seconds_per_step()
        if pace is not None:
            parts += [f"{pace:.1f} s/step", f"ETA {_clock(pace * (self.total - step))}"]
        return " | ".join(parts)


def evaluation_line(step: int, total: int, metrics: dict) -> str:
    """`eval at step 10/562: accuracy 62.5% [40.9, 80.0] (95% Wilson) over 8 answers`"""
    accuracy = metrics.get("eval/accuracy")
    if not isinstance(accuracy, (int, float)):
        return f"eval at step {step}/{total}: no accuracy (no answer was graded)"
    low, high = metrics.get("eval/ci_low"), metrics.get("eval/ci_high")
    interval = f" [{100 * low:.1f}, {100 * high:.1f}] (95% Wilson)" if low is not None and high is not None else ""
    n = metrics.get("eval/n")
    return f"eval at step {step}/{total}: accuracy {100 * accuracy:.1f}%{interval}" + (
        f" over {int(n)} answers" if n is not None else "")


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _flat(values: dict) -> dict:
    return {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in values.items()}
