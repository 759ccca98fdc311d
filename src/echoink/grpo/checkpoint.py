"""Training checkpoints that resume exactly and are never half-written.

    output_dir/checkpoint-<step>/
        config.json, model.safetensors, processor files   the thinker (load_thinker reads it) — or
        adapter/                                           the LoRA adapter under use_peft
        trainer_state/                                     accelerate state: model, optimizer, scheduler,
                                                           RNG states (python, numpy, torch) of every rank
        trainer_state.json                                 step and data position; written last

A checkpoint is built in `.checkpoint-<step>.tmp` and renamed into place by the main process, so a
kill during a save leaves the previous checkpoint intact; a directory without trainer_state.json
is never considered complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from echoink.data.atomic import write_json_atomic

STATE_FILE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if (m := _CHECKPOINT.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def read_state(checkpoint: str | Path) -> dict:
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint}: not a complete checkpoint (no {STATE_FILE})")
    return json.loads(path.read_text(encoding="utf-8"))


def save_checkpoint(accelerator, save_model, output_dir: str | Path, step: int, state: dict,
                    save_total_limit: int | None = None) -> Path:
    """Write checkpoint-<step> atomically. `save_model(directory)` writes the model/adapter files."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "trainer_state"), safe_serialization=True)
    if accelerator.is_main_process:
        save_model(tmp)
        write_json_atomic(tmp / STATE_FILE, state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if save_total_limit:
            for old in checkpoint_dirs(output_dir)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint_state(accelerator, checkpoint: str | Path) -> dict:
    """Restore model, optimizer, scheduler and RNG states; return the trainer state (step, ...)."""
    state = read_state(checkpoint)
    accelerator.load_state(str(Path(checkpoint) / "trainer_state"))
    return state
