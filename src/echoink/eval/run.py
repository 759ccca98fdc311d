"""Whole evaluation runs: `echoink eval` and the trainer's in-training evaluation.

    evaluate(model_dir, data.json, PRED.jsonl)          the CLI's `echoink eval`
    evaluate_loaded(model, processor, records, ...)     the same on a loaded model (the trainer's eval)
    training_evaluator(config)                          the trainer's callback (`eval/*` metrics)

One job per module: the loop through the rollout engine (`eval.generation`), grading (`eval.grading`),
the predictions file, its run signature and the weights fingerprint (`eval.run_files`: resumable runs),
and the summary of rows (`eval.metrics.headline_summary`, the head of `echoink metrics`' table).
"""

from __future__ import annotations

import inspect
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from echoink.config import TrainConfig
from echoink.data.records import Record, load_dataset
from echoink.eval.generation import SAMPLES_PER_CALL, check_unique_ids, generate_predictions
from echoink.eval.grading import Row
from echoink.eval.metrics import headline_summary
from echoink.eval.protocols import protocol_settings
from echoink.eval.run_files import open_run, run_signature
from echoink.io import append_jsonl
from echoink.model.batching import embedding_device_dtype
from echoink.model.generation import SamplingSettings, generation_owner
from echoink.model.inputs import ABLATIONS, MediaOptions
from echoink.problem_types import register_problem_types
from echoink.prompts import DEFAULT_TEMPLATE, PromptTemplate
from echoink.run_lock import file_lock, hold_lock

__all__ = ["evaluate", "evaluate_loaded", "first_records", "sampling_settings", "training_evaluator"]

#: Training's default `max_prompt_length`, the evaluation default too.
DEFAULT_MAX_PROMPT_LENGTH = TrainConfig.max_prompt_length


def evaluate(
    model: str | Path | tuple[Any, Any],
    data_path: str | Path,
    out_path: str | Path,
    *,
    progress: bool = True,
    dtype: str = "auto",
    device: str | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Evaluate a model directory (or a loaded `(model, processor)`) on a dataset file; write PRED.jsonl.

    `settings` are :func:`evaluate_loaded`'s keyword arguments (batch_size, greedy, samples,
    temperature, top_p, top_k, seed, max_new_tokens, ablate, limit, lenient, template, media_options,
    on_batch). Validates everything (settings, dataset, model directory, an existing output's
    signature) before generating. `dtype` / `device` apply when loading from a directory (device:
    CUDA when available).
    Returns `metrics.headline_summary` of every row in the file (resumed rows included) plus
    `generated`, `resumed`, `seconds` and `out_path`.
    Raises ModelLoadError, DatasetError, RunSignatureError or ValueError with one clear message.
    """
    unknown = sorted(set(settings) - _EVALUATE_SETTINGS)
    if unknown:
        raise TypeError(f"evaluate() got unknown setting(s): {', '.join(unknown)}")
    sampling_settings(**{k: v for k, v in settings.items() if k in _SAMPLING_ARGS})
    samples, batch_size = settings.get("samples", 1), settings.get("batch_size", 8)
    per_call = min(samples, SAMPLES_PER_CALL) if isinstance(samples, int) else 1
    if isinstance(batch_size, int) and per_call * batch_size > MAX_SEQUENCES_PER_CALL:
        raise ValueError(f"--batch-size {batch_size} x {per_call} samples = {batch_size * per_call} replies generated "
                         f"at once, more than {MAX_SEQUENCES_PER_CALL}; lower --batch-size to at most "
                         f"{max(1, MAX_SEQUENCES_PER_CALL // per_call)}")
    ablate = settings.get("ablate", "none")
    if ablate not in ABLATIONS:
        raise ValueError(f"ablate must be one of {ABLATIONS}, got {ablate!r}")
    records = load_dataset(data_path)
    _check_before_loading(records, settings)
    with hold_lock(file_lock(out_path), f"predictions file {out_path}"):  # one writer per file (run_lock.py)
        return _evaluate_locked(model, records, data_path, out_path, progress, dtype, device, settings)


def _check_before_loading(records: Sequence[Record], settings: dict) -> None:
    """The argument checks `evaluate_loaded` and `generate_predictions` make, made before the model loads."""
    batch_size, max_prompt_length = settings.get("batch_size", 8), settings.get("max_prompt_length")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1 or None, got {max_prompt_length}")
    chosen = first_records(records, settings.get("limit"))
    check_unique_ids(chosen)
    if settings.get("protocol", "ours") != "ours":
        _check_multiple_choice(chosen, settings["protocol"])


def _evaluate_locked(model, records, data_path, out_path, progress, dtype, device, settings) -> dict[str, Any]:
    if isinstance(model, (str, Path)):
        from echoink.model.loading import load_thinker

        model_name = str(Path(model).resolve())
        loaded, processor = load_thinker(model, dtype=dtype)
        loaded.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    else:
        loaded, processor = model
        model_name = _model_name(loaded)
    return evaluate_loaded(loaded, processor, records, out_path=out_path, progress=progress, model_name=model_name,
                           data_name=str(Path(data_path).resolve()), **settings)


def evaluate_loaded(
    model,
    processor,
    records: Sequence[Record],
    *,
    out_path: str | Path | None = None,
    batch_size: int = 8,
    greedy: bool = True,
    samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    max_new_tokens: int = 256,
    ablate: str = "none",
    limit: int | None = None,
    lenient: bool = False,
    template: PromptTemplate = DEFAULT_TEMPLATE,
    media_options: MediaOptions = MediaOptions(),
    max_prompt_length: int | None = DEFAULT_MAX_PROMPT_LENGTH,
    protocol: str = "ours",
    base_model: bool = False,
    progress: bool = False,
    model_name: str | None = None,
    data_name: str | None = None,
    on_batch: Callable[[list[Row]], None] | None = None,
) -> dict[str, Any]:
    """Evaluate a loaded model on records; return the summary (write/resume `out_path` when given).

    The trainer's in-training evaluation calls this greedily on a subset without `out_path`. The
    model's training flag and the caller's RNG state are left as they were. `on_batch(rows)` is
    called after each batch is written (rows just generated). Summary: `metrics.headline_summary` plus
    `generated` (rows made now), `resumed` (rows found in `out_path`), `seconds` and `out_path`.

    `limit`: the first N records (None: all; 0: none; negative: an error) — :func:`first_records`.
    `max_prompt_length`: training's rule, applied before the forward: longer prompts are not generated,
    their rows say `skipped` and count as wrong (None: no limit).
    `protocol` "echoink" (see `eval.protocols`) replaces the template, media options and decoding with
    EchoInk-R1's (greedy for `base_model`, else one seeded sample at T = 1, top_p 0.95; `samples` and
    `seed` still apply) and grades with its answer rule; `lenient` does not apply then.
    """
    settings = protocol_settings(protocol, base_model=base_model, seed=seed, samples=samples, template=template,
                                 media_options=media_options)
    template, media_options = settings.template, settings.media_options
    decoding = settings.decoding or sampling_settings(greedy, samples, temperature, top_p, top_k, seed,
                                                      max_new_tokens)
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1 or None, got {max_prompt_length}")
    records = first_records(records, limit)
    if protocol != "ours":
        _check_multiple_choice(records, protocol)
    model_name = model_name or _model_name(model)
    previous: list[Row] = []
    if out_path is not None:
        _, dtype = embedding_device_dtype(model)
        signature = run_signature(
            model_name=model_name, model_dtype=str(dtype).replace("torch.", ""),
            data=data_name or (records[0].source if records else ""), decoding=decoding, ablate=ablate,
            lenient=lenient, template=template, media_options=media_options, max_prompt_length=max_prompt_length,
            protocol=protocol, base_model=base_model, batch_size=batch_size, limit=limit)
        previous = open_run(Path(out_path), signature)
    done = {(str(row["problem_id"]), int(row.get("sample_idx", 0))) for row in previous}
    wanted_keys = {(str(r.problem_id), s) for r in records for s in range(decoding.num_generations)}
    rows = [row for row in previous if (str(row["problem_id"]), int(row.get("sample_idx", 0))) in wanted_keys]
    started = time.perf_counter()
    generated = 0
    with _progress_bar(progress, total=len(wanted_keys), done=len(rows), rows=rows) as advance:
        with (open(out_path, "a", encoding="utf-8") if out_path is not None else nullcontext()) as handle:
            for batch_rows in generate_predictions(
                model, processor, records, decoding=decoding, batch_size=batch_size, ablate=ablate,
                lenient=lenient, template=template, media_options=media_options, model_name=model_name, skip=done,
                max_prompt_length=max_prompt_length, protocol=protocol,
            ):
                if handle is not None:
                    append_jsonl(out_path, batch_rows, handle)
                rows.extend(batch_rows)
                generated += len(batch_rows)
                advance(batch_rows)
                if on_batch is not None:
                    on_batch(batch_rows)
    summary = headline_summary(rows)
    summary.update({"skipped": sum(1 for row in rows if row.get("skipped")), "generated": generated, "resumed": len(rows) - generated,
                    "seconds": time.perf_counter() - started, "out_path": None if out_path is None else str(out_path)})
    return summary


_EVALUATE_SETTINGS = set(inspect.signature(evaluate_loaded).parameters) - {
    "model", "processor", "records", "out_path", "progress", "model_name", "data_name"}


#: The most answers per problem (`--samples`), and the most sequences one generate call may hold (`--batch-size`
#: x the samples of a call, at most SAMPLES_PER_CALL): these bound the memory of an evaluation.
MAX_EVAL_SAMPLES = 1024
MAX_SEQUENCES_PER_CALL = 4096


def sampling_settings(greedy: bool = True, samples: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                      top_k: int | None = None, seed: int = 0, max_new_tokens: int = 256) -> SamplingSettings:
    """Evaluation's decoding arguments (`samples` = K answers per problem) as the shared settings type."""
    if isinstance(samples, int) and samples > MAX_EVAL_SAMPLES:
        raise ValueError(f"--samples {samples} is more than {MAX_EVAL_SAMPLES} answers per problem; use at most "
                         f"{MAX_EVAL_SAMPLES}")
    return SamplingSettings(num_generations=samples, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, top_k=top_k, greedy=greedy, seed=seed)


_SAMPLING_ARGS = set(inspect.signature(sampling_settings).parameters)


def first_records(records: Sequence[Record], limit: int | None) -> list[Record]:
    """The first `limit` records: the one meaning of `eval --limit` and the config's `eval_limit`.

    None: all; 0: none; a negative number is an error (it never means "all but the last").
    """
    if limit is None:
        return list(records)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit must be a whole number >= 0 (or None for all records), got {limit!r}")
    return list(records)[:limit]


def _check_multiple_choice(records: Sequence[Record], protocol: str) -> None:
    for record in records:
        if not record.is_multiple_choice:
            raise ValueError(f"{record.source}:{record.index}:problem_type: {record.problem_type!r}; protocol "
                             f"{protocol!r} evaluates multiple-choice items only (EchoInk-R1's evaluation)")


def _model_name(model) -> str:
    name = getattr(getattr(generation_owner(model), "config", None), "name_or_path", "") or ""
    if name and Path(name).is_dir():
        return str(Path(name).resolve())
    return name or type(model).__name__


#: `echoink eval` with stderr sent to a file: one progress line per this many answers (and one at the end).
PROGRESS_LINE_EVERY = 50


def _progress_line(counts: dict, total: int, elapsed: float, accuracy: str, speed: str) -> str:
    """`eval 150/1000 answers | accuracy 62.0% | 1.23 items/s | ETA 0:11:30`"""
    line = f"eval {counts['n']}/{total} answers | accuracy {accuracy} | {speed} items/s"
    if counts["new"] and elapsed > 0:
        left = round((total - counts["n"]) * elapsed / counts["new"])
        line += f" | ETA {left // 3600}:{left % 3600 // 60:02d}:{left % 60:02d}"
    return line


@contextmanager
def _progress_bar(enabled: bool, *, total: int, done: int, rows: list[Row]):
    """Yield `advance(batch_rows)`; with `enabled`, a rich bar (on stderr) shows items/s and running accuracy,
    or, when stderr is not a terminal (a log file), a plain line every PROGRESS_LINE_EVERY items and at the end."""
    if not enabled:
        yield lambda batch_rows: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    counts = {"correct": sum(bool(row["correct"]) for row in rows), "n": len(rows), "new": 0}
    started = time.perf_counter()

    def fields() -> dict[str, str]:
        accuracy = f"{100 * counts['correct'] / counts['n']:.1f}%" if counts["n"] else "-"
        elapsed = time.perf_counter() - started
        speed = f"{counts['new'] / elapsed:.2f}" if counts["new"] and elapsed > 0 else "-"
        return {"accuracy": accuracy, "speed": speed}

    def count(batch_rows: list[Row]) -> None:
        counts["n"] += len(batch_rows)
        counts["new"] += len(batch_rows)
        counts["correct"] += sum(bool(row["correct"]) for row in batch_rows)

    console = Console(stderr=True)
    if not console.is_terminal:  # a bar would show nothing until the end in a log file
        last_line = {"n": counts["n"]}

        def line(batch_rows: list[Row]) -> None:
            count(batch_rows)
            if counts["n"] - last_line["n"] >= PROGRESS_LINE_EVERY or counts["n"] >= total:
                last_line["n"] = counts["n"]
                console.print(_progress_line(counts, total, time.perf_counter() - started, **fields()),
                              soft_wrap=True, highlight=False, markup=False)

        yield line
        return

    columns = (TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[speed]} items/s"),
               TextColumn("acc {task.fields[accuracy]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("eval", total=total, completed=done, **fields())

        def advance(batch_rows: list[Row]) -> None:
            count(batch_rows)
            bar.update(task, advance=len(batch_rows), **fields())

        yield advance


def training_evaluator(config) -> Callable[[Any, Any], dict[str, float]] | None:
    """The trainer's in-training evaluation, built by the caller (grpo never imports eval).

    Reads and validates `config.eval_data` now (before any model loads); the returned function runs greedy
    evaluation of the first `eval_limit` items (:func:`first_records`) with the training prompt, media settings
    and `max_prompt_length` and returns `eval/*` metrics. None when `config.eval_steps` is 0.
    """
    if not config.eval_steps:
        return None
    register_problem_types(config.problem_types)
    subset = first_records(load_dataset(config.eval_data), config.eval_limit)
    template = PromptTemplate.from_dict(config.prompt_template)
    media_options = MediaOptions.from_config(config)
    max_new_tokens = config.eval_max_new_tokens or config.max_completion_length

    def evaluate_now(model, processor) -> dict[str, float]:
        summary = evaluate_loaded(model, processor, subset, batch_size=config.eval_batch_size,
                                  max_new_tokens=max_new_tokens, template=template, media_options=media_options,
                                  max_prompt_length=config.max_prompt_length)
        metrics = {f"eval/{k}": v for k, v in summary.items() if isinstance(v, (int, float))}
        metrics.update({f"eval/{block['measure'].replace(' ', '_')}_by_type/{kind.replace(' ', '_')}": block["value"]
                        for kind, block in summary["by_problem_type"].items()})
        return metrics

    return evaluate_now
