"""The `echoink` command line. Thin: each command parses, calls one library function, prints."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperCommand, TyperGroup

from echoink.config import TrainConfig

DEFAULT_MAX_PROMPT_LENGTH = TrainConfig.max_prompt_length  # evaluation applies training's rule and default

class _FlagsWithoutMetavar:
    """--help lists flags without a value placeholder (typer shows `--greedy <bool>`, `--help <bool>`, although a
    flag takes no value)."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


    def get_short_help_str(self, limit: int = 45) -> str:
        """A group's list of commands shows each command's whole first paragraph, wrapped (click cuts it
        with "..." at `limit`)."""
        return (self.short_help or (self.help or "").split("\n\n")[0]).strip()


class FlagCommand(_FlagsWithoutMetavar, TyperCommand):
    pass


class FlagGroup(_FlagsWithoutMetavar, TyperGroup):
    def invoke(self, ctx):
        """Any command whose output place cannot be written ends in one line naming the path and the cause."""
        from echoink.io import NoSpaceLeftError, UnwritableError

        try:
            return super().invoke(ctx)
        except NoSpaceLeftError as exc:  # any command that writes (eval predictions, plots, reports...)
            _fail_no_space(exc, "run the command again (an eval resumes its predictions file)")
        except (UnwritableError, NotADirectoryError) as exc:
            _fail(str(exc))


# Plain click help (rich_markup_mode=None): rich's panels cut long option names and help with "..." at 80
# columns, and rich markup would swallow examples such as `reward_funcs=[my_rewards:length]`.
_PLAIN_HELP = {"rich_markup_mode": None, "no_args_is_help": True, "cls": FlagGroup}
app = typer.Typer(help="echoink: GRPO fine-tuning and evaluation of omni-modal models (Qwen2.5-Omni, Qwen3-Omni).",
                  add_completion=False, **_PLAIN_HELP)
model_app = typer.Typer(help="Model utilities (tiny offline checkpoints).", **_PLAIN_HELP)
data_app = typer.Typer(help="Datasets in the AVQA-R1 format: validate, synthesize, convert.", **_PLAIN_HELP)
app.add_typer(model_app, name="model")
app.add_typer(data_app, name="data")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


def _fail_no_space(error, resumable: str) -> None:
    """A full disk: the path, and how to go on (`resumable`: how the interrupted work continues)."""
    _fail(str(error) if getattr(error, "detail", "") else f"{error}: free space, then {resumable}")


_PROBLEM_TYPES_HELP = "User problem types, comma-separated 'package.module:Class' (imports them: trusted code only)."


def _register_problem_types(specs: list[str] | str | None) -> None:
    """Register user problem types (from a flag or a config's problem_types); one error line on failure."""
    from echoink.problem_types import register_problem_types

    if isinstance(specs, str):
        specs = [spec.strip() for spec in specs.split(",") if spec.strip()]
    try:
        register_problem_types(specs)
    except ValueError as exc:
        _fail(str(exc))


# ---- model commands ---------------------------------------------------------------------------

@model_app.command("tiny", cls=FlagCommand)
def model_tiny(
    out: Path = typer.Option(..., "--out", help="Directory to write the checkpoint to."),
    layout: str = typer.Option("full", "--layout", help="full: the family's published layout; thinker: ours."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random initialisation."),
    size: str = typer.Option("tiny", "--size", help="tiny (tests, demo) or bench (benchmark shape)."),
    family: str = typer.Option("qwen2.5-omni", "--family", help="Model family: qwen2.5-omni or qwen3-omni."),
) -> None:
    """Write a tiny random-initialised checkpoint of a model family + processor files, offline."""
    from echoink.io import NoSpaceLeftError
    from echoink.model.families import family_by_name
    from echoink.model.tiny_families import write_tiny_checkpoint

    try:
        path = write_tiny_checkpoint(out, family=family, layout=layout, seed=seed, size=size)
    except ValueError as exc:
        _fail(str(exc))
    except NoSpaceLeftError as exc:
        _fail_no_space(exc, "run the command again (nothing half-written was left)")
    typer.echo(f"wrote tiny {family_by_name(family).display_name} checkpoint ({layout} layout, {size}) to {path}")


# ---- data commands ----------------------------------------------------------------------------


@data_app.command("validate", cls=FlagCommand)
def data_validate(
    path: Path = typer.Argument(..., help="Dataset JSON (array) or JSONL file, parquet file, or datasets "
                                           "save_to_disk directory."),
    check_media: bool = typer.Option(False, "--check-media", help="Also decode every media file."),
    problem_types: Optional[str] = typer.Option(None, "--problem-types", help=_PROBLEM_TYPES_HELP),
    config: Optional[Path] = typer.Option(None, "--config", help="Training config: register its problem_types."),
) -> None:
    """Validate a dataset file and print statistics; exit 1 on any problem."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from echoink.config import ConfigError, load_config
    from echoink.data.report import build_report

    if config is not None:
        try:
            _register_problem_types(load_config(config).problem_types)
        except ConfigError as exc:
            _fail(str(exc))
    _register_problem_types(problem_types)

    console = Console(markup=False, highlight=False)  # user text (paths, values) printed literally: "[nan, 3]" too
    report = build_report(path, check_media=check_media)
    for problem in report.problems:
        console.print(Text.assemble(("error", "red"), " ", problem), soft_wrap=True)

    table = Table(title=f"{path} — {len(report.records)} valid record(s)", show_header=True)
    table.add_column("statistic")
    table.add_column("value")
    table.add_row("data_type", ", ".join(f"{k}: {v}" for k, v in sorted(report.data_types.items())) or "-")
    table.add_row("problem_type", ", ".join(f"{k}: {v}" for k, v in sorted(report.problem_types.items())) or "-")
    if report.needs:
        table.add_row("needs", ", ".join(f"{k}: {v}" for k, v in sorted(report.needs.items())))
    table.add_row("answer letters", ", ".join(f"{k}: {v}" for k, v in sorted(report.answer_letters.items())) or "-")
    audio = report.audio_seconds
    table.add_row("audio seconds", f"n={audio.count} min={audio.minimum:.2f} mean={audio.mean:.2f} "
                  f"max={audio.maximum:.2f} (over the 10 s cap: {report.audio_over_cap})" if audio.count else "-")
    width, height, pixels = report.image_widths, report.image_heights, report.image_pixels
    table.add_row("image sizes", f"n={pixels.count} width {width.minimum:.0f}-{width.maximum:.0f}, height "
                  f"{height.minimum:.0f}-{height.maximum:.0f}, mean {pixels.mean:,.0f} px "
                  f"(resized down: {report.images_over_cap})" if pixels.count else "-")
    table.add_row("media decoded", "yes" if report.media_checked else "no (use --check-media)")
    console.print(table)
    if not report.ok:
        console.print(f"{len(report.problems)} problem(s) found", style="red")
        raise typer.Exit(code=1)
    console.print("ok", style="green")


@data_app.command("synth", cls=FlagCommand)
def data_synth(
    out: Path = typer.Option(..., "--out", help="Output directory (gets train/ and valid/)."),
    train: int = typer.Option(200, "--train", min=0, help="Number of training items."),
    valid: int = typer.Option(50, "--valid", min=0, help="Number of validation items."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives byte-identical files."),
    families: Optional[str] = typer.Option(None, "--families", help="Comma-separated family names (default: every multiple-choice family; "
                                               "add beep_count, tone_hz, tone_hz_regression, tone_span for other problem types)."),
    shuffle_options: bool = typer.Option(True, "--shuffle-options/--fixed-options",
                                         help="Shuffle options (balanced answer letters) or keep each family's order."),
) -> None:
    """Write a synthetic audio-visual set in the AVQA-R1 layout (multiple choice, or a mix of problem types)."""
    from rich.console import Console

    from echoink.data.synth import write_synthetic_dataset

    from echoink.io import check_writable

    chosen = [name.strip() for name in families.split(",") if name.strip()] if families else None
    check_writable(out)
    try:
        result = write_synthetic_dataset(out, train, valid, seed, families=chosen, shuffle_options=shuffle_options)
    except ValueError as exc:
        _fail(str(exc))
    console = Console(markup=False)
    for split, info in result["splits"].items():
        mix = ", ".join(f"{k}: {v}" for k, v in sorted(info["families"].items()))
        console.print(f"{split}: {info['count']} items -> {info['json']}  ({mix})", highlight=False)


@data_app.command("convert-omniinstruct", cls=FlagCommand)
def data_convert_omniinstruct(
    source: Path = typer.Option(..., "--source", help="Directory holding OmniInstruct-v1 parquet files."),
    split: str = typer.Option(..., "--split", help="train or valid."),
    out: Path = typer.Option(..., "--out", help="Output directory (AVQA-R1 layout)."),
) -> None:
    """Rebuild AVQA-R1-6K (AVQA rows, four options) from a local OmniInstruct-v1 copy."""
    from rich.console import Console

    from echoink.data.omniinstruct import convert_omniinstruct

    if split not in ("train", "valid"):
        _fail(f"--split must be train or valid, got {split!r}")
    try:
        report = convert_omniinstruct(source, split, out)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    Console(markup=False).print(report.summary(), highlight=False)


@data_app.command("convert-avqa", cls=FlagCommand)
def data_convert_avqa(
    qa: Path = typer.Option(..., "--qa", help="AVQA's train_qa.json or val_qa.json."),
    videos: Path = typer.Option(..., "--videos", help="Directory of the VGGSound clips (<video_name>.mp4)."),
    out: Path = typer.Option(..., "--out", help="Output JSON file, in a directory that contains --videos."),
) -> None:
    """Convert the original AVQA annotations (multi_choice + answer index) into echoink's format."""
    from echoink.data.avqa import convert_avqa
    from echoink.data.conversion import ConversionError
    from echoink.io import check_writable

    check_writable(out.parent)
    try:
        report = convert_avqa(qa, videos, out)
    except ConversionError as exc:
        _fail(str(exc))
    typer.echo(report.summary())


@data_app.command("convert-daily-omni", cls=FlagCommand)
def data_convert_daily_omni(
    qa: Path = typer.Option(..., "--qa", help="Daily-Omni's qa.json."),
    videos: Path = typer.Option(..., "--videos", help="Daily-Omni's Videos/ directory (<id>/<id>_video.mp4, _audio.wav)."),
    out: Path = typer.Option(..., "--out", help="Output JSON file, in a directory that contains --videos."),
    mode: str = typer.Option("all", "--mode", help="all (video with its sound), visual (frames only) or audio (the wav)."),
) -> None:
    """Convert Daily-Omni's qa.json into echoink's format for one of its input modes."""
    from echoink.data.conversion import ConversionError
    from echoink.data.daily_omni import convert_daily_omni
    from echoink.io import check_writable

    check_writable(out.parent)
    try:
        report = convert_daily_omni(qa, videos, out, mode=mode)
    except ConversionError as exc:
        _fail(str(exc))
    typer.echo(report.summary())


# ---- training commands ------------------------------------------------------------------------

@app.command("train", cls=FlagCommand, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train_command(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (TRL GRPOConfig field names)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config and step arithmetic; load no model."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Resume from this checkpoint directory."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar: a plain line per logged step."),
    num_processes: int = typer.Option(int(os.environ.get("WORLD_SIZE", "1")), "--num-processes",
                                      help="With --dry-run: number of GPUs/processes to compute the arithmetic for."),
    num_items: Optional[int] = typer.Option(None, "--num-items",
                                            help="With --dry-run: training items, when the dataset is not at hand."),
) -> None:
    """Train with GRPO. Extra arguments are key=value overrides of the config, e.g. beta=0.04.

    Every config key, with its type, default and help: `echoink config --list`.

    The working directory is on the import path (as with `python -m`), after the installed packages:
    `reward_funcs=[my_rewards:length]` finds ./my_rewards.py without PYTHONPATH.
    """
    from echoink.config import ConfigError, load_config
    from echoink.data import DatasetError
    from echoink.io import NoSpaceLeftError

    _working_directory_importable()

    try:
        cfg = load_config(config, ctx.args)
    except ConfigError as exc:
        _fail(str(exc))
    _register_problem_types(cfg.problem_types)  # before the data is validated
    if dry_run:
        from echoink.config import describe_run
        from echoink.data import load_dataset
        from echoink.grpo.trackers import check_trackers
        from echoink.prompts import PromptTemplate
        from echoink.rewards import resolve_rewards

        try:  # what train() checks before the model loads, minus the data: a bad reward or template fails here
            resolve_rewards(cfg.reward_funcs)
            PromptTemplate.from_dict(cfg.prompt_template)
            _dry_run_family_checks(cfg)
        except (TypeError, ValueError) as exc:
            _fail(str(exc))

        if num_items is None:
            try:
                num_items = len(load_dataset(cfg.train_data))
            except DatasetError as exc:
                _fail(f"{exc}\n(pass --num-items N to see the step arithmetic without the dataset)")
        typer.echo(describe_run(cfg, num_items, num_processes))
        try:  # the dry run may be on another machine than the run: a missing tracker is a note here
            check_trackers(cfg)
        except ConfigError as exc:
            typer.echo(f"note: {exc} (the run itself stops on this)", err=True)
        return
    from echoink.eval.run import training_evaluator
    from echoink.grpo.step import NonFiniteError
    from echoink.grpo.trainer import train
    from echoink.model import ModelLoadError
    from echoink.rewards import RewardError
    from echoink.run_lock import LockedError
    from echoink.grpo.preemption import PREEMPTED_EXIT_STATUS, Preempted

    from echoink.export import write_model_card

    try:
        final = train(cfg, resume_from=str(resume) if resume else None, progress=not quiet,
                      evaluate=training_evaluator(cfg))
    except (DatasetError, ModelLoadError, RewardError, NonFiniteError, ConfigError, ValueError, LockedError) as exc:
        _fail(str(exc))
    except Preempted as exc:  # SIGTERM / SIGUSR1: a checkpoint was written; 75 tells a job script to requeue
        typer.secho(str(exc), fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(code=PREEMPTED_EXIT_STATUS)
    except NoSpaceLeftError as exc:
        _fail_no_space(exc, "run the same command with resume=true (it continues from the newest checkpoint)")
    try:
        card = write_model_card(final, run_dir=cfg.output_dir, config=cfg.to_dict())
    except NoSpaceLeftError as exc:
        _fail(f"{exc} (the model in {final} is complete; only its README.md model card was not written)")
    typer.echo(f"final model: {final} (model card: {card})")


@app.command("config", cls=FlagCommand)
def config_command(
    keys: Optional[list[str]] = typer.Argument(None, help="Keys to describe (default: every key)."),
    list_keys: bool = typer.Option(False, "--list", help="List every config key (the default without KEYS)."),
) -> None:
    """Describe the training config keys: type, default and one-line help, by section."""
    from echoink.config import config_keys, describe_config_keys, unknown_key_message

    if keys and not list_keys:
        known = {key.name: key for key in config_keys()}
        unknown = [name for name in keys if name not in known]
        if unknown:
            _fail(unknown_key_message(unknown))
        for name in keys:
            key = known[name]
            typer.echo(f"{key.name} ({key.type}, default {key.default}): {key.help} [{key.section}]")
        return
    typer.echo(describe_config_keys())


def _dry_run_family_checks(cfg) -> None:
    """train's checks of the model directory and of the settings its family cannot honour (its config.json
    is read, not its weights); a model not downloaded yet is said and skipped."""
    from echoink.model.loading import read_checkpoint
    from echoink.model.trainable import check_family_settings

    if not cfg.model_path or not Path(cfg.model_path).exists():
        typer.echo(f"note: model_path {cfg.model_path or '(unset)'} not found: its family checks are skipped",
                   err=True)
        return
    family, _, _ = read_checkpoint(cfg.model_path)
    check_family_settings(family, cfg)


def _working_directory_importable() -> None:
    """Put the working directory on the import path as `python -m` does, but last, so a file there never
    shadows an installed module (the `echoink` console script starts with its own directory instead)."""
    import sys

    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())


@app.command("demo", cls=FlagCommand, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def demo_command(
    ctx: typer.Context,
    out: Path = typer.Option(Path("demo_out"), "--out", help="Directory for data, models, run and summary.json."),
    family: str = typer.Option("qwen2.5-omni", "--family",
                               help="Tiny model family: qwen2.5-omni or qwen3-omni (models and run in "
                                    "<out>/model_warm-<family>, <out>/run-<family>)."),
) -> None:
    """The embedded default end to end: synthetic data, tiny model, GRPO, before/after accuracy, curves.

    Extra key=value arguments override the demo config shipped in the package (echoink/demo/demo_cpu.yaml) (e.g. max_steps=20).
    """
    from echoink.config import ConfigError
    from echoink.data import DatasetError
    from echoink.demo import run_demo
    from echoink.grpo.step import NonFiniteError
    from echoink.io import NoSpaceLeftError
    from echoink.model import ModelLoadError
    from echoink.run_lock import LockedError

    try:
        summary = run_demo(out, overrides=ctx.args, family=family)
    except (ConfigError, DatasetError, ModelLoadError, NonFiniteError, ValueError, LockedError) as exc:
        _fail(f"{exc} (demo config: echoink/demo/demo_cpu.yaml; key=value arguments override it)"
              if isinstance(exc, ConfigError) else str(exc))
    except NoSpaceLeftError as exc:
        _fail_no_space(exc, "run the demo again (it rebuilds what is missing)")
    typer.echo(f"accuracy {summary['accuracy_before']:.3f} -> {summary['accuracy_after']:.3f}")


# ---- evaluation and analysis commands ---------------------------------------------------------


@app.command("eval", cls=FlagCommand)
def eval_command(
    model: Path = typer.Option(..., "--model", help="Model directory (a published Qwen2.5-Omni / Qwen3-Omni layout or ours)."),
    data: Path = typer.Option(..., "--data", help="Dataset in the AVQA-R1 format: JSON/JSONL, parquet, or a "
                                                   "datasets save_to_disk directory."),
    out: Path = typer.Option(..., "--out", help="Predictions JSONL to write (resumed when it exists)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Prompts per generate call."),
    greedy: bool = typer.Option(False, "--greedy", help="Greedy decoding, one answer per problem (the default)."),
    samples: Optional[int] = typer.Option(None, "--samples", min=1,
                                          help="Sample K answers per problem (sampling instead of greedy)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature (default 1.0)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling threshold (default 1.0)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Top-k sampling (default: off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed (default 0)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1,
                                                 help="Longest reply in tokens (default 256)."),
    max_prompt_length: int = typer.Option(DEFAULT_MAX_PROMPT_LENGTH, "--max-prompt-length", min=1,
                                          help="Longer prompts (tokens, media included) are skipped and count as "
                                               "wrong, as in training."),
    ablate: str = typer.Option("none", "--ablate", help="none | mute-audio | blank-image | no-media."),
    limit: Optional[int] = typer.Option(None, "--limit", min=0, help="Only the first N records (0: none)."),
    lenient: bool = typer.Option(False, "--lenient", help="Also read 'C.', '(C)', 'Answer: C' ... (not the reward's rule)."),
    protocol: str = typer.Option("ours", "--protocol",
                                 help="ours (training prompt, strict parser) | echoink (EchoInk-R1's evaluation: "
                                      "its prompt, decoding, media caps and parser; see docs/evaluation.md)."),
    base_model: bool = typer.Option(False, "--base-model",
                                    help="With --protocol echoink: the base model's prompt and greedy decoding."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | bfloat16 | float32."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    problem_types: Optional[str] = typer.Option(None, "--problem-types", help=_PROBLEM_TYPES_HELP),
    config: Optional[Path] = typer.Option(None, "--config",
                                          help="A run's config.resolved.json (or training YAML): prompt with its "
                                               "template, media caps and problem types instead of those saved "
                                               "with the model (echoink_prompt.json)."),
) -> None:
    """Batched, resumable evaluation: write one JSON line per answer to --out and print the accuracy.

    With --protocol ours a trained model is prompted as it was trained: the prompt template and media caps
    saved with it (echoink_prompt.json), or those of --config; the first line says which.
    """
    from echoink.data import DatasetError
    from echoink.data.media import MediaError
    from echoink.eval.protocols import EVAL_PROTOCOLS
    from echoink.eval.metrics_table import eval_summary_lines
    from echoink.eval.run import evaluate
    from echoink.eval.run_files import RunSignatureError
    from echoink.model import ModelLoadError
    from echoink.run_lock import LockedError

    _register_problem_types(problem_types)
    if protocol not in EVAL_PROTOCOLS:
        _fail(f"--protocol must be one of {', '.join(EVAL_PROTOCOLS)}, got {protocol!r}")
    prompt = _eval_prompt_settings(model, config, protocol, given_problem_types=bool(problem_types))
    sampling_options = {"--temperature": temperature, "--top-p": top_p, "--top-k": top_k}
    if protocol == "echoink":
        fixed = [name for name, value in {**sampling_options, "--max-new-tokens": max_new_tokens}.items()
                 if value is not None] + [name for name, on in (("--greedy", greedy), ("--lenient", lenient)) if on]
        if fixed:
            _fail(f"--protocol echoink fixes the decoding and the parser; drop {', '.join(fixed)} "
                  "(--base-model selects greedy decoding; --samples K and --seed still apply)")
        if base_model and (samples is not None or seed is not None):
            _fail("--base-model decodes greedily (EchoInk-R1's base-model protocol): drop --samples / --seed")
    else:
        if base_model:
            _fail("--base-model only applies with --protocol echoink (ours gives every model the same prompt)")
        if samples is None:
            given = [name for name, value in {**sampling_options, "--seed": seed}.items() if value is not None]
            if given:
                _fail(f"{', '.join(given)} only apply when sampling: add --samples K (greedy is the default)")
        elif greedy:
            _fail("--greedy and --samples exclude each other (greedy gives one answer per problem)")
    try:
        summary = evaluate(
            model, data, out, batch_size=batch_size, greedy=samples is None, samples=samples or 1,
            temperature=1.0 if temperature is None else temperature, top_p=1.0 if top_p is None else top_p,
            top_k=top_k, seed=0 if seed is None else seed, max_new_tokens=max_new_tokens or 256, ablate=ablate,
            limit=limit, lenient=lenient, progress=progress, dtype=dtype, max_prompt_length=max_prompt_length,
            protocol=protocol, base_model=base_model, **prompt,
        )
    except (DatasetError, ModelLoadError, RunSignatureError, MediaError, ValueError, LockedError) as exc:
        _fail(str(exc))
    for line in eval_summary_lines(summary, protocol):
        typer.echo(line)
    if summary["skipped"]:
        typer.echo(f"skipped {summary['skipped']} answer(s) whose prompt is longer than --max-prompt-length "
                   f"{max_prompt_length} tokens (counted as wrong; their rows say why)")
    typer.echo(f"wrote {out} ({summary['generated']} new, {summary['resumed']} resumed)")


@app.command("lmms-eval-task", cls=FlagCommand)
def lmms_eval_task_command(
    data: Path = typer.Argument(..., help="Dataset JSON/JSONL in echoink's format (AVQA-R1 layout)."),
    out: Path = typer.Option(..., "--out", help="Directory to write the task into (pass it to lmms-eval's --include_path)."),
    name: Optional[str] = typer.Option(None, "--name", help="Task name (default: echoink_<file stem>)."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Generation budget (echoink eval's default)."),
) -> None:
    """Write an lmms-eval task (YAML, documents, grading functions) for a dataset file in echoink's format."""
    from echoink.data import DatasetError
    from echoink.eval.lmms_task import write_lmms_task

    try:
        task = write_lmms_task(data, out, name=name, max_new_tokens=max_new_tokens)
    except (DatasetError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(f"wrote task {task.name} ({task.count} documents; data types {', '.join(task.data_types)}) to "
               f"{task.yaml_path}\nrun: lmms-eval --model echoink --model_args pretrained=MODEL_DIR "
               f"--tasks {task.name} --include_path {task.yaml_path.parent}")


def _eval_prompt_settings(model: Path, config: Optional[Path], protocol: str, given_problem_types: bool) -> dict:
    """evaluate()'s template and media_options for --protocol ours (printed with where they came from);
    nothing for --protocol echoink, which fixes its own."""
    from echoink.model.prompt_settings import PromptSettingsError, settings_for_eval

    if protocol != "ours":
        if config is not None:
            _fail(f"--protocol {protocol} uses its own prompt and media caps: drop --config")
        return {}
    try:
        settings, source = settings_for_eval(model, config)
    except PromptSettingsError as exc:
        _fail(str(exc))
    if settings.problem_types and config is not None:
        _register_problem_types(list(settings.problem_types))  # a config the user named: as train does
    elif settings.problem_types and not given_problem_types:  # never import code named by a file in a model dir
        _fail(f"the model was trained with user problem types {', '.join(settings.problem_types)} ({source}); "
              f"pass --problem-types {','.join(settings.problem_types)} to import them (trusted code only)")
    if model.is_dir():  # (a missing model is one error line from evaluate, not a prompt line first)
        typer.echo(f"{settings.describe()} ({source})")
    return {"template": settings.template, "media_options": settings.media}


@app.command("metrics", cls=FlagCommand)
def metrics_command(
    predictions: list[Path] = typer.Argument(..., help="One or more predictions.jsonl files (one column each)."),
    against: Optional[str] = typer.Option(
        None, "--against",
        help="Baseline predictions file: paired comparison of every file against it. Or a protocol name, echoink "
             "or ours: each file's own replies graded by that protocol's answer rule as the baseline (write "
             "./echoink for a file of that name)."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables."),
) -> None:
    """Accuracy (95% Wilson CI), majority vote, pass@k, format and parse rates; paired tests with --against.

    Tables have one row per measure and one column per file ([1], [2], ... listed above each table), so they
    read at 80 columns.
    """
    from rich.console import Console

    from echoink.eval.metrics import accuracy_summary, load_predictions, paired_comparison
    from echoink.eval.metrics_table import comparison_measures, file_legend, group_tables, measure_tables, summary_measures
    from echoink.eval.protocols import EVAL_PROTOCOLS, echoink_fallback_counts, regrade_rows
    from echoink.io import to_strict_json

    try:
        rows = {str(path): load_predictions(path) for path in predictions}
        summaries = {name: accuracy_summary(file_rows) for name, file_rows in rows.items()}
        if against in EVAL_PROTOCOLS:
            baselines = {name: regrade_rows(file_rows, against, name) for name, file_rows in rows.items()}
            baseline_name = f"the same replies graded by protocol {against!r}"
        elif against is not None:
            baseline = load_predictions(Path(against))
            baselines = {name: baseline for name in rows}
            baseline_name = against
        else:
            baselines = {}
        comparisons = {name: paired_comparison(rows[name], baselines[name]) for name in baselines}
        if against in EVAL_PROTOCOLS:
            for name, comparison in comparisons.items():
                comparison["baseline_accuracy_summary"] = accuracy_summary(baselines[name])
                comparison["echoink_parser"] = echoink_fallback_counts(rows[name])
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))

    if as_json:
        payload = {"files": summaries}
        if against is not None:
            payload["against"] = {"baseline": baseline_name, "comparisons": comparisons}
        typer.echo(to_strict_json(payload, indent=2))
        return

    console = Console(highlight=False, markup=False)  # file names and groups printed literally
    console.print(file_legend(list(summaries)), soft_wrap=True)
    for table in measure_tables("Evaluation metrics (in %, 95% Wilson interval)",
                                {name: summary_measures(s) for name, s in summaries.items()}):
        console.print(table)
    for table in group_tables(summaries):
        console.print(table)
    if comparisons:
        console.print(f"baseline: {baseline_name}", soft_wrap=True)
        per_file = {name: comparison_measures(c) for name, c in comparisons.items()}
        if against in EVAL_PROTOCOLS:
            for name, c in comparisons.items():
                counts = c["echoink_parser"]
                per_file[name] += [("echoink: <answer> tag", str(counts["tagged"])),
                                   ("echoink: bare letter", str(counts["fallback"])),
                                   ("  of which article 'a'", str(counts["article_a"]))]
        for table in measure_tables("Paired comparison (per-problem score; difference in points)", per_file):
            console.print(table)


@app.command("export", cls=FlagCommand)
def export_command(
    model: Path = typer.Option(..., "--model", help="Trained model: RUN/final, a LoRA adapter dir, or a full layout."),
    out: Path = typer.Option(..., "--out", help="New directory to write (an existing one is never replaced)."),
    base: Optional[Path] = typer.Option(None, "--base",
                                        help="The published base checkpoint (full layout): its talker, token2wav "
                                             "and speakers are copied; required for --layout full."),
    layout: str = typer.Option("full", "--layout", help="full (published Qwen2.5-Omni layout) | thinker (ours)."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir",
                                           help="Training run for the model card (default: the model's parent "
                                                "directory when it holds metrics.jsonl)."),
    max_shard_gb: float = typer.Option(5.0, "--max-shard-gb", min=0.001, help="Largest weight shard, in GiB."),
    predictions: Optional[list[Path]] = typer.Option(None, "--predictions",
                                                     help="echoink eval output(s) to report in the model card "
                                                          "(repeatable)."),
    base_model_id: Optional[str] = typer.Option(None, "--base-model-id",
                                                help="The base's Hub id for the card's base_model, e.g. "
                                                     "Qwen/Qwen2.5-Omni-7B (a local path is never written there)."),
    dataset_id: Optional[str] = typer.Option(None, "--dataset-id",
                                             help="The training data's Hub id for the card's datasets."),
    license_id: Optional[str] = typer.Option(None, "--license",
                                             help="The card's license (a Hub license id such as apache-2.0; "
                                                  "default: the base's own card's, else other)."),
) -> None:
    """Export a trained model for transformers, vLLM, lmms-eval and ms-swift, with a model card (README.md)."""
    from echoink.export import ExportError, export_model
    from echoink.io import check_writable
    from echoink.model import ModelLoadError

    check_writable(out.parent)
    try:
        result = export_model(model, out, base_dir=base, layout=layout, run_dir=run_dir,
                              max_shard_bytes=int(max_shard_gb * 1024**3), predictions=predictions or (),
                              card_ids={"base_model_id": base_model_id, "dataset_id": dataset_id,
                                        "license": license_id})
    except (ExportError, ModelLoadError) as exc:
        _fail(str(exc))
    merged = ", LoRA merged" if result.merged_lora else ""
    if result.layout == "full":
        typer.echo(f"wrote {result.out_dir} (full layout{merged}): {result.thinker_tensors} thinker tensors, "
                   f"{result.copied_tensors} tensors copied from the base as stored, {len(result.shards)} shard(s), "
                   "model card README.md")
    else:
        typer.echo(f"wrote {result.out_dir} (thinker layout{merged}): {len(result.copied_files)} files, "
                   "model card README.md")


@app.command("report", cls=FlagCommand)
def report_command(
    run_dir: Path = typer.Argument(..., help="Run directory (metrics.jsonl, completions.jsonl, config.resolved.json)."),
    predictions: Optional[list[Path]] = typer.Argument(None, help="Predictions files to show (echoink eval output)."),
    out: Optional[Path] = typer.Option(None, "--out", help="HTML file to write (default: RUN_DIR/report.html)."),
    max_steps: int = typer.Option(30, "--max-steps", min=1, help="Most training steps shown (evenly spaced)."),
    media: bool = typer.Option(True, "--media/--no-media", help="Embed each problem's image and audio."),
) -> None:
    """One self-contained HTML page of a run: curves, eval tables, sample completions with their image and audio."""
    from echoink.analysis.report import write_report
    from echoink.io import check_writable

    if out is not None and out.is_dir():
        _fail(f"--out {out}: is a directory; give the HTML file to write, e.g. --out {out / 'report.html'}")
    if run_dir.is_dir():
        check_writable((out or run_dir / "report.html").parent)
    try:
        result = write_report(run_dir, predictions or [], out, max_steps=max_steps, media=media)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    for note in result.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"wrote {result.path} ({len(result.steps_shown)} steps shown, {result.images} image(s), "
               f"{result.audio_clips} audio clip(s), {result.video_clips} video clip(s) embedded)")


@app.command("plot", cls=FlagCommand)
def plot_command(
    run_dir: Path = typer.Argument(..., help="Run directory (with metrics.jsonl) or a metrics.jsonl file."),
    out: Optional[Path] = typer.Option(None, "--out", help="PNG to write (default: RUN_DIR/curves.png)."),
) -> None:
    """Draw the training curves (accuracy/format reward, length, KL, reward std, eval accuracy) to a PNG."""
    from echoink.analysis.curves import plot_training_curves

    from echoink.io import check_writable

    if out is None:
        out = (run_dir if run_dir.is_dir() else run_dir.parent) / "curves.png"
    if out.is_dir():
        _fail(f"--out {out}: is a directory; give the PNG file to write, e.g. --out {out / 'curves.png'}")
    if run_dir.exists():
        check_writable(out.parent)
    try:
        written = plot_training_curves(run_dir, out)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(f"wrote {written}")


@app.command("aha", cls=FlagCommand)
def aha_command(
    source: Path = typer.Argument(..., help="Run directory (with completions.jsonl) or a predictions.jsonl file."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory (default: RUN_DIR/aha or PRED_aha/)."),
    patterns: Optional[Path] = typer.Option(None, "--patterns",
                                            help="Text file of reflective phrases, one per line (# comments)."),
    problem_types: Optional[str] = typer.Option(None, "--problem-types", help=_PROBLEM_TYPES_HELP),
) -> None:
    """Mine reflective expressions ("wait", "hmm", ...) and answer revisions; write report, examples, plot."""
    from rich.console import Console

    from echoink.analysis.aha import load_patterns, mine_aha

    from echoink.io import check_writable

    _register_problem_types(problem_types)  # a run's completions are graded by their own problem type

    if out is None:
        out = source / "aha" if source.is_dir() else source.with_name(f"{source.stem}_aha")
    if source.exists():
        check_writable(out.parent)
    try:
        phrases = load_patterns(patterns) if patterns is not None else None
        report = mine_aha(source, out, phrases)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    console = Console(highlight=False, soft_wrap=True, markup=False)
    revisions = report["revisions"]
    console.print(f"{report['n_completions']} completions ({report['kind']}): "
                  f"{100 * report['reflection_rate']:.1f}% with a reflective expression, "
                  f"{report['mean_reflections']:.2f} per completion")
    top = list(report["expression_counts"].items())[:8]
    if top:
        console.print("top expressions: " + ", ".join(f"{e!r} {c['count']}" for e, c in top))
    console.print(f"revisions: {revisions['n']} (fixed {revisions['fixed']}, broke {revisions['broke']}, "
                  f"changed {revisions['changed']}) among {revisions['n_with_stated_answer']} completions "
                  "that state an answer while thinking")
    for label, path in report["outputs"].items():
        if path is not None:
            console.print(f"wrote {path}")


def main() -> None:  # pragma: no cover - console entry point (pyproject's [project.scripts])
    """The `echoink` command: the app, whose command group turns write failures into one line (FlagGroup)."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
