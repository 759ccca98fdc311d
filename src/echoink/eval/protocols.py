"""Evaluation protocols: ours (the default) and EchoInk-R1's, so our numbers can be set beside its published ones.

``ours``      the training prompt (EchoInk-R1's training template, " Options:" label included), the decoding the
              caller asks for (greedy by default), the training media caps, and the accuracy reward's answer rule
              (`rewards.answer_letter`: the first answer block must hold exactly one capital letter).
``echoink``   what EchoInk-R1's evaluation script did to obtain its published accuracies on AVQA-R1-6K's validation
              split (85.77 for EchoInk-R1-7B, 80.53 for the Qwen2.5-Omni-7B base model):

              * prompt: the question and its options joined by newlines **without** the " Options:" label; the RL
                model gets the "think like a human" paragraph, the base model (``base_model=True``) the line
                "Please answer the following question based on the given image and audio." and an explicit
                system turn "You are a helpful assistant."; both end with the multiple-choice answer suffix;
              * decoding: the RL model one sample at temperature 1, top_p 0.95 (EchoInk-R1 did not seed it; we
                seed it, so a rerun gives the same answers); the base model greedy; at most 1,024 new tokens
                (transformers' `thinker_max_new_tokens` default there). Settings the script left unset (top_k,
                repetition penalty for the RL model) came from the checkpoint's generation_config.json there;
                here they are off, as in every echoink decoding;
              * media: qwen-omni-utils' image caps (4 x 28 x 28 = 3,136 to 16,384 x 28 x 28 = 12,845,056 pixels)
                and the whole audio clip (Qwen2.5-Omni's feature extractor reads up to 30 s), not the 10-s cap and
                200,704-pixel cap of training;
              * answer rule (:func:`echoink_answer_letter`): case-insensitive ``<answer> X </answer>`` with X in
                A-D, else the first standalone A-D letter anywhere in the reply, case-insensitive. The fallback
                reads the English article "a" as option A ("a dog barks" -> A): a quirk reproduced on purpose
                and shown by `echoink metrics --against echoink`.

The answer rule is applied to rows after generation (:func:`regrade_row`), so the same predictions file can be
graded under both rules without generating again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from echoink.choices import EVAL_PROTOCOLS
from echoink.model.generation import SamplingSettings
from echoink.model.inputs import MediaOptions
from echoink.prompts import DEFAULT_TEMPLATE, PromptTemplate
from echoink.rewards import (
    ECHOINK_R1_STANDALONE_LETTER,
    ECHOINK_R1_TAGGED_LETTER,
    answer_letter,
    echoink_r1_answer_letter,
)

__all__ = [
    "ECHOINK_BASE_INSTRUCTION",
    "ECHOINK_MAX_NEW_TOKENS",
    "ECHOINK_MEDIA",
    "EVAL_PROTOCOLS",
    "ProtocolSettings",
    "echoink_answer_letter",
    "echoink_fallback_counts",
    "protocol_settings",
    "regrade_row",
    "regrade_rows",
]

#: EchoInk-R1's instruction for the base model (its evaluation script, BASE_MODEL = True).
ECHOINK_BASE_INSTRUCTION = "Please answer the following question based on the given image and audio."
ECHOINK_BASE_SYSTEM = "You are a helpful assistant."
ECHOINK_MAX_NEW_TOKENS = 1024
ECHOINK_TOP_P = 0.95
#: qwen-omni-utils' defaults (its vision_process): 4 to 16,384 visual patches of 28 x 28; the whole audio clip,
#: which the Whisper feature extractor of Qwen2.5-Omni's processor reads up to 30 s.
ECHOINK_MEDIA = MediaOptions(max_audio_seconds=30.0, min_pixels=4 * 28 * 28, max_pixels=16384 * 28 * 28)

#: The RL model's template: no " Options:" label, otherwise the training prompt.
_ECHOINK_RL_TEMPLATE = replace(DEFAULT_TEMPLATE, question_template="{problem}\n{options}",
                               version="echoink-r1-eval-rl")
_ECHOINK_BASE_TEMPLATE = replace(DEFAULT_TEMPLATE, question_template="{problem}\n{options}",
                                 instruction=ECHOINK_BASE_INSTRUCTION, system_prompt=ECHOINK_BASE_SYSTEM,
                                 version="echoink-r1-eval-base")

_TAGGED_LETTER, _STANDALONE_LETTER = ECHOINK_R1_TAGGED_LETTER, ECHOINK_R1_STANDALONE_LETTER
#: EchoInk-R1's answer rule (defined with the other answer parsers in `rewards`, so tasks can grade without this layer).
echoink_answer_letter = echoink_r1_answer_letter


@dataclass(frozen=True)
class ProtocolSettings:
    """What a protocol fixes: the prompt, the media caps and the decoding (None: the caller's)."""

    name: str
    template: PromptTemplate
    media_options: MediaOptions
    decoding: SamplingSettings | None


def protocol_settings(name: str, *, base_model: bool = False, seed: int = 0, samples: int = 1,
                      template: PromptTemplate = DEFAULT_TEMPLATE,
                      media_options: MediaOptions = MediaOptions()) -> ProtocolSettings:
    """The settings of protocol `name`. ``ours`` keeps the given template and media options and leaves decoding to
    the caller; ``echoink`` replaces all three (``samples`` > 1 draws K samples at its temperature and top_p, an
    extension of its one-sample protocol; ignored for the greedy base model)."""
    if name not in EVAL_PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(EVAL_PROTOCOLS)}, got {name!r}")
    if name == "ours":
        if base_model:
            raise ValueError("base_model only applies to protocol 'echoink' (ours gives every model the same prompt)")
        return ProtocolSettings(name, template, media_options, None)
    if base_model:
        decoding = SamplingSettings(greedy=True, max_new_tokens=ECHOINK_MAX_NEW_TOKENS)
        return ProtocolSettings(name, _ECHOINK_BASE_TEMPLATE, ECHOINK_MEDIA, decoding)
    decoding = SamplingSettings(num_generations=samples, max_new_tokens=ECHOINK_MAX_NEW_TOKENS, temperature=1.0,
                                top_p=ECHOINK_TOP_P, greedy=False, seed=seed)
    return ProtocolSettings(name, _ECHOINK_RL_TEMPLATE, ECHOINK_MEDIA, decoding)


def regrade_row(row: dict[str, Any], protocol: str, *, where: str = "") -> dict[str, Any]:
    """A copy of a multiple-choice prediction row with ``pred`` / ``correct`` from `protocol`'s answer rule.

    ``ours``: the accuracy reward's strict rule (`answer_letter`); ``echoink``: :func:`echoink_answer_letter`.
    The row's ``gt`` must be an option letter (both protocols grade multiple choice); `where` names the row in
    the error message.
    """
    if protocol not in EVAL_PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(EVAL_PROTOCOLS)}, got {protocol!r}")
    gt = row.get("gt")
    if not isinstance(gt, str) or len(gt) != 1 or not gt.isupper():
        raise ValueError(f"{where or 'prediction row'}: gt {gt!r} is not an option letter; protocol {protocol!r} "
                         "grades multiple-choice answers only")
    reply = row.get("reply")
    if not isinstance(reply, str):
        raise ValueError(f"{where or 'prediction row'}: no 'reply' text to grade")
    pred = echoink_answer_letter(reply) if protocol == "echoink" else answer_letter(reply)
    return {**row, "pred": pred, "correct": pred is not None and pred == gt, "protocol": protocol}


def regrade_rows(rows: list[dict[str, Any]], protocol: str, source: str = "") -> list[dict[str, Any]]:
    """:func:`regrade_row` over a file's rows (`source` names the file in errors)."""
    return [regrade_row(row, protocol, where=f"{source}: row {index + 1}" if source else f"row {index + 1}")
            for index, row in enumerate(rows)]


def echoink_fallback_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """How EchoInk-R1's rule reads these rows' replies: ``tagged`` (an ``<answer>`` A-D tag), ``fallback`` (a bare
    A-D letter elsewhere), of which ``article_a`` are a lower-case "a" (the article read as option A), and
    ``none`` (nothing readable). Shows how much of an accuracy under that rule comes from its fallback."""
    counts = {"tagged": 0, "fallback": 0, "article_a": 0, "none": 0}
    for row in rows:
        reply = row.get("reply") if isinstance(row.get("reply"), str) else ""
        if _TAGGED_LETTER.search(reply):
            counts["tagged"] += 1
            continue
        match = _STANDALONE_LETTER.search(reply)
        if match is None:
            counts["none"] += 1
            continue
        counts["fallback"] += 1
        counts["article_a"] += match.group(1) == "a"
    return counts
