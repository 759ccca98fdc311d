"""Training-dynamics figure (EchoInk-R1 style) from a run's ``metrics.jsonl``.

``metrics.jsonl`` has one JSON object per logged step, e.g.
``{"step": 10, "reward": 1.4, "rewards/accuracy": 0.5, "rewards/format": 0.9, "reward_std": 0.3,
"completion_length": 143.0, "kl": 0.0012, "loss": 0.01, "grad_norm": 0.8, "learning_rate": 1e-6}``;
some lines also carry ``"eval/accuracy"`` with its interval ``"eval/ci_low"``/``"eval/ci_high"``. Each panel
plots the raw series (thin, transparent) and a smoothed one (debiased exponential moving average, thick)
against the step. Shares and accuracies (rewards, evaluation accuracy, informative groups, clipped ratios) sit
on a fixed 0-1 axis; the evaluation panel draws each point's 95% interval. A quantity that no line carries
gives a panel that says "not logged"; ``null`` (a NaN or infinity when it was written) is a missing value.
When the run has no KL term (β = 0, read from the run's config.resolved.json or given), the KL panel says so
instead of drawing a flat line at 0.
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
    """One subplot: a title, the metric keys that may hold it (first one present wins), the y-axis label.

    unit: a share or an accuracy, drawn on a fixed 0-1 axis (widened only to show a value outside it), so a
    drop from 1.00 to 0.94 looks like the 6 points it is; interval: the keys of the lower and upper bound drawn
    as error bars around each point (rows without both draw the point alone)."""

    title: str
    keys: tuple[str, ...]
    ylabel: str
    smooth: bool = True
    unit: bool = False
    interval: Optional[tuple[str, str]] = None


PANELS: tuple[Panel, ...] = (
    Panel("Accuracy reward", ("rewards/accuracy", "rewards/accuracy_reward", "rewards/accuracy_reward/mean"),
          "mean accuracy reward", unit=True),
    Panel("Format reward", ("rewards/format", "rewards/format_reward", "rewards/format_reward/mean"),
          "mean format reward", unit=True),
    Panel("Completion length", ("completion_length", "completions/mean_length"), "tokens"),
    Panel("KL to reference", ("kl",), "KL (k3 estimate)"),
    Panel("Reward std within groups", ("reward_std",), "std of reward"),
    Panel("Evaluation accuracy", ("eval/accuracy",), "accuracy (95% interval)", smooth=False, unit=True,
          interval=("eval/ci_low", "eval/ci_high")),
    Panel("Informative groups (rewards not all equal)", ("informative_share",), "share of trained-on groups",
          unit=True),
    Panel("Loss", ("loss",), "GRPO loss"),
    Panel("Gradient norm", ("grad_norm",), "norm before clipping"),
    Panel("Learning rate", ("learning_rate",), "learning rate", smooth=False),
    Panel("Clipped ratios", ("clip_ratio/region_mean",), "share of tokens clipped", unit=True),
)
#: Values larger than this in magnitude are not drawn (matplotlib cannot lay out an axis near the float limit);
#: the panel says how many were left out.
LARGEST_DRAWN = 1e100


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
            if not _finite_number(value):
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


def _say(axis, text: str, color: str = "0.45") -> None:
    axis.text(0.5, 0.5, text, ha="center", va="center", transform=axis.transAxes, fontsize=11, color=color)
    axis.set_xticks([])
    axis.set_yticks([])


def _draw_panel(axis, panel: Panel, rows: Sequence[dict[str, Any]], no_kl_term: bool = False) -> None:
    key, steps, values = metric_series(rows, panel.keys)
    axis.set_title(panel.title, fontsize=12)
    if no_kl_term and panel.keys == ("kl",):
        _say(axis, "β = 0: no KL term", color="0.3")
        return
    if key is None:
        _say(axis, f"not logged\n(no '{panel.keys[0]}' in {METRICS_FILE})")
        return
    drawn = [(step, value) for step, value in zip(steps, values) if abs(value) <= LARGEST_DRAWN]
    if len(drawn) < len(values):
        axis.text(0.01, 0.99, f"{len(values) - len(drawn)} value(s) beyond ±{LARGEST_DRAWN:.0e} not drawn",
                  ha="left", va="top", transform=axis.transAxes, fontsize=8, color="tab:red")
    if not drawn:
        _say(axis, f"no value within ±{LARGEST_DRAWN:.0e}")
        return
    steps, values = [step for step, _ in drawn], [value for _, value in drawn]
    if panel.smooth and len(values) > 10:  # ema() leaves 10 points or fewer unsmoothed
        axis.plot(steps, values, color="tab:blue", linewidth=0.8, alpha=0.3, label="raw")
        axis.plot(steps, ema(values), color="tab:blue", linewidth=2.2, label="smoothed (EMA)")
        axis.legend(loc="best", fontsize=8, frameon=False)
    else:
        axis.plot(steps, values, color="tab:blue", linewidth=1.6, marker="o", markersize=4)
    if panel.interval is not None:
        _draw_interval(axis, rows, key, panel.interval)
    if panel.unit:
        low, high = min(0.0, min(values)), max(1.0, max(values))
        axis.set_ylim(low - 0.03 * (high - low), high + 0.03 * (high - low))
    axis.set_xlabel("step")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_ylabel(panel.ylabel if key == panel.keys[0] else f"{panel.ylabel} ({key})")
    axis.grid(True, alpha=0.3)


def interval_series(rows: Sequence[dict[str, Any]], key: str, bounds: tuple[str, str]) -> tuple[list, list, list, list]:
    """``(steps, values, lows, highs)`` of the rows carrying ``key`` and both ``bounds`` as finite numbers."""
    steps, values, lows, highs = [], [], [], []
    for row in rows:
        value, low, high = row.get(key), row.get(bounds[0]), row.get(bounds[1])
        if all(_finite_number(v) and abs(v) <= LARGEST_DRAWN for v in (value, low, high)):
            steps.append(row["step"])
            values.append(float(value))
            lows.append(float(low))
            highs.append(float(high))
    return steps, values, lows, highs


def _draw_interval(axis, rows: Sequence[dict[str, Any]], key: str, bounds: tuple[str, str]) -> None:
    steps, values, lows, highs = interval_series(rows, key, bounds)
    if steps:
        below = [max(0.0, value - low) for value, low in zip(values, lows)]
        above = [max(0.0, high - value) for value, high in zip(values, highs)]
        axis.errorbar(steps, values, yerr=[below, above], fmt="none", ecolor="tab:blue", alpha=0.6, capsize=4,
                      label="95% interval")
        axis.legend(loc="best", fontsize=8, frameon=False)


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_training_curves(metrics_path_or_run_dir: Union[str, Path], out_png: Union[str, Path],
                         beta: Optional[float] = None) -> Path:
    """Draw the training-dynamics figure (the eleven ``PANELS``: accuracy and format reward, completion length, KL,
    within-group reward std, evaluation accuracy with its interval, share of informative groups, loss, gradient
    norm, learning rate, clipped ratios) of ``metrics.jsonl`` (or ``RUN_DIR/metrics.jsonl``) into
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
    """The matplotlib ``Figure`` of logged ``rows``, one panel per ``PANELS`` entry on a 3 x 4 grid (what
    `plot_training_curves` saves); β = 0 labels the KL panel "β = 0: no KL term"."""
    from matplotlib.figure import Figure  # the object API renders with Agg and never touches pyplot's state

    rows = sorted(rows, key=lambda row: row["step"])
    figure = Figure(figsize=(21, 12.5))
    axes = figure.subplots(3, 4)
    for axis in axes.flat[len(PANELS):]:
        axis.set_visible(False)
    for axis, panel in zip(axes.flat, PANELS):
        _draw_panel(axis, panel, rows, no_kl_term=beta == 0)
    n_steps = len({row["step"] for row in rows})
    figure.suptitle(f"Training dynamics: {run_name}  ({n_steps} logged steps, last step {rows[-1]['step']:g})",
                    fontsize=14, parse_math=False)  # a run named "$x$" or "a$b" is shown as written
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    return figure
