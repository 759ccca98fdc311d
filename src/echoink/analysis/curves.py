"""Training-dynamics figure (EchoInk-R1 style) from a run's ``metrics.jsonl``.

``metrics.jsonl`` has one JSON object per logged step, e.g.
``{"step": 10, "reward": 1.4, "rewards/accuracy": 0.5, "rewards/format": 0.9, "reward_std": 0.3,
"completion_length": 143.0, "kl": 0.0012, "loss": 0.01, "grad_norm": 0.8, "learning_rate": 1e-6}``;
some lines also carry ``"eval/accuracy"``. Each panel plots the raw series (thin, transparent) and a smoothed
one (debiased exponential moving average, thick) against the step. A quantity that no line carries gives a
panel that says "not logged". When the run has no KL term (β = 0, read from the run's config.resolved.json or
given), the KL panel says so instead of drawing a flat line at 0.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from matplotlib.ticker import MaxNLocator

from echoink.io import save_figure_atomic
from echoink.io import JsonlError, iter_jsonl

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class Panel:
    """One subplot: a title, the metric keys that may hold it (first one present wins), the y-axis label."""

    title: str
    keys: tuple[str, ...]
    ylabel: str
    smooth: bool = True


PANELS: tuple[Panel, ...] = (
    Panel("Accuracy reward", ("rewards/accuracy", "rewards/accuracy_reward", "rewards/accuracy_reward/mean"),
          "mean accuracy reward"),
    Panel("Format reward", ("rewards/format", "rewards/format_reward", "rewards/format_reward/mean"),
          "mean format reward"),
    Panel("Completion length", ("completion_length", "completions/mean_length"), "tokens"),
    Panel("KL to reference", ("kl",), "KL (k3 estimate)"),
    Panel("Reward std within groups", ("reward_std",), "std of reward"),
    Panel("Evaluation accuracy", ("eval/accuracy",), "accuracy", smooth=False),
    Panel("Informative groups (rewards not all equal)", ("informative_share",), "share of trained-on groups"),
)


def metrics_file(metrics_path_or_run_dir: Union[str, Path]) -> Path:
    """``run_dir/metrics.jsonl`` for a directory, the path itself otherwise."""
    path = Path(metrics_path_or_run_dir)
    return path / METRICS_FILE if path.is_dir() else path


def load_metrics(metrics_path_or_run_dir: Union[str, Path]) -> list[dict[str, Any]]:
    """Logged rows of ``metrics.jsonl``, each with an integer ``"step"`` (the row's 1-based position when the
    line has none). Raises ``FileNotFoundError``, or ``JsonlError`` naming file:line for bad JSON or a
    non-numeric step."""
    path = metrics_file(metrics_path_or_run_dir)
    rows: list[dict[str, Any]] = []
    for line_number, row in iter_jsonl(path):
        step = row.get("step", len(rows) + 1)
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step):
            raise JsonlError(f"{path}:{line_number}: 'step' must be a number, got {step!r}")
        rows.append({**row, "step": step})
    return rows


def metric_series(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> tuple[Optional[str], list[float], list[float]]:
    """``(key, steps, values)`` for the first of ``keys`` that some row carries with a finite number.

    Rows without it (or with null / NaN / non-numbers) are skipped; ``(None, [], [])`` when no row has any key.
    """
    for key in keys:
        steps: list[float] = []
        values: list[float] = []
        for row in rows:
            value = row.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            steps.append(row["step"])
            values.append(float(value))
        if values:
            return key, steps, values
    return None, [], []


def ema(values: Sequence[float], weight: Optional[float] = None) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing).

    ``s_t = w s_{t-1} + (1 - w) x_t`` with ``s_0 = 0``, reported as ``s_t / (1 - w^t)``, so early points are not
    pulled towards 0. ``weight=None`` picks ``w = clip(1 - 10 / n, 0, 0.9)``: about n/10 points of memory, at
    most ~10 (w = 0.9) for long runs, none for runs of up to 10 points.
    """
    if weight is None:
        weight = min(0.9, max(0.0, 1.0 - 10.0 / max(1, len(values))))
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    smoothed: list[float] = []
    running = 0.0
    for t, value in enumerate(values, start=1):
        running = weight * running + (1.0 - weight) * value
        smoothed.append(running / (1.0 - weight**t))
    return smoothed


def run_beta(metrics_path: Path) -> Optional[float]:
    """β of the run that wrote ``metrics_path``, from ``config.resolved.json`` beside it (None when unknown)."""
    config_path = metrics_path.parent / "config.resolved.json"
    try:
        beta = json.loads(config_path.read_text(encoding="utf-8")).get("beta")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return float(beta) if isinstance(beta, (int, float)) and not isinstance(beta, bool) else None


def _draw_panel(axis, panel: Panel, rows: Sequence[dict[str, Any]], no_kl_term: bool = False) -> None:
    key, steps, values = metric_series(rows, panel.keys)
    axis.set_title(panel.title, fontsize=12)
    if no_kl_term and panel.keys == ("kl",):
        axis.text(0.5, 0.5, "β = 0: no KL term", ha="center", va="center", transform=axis.transAxes, fontsize=13,
                  color="0.3")
        axis.set_xticks([])
        axis.set_yticks([])
        return
    if key is None:
        axis.text(0.5, 0.5, f"not logged\n(no '{panel.keys[0]}' in {METRICS_FILE})", ha="center", va="center",
                  transform=axis.transAxes, fontsize=11, color="0.45")
        axis.set_xticks([])
        axis.set_yticks([])
        return
    if panel.smooth and len(values) > 10:  # ema() leaves 10 points or fewer unsmoothed
        axis.plot(steps, values, color="tab:blue", linewidth=0.8, alpha=0.3, label="raw")
        axis.plot(steps, ema(values), color="tab:blue", linewidth=2.2, label="smoothed (EMA)")
        axis.legend(loc="best", fontsize=8, frameon=False)
    else:
        axis.plot(steps, values, color="tab:blue", linewidth=1.6, marker="o", markersize=4)
    axis.set_xlabel("step")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_ylabel(panel.ylabel if key == panel.keys[0] else f"{panel.ylabel} ({key})")
    axis.grid(True, alpha=0.3)


def plot_training_curves(metrics_path_or_run_dir: Union[str, Path], out_png: Union[str, Path],
                         beta: Optional[float] = None) -> Path:
    """Draw the training-dynamics figure (seven panels: accuracy reward, format reward, completion length, KL,
    within-group reward std, evaluation accuracy, share of informative groups) of ``metrics.jsonl`` (or ``RUN_DIR/metrics.jsonl``) into
    ``out_png``, written atomically. Returns the PNG path. ``beta``: the run's KL coefficient (default: read from
    the run's config.resolved.json); with β = 0 the KL panel says "β = 0: no KL term".

    Raises ``FileNotFoundError``; ``JsonlError`` (ValueError) naming file:line for a bad line; ``ValueError``
    when the file holds no logged step.
    """
    path = metrics_file(metrics_path_or_run_dir)
    rows = load_metrics(path)
    if not rows:
        raise ValueError(f"{path}: no logged steps")
    run_name = path.parent.name if path.name == METRICS_FILE else path.name
    figure = training_figure(rows, run_name, run_beta(path) if beta is None else beta)
    return save_figure_atomic(figure, out_png)


def training_figure(rows: Sequence[dict[str, Any]], run_name: str = "", beta: Optional[float] = None):
    """The seven-panel matplotlib ``Figure`` of logged ``rows`` (what `plot_training_curves` saves); β = 0 labels
    the KL panel "β = 0: no KL term"."""
    from matplotlib.figure import Figure  # the object API renders with Agg and never touches pyplot's state

    rows = sorted(rows, key=lambda row: row["step"])
    figure = Figure(figsize=(21, 8.5))
    axes = figure.subplots(2, 4)
    axes.flat[-1].set_visible(False)  # seven panels on a 2 x 4 grid
    for axis, panel in zip(axes.flat, PANELS):
        _draw_panel(axis, panel, rows, no_kl_term=beta == 0)
    n_steps = len({row["step"] for row in rows})
    figure.suptitle(f"Training dynamics: {run_name}  ({n_steps} logged steps, last step {rows[-1]['step']:g})",
                    fontsize=14)
    figure.tight_layout(rect=(0, 0, 1, 0.96))
    return figure
