"""The embedded default, end to end on 2 CPU cores (`make demo`, `echoink demo`).

    synthetic audio-visual set  ->  tiny random thinker (Qwen2.5-Omni, or Qwen3-Omni with --family)  ->  format warm-up (random letters)
      ->  greedy validation accuracy  ->  GRPO (demo_cpu.yaml, shipped in this package)  ->  greedy validation accuracy
      ->  training-curve PNG, before/after table, summary.json

What it shows and what it cannot: the pipeline — data, prompts, rollouts, rewards, advantages, loss,
checkpoints, evaluation, plots — runs for real, and the accuracy gain comes only from the reward
signal (the warm-up draws its answer letters at random). A 1-million-parameter random model does
not reason: it learns to map a colour or a pitch to a letter. The task is designed for that (see
docs/demo.md): options in a fixed order, two very distinct single-modality families, letter-balanced
batches. Nothing here says anything about Qwen2.5-Omni-7B's accuracy on AVQA.

Families: `family` picks the tiny model's family (`echoink.model.families`); both families run the
same demo config, plus the few settings in `FAMILY_SETTINGS` (Qwen3-Omni: a KL penalty, beta = 0.04;
docs/demo.md says why). A non-default family keeps its models, run and summary under its
own names (`model_warm-qwen3-omni`, `run-qwen3-omni`, `summary-qwen3-omni.json`), so demos of two
families share the data but never each other's models.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from echoink.config import load_config
from echoink.data import load_dataset
from echoink.io import write_json_atomic
from echoink.data.synth import write_synthetic_dataset
from echoink.model import load_thinker, save_thinker
from echoink.model.inputs import MediaOptions
from echoink.model.families import DEFAULT_FAMILY, family_by_name
from echoink.model.tiny_families import write_tiny_checkpoint
from echoink.prompts import PromptTemplate
from echoink.run_lock import directory_lock, hold_lock

DEMO_CONFIG = Path(__file__).resolve().parent / "demo_cpu.yaml"  # package data: works from a wheel
DEMO_FAMILIES = ("image_colour", "audio_pitch")
WARMUP_STEPS = 100
#: Settings a family's tiny demo needs on top of demo_cpu.yaml (the user's key=value overrides still win).
#: Qwen3-Omni's tiny mixture of experts: once accuracy passed ~0.5, single updates moved the policy abruptly
#: (gradient norms of 5-27 against ~0.3); in all 7 runs with beta = 0 the answer format then broke down
#: within a few steps, and the KL anchor of beta = 0.04 brought the 2 runs with it back within ~10 steps
#: (docs/demo.md, "The demo on Qwen3-Omni").
FAMILY_SETTINGS: dict[str, list[str]] = {"qwen3-omni": ["beta=0.04"]}


def family_suffix(family: str) -> str:
    """Directory-name suffix of a family's demo models and run ("" for the default family)."""
    return "" if family == DEFAULT_FAMILY.name else f"-{family}"


def prepare_demo_inputs(out_dir: Path, config, console: Console | None = None, seed: int = 0,
                        family: str = DEFAULT_FAMILY.name, warmup_steps: int = WARMUP_STEPS) -> dict:
    """Create (when missing) the synthetic data, the tiny model and the format-warmed model.

    Paths come from the demo config (model_path = the warmed model, train_data / eval_data).
    """
    from echoink.demo.format_warmup import format_warmup

    console = console or Console()
    train_json, valid_json, warm_dir = Path(config.train_data), Path(config.eval_data), Path(config.model_path)
    report: dict = {}
    if not (train_json.is_file() and valid_json.is_file()):
        console.print(f"[bold]1. synthetic data[/bold] -> {train_json.parent.parent} ({', '.join(DEMO_FAMILIES)}, options in fixed order)")
        write_synthetic_dataset(train_json.parent.parent, 800, 200, seed=seed, families=list(DEMO_FAMILIES),
                                shuffle_options=False)
    if not (warm_dir / "config.json").is_file():
        init_dir = warm_dir.parent / f"tiny_init{family_suffix(family)}"
        console.print(f"[bold]2. tiny random {family_by_name(family).display_name} thinker[/bold] -> {init_dir}")
        write_tiny_checkpoint(init_dir, family=family, layout="thinker", seed=seed)
        model, processor = load_thinker(init_dir)
        console.print(f"[bold]3. format warm-up[/bold]: {warmup_steps} supervised steps on "
                      "'<think>ok</think><answer>L</answer>' with L a RANDOM letter (teaches the format, not the answers)")
        report["warmup"] = format_warmup(model, processor, load_dataset(train_json), steps=warmup_steps,
                                         seed=seed, media_options=MediaOptions.from_config(config),
                                         template=PromptTemplate.from_dict(config.prompt_template), log=console.print)
        save_thinker(model, processor, warm_dir)
    return report


def greedy_accuracy(model_dir: Path, config) -> dict:
    """Greedy accuracy on the demo's validation split, with the training prompt and media settings."""
    from echoink.eval.run import evaluate_loaded

    model, processor = load_thinker(model_dir)
    return evaluate_loaded(model, processor, load_dataset(config.eval_data), batch_size=16, greedy=True,
                           max_new_tokens=config.max_completion_length,
                           template=PromptTemplate.from_dict(config.prompt_template),
                           media_options=MediaOptions.from_config(config))


def run_demo(out_dir: str | Path = "demo_out", config_path: str | Path = DEMO_CONFIG, overrides: list[str] | None = None,
             console: Console | None = None, family: str = DEFAULT_FAMILY.name,
             warmup_steps: int = WARMUP_STEPS) -> dict:
    """Run the whole demo into `out_dir`; returns the summary (also written to out_dir/summary.json,
    out_dir/summary-<family>.json for a non-default family). Holds out_dir's lock (`echoink.run_lock`)."""
    out_dir = Path(out_dir)
    family_by_name(family)  # an unknown family: one line naming the known ones
    suffix = family_suffix(family)
    config = load_config(config_path, [f"output_dir={out_dir / f'run{suffix}'}",
                                       f"model_path={out_dir / f'model_warm{suffix}'}",
                                       f"train_data={out_dir / 'data/train/omni_rl_format_train.json'}",
                                       f"eval_data={out_dir / 'data/valid/omni_rl_format_valid.json'}",
                                       *FAMILY_SETTINGS.get(family, []), *(overrides or [])])
    with hold_lock(directory_lock(out_dir), f"demo directory {out_dir}"):  # the demo replaces what it built there
        return _run_demo(out_dir, config, console or Console(), family, warmup_steps)


def _run_demo(out_dir: Path, config, console: Console, family: str, warmup_steps: int) -> dict:
    from echoink.analysis.curves import plot_training_curves
    from echoink.eval.run import training_evaluator
    from echoink.export import write_model_card
    from echoink.grpo.run_dir import previous_run_entries
    from echoink.grpo.trainer import train

    suffix = family_suffix(family)
    started = time.perf_counter()
    # the demo owns out_dir/run: a second `make demo` replaces the previous demo run (and says so)
    if Path(config.output_dir) == out_dir / f"run{suffix}" and previous_run_entries(config.output_dir):
        config.overwrite_output_dir = True
        console.print(f"[bold]{config.output_dir}[/bold] holds a previous demo run: this run replaces it "
                      "(the data and models in the demo directory are reused)")
    if config.torch_num_threads:
        torch.set_num_threads(config.torch_num_threads)
    prep = prepare_demo_inputs(out_dir, config, console, seed=config.seed, family=family, warmup_steps=warmup_steps)

    console.print("[bold]4. greedy validation accuracy before GRPO[/bold]")
    before = greedy_accuracy(Path(config.model_path), config)
    console.print(f"   accuracy {before['accuracy']:.3f} on {before['n']} items (format {before['format_rate']:.3f})")

    console.print(f"[bold]5. GRPO[/bold]: {config.max_steps} steps, {config.per_device_train_batch_size} prompts x "
                  f"{config.num_generations} completions per step, lr {config.learning_rate}")
    t = time.perf_counter()
    final_dir = train(config, progress=True, evaluate=training_evaluator(config))
    train_seconds = time.perf_counter() - t
    write_model_card(final_dir, run_dir=config.output_dir, config=config.to_dict())

    console.print("[bold]6. greedy validation accuracy after GRPO[/bold]")
    after = greedy_accuracy(final_dir, config)
    curves = plot_training_curves(Path(config.output_dir), Path(config.output_dir) / "curves.png")

    summary = {
        "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
        "format_before": before["format_rate"], "format_after": after["format_rate"],
        "ci_before": [before["ci_low"], before["ci_high"]], "ci_after": [after["ci_low"], after["ci_high"]],
        "family": family, "valid_items": after["n"], "steps": config.max_steps, "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - started, "final_model": str(final_dir), "curves": str(curves),
        "warmup": prep.get("warmup"),
        "note": "tiny random model; format warm-up used random letters, so the accuracy gain comes from GRPO's reward",
    }
    summary_file = out_dir / f"summary{suffix}.json"
    write_json_atomic(summary_file, summary)

    table = Table(title=f"echoink demo: greedy validation accuracy (tiny {family_by_name(family).display_name}, "
                        "synthetic audio-visual set)")
    for column in ("", "accuracy (95% CI)", "format"):
        table.add_column(column)
    table.add_row("before GRPO", f"{before['accuracy']:.3f} ({before['ci_low']:.3f}-{before['ci_high']:.3f})",
                  f"{before['format_rate']:.3f}")
    table.add_row("after GRPO", f"{after['accuracy']:.3f} ({after['ci_low']:.3f}-{after['ci_high']:.3f})",
                  f"{after['format_rate']:.3f}")
    console.print(table)
    console.print(f"{config.max_steps} GRPO steps in {train_seconds:.0f} s; curves: {curves}; summary: {summary_file}")
    return summary
