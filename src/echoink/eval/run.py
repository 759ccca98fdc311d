"""Batched, resumable evaluation: records -> model.generate -> predictions.jsonl (one line per answer).

    evaluate(model_dir, data.json, PRED.jsonl)          the CLI's `echoink eval`
    evaluate_loaded(model, processor, records, ...)     the same on a loaded model (the trainer's eval)
    generate_predictions(...)                           the generator both use: one list of rows per batch

Prompts come from `model.inputs.encode_prompt` (the same prompt as training) and answers from
`rewards.answer_letter` (the same parser as the accuracy reward), so evaluation and training agree by
construction. Prompts are left-padded into batches (`model.batching`); greedy decoding gives the
same predictions as batch size 1.

Decoding. Greedy (default): one row per record, sample_idx 0. Sampling (`greedy=False`): `samples`
rows per record, sample_idx 0..K-1, at `temperature`, `top_p`, `top_k` (None = no top-k). The
`GenerationConfig` is built here from these arguments alone; the checkpoint's generation_config.json
(Qwen's published sampling defaults) is ignored. Media tokens are never generated; `<|im_end|>` ends
a reply.

Batches. `batch_size` counts prompts per generate call; with K samples each prompt is answered K
times in that call (B x K sequences). The records are cut into fixed chunks of `batch_size` (after
`limit`); a chunk is split further when it mixes `use_audio_in_video` prompts with others. When
sampling, the random generator is re-seeded from (seed, chunk, sub-batch) before each call and the
caller's RNG state is restored afterwards: the same seed and batch size give the same samples, with
or without interruptions.

Output (JSON Lines, one object per answer)::

    {"problem_id": 7, "sample_idx": 0, "gt": "C", "pred": "C", "correct": true, "reply": "<think>...",
     "data_type": "image_audio", "needs": "audio", "reply_tokens": 93, "truncated": false,
     "model": "/abs/model", "decoding": {"greedy": true, "samples": 1, "max_new_tokens": 256},
     "prompt_version": "echoink-r1-v1", "ablate": "none"}

`pred` is null when the reply cannot be parsed (it then counts as wrong); `reply_tokens` counts the
generated tokens including the closing `<|im_end|>`; `needs` appears when the record has it.

Resume. The run's settings are written atomically to a sidecar `PRED.jsonl.run.json` before the
first row (the predictions file holds rows only, so every JSONL reader can read it). Rows are
appended batch by batch (flush + fsync). On start, an existing non-empty PRED.jsonl is resumed only
if its sidecar's settings equal the current ones (else `RunSignatureError`: never mix two runs);
anything after the last newline (a line cut by a kill) is truncated away, and (problem_id,
sample_idx) pairs already present are skipped. A chunk that was cut midway is generated again and
only its missing rows are written. `batch_size` and `limit` may change between resumptions (they
are recorded, not compared): lowering the batch size after running out of memory, or extending a
`limit`ed run to the whole set, continues the same file.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from transformers import GenerationConfig

from echoink.config import TrainConfig
from echoink.io import append_jsonl, repair_cut_last_line, split_jsonl_lines, write_json_atomic
from echoink.data.records import Record, load_dataset
from echoink.eval.metrics import type_measure, wilson_interval
from echoink.eval.protocols import protocol_settings, regrade_row
from echoink.model.generation import (
    SamplingSettings,
    completion_mask,
    forget_rope_deltas,
    generation_owner,
    media_token_ids,
    own_generation_defaults,
)
from echoink.model.batching import collate_prompts, move_batch, split_by_audio_in_video
from echoink.model.inputs import ABLATIONS, MediaOptions, PromptInputs, encode_prompt
from echoink.problem_types import register_problem_types
from echoink.prompts import DEFAULT_TEMPLATE, PromptTemplate
from echoink.rewards import answer_letter, extract_answer, format_reward, score_answer
from echoink.run_lock import file_lock, hold_lock

__all__ = [
    "EOS_TOKEN",
    "answer_prompts",
    "RUN_FORMAT",
    "RunSignatureError",
    "evaluate",
    "evaluate_loaded",
    "generate_predictions",
    "run_file_path",
    "summarize_rows",
    "training_evaluator",
]

EOS_TOKEN = "<|im_end|>"
RUN_FORMAT = "echoink-predictions-v1"
#: Sidecar keys that are recorded but may differ when a run is resumed.
UNCOMPARED_KEYS = ("batch_size", "limit")
#: Training's default `max_prompt_length`, the evaluation default too.
DEFAULT_MAX_PROMPT_LENGTH = TrainConfig.max_prompt_length

Row = dict[str, Any]


class RunSignatureError(ValueError):
    """An existing predictions file was written with other settings (or without a run signature)."""


# ---- the generator ---------------------------------------------------------------------------------


def generate_predictions(
    model,
    processor,
    records: Sequence[Record],
    *,
    decoding: SamplingSettings = SamplingSettings(greedy=True),
    batch_size: int = 8,
    ablate: str = "none",
    lenient: bool = False,
    template: PromptTemplate = DEFAULT_TEMPLATE,
    media_options: MediaOptions = MediaOptions(),
    model_name: str = "",
    skip: set[tuple[str, int]] | frozenset = frozenset(),
    max_prompt_length: int | None = None,
    protocol: str = "ours",
) -> Iterator[list[Row]]:
    """Yield the prediction rows of each batch, in record order (rows whose key is in `skip` left out).

    A key is `(str(problem_id), sample_idx)`. Chunks whose rows are all in `skip` are not generated.
    The model is put in eval mode for the call and its training flag restored afterwards.
    A prompt longer than `max_prompt_length` tokens (media placeholders included: training's rule) is not
    generated: its rows are written with an empty reply, `pred` null (wrong) and `skipped` saying why.
    `protocol` "echoink" grades the replies with EchoInk-R1's answer rule (`protocols.regrade_row`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if ablate not in ABLATIONS:
        raise ValueError(f"ablate must be one of {ABLATIONS}, got {ablate!r}")
    _check_unique_ids(records)
    tokenizer = processor.tokenizer
    eos_id, pad_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN), tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token (needed for left padding)")
    config = decoding.generation_config(eos_id, pad_id, media_token_ids(tokenizer))
    common = {"model": model_name, "decoding": decoding.as_dict(), "prompt_version": template.version,
              "ablate": ablate}
    device, dtype = _model_device_dtype(model)

    with _eval_mode(model):
        for chunk_index, start in enumerate(range(0, len(records), batch_size)):
            chunk = list(records[start : start + batch_size])
            wanted = [(r, s) for r in chunk for s in range(decoding.num_generations) if (str(r.problem_id), s) not in skip]
            if not wanted:
                continue
            prompts = [encode_prompt(r, processor, media_options, template, ablate) for r in chunk]
            replies: dict[tuple[str, int], tuple[str, int, bool]] = {}
            too_long = {i for i, p in enumerate(prompts) if max_prompt_length and p.length > max_prompt_length}
            kept = [i for i in range(len(chunk)) if i not in too_long]
            for sub_index, sub_members in enumerate(split_by_audio_in_video([prompts[i] for i in kept])):
                members = [kept[i] for i in sub_members]
                for first, count, piece_config, seed in _sample_pieces(decoding, config, chunk_index, sub_index,
                                                                       eos_id, pad_id, media_token_ids(tokenizer)):
                    texts = _generate([prompts[i] for i in members], model, tokenizer, piece_config, eos_id, pad_id,
                                      device, dtype, seed)
                    for position, i in enumerate(members):
                        for s in range(count):
                            replies[(str(chunk[i].problem_id), first + s)] = texts[position * count + s]
            lengths = {str(r.problem_id): p.length for r, p in zip(chunk, prompts)}
            rows = []
            for r, s in wanted:
                if (str(r.problem_id), s) in replies:
                    row = _row(r, s, *replies[(str(r.problem_id), s)], lenient=lenient, common=common)
                    rows.append(row if protocol == "ours" else regrade_row(row, protocol))
                else:  # prompt too long: never generated, counted as wrong
                    row = _row(r, s, "", 0, False, lenient=lenient, common=common)
                    row["skipped"] = (f"prompt of {lengths[str(r.problem_id)]} tokens is longer than "
                                      f"max_prompt_length {max_prompt_length}")
                    rows.append(row if protocol == "ours" else {**row, "protocol": protocol})
            yield rows


#: Samples of one problem generated in one call at most; more are generated in pieces of this many (the first
#: piece seeded as a single call was, so K <= this gives the samples it always gave).
SAMPLES_PER_CALL = 256


def _sample_pieces(decoding: SamplingSettings, config: GenerationConfig, chunk_index: int, sub_index: int,
                   eos_id: int, pad_id: int, suppress: list[int]) -> Iterator[tuple]:
    """(first sample index, samples, GenerationConfig, seed or None) of each generate call for one sub-batch."""
    total = decoding.num_generations
    for piece, first in enumerate(range(0, total, SAMPLES_PER_CALL)):
        count = min(SAMPLES_PER_CALL, total - first)
        piece_config = config if count == total else replace(decoding, num_generations=count).generation_config(
            eos_id, pad_id, suppress)
        seed = None if decoding.greedy else (_batch_seed(decoding.seed, chunk_index, sub_index) if piece == 0
                                             else _batch_seed(decoding.seed, chunk_index, sub_index, piece))
        yield first, count, piece_config, seed


@torch.no_grad()
def _generate(prompts: list[PromptInputs], model, tokenizer, config: GenerationConfig, eos_id: int, pad_id: int,
              device, dtype, seed: int | None) -> list[tuple[str, int, bool]]:
    """One generate call -> (reply text, reply tokens, truncated) per row (row b*K + k = prompt b, sample k)."""
    batch = move_batch(collate_prompts(prompts, pad_id), device, dtype)
    prompt_length = batch["input_ids"].shape[1]
    rng = _seeded_rng(seed, device) if seed is not None else nullcontext()
    with rng, own_generation_defaults(model):
        sequences = model.generate(**batch, generation_config=config)
    forget_rope_deltas(model)
    completions = sequences[:, prompt_length:]                                   # [B*K, C]
    mask, truncated = completion_mask(completions, eos_id)                       # [B*K, C], [B*K]
    texts = tokenizer.batch_decode(completions.masked_fill(mask == 0, pad_id), skip_special_tokens=True)
    texts = [prompts[row * len(prompts) // len(texts)].generation_prefix + text for row, text in enumerate(texts)]
    lengths = mask.sum(dim=1).tolist()
    return [(text, int(n), bool(t)) for text, n, t in zip(texts, lengths, truncated.tolist())]


def answer_prompts(model, processor, prompts: Sequence[PromptInputs], decoding: SamplingSettings, *,
                   seed: int = 0) -> list[list[str]]:
    """Replies to prompts already encoded (by `encode_prompt` or `encode_messages`): for each prompt, its
    `decoding.num_generations` replies, in order. One generate call for all of them, split like
    `generate_predictions` splits a chunk (prompts that read a video's own sound track apart from the others);
    the same decoding, end of reply and reply text as `echoink eval`. Sampling is seeded per call from
    (`seed`, sub-batch); the caller's RNG state is left as it was. Used by the lmms-eval adapter."""
    tokenizer = processor.tokenizer
    eos_id, pad_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN), tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token (needed for left padding)")
    config = decoding.generation_config(eos_id, pad_id, media_token_ids(tokenizer))
    device, dtype = _model_device_dtype(model)
    replies: list[list[str]] = [[] for _ in prompts]
    with _eval_mode(model):
        for sub_index, members in enumerate(split_by_audio_in_video(list(prompts))):
            call_seed = None if decoding.greedy else _batch_seed(seed, 0, sub_index)
            texts = _generate([prompts[i] for i in members], model, tokenizer, config, eos_id, pad_id, device, dtype,
                              call_seed)
            for position, i in enumerate(members):
                replies[i] = [text for text, _, _ in texts[position * decoding.num_generations:
                                                            (position + 1) * decoding.num_generations]]
    return replies


def _row(record: Record, sample_idx: int, reply: str, reply_tokens: int, truncated: bool, *, lenient: bool,
         common: dict[str, Any]) -> Row:
    """One prediction line. Multiple choice: the option letter (`answer_letter`); other problems: the
    stripped answer block scored by the record's problem type (`rewards.score_answer`, the accuracy
    reward's rule): `score` in [0, 1], `correct` iff the score is 1, `pred` None when it does not parse."""
    if record.is_multiple_choice:
        pred = answer_letter(reply, lenient=lenient)
        score = float(pred is not None and pred == record.answer)
    else:
        try:
            scored = score_answer(reply, record.solution, record.problem_type, record.extra)
        except ValueError as exc:  # a user type's score() failed or returned no score in [0, 1]
            raise ValueError(f"{record.source}:{record.index} (problem_id {record.problem_id!r}): {exc}") from exc
        pred, score = (extract_answer(reply) if scored.parsed else None), scored.value
    row: Row = {"problem_id": record.problem_id, "sample_idx": sample_idx, "gt": record.answer, "pred": pred,
                "correct": score == 1.0, "score": score, "problem_type": record.problem_type, "reply": reply,
                "data_type": record.data_type}
    if record.needs is not None:
        row["needs"] = record.needs
    row.update({"reply_tokens": reply_tokens, "truncated": truncated})
    row.update(common)
    return row


# ---- whole runs ----------------------------------------------------------------------------------


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
    Returns :func:`summarize_rows` of every row in the file (resumed rows included) plus
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
    _check_unique_ids(chosen)
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
    called after each batch is written (rows just generated). Summary: :func:`summarize_rows` plus
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
        _, dtype = _model_device_dtype(model)
        signature = {
            "format": RUN_FORMAT, "model": model_name, "model_dtype": str(dtype).replace("torch.", ""),
            "data": data_name or (records[0].source if records else ""), "decoding": decoding.as_dict(),
            "ablate": ablate, "lenient": lenient, "prompt_version": template.version,
            "prompt_sha256": _template_digest(template), "media_options": asdict(media_options),
            "weights": weights_fingerprint(model_name), "max_prompt_length": max_prompt_length,
            "protocol": protocol, "base_model": base_model, "batch_size": batch_size, "limit": limit,
        }
        previous = _open_run(Path(out_path), signature)
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
    summary = summarize_rows(rows)
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


def summarize_rows(rows: Sequence[Row]) -> dict[str, Any]:
    """Headline numbers of prediction rows (for logs and the trainer; `echoink metrics` gives the full table).

    n (rows), n_problems, samples_per_problem, accuracy with its 95% Wilson interval (ci_low, ci_high;
    rows treated as independent), unparsed_rate (pred null), format_rate (format reward of the reply),
    truncated_rate (no `<|im_end|>` within max_new_tokens), mean_reply_tokens and
    accuracy_by_data_type {data_type: accuracy}, by_problem_type {type: its measure}. Rates are None when
    there are no rows.
    """
    n = len(rows)
    problems: dict[str, int] = {}
    for row in rows:
        problems[str(row["problem_id"])] = problems.get(str(row["problem_id"]), 0) + 1
    correct = sum(bool(row["correct"]) for row in rows)
    low, high = wilson_interval(correct, n)

    def rate(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    by_type: dict[str, list[float]] = {}
    for row in rows:
        by_type.setdefault(str(row.get("data_type")), []).append(float(bool(row["correct"])))
    return {
        "n": n,
        "n_problems": len(problems),
        "samples_per_problem": max(problems.values(), default=0),
        "accuracy": rate([float(bool(row["correct"])) for row in rows]),
        "ci_low": low,
        "ci_high": high,
        "unparsed_rate": rate([float(row.get("pred") is None) for row in rows]),
        "format_rate": rate(format_reward([row.get("reply", "") for row in rows])),
        "truncated_rate": rate([float(bool(row.get("truncated", False))) for row in rows]),
        "mean_reply_tokens": rate([float(row["reply_tokens"]) for row in rows if "reply_tokens" in row]),
        "accuracy_by_data_type": {key: sum(v) / len(v) for key, v in sorted(by_type.items())},
        "by_problem_type": _by_problem_type(rows),
    }


def _by_problem_type(rows: Sequence[Row]) -> dict[str, dict[str, Any]]:
    """Each problem type's own measure (`eval.metrics.type_measure`); rows without the field are multiple choice."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(str(row.get("problem_type") or "multiple choice"), []).append(row)
    return {kind: type_measure(kind, kind_rows) for kind, kind_rows in sorted(groups.items())}


# ---- the output file and its run signature ---------------------------------------------------------


def run_file_path(out_path: str | Path) -> Path:
    """The sidecar holding a predictions file's run settings: `PRED.jsonl.run.json`."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".run.json")


def _open_run(out_path: Path, signature: dict[str, Any]) -> list[Row]:
    """Check or create the run signature; repair a cut last line; return the rows already written."""
    sidecar = run_file_path(out_path)
    if out_path.is_dir():
        raise ValueError(f"{out_path}: is a directory (expected a .jsonl file path)")
    has_rows = out_path.is_file() and out_path.stat().st_size > 0
    if not has_rows:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(sidecar, signature)
        out_path.write_bytes(b"")
        return []
    if not sidecar.is_file():
        raise RunSignatureError(f"{out_path}: exists but has no run signature ({sidecar.name}); it was not written "
                                "by `echoink eval` — delete it or choose another output path")
    try:
        stored = json.loads(sidecar.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RunSignatureError(f"{sidecar}: unreadable run signature ({exc.msg}); delete both files to start over") \
            from None
    differences = [
        f"{key}: {_short(stored.get(key))} in the file, {_short(signature.get(key))} now"
        for key in sorted(set(stored) | set(signature))
        if key not in UNCOMPARED_KEYS and stored.get(key) != signature.get(key)
    ]
    if differences:
        raise RunSignatureError(f"{out_path}: was written with other settings ({'; '.join(differences)}); "
                                "refusing to mix runs — use another output path or delete it and its .run.json")
    return _read_complete_rows(out_path)


def _read_complete_rows(path: Path) -> list[Row]:
    """Rows of every complete line; bytes after the last newline (a write cut by a kill) are truncated away."""
    data = repair_cut_last_line(path)
    end = len(data)
    rows: list[Row] = []
    seen: set[tuple[str, int]] = set()
    for number, line in enumerate(split_jsonl_lines(data[:end].decode("utf-8")), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: invalid JSON ({exc.msg}); the file is damaged before its last line")\
                from None
        if not isinstance(row, dict) or "problem_id" not in row or "correct" not in row:
            raise ValueError(f"{path}:{number}: not a prediction row")
        key = (str(row["problem_id"]), int(row.get("sample_idx", 0)))
        if key in seen:
            raise ValueError(f"{path}:{number}: duplicate row for problem_id {row['problem_id']!r} "
                             f"sample_idx {key[1]}")
        seen.add(key)
        rows.append(row)
    return rows


# ---- helpers -------------------------------------------------------------------------------------

_FINGERPRINT_BLOCKS, _FINGERPRINT_BLOCK_BYTES = 16, 65536


def first_records(records: Sequence[Record], limit: int | None) -> list[Record]:
    """The first `limit` records: the one meaning of `eval --limit` and the config's `eval_limit`.

    None: all; 0: none; a negative number is an error (it never means "all but the last").
    """
    if limit is None:
        return list(records)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit must be a whole number >= 0 (or None for all records), got {limit!r}")
    return list(records)[:limit]


def weights_fingerprint(model_dir: str | Path) -> str | None:
    """A content fingerprint of a model directory's weights, for the run signature (None: not a directory).

    sha256 over each weight file's name and size, its safetensors header, and 16 evenly spaced 64-KiB blocks of
    its data: replacing the model in place (even with the same shapes and file sizes) changes it, while
    copying or touching the files does not. Reads about 1 MiB per file.
    """
    path = Path(model_dir)
    if not path.is_dir():
        return None
    digest = hashlib.sha256()
    for index in sorted(path.glob("*.safetensors.index.json")):
        digest.update(index.name.encode() + b"\n" + index.read_bytes())
    for file in sorted(path.glob("*.safetensors")):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}\n".encode())
        with file.open("rb") as handle:
            header_length = int.from_bytes(handle.read(8), "little") if size >= 8 else 0
            start = min(size, 8 + header_length)
            handle.seek(0)
            digest.update(handle.read(start))
            step = max(1, (size - start) // _FINGERPRINT_BLOCKS)
            for offset in range(start, size, step):
                handle.seek(offset)
                digest.update(handle.read(_FINGERPRINT_BLOCK_BYTES))
    return digest.hexdigest()[:32]


def _check_multiple_choice(records: Sequence[Record], protocol: str) -> None:
    for record in records:
        if not record.is_multiple_choice:
            raise ValueError(f"{record.source}:{record.index}:problem_type: {record.problem_type!r}; protocol "
                             f"{protocol!r} evaluates multiple-choice items only (EchoInk-R1's evaluation)")


def _check_unique_ids(records: Sequence[Record]) -> None:
    seen: set[str] = set()
    for record in records:
        key = str(record.problem_id)
        if key in seen:
            raise ValueError(f"{record.source}:{record.index}:problem_id: {record.problem_id!r} appears twice "
                             "(predictions are keyed by problem_id)")
        seen.add(key)


def _batch_seed(seed: int, chunk_index: int, sub_index: int, *piece: int) -> int:
    """A 63-bit seed for one generate call, derived from the run seed and the call's place in the run (and the
    piece of a problem's samples, past the first `SAMPLES_PER_CALL`)."""
    entropy = [seed, chunk_index, sub_index, *piece]
    return int(np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint64)[0] >> 1)


@contextmanager
def _seeded_rng(seed: int, device):
    """Seed torch's generators for one call; restore the caller's RNG state afterwards."""
    cuda = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


@contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    """Where the token embeddings live and their dtype (media tensors follow them; LoRA adapters may differ)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    parameter = embeddings.weight if embeddings is not None else next(model.parameters())
    return parameter.device, parameter.dtype


def _model_name(model) -> str:
    name = getattr(getattr(generation_owner(model), "config", None), "_name_or_path", "") or ""
    if name and Path(name).is_dir():
        return str(Path(name).resolve())
    return name or type(model).__name__


def _template_digest(template: PromptTemplate) -> str:
    return hashlib.sha256(json.dumps(template.text_fields(), sort_keys=True).encode("utf-8")).hexdigest()[:16]


#: `echoink eval` with stderr sent to a file: one progress line per this many answers (and one at the end).
PROGRESS_LINE_EVERY = 50


def _progress_line(counts: dict, total: int, elapsed: float, accuracy: str, speed: str) -> str:
    """`eval 150/1000 answers | accuracy 62.0% | 1.23 items/s | ETA 0:11:30`"""
    line = f"eval {counts['n']}/{total} answers | accuracy {accuracy} | {speed} items/s"
    if counts["new"] and elapsed > 0:
        left = round((total - counts["n"]) * elapsed / counts["new"])
        line += f" | ETA {left // 3600}:{left % 3600 // 60:02d}:{left % 60:02d}"
    return line


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 120 else text[:117] + "..."


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
