"""Training checkpoints that resume exactly and are never half-written.

    output_dir/checkpoint-<step>/
        config.json, model.safetensors, processor files   the thinker (load_thinker reads it) — or
        adapter/                                           the LoRA adapter under use_peft
        trainer_state/                                     accelerate state: model, optimizer, scheduler,
                                                           RNG states (python, numpy, torch) of every rank
        trainer_state.json                                 step and data position; written last

A checkpoint is built in `.checkpoint-<step>.tmp` and renamed into place by the main process, so a
kill during a save — or a full disk (`NoSpaceLeftError`: the temporary directory is removed) — leaves
the previous checkpoint intact; a directory without trainer_state.json is never considered complete.

Before resuming, a checkpoint is validated without loading it into the model (`checkpoint_problems`):
trainer_state.json a JSON object with an integer step, every safetensors header readable and its sizes
consistent with the file, optimizer / scheduler / RNG files present and loadable (memory-mapped,
weights only). `resume=true` takes the newest valid checkpoint and says which newer ones it skipped and
why (`choose_resume_checkpoint`); an explicit path that fails is one `CheckpointError` naming the file.
A checkpoint whose RNG states are missing or damaged can only resume inexactly: refused unless
`allow_inexact_resume=true`. trainer_state.json also records the run settings that shape the data
order and the updates (`run_settings`), so a resume with other values is warned about, setting by setting. The data position needs no sampler state: which prompts a step trains
on is a pure function of (seed, step) (`batches.BatchPlan`).

Every function here that writes model weights is called on every rank: under ZeRO-3 / FSDP,
gathering the full weights is a collective; only the main process writes files.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from accelerate.utils import load as accelerate_load
from safetensors import safe_open

from echoink.compat import weight_conversions_set_aside
from echoink.config import TrainConfig
from echoink.io import NoSpaceLeftError, read_object_file, replace_directory, reporting_full_disk, write_json_atomic
from echoink.grpo.distributed import full_state_dict
from echoink.model.processor import save_processor
from echoink.model.prompt_settings import PromptSettings, write_prompt_settings

STATE_FILE = "trainer_state.json"
ACCELERATE_STATE_DIR = "trainer_state"
RNG_STATE_FILE = "random_states_{rank}.pkl"  # accelerate's name for each rank's RNG states
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
#: The settings recorded in trainer_state.json that make a resumed run differ from an uninterrupted one.
RUN_SETTINGS = ("seed", "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
                "num_generations", "num_processes")


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed from; the message names the file and what to do."""


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
    """trainer_state.json of `checkpoint`: a JSON object with a non-negative integer "step".

    Raises CheckpointError naming the file when it is missing, not UTF-8 JSON, or not such an object.
    """
    checkpoint = Path(checkpoint)
    path = checkpoint / STATE_FILE
    if not checkpoint.is_dir():
        hint = " (a file, not a checkpoint directory)" if checkpoint.exists() else ""
        raise CheckpointError(f"{checkpoint}: no such checkpoint directory{hint}")
    if not path.is_file():
        runs = [p.name for p in checkpoint_dirs(checkpoint)]
        hint = (f"; it is a run directory with {', '.join(runs)}: pass one of them, or resume=true "
                f"output_dir={checkpoint} for the newest" if runs else "")
        raise CheckpointError(f"{checkpoint}: not a complete checkpoint (no {STATE_FILE}){hint}")
    state = read_object_file(path, CheckpointError, hint="the checkpoint is damaged")
    for key in ("step", "data_position"):  # data_position: dynamic sampling's draw rounds (optional)
        value = state.get(key, 0 if key == "data_position" else None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"{path}: \"{key}\" must be a non-negative integer, got {value!r}; "
                                  "the checkpoint is damaged")
    return state


def run_settings(config: TrainConfig, num_processes: int) -> dict:
    """What trainer_state.json records about the run (compared on resume by `changed_settings`)."""
    values = {name: getattr(config, name) for name in RUN_SETTINGS if name != "num_processes"}
    return {**values, "num_processes": num_processes}


def changed_settings(state: dict, config: TrainConfig, num_processes: int) -> list[str]:
    """`name old -> new` for each recorded run setting that differs now (settings the checkpoint lacks
    are not compared)."""
    now = run_settings(config, num_processes)
    return [f"{name} {state[name]} -> {now[name]}" for name in RUN_SETTINGS if name in state and state[name] != now[name]]


# ---- validating a checkpoint before resuming from it --------------------------------------------

@dataclass
class CheckpointCheck:
    """What is wrong with a checkpoint: `problems` make it unusable; `rng_problems` make a resume inexact."""

    path: Path
    problems: list[str] = field(default_factory=list)
    rng_problems: list[str] = field(default_factory=list)
    state: dict | None = None

    @property
    def usable(self) -> bool:
        return not self.problems

    @property
    def exact(self) -> bool:
        return not self.problems and not self.rng_problems


def checkpoint_problems(checkpoint: str | Path, num_processes: int = 1) -> CheckpointCheck:
    """Validate `checkpoint` without loading it into a model (see the module docstring)."""
    checkpoint = Path(checkpoint)
    check = CheckpointCheck(checkpoint)
    try:
        check.state = read_state(checkpoint)
    except CheckpointError as exc:
        check.problems.append(str(exc))
        return check
    accelerate_dir = checkpoint / ACCELERATE_STATE_DIR
    if not accelerate_dir.is_dir():
        check.problems.append(f"{accelerate_dir}: missing (model, optimizer and scheduler states)")
        return check
    for path in sorted(checkpoint.rglob("*.safetensors")):
        problem = _safetensors_problem(path)
        if problem:
            check.problems.append(problem)
    sharded = any(p.is_dir() for p in accelerate_dir.iterdir())  # DeepSpeed / FSDP write their own directories
    required = [] if sharded else ["optimizer.bin", "scheduler.bin"]
    if not sharded and not (accelerate_dir / "model.safetensors").is_file() and not (accelerate_dir / "model.bin").is_file():
        check.problems.append(f"{accelerate_dir / 'model.safetensors'}: missing")
    for name in required:
        if not (accelerate_dir / name).is_file():
            check.problems.append(f"{accelerate_dir / name}: missing")
    for path in sorted(p for p in accelerate_dir.iterdir() if p.suffix == ".bin" and p.is_file()):
        problem = _torch_file_problem(path)
        if problem:
            check.problems.append(problem)
    for rank in range(num_processes):
        path = accelerate_dir / RNG_STATE_FILE.format(rank=rank)
        problem = f"{path}: missing" if not path.is_file() else _torch_file_problem(path)
        if problem:
            check.rng_problems.append(problem)
    return check


def _safetensors_problem(path: Path) -> str | None:
    """None when the header parses and the file holds every byte the header promises."""
    try:
        with safe_open(str(path), framework="pt"):
            return None
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError for I/O)
        return f"{path}: unreadable safetensors file ({exc}); truncated or damaged"


def _torch_file_problem(path: Path) -> str | None:
    """None when the file loads as accelerate loads it (weights only), memory-mapped: no copy in RAM."""
    try:
        accelerate_load(str(path), map_location="cpu", mmap=True)
        return None
    except Exception as exc:  # a truncated zip, a foreign pickle (refused by weights_only), an I/O error
        return f"{path}: cannot be loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); truncated or damaged"


@dataclass
class ResumeChoice:
    """The checkpoint a run resumes from (None: start at step 0) and what to tell the user about it."""

    checkpoint: Path | None
    state: dict | None
    notes: list[str]      # skipped checkpoints, one line each
    warnings: list[str]   # an inexact resume


def choose_resume_checkpoint(config: TrainConfig, explicit: str | Path | None, num_processes: int) -> ResumeChoice:
    """The checkpoint to resume from, validated (call before loading the model).

    explicit: `--resume PATH` / `resume_from_checkpoint`: must be valid, else one CheckpointError naming the file.
    Otherwise with `resume=true`: the newest valid checkpoint of output_dir; each newer one that is not is
    named in `notes` with the reason. A checkpoint without valid RNG states counts only with
    `allow_inexact_resume=true` (a warning). None found among existing checkpoints: CheckpointError.
    """
    explicit = explicit or config.resume_from_checkpoint
    if explicit:
        check = checkpoint_problems(explicit, num_processes)
        if check.problems:
            raise CheckpointError(check.problems[0] + _more(check.problems))
        return ResumeChoice(Path(explicit), check.state, [], _inexact(config, check))
    if not config.resume:
        return ResumeChoice(None, None, [], [])
    notes: list[str] = []
    for candidate in reversed(checkpoint_dirs(config.output_dir)):
        check = checkpoint_problems(candidate, num_processes)
        if check.exact or (check.usable and config.allow_inexact_resume):
            return ResumeChoice(candidate, check.state, notes, _inexact(config, check))
        reasons = check.problems or [p + " (allow_inexact_resume=true would resume from it, inexactly)"
                                     for p in check.rng_problems]
        notes.append(f"skipped {candidate.name}: {reasons[0]}{_more(reasons)}")
    if notes:
        raise CheckpointError(f"resume=true: no usable checkpoint in {config.output_dir}: " + "; ".join(notes))
    return ResumeChoice(None, None, [], [])


def _inexact(config: TrainConfig, check: CheckpointCheck) -> list[str]:
    if not check.rng_problems:
        return []
    if not config.allow_inexact_resume:
        raise CheckpointError(f"{check.rng_problems[0]}{_more(check.rng_problems)}: without the RNG states the run "
                              "cannot resume exactly; pass allow_inexact_resume=true to resume anyway (the sampled "
                              "completions, and so the weights, will differ from an uninterrupted run)")
    return [f"INEXACT RESUME from {check.path}: {check.rng_problems[0]}{_more(check.rng_problems)}; "
            "allow_inexact_resume=true: continuing with fresh RNG states, so the completions and weights will "
            "differ from an uninterrupted run"]


def _more(items: list[str]) -> str:
    return f" (and {len(items) - 1} more problem(s))" if len(items) > 1 else ""


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
    try:
        with reporting_full_disk(final):
            if accelerator.is_main_process:
                tmp.mkdir(parents=True)
            accelerator.wait_for_everyone()
            accelerator.save_state(str(tmp / ACCELERATE_STATE_DIR), safe_serialization=True)
            save_model(tmp)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                write_json_atomic(tmp / STATE_FILE, state)
                replace_directory(tmp, final)
    except NoSpaceLeftError as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the previous checkpoint is untouched
        raise NoSpaceLeftError(output_dir, _not_written(final.name, output_dir)) from exc
    if accelerator.is_main_process and save_total_limit:
        for old in checkpoint_dirs(output_dir)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint_state(accelerator, checkpoint: str | Path) -> dict:
    """Restore model, optimizer, scheduler and RNG states; return the trainer state (step, ...)."""
    state = read_state(checkpoint)
    try:
        accelerator.load_state(str(Path(checkpoint) / ACCELERATE_STATE_DIR))
    except (RuntimeError, ValueError, KeyError) as exc:  # e.g. another model, LoRA setting or trainable set
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{checkpoint}: does not fit this run's model or optimizer ({first[:300]}); resume "
                              "with the settings it was saved with (model_path, use_peft, freeze_*)") from None
    return state


def save_model_files(accelerator, policy, processor, directory: str | Path, peft_model=None,
                     atomic: bool = True, prompt_settings: PromptSettings | None = None) -> Path:
    """Write the trained thinker to `directory` — or, under LoRA, the adapter to `directory/adapter` —
    with the run's `prompt_settings` (echoink_prompt.json: how `echoink eval` prompts it by default).

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
        try:
            with reporting_full_disk(target):
                tmp.mkdir(parents=True, exist_ok=True)
                if peft_model is not None:
                    # peft names the injected thinker's weights base_model.model.<thinker key>; it keeps the lora_ ones
                    peft_model.save_pretrained(str(tmp), state_dict={f"base_model.model.{k}": v for k, v in state.items()})
                else:
                    _save_thinker_weights(accelerator.unwrap_model(policy).thinker, state, tmp)
                save_processor(processor, tmp)
                if prompt_settings is not None:
                    write_prompt_settings(tmp, prompt_settings)
                if atomic:
                    replace_directory(tmp, target)
        except NoSpaceLeftError as exc:
            if not atomic:
                raise  # inside a checkpoint: save_checkpoint says what was lost
            shutil.rmtree(tmp, ignore_errors=True)  # the space back; an earlier model at `target` is untouched
            raise NoSpaceLeftError(target, _not_written("the model", target.parent)) from exc
    accelerator.wait_for_everyone()
    return target


def _not_written(what: str, output_dir: Path) -> str:
    """What a full disk cost and how the run goes on (the newest checkpoint, if any)."""
    previous = [p.name for p in checkpoint_dirs(output_dir)]
    if previous:
        return f"{what} not written; free space, then run again with resume=true (it resumes from {previous[-1]})"
    return (f"{what} not written and no checkpoint to resume from; free space, then start again with "
            "overwrite_output_dir=true (and save_steps > 0 to make a long run resumable)")


def _save_thinker_weights(thinker, state: dict, directory: Path) -> None:
    """`save_pretrained` with the default key layout (what load_thinker and the tiny checkpoint use).

    transformers renames keys back to the layout a model was loaded from; a model built inside
    `deepspeed.zero.Init` (ZeRO-3) records extra prefix rules that would write `thinker.model.thinker.*`
    keys, so the recorded rules are set aside while saving.
    """
    with weight_conversions_set_aside(thinker):
        thinker.save_pretrained(str(directory), state_dict=state, safe_serialization=True)
