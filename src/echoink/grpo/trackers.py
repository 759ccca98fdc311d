"""Experiment trackers (`report_to`), built here rather than by name inside accelerate, so that:

* a tracker that is named but not installed is one error line before the model loads (accelerate only warns
  and trains untracked);
* TensorBoard writes its event files exactly where `logging_dir` says (default OUTPUT_DIR/echoink);
* W&B's project comes from `WANDB_PROJECT` (default "echoink") and its run is named `run_name`
  (default: output_dir's folder name);
* metrics carry `train/...` and `eval/...` tags, as transformers' trainers log them.
"""

from __future__ import annotations

import os
from pathlib import Path

from echoink.config import ConfigError, TrainConfig

#: report_to name -> the package that provides it (pip name), for the "not installed" line.
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml", "aim": "aim",
                    "mlflow": "mlflow", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
                    "trackio": "trackio"}
PROJECT = "echoink"


def installed_trackers() -> list[str]:
    """The report_to names whose package is importable here."""
    from accelerate.tracking import get_available_trackers

    return [str(tracker) for tracker in get_available_trackers()]


def run_name(config: TrainConfig) -> str:
    return config.run_name or Path(config.output_dir).resolve().name


def logging_dir(config: TrainConfig) -> Path:
    return Path(config.logging_dir) if config.logging_dir else Path(config.output_dir) / "echoink"


def check_trackers(config: TrainConfig) -> list[str]:
    """The tracker names the run will use ("all": every installed one). Raises ConfigError (one line) when a
    named tracker is not installed."""
    installed = installed_trackers()
    if "all" in config.report_to:
        return installed
    missing = [name for name in config.report_to if name not in installed]
    if missing:
        packages = " ".join(TRACKER_PACKAGES.get(name, name) for name in missing)
        raise ConfigError(f"report_to names {', '.join(missing)}, which is not installed: pip install {packages}, "
                          "or set report_to: none")
    return list(dict.fromkeys(config.report_to))


def make_trackers(config: TrainConfig) -> list:
    """accelerate tracker objects for `Accelerator(log_with=...)` (started by `init_trackers` on the main
    process only). Raises ConfigError when a named tracker is not installed."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, TensorBoardTracker, WandBTracker

    trackers = []
    for name in check_trackers(config):
        if name == "tensorboard":
            trackers.append(TensorBoardTracker("", logging_dir(config)))  # "" : the directory itself
        elif name == "wandb":
            trackers.append(WandBTracker(os.environ.get("WANDB_PROJECT") or PROJECT, name=run_name(config)))
        else:
            tracker_class = LOGGER_TYPE_TO_CLASS[name]
            if tracker_class.requires_logging_directory:
                trackers.append(tracker_class(run_name(config), logging_dir(config)))
            else:
                trackers.append(tracker_class(run_name(config)))
    return trackers


def tracker_metrics(metrics: dict) -> dict:
    """A metrics.jsonl row as trackers get it: `train/<name>` for training metrics, `eval/<name>` kept,
    without the step (the trackers' own x axis)."""
    return {(key if key.startswith("eval/") else f"train/{key}"): value
            for key, value in metrics.items() if key != "step"}
