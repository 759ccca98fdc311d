"""Training checkpoints that resume exactly and are never half-written.

    output_dir/checkpoint-<step>/
        config.json, model.safetensors, processor files   the thinker (load_thinker reads it) — or
        adapter/                                           the LoRA adapter under use_peft
        trainer_state/                                     accelerate state: model, optimizer, scheduler,
                                                           RNG states (python, numpy, torch) of every rank
        trainer_state.json                                 step and data position; written last

A checkpoint is built in `.checkpoint-<step>.tmp` and renamed into place by the main process, so a
kill during a save leaves the previous checkpoint intact; a directory without trainer_state.json
is never considered complete. The data position needs no sampler state: which prompts a step trains
on is a pure function of (seed, step) (`batches.BatchPlan`).

Every function here that writes model weights is called on every rank: under ZeRO-3 / FSDP,
gathering the full weights is a collective; only the main process writes files.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from echoink.compat import weight_conversions_set_aside
from echoink.io import replace_directory, write_json_atomic
from echoink.grpo.distributed import full_state_dict
from echoink.model.processor import save_processor

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
    """Write checkpoint-<step> atomically (call on every rank).

    `save_model(directory)` writes the model/adapter files; it is called on every rank.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "trainer_state"), safe_serialization=True)
    save_model(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(tmp / STATE_FILE, state)
        replace_directory(tmp, final)
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


def save_model_files(accelerator, policy, processor, directory: str | Path, peft_model=None,
                     atomic: bool = True) -> Path:
    """Write the trained thinker to `directory` — or, under LoRA, the adapter to `directory/adapter`.

    Call on every rank (full weights are gathered under ZeRO-3 / FSDP). With `atomic`, the files are
    written in a temporary sibling and renamed into place, so the target is never half-written;
    without it they are added to `directory` as is (a checkpoint's directory is itself temporary).
    Returns the directory written (on every rank).
    """
    state = full_state_dict(accelerator, policy)  # thinker keys; None on other ranks
    target = Path(directory) / "adapter" if peft_model is not None else Path(directory)
    if accelerator.is_main_process:
        tmp = target.with_name(f".{target.name}.tmp") if atomic else target
        if atomic:
            shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
        if peft_model is not None:
            # peft names the injected thinker's weights base_model.model.<thinker key>; it keeps the lora_ ones
            peft_model.save_pretrained(str(tmp), state_dict={f"base_model.model.{k}": v for k, v in state.items()})
        else:
            _save_thinker_weights(accelerator.unwrap_model(policy).thinker, state, tmp)
        save_processor(processor, tmp)
        if atomic:
            replace_directory(tmp, target)
    accelerator.wait_for_everyone()
    return target


def _save_thinker_weights(thinker, state: dict, directory: Path) -> None:
    """`save_pretrained` with the default key layout (what load_thinker and the tiny checkpoint use).

    transformers renames keys back to the layout a model was loaded from; a model built inside
    `deepspeed.zero.Init` (ZeRO-3) records extra prefix rules that would write `thinker.model.thinker.*`
    keys, so the recorded rules are set aside while saving.
    """
    with weight_conversions_set_aside(thinker):
        thinker.save_pretrained(str(directory), state_dict=state, safe_serialization=True)
