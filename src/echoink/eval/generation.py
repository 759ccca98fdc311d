"""The evaluation loop: records -> prompts -> the rollout engine -> graded rows, batch by batch.

    generate_predictions(model, processor, records, decoding=..., batch_size=...) -> yields a list of rows per batch
    answer_prompts(model, processor, prompts, decoding, seed=..., stream_keys=...) -> replies per encoded prompt
                                                                       (lmms-eval)

Prompts come from `model.inputs.encode_prompt` (the same prompt as training); completions from the rollout
engine training uses (`model.engine.evaluation_engine`: the shared-prefill engine, every prompt of a batch in
one decode loop; transformers' generate for a model whose family has no exact shared path); rows from
`eval.grading`.

Decoding. Greedy (default): one row per record, sample_idx 0. Sampling (`greedy=False`): `samples`
rows per record, sample_idx 0..K-1, at `temperature`, `top_p`, `top_k` (None = no top-k). The
`GenerationConfig` is built from these arguments alone; the checkpoint's generation_config.json
(Qwen's published sampling defaults) is ignored. Media tokens are never generated; the family's
end-of-turn token ends a reply.

Batches. `batch_size` counts prompts per engine call (one decode loop); with K samples each prompt is
answered K times in that loop (B x K rows). The records are cut into fixed chunks of `batch_size` (after
`limit`). Each prompt draws from its own generator, seeded by (seed, the record's position in the
evaluated list): the same seed gives the same answers for every batch size, with or without
interruptions, and the caller's global RNG state is never touched. Greedy decoding draws nothing.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator, Sequence

from echoink.data.records import Record
from echoink.eval.grading import Row, prediction_row, skipped_row
from echoink.model.batching import embedding_device_dtype, move_prompt
from echoink.model.engine import evaluation_engine, prompt_generators, prompt_seed
from echoink.model.generation import SamplingSettings
from echoink.model.inputs import ABLATIONS, MediaOptions, PromptInputs, encode_prompt
from echoink.prompts import DEFAULT_TEMPLATE, PromptTemplate


#: Samples of one problem drawn in one engine call at most; more are drawn in pieces of this many (piece p > 0 of
#: a problem seeded by (seed, record position, p); the first piece as a single call would be).
SAMPLES_PER_CALL = 256


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
    engine = evaluation_engine(model, processor.tokenizer)
    common = {"model": model_name, "decoding": decoding.as_dict(), "prompt_version": template.version,
              "ablate": ablate}
    device, dtype = embedding_device_dtype(model)

    for start in range(0, len(records), batch_size):
        chunk = list(records[start : start + batch_size])
        wanted = [(r, s) for r in chunk for s in range(decoding.num_generations) if (str(r.problem_id), s) not in skip]
        if not wanted:
            continue
        prompts = [encode_prompt(r, processor, media_options, template, ablate) for r in chunk]
        replies: dict[tuple[str, int], tuple[str, int, bool]] = {}
        kept = [i for i, p in enumerate(prompts) if not (max_prompt_length and p.length > max_prompt_length)]
        for piece, first in enumerate(range(0, decoding.num_generations, SAMPLES_PER_CALL)):
            count = min(SAMPLES_PER_CALL, decoding.num_generations - first)
            generators = None if decoding.greedy else prompt_generators(
                [prompt_seed(decoding.seed, start + i, *((piece,) if piece else ())) for i in kept], device)
            groups = engine.generate([move_prompt(prompts[i], device, dtype) for i in kept],
                                     replace(decoding, num_generations=count), generators)
            for i, group in zip(kept, groups):
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
                   seed: int = 0, stream_keys: Sequence[Sequence[int]] | None = None) -> list[list[str]]:
    """Replies to prompts already encoded (by `encode_prompt` or `encode_messages`): for each prompt, its
    `decoding.num_generations` replies, in order. One engine call for all of them (one decode loop); the same
    decoding, end of reply and reply text as `echoink eval`. Prompt i draws from its own stream, seeded by
    (`seed`, *stream_keys[i]) — by default (`seed`, i); give keys that name the item (the lmms-eval adapter: its
    task and document) so that an item's samples do not depend on its batch. The caller's RNG state is left as
    it was. Used by the lmms-eval adapter."""
    engine = evaluation_engine(model, processor.tokenizer)
    device, dtype = embedding_device_dtype(model)
    keys = [(i,) for i in range(len(prompts))] if stream_keys is None else list(stream_keys)
    if len(keys) != len(prompts):
        raise ValueError(f"answer_prompts: {len(keys)} stream keys for {len(prompts)} prompts")
    generators = None if decoding.greedy else prompt_generators([prompt_seed(seed, *key) for key in keys], device)
    groups = engine.generate([move_prompt(prompt, device, dtype) for prompt in prompts], decoding, generators)
    return [list(group.texts) for group in groups]


def check_unique_ids(records: Sequence[Record]) -> None:
    seen: set[str] = set()
    for record in records:
        key = str(record.problem_id)
        if key in seen:
            raise ValueError(f"{record.source}:{record.index}:problem_id: {record.problem_id!r} appears twice "
                             "(predictions are keyed by problem_id)")
        seen.add(key)
