"""The `echoink` command line. Thin: each command parses, calls one library function, prints."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="echoink: GRPO fine-tuning and evaluation of omni-modal models (Qwen2.5-Omni, Qwen3-Omni).",
                  no_args_is_help=True, add_completion=False)
model_app = typer.Typer(help="Model utilities (tiny offline checkpoints).", no_args_is_help=True)
data_app = typer.Typer(help="Datasets in the AVQA-R1 format: validate, synthesize, convert.", no_args_is_help=True)
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

@model_app.command("tiny")
def model_tiny(
    out: Path = typer.Option(..., "--out", help="Directory to write the checkpoint to."),
    layout: str = typer.Option("full", "--layout", help="full: the family's published layout; thinker: ours."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random initialisation."),
    size: str = typer.Option("tiny", "--size", help="tiny (tests, demo) or bench (benchmark shape)."),
    family: str = typer.Option("qwen2.5-omni", "--family", help="Model family: qwen2.5-omni or qwen3-omni."),
) -> None:
    """Write a tiny random-initialised checkpoint of a model family + processor files, offline."""
    from echoink.io import NoSpaceLeftError
    from echoink.model.families import family_by_name, write_tiny_checkpoint

    try:
        path = write_tiny_checkpoint(out, family=family, layout=layout, seed=seed, size=size)
    except ValueError as exc:
        _fail(str(exc))
    except NoSpaceLeftError as exc:
        _fail_no_space(exc, "run the command again (nothing half-written was left)")
    typer.echo(f"wrote tiny {family_by_name(family).display_name} checkpoint ({layout} layout, {size}) to {path}")


# ---- data commands ----------------------------------------------------------------------------


@data_app.command("validate")
def data_validate(
    path: Path = typer.Argument(..., help="Dataset JSON (array) or JSONL file."),
    check_media: bool = typer.Option(False, "--check-media", help="Also decode every media file."),
    problem_types: Optional[str] = typer.Option(None, "--problem-types", help=_PROBLEM_TYPES_HELP),
    config: Optional[Path] = typer.Option(None, "--config", help="Training config: register its problem_types."),
) -> None:
    """Validate a dataset file and print statistics; exit 1 on any problem."""
    from rich.console import Console
    from rich.table import Table

    from echoink.config import ConfigError, load_config
    from echoink.data.report import build_report

    if config is not None:
        try:
            _register_problem_types(load_config(config).problem_types)
        except ConfigError as exc:
            _fail(str(exc))
    _register_problem_types(problem_types)

    console = Console()
    report = build_report(path, check_media=check_media)
    for problem in report.problems:
        console.print(f"[red]error[/red] {problem}", markup=True, highlight=False, soft_wrap=True)

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
        console.print(f"[red]{len(report.problems)} problem(s) found[/red]")
        raise typer.Exit(code=1)
    console.print("[green]ok[/green]")


@data_app.command("synth")
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

    chosen = [name.strip() for name in families.split(",") if name.strip()] if families else None
    try:
        result = write_synthetic_dataset(out, train, valid, seed, families=chosen, shuffle_options=shuffle_options)
    except ValueError as exc:
        _fail(str(exc))
    console = Console()
    for split, info in result["splits"].items():
        mix = ", ".join(f"{k}: {v}" for k, v in sorted(info["families"].items()))
        console.print(f"{split}: {info['count']} items -> {info['json']}  ({mix})", highlight=False)


@data_app.command("convert-omniinstruct")
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
    Console().print(report.summary(), highlight=False)


# ---- training commands ------------------------------------------------------------------------

@app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train_command(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (TRL GRPOConfig field names)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config and step arithmetic; load no model."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Resume from this checkpoint directory."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    num_processes: int = typer.Option(int(os.environ.get("WORLD_SIZE", "1")), "--num-processes",
                                      help="With --dry-run: number of GPUs/processes to compute the arithmetic for."),
    num_items: Optional[int] = typer.Option(None, "--num-items",
                                            help="With --dry-run: training items, when the dataset is not at hand."),
) -> None:
    """Train with GRPO. Extra arguments are key=value overrides of the config, e.g. beta=0.04.

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
        from echoink.prompts import PromptTemplate
        from echoink.rewards import resolve_rewards

        try:  # what train() checks before the model loads, minus the data: a bad reward or template fails here
            resolve_rewards(cfg.reward_funcs)
            PromptTemplate.from_dict(cfg.prompt_template)
        except (TypeError, ValueError) as exc:
            _fail(str(exc))

        if num_items is None:
            try:
                num_items = len(load_dataset(cfg.train_data))
            except DatasetError as exc:
                _fail(f"{exc}\n(pass --num-items N to see the step arithmetic without the dataset)")
        typer.echo(describe_run(cfg, num_items, num_processes))
        return
    from echoink.eval import training_evaluator
    from echoink.grpo.step import NonFiniteError
    from echoink.grpo.trainer import train
    from echoink.model import ModelLoadError
    from echoink.rewards import RewardError

    try:
        final = train(cfg, resume_from=str(resume) if resume else None, progress=not quiet,
                      evaluate=training_evaluator(cfg))
    except (DatasetError, ModelLoadError, RewardError, NonFiniteError, ConfigError, ValueError) as exc:
        _fail(str(exc))
    except NoSpaceLeftError as exc:
        _fail_no_space(exc, "run the same command with resume=true (it continues from the newest checkpoint)")
    typer.echo(f"final model: {final}")


def _working_directory_importable() -> None:
    """Put the working directory on the import path as `python -m` does, but last, so a file there never
    shadows an installed module (the `echoink` console script starts with its own directory instead)."""
    import sys

    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())


@app.command("demo", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def demo_command(
    ctx: typer.Context,
    out: Path = typer.Option(Path("demo_out"), "--out", help="Directory for data, models, run and summary.json."),
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

    try:
        summary = run_demo(out, overrides=ctx.args)
    except (ConfigError, DatasetError, ModelLoadError, NonFiniteError, ValueError) as exc:
        _fail(f"{exc} (demo config: echoink/demo/demo_cpu.yaml; key=value arguments override it)"
              if isinstance(exc, ConfigError) else str(exc))
    except NoSpaceLeftError as exc:
        _fail_no_space(exc, "run the demo again (it rebuilds what is missing)")
    typer.echo(f"accuracy {summary['accuracy_before']:.3f} -> {summary['accuracy_after']:.3f}")


# ---- evaluation and analysis commands ---------------------------------------------------------


@app.command("eval")
def eval_command(
    model: Path = typer.Option(..., "--model", help="Model directory (a published Qwen2.5-Omni / Qwen3-Omni layout or ours)."),
    data: Path = typer.Option(..., "--data", help="Dataset JSON/JSONL in the AVQA-R1 format."),
    out: Path = typer.Option(..., "--out", help="Predictions JSONL to write (resumed when it exists)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Prompts per generate call."),
    greedy: bool = typer.Option(False, "--greedy", help="Greedy decoding, one answer per problem (the default)."),
    samples: Optional[int] = typer.Option(None, "--samples", min=1,
                                          help="Sample K answers per problem (sampling instead of greedy)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature (default 1.0)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling threshold (default 1.0)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Top-k sampling (default: off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed (default 0)."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Longest reply in tokens."),
    ablate: str = typer.Option("none", "--ablate", help="none | mute-audio | blank-image | no-media."),
    limit: Optional[int] = typer.Option(None, "--limit", min=0, help="Only the first N records."),
    lenient: bool = typer.Option(False, "--lenient", help="Also read 'C.', '(C)', 'Answer: C' ... (not the reward's rule)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | bfloat16 | float32."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    problem_types: Optional[str] = typer.Option(None, "--problem-types", help=_PROBLEM_TYPES_HELP),
) -> None:
    """Batched, resumable evaluation: write one JSON line per answer to --out and print the accuracy."""
    from echoink.data import DatasetError
    from echoink.data.media import MediaError
    from echoink.eval.run import RunSignatureError, evaluate
    from echoink.model import ModelLoadError

    _register_problem_types(problem_types)
    sampling_options = {"--temperature": temperature, "--top-p": top_p, "--top-k": top_k, "--seed": seed}
    if samples is None:
        given = [name for name, value in sampling_options.items() if value is not None]
        if given:
            _fail(f"{', '.join(given)} only apply when sampling: add --samples K (greedy is the default)")
    elif greedy:
        _fail("--greedy and --samples exclude each other (greedy gives one answer per problem)")
    try:
        summary = evaluate(
            model, data, out, batch_size=batch_size, greedy=samples is None, samples=samples or 1,
            temperature=1.0 if temperature is None else temperature, top_p=1.0 if top_p is None else top_p,
            top_k=top_k, seed=0 if seed is None else seed, max_new_tokens=max_new_tokens, ablate=ablate,
            limit=limit, lenient=lenient, progress=progress, dtype=dtype,
        )
    except (DatasetError, ModelLoadError, RunSignatureError, MediaError, ValueError) as exc:
        _fail(str(exc))
    accuracy = summary["accuracy"]
    headline = "-" if accuracy is None else _ci_text(accuracy, summary["ci_low"], summary["ci_high"])
    typer.echo(f"accuracy {headline} % over {summary['n']} answers to {summary['n_problems']} problems "
               f"(95% Wilson); unparsed {100 * (summary['unparsed_rate'] or 0):.1f}%, "
               f"format {100 * (summary['format_rate'] or 0):.1f}%, "
               f"truncated {100 * (summary['truncated_rate'] or 0):.1f}%")
    for kind, block in summary.get("by_problem_type", {}).items():
        typer.echo(f"  {kind}: {block['measure']} {_ci_text(block['value'], block['ci_low'], block['ci_high'])} % "
                   f"over {block['n']} answers, unparsed {100 * block['unparsed_rate']:.1f}%")
    typer.echo(f"wrote {out} ({summary['generated']} new, {summary['resumed']} resumed)")


def _ci_text(value: float, low: float, high: float) -> str:
    return f"{100 * value:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


@app.command("metrics")
def metrics_command(
    predictions: list[Path] = typer.Argument(..., help="One or more predictions.jsonl files (one table row each)."),
    against: Optional[Path] = typer.Option(None, "--against",
                                           help="Baseline predictions: paired comparison of every file against it."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables."),
) -> None:
    """Accuracy (95% Wilson CI), majority vote, pass@k, format and parse rates; paired tests with --against."""
    import json

    from rich.console import Console
    from rich.table import Table

    from echoink.eval.metrics import accuracy_summary, load_predictions, paired_comparison

    try:
        rows = {str(path): load_predictions(path) for path in predictions}
        baseline = load_predictions(against) if against is not None else None
        summaries = {name: accuracy_summary(file_rows) for name, file_rows in rows.items()}
        comparisons = ({name: paired_comparison(file_rows, baseline) for name, file_rows in rows.items()}
                       if baseline is not None else {})
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))

    if as_json:
        payload = {"files": summaries}
        if against is not None:
            payload["against"] = {"baseline": str(against), "comparisons": comparisons}
        typer.echo(json.dumps(payload, indent=2))
        return

    console = Console()
    table = Table(title="Evaluation metrics (accuracy in %, 95% Wilson interval)")
    for column in ("file", "n", "problems", "accuracy", "K", "mean±std over samples", "majority",
                   "pass@K", "unparsed", "format", "reply tokens"):
        table.add_column(column, justify="left" if column == "file" else "right")
    for name, s in summaries.items():
        k = s["samples_per_problem"]
        pass_k = s["pass_at_k"].get(f"pass@{len(s['pass_at_k'])}")
        table.add_row(
            name, str(s["n"]), str(s["n_problems"]), _ci_text(s["accuracy"], s["ci_low"], s["ci_high"]), str(k),
            f"{100 * s['accuracy_mean']:.1f}±{100 * s['accuracy_std']:.1f}", f"{100 * s['majority_vote_accuracy']:.1f}",
            f"{100 * pass_k:.1f} (k={len(s['pass_at_k'])})", f"{100 * s['unparsed_rate']:.1f}",
            "-" if s["format_rate"] is None else f"{100 * s['format_rate']:.1f}",
            "-" if s["mean_reply_tokens"] is None else f"{s['mean_reply_tokens']:.0f}",
        )
    console.print(table)

    breakdown = Table(title="Breakdown (accuracy in %, 95% Wilson interval)")
    for column in ("file", "by", "group", "n", "accuracy"):
        breakdown.add_column(column, justify="right" if column in ("n", "accuracy") else "left")
    for name, s in summaries.items():
        for by in ("data_type", "needs"):
            for group, block in s[f"by_{by}"].items():
                breakdown.add_row(name, by, group, str(block["n"]),
                                  _ci_text(block["accuracy"], block["ci_low"], block["ci_high"]))
    if breakdown.row_count:
        console.print(breakdown)

    by_type = Table(title="Per problem type (accuracy: 95% Wilson; mean score: 95% bootstrap; in %)")
    for column in ("file", "problem type", "n", "measure", "value", "unparsed"):
        by_type.add_column(column, justify="right" if column in ("n", "value", "unparsed") else "left")
    for name, s in summaries.items():
        for key in ("by_problem_type", "by_problem_type_data_type"):
            for group, block in s[key].items():
                by_type.add_row(name, group, str(block["n"]), block["measure"],
                                _ci_text(block["value"], block["ci_low"], block["ci_high"]),
                                f"{100 * block['unparsed_rate']:.1f}")
    console.print(by_type)

    if comparisons:
        paired = Table(title=f"Paired comparison against {against} (per-problem score; difference in points)")
        for column in ("file", "shared", "accuracy", "baseline", "difference [95% bootstrap CI]", "wins/losses/ties",
                       "McNemar p"):
            paired.add_column(column, justify="left" if column == "file" else "right")
        for name, c in comparisons.items():
            paired.add_row(name, str(c["n_shared"]), f"{100 * c['accuracy_a']:.1f}", f"{100 * c['accuracy_b']:.1f}",
                           f"{100 * c['difference']:+.1f} [{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}]",
                           f"{c['wins']}/{c['losses']}/{c['ties']}", f"{c['mcnemar_p']:.4g}")
        console.print(paired)


@app.command("plot")
def plot_command(
    run_dir: Path = typer.Argument(..., help="Run directory (with metrics.jsonl) or a metrics.jsonl file."),
    out: Optional[Path] = typer.Option(None, "--out", help="PNG to write (default: RUN_DIR/curves.png)."),
) -> None:
    """Draw the training curves (accuracy/format reward, length, KL, reward std, eval accuracy) to a PNG."""
    from echoink.analysis.curves import plot_training_curves

    if out is None:
        out = (run_dir if run_dir.is_dir() else run_dir.parent) / "curves.png"
    try:
        written = plot_training_curves(run_dir, out)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(f"wrote {written}")


@app.command("aha")
def aha_command(
    source: Path = typer.Argument(..., help="Run directory (with completions.jsonl) or a predictions.jsonl file."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory (default: RUN_DIR/aha or PRED_aha/)."),
    patterns: Optional[Path] = typer.Option(None, "--patterns",
                                            help="Text file of reflective phrases, one per line (# comments)."),
) -> None:
    """Mine reflective expressions ("wait", "hmm", ...) and answer revisions; write report, examples, plot."""
    from rich.console import Console

    from echoink.analysis.aha import load_patterns, mine_aha

    if out is None:
        out = source / "aha" if source.is_dir() else source.with_name(f"{source.stem}_aha")
    try:
        phrases = load_patterns(patterns) if patterns is not None else None
        report = mine_aha(source, out, phrases)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    console = Console(highlight=False, soft_wrap=True)
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


def main() -> None:  # pragma: no cover - console entry point
    from echoink.io import NoSpaceLeftError

    try:
        app()
    except NoSpaceLeftError as exc:  # any command that writes (eval predictions, plots, reports...)
        typer.secho(f"error: {exc}" + ("" if exc.detail else ": free space, then run the command again (an eval "
                                       "resumes its predictions file)"), fg=typer.colors.RED, err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":  # pragma: no cover
    main()
