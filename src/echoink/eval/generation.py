"""The evaluation loop: records -> prompts -> the rollout engine -> graded rows, batch by batch.

    generate_predictions(model, processor, records, decoding=..., batch_size=...) -> yields a list of rows per batch
    answer_prompts(model, processor, prompts, decoding, seed=...) -> replies per encoded prompt (lmms-eval)

Prompts come from `model.inputs.encode_prompt` (the same prompt as training); completions from the
transformers-generate engine (`model.engine`, left-padded batches: greedy decoding gives the same
predictions as batch size 1); rows from `eval.grading`.

Decoding. Greedy (default): one row per record, sample_idx 0. Sampling (`greedy=False`): `samples`
rows per record, sample_idx 0..K-1, at `temperature`, `top_p`, `top_k` (None = no top-k). The
`GenerationConfig` is built from these arguments alone; the checkpoint's generation_config.json
(Qwen's published sampling defaults) is ignored. Media tokens are never generated; the family's
end-of-turn token ends a reply.

Batches. `batch_size` counts prompts per generate call; with K samples each prompt is answered K
times in that call (B x K sequences). The records are cut into fixed chunks of `batch_size` (after
`limit`); a chunk is split further when it mixes `use_audio_in_video` prompts with others. When
sampling, the random generator is re-seeded from (seed, chunk, sub-batch) before each call and the
caller's RNG state is restored afterwards: the same seed and batch size give the same samples, with
or without interruptions.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import Iterator, Sequence

import numpy as np
import torch

from echoink.data.records import Record
from echoink.eval.grading import Row, prediction_row, skipped_row
from echoink.model.batching import embedding_device_dtype, move_prompt, split_by_audio_in_video
from echoink.model.engine import TransformersGenerateEngine
from echoink.model.generation import SamplingSettings
from echoink.model.inputs import ABLATIONS, MediaOptions, PromptInputs, encode_prompt
from echoink.prompts import DEFAULT_TEMPLATE, PromptTemplate


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
    The engine runs the model in eval mode and restores its training flag afterwards.
    A prompt longer than `max_prompt_length` tokens (media placeholders included: training's rule) is not
    generated: its rows are written with an empty reply, `pred` null (wrong) and `skipped` saying why.
    `protocol` "echoink" grades the replies with EchoInk-R1's answer rule (`protocols.regrade_row`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if ablate not in ABLATIONS:
        raise ValueError(f"ablate must be one of {ABLATIONS}, got {ablate!r}")
    check_unique_ids(records)
    engine = TransformersGenerateEngine(model, processor.tokenizer, max_batch_prompts=batch_size)
    common = {"model": model_name, "decoding": decoding.as_dict(), "prompt_version": template.version,
              "ablate": ablate}
    device, dtype = embedding_device_dtype(model)

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
            batch = [move_prompt(prompts[i], device, dtype) for i in members]
            for first, piece, seed in _sample_pieces(decoding, chunk_index, sub_index):
                with _seeded_rng(seed, device) if seed is not None else nullcontext():
                    groups = engine.generate(batch, piece)
                for i, group in zip(members, groups):
                    for s, (text, length, truncated) in enumerate(zip(group.texts, group.completion_lengths.tolist(),
                                                                      group.truncated.tolist())):
                        replies[(str(chunk[i].problem_id), first + s)] = (text, int(length), bool(truncated))
        lengths = {str(r.problem_id): p.length for r, p in zip(chunk, prompts)}
        rows = []
        for r, s in wanted:
            if (str(r.problem_id), s) in replies:
                rows.append(prediction_row(r, s, *replies[(str(r.problem_id), s)], lenient=lenient, common=common,
                                           protocol=protocol))
            else:  # prompt too long: never generated, counted as wrong
                reason = (f"prompt of {lengths[str(r.problem_id)]} tokens is longer than "
                          f"max_prompt_length {max_prompt_length}")
                rows.append(skipped_row(r, s, reason, lenient=lenient, common=common, protocol=protocol))
        yield rows


def answer_prompts(model, processor, prompts: Sequence[PromptInputs], decoding: SamplingSettings, *,
                   seed: int = 0) -> list[list[str]]:
    """Replies to prompts already encoded (by `encode_prompt` or `encode_messages`): for each prompt, its
    `decoding.num_generations` replies, in order. One engine call for all of them, split like
    `generate_predictions` splits a chunk (prompts that read a video's own sound track apart from the others);
    the same decoding, end of reply and reply text as `echoink eval`. Sampling is seeded per call from
    (`seed`, sub-batch); the caller's RNG state is left as it was. Used by the lmms-eval adapter."""
    engine = TransformersGenerateEngine(model, processor.tokenizer, max_batch_prompts=max(1, len(prompts)))
    device, dtype = embedding_device_dtype(model)
    replies: list[list[str]] = [[] for _ in prompts]
    for sub_index, members in enumerate(split_by_audio_in_video(list(prompts))):
        call_seed = None if decoding.greedy else _batch_seed(seed, 0, sub_index)
        with _seeded_rng(call_seed, device) if call_seed is not None else nullcontext():
            groups = engine.generate([move_prompt(prompts[i], device, dtype) for i in members], decoding)
        for i, group in zip(members, groups):
            replies[i] = list(group.texts)
    return replies


def check_unique_ids(records: Sequence[Record]) -> None:
    seen: set[str] = set()
    for record in records:
        key = str(record.problem_id)
        if key in seen:
            raise ValueError(f"{record.source}:{record.index}:problem_id: {record.problem_id!r} appears twice "
                             "(predictions are keyed by problem_id)")
        seen.add(key)


#: Samples of one problem generated in one call at most; more are generated in pieces of this many (the first
#: piece seeded as a single call was, so K <= this gives the samples it always gave).
SAMPLES_PER_CALL = 256


def _sample_pieces(decoding: SamplingSettings, chunk_index: int, sub_index: int) -> Iterator[tuple]:
    """(first sample index, the piece's settings, seed or None) of each engine call for one sub-batch."""
    total = decoding.num_generations
    for piece, first in enumerate(range(0, total, SAMPLES_PER_CALL)):
        count = min(SAMPLES_PER_CALL, total - first)
        settings = decoding if count == total else replace(decoding, num_generations=count)
        seed = None if decoding.greedy else (_batch_seed(decoding.seed, chunk_index, sub_index) if piece == 0
                                             else _batch_seed(decoding.seed, chunk_index, sub_index, piece))
        yield first, settings, seed


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
