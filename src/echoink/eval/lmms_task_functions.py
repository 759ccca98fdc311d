"""The functions an echoink-format lmms-eval task names in its YAML (``!function echoink_task_functions.…``).

`echoink lmms-eval-task` copies this file, unchanged, next to the task YAML it writes (lmms-eval imports such
files by path from the task's directory). It reads the task's documents (one JSON line per record, written by
`echoink.eval.lmms_task`) and grades replies with echoink's own rules, importing only `echoink.rewards` and
`echoink.problem_types` (the answer parsers: no torch, no model code), so any lmms-eval model can be scored on
the task.

Each document holds: ``prompt`` (echoink's training prompt text for the record), ``media`` (absolute media
paths, video / image / audio in the order echoink's prompt shows them), ``answer`` (the option letter, or the
solution's answer for other problem types), ``solution``, ``problem_type``, ``data_type``, ``extra`` (the
record's extra fields as JSON text), ``echoink_data`` and ``echoink_index`` (where the record comes from: the
echoink model rebuilds the exact record from them).

Metrics, per document (lmms-eval averages each over the documents that report it):

* ``strict_accuracy`` — echoink's rule, the accuracy reward's: multiple choice is right when the first
  ``<answer>…</answer>`` block holds exactly the right capital letter; other problem types when their score is 1.
  It equals ``echoink eval``'s ``correct`` for the same reply;
* ``echoink_r1_accuracy`` — EchoInk-R1's evaluation rule (an ``<answer>`` tag with A-D in any case, else the first
  standalone A-D letter anywhere): multiple-choice documents only;
* ``strict_accuracy_<data_type>`` and ``echoink_r1_accuracy_<data_type>`` — the same on the documents of one
  ``data_type`` (the per-data-type breakdown).
"""

from __future__ import annotations

import json
from typing import Any

from echoink.problem_types import MULTIPLE_CHOICE
from echoink.rewards import answer_letter, echoink_r1_answer_letter, score_answer

STRICT, ECHOINK_R1 = "strict_accuracy", "echoink_r1_accuracy"


def doc_to_visual(doc: dict[str, Any]) -> list[str]:
    """The record's media files (absolute paths; a ``video_audio`` record's video carries its own sound)."""
    return list(doc.get("media") or [])


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    """echoink's training prompt for the record, between the task's optional ``pre_prompt`` / ``post_prompt``."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['prompt']}{kwargs.get('post_prompt', '')}"


def doc_to_target(doc: dict[str, Any]) -> str:
    return doc["answer"]


def strict_correct(doc: dict[str, Any], reply: str) -> bool:
    """echoink's rule: the one `echoink eval` grades with (`rewards.answer_letter` / `rewards.score_answer`)."""
    if doc["problem_type"] == MULTIPLE_CHOICE:
        return answer_letter(reply) == doc["answer"]
    extra = json.loads(doc.get("extra") or "{}")
    return score_answer(reply, doc["solution"], doc["problem_type"], extra).value == 1.0


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """The metrics of one reply (``results[0]``): strict and EchoInk-R1 accuracy, overall and for its data type."""
    reply = results[0] if results and isinstance(results[0], str) else ""
    data_type = doc["data_type"]
    strict = float(strict_correct(doc, reply))
    metrics = {STRICT: strict, f"{STRICT}_{data_type}": strict}
    if doc["problem_type"] == MULTIPLE_CHOICE:
        echoink_r1 = float(echoink_r1_answer_letter(reply) == doc["answer"])
        metrics.update({ECHOINK_R1: echoink_r1, f"{ECHOINK_R1}_{data_type}": echoink_r1})
    return metrics
