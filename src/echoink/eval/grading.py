"""Grading: one prediction row per answer, by the same parser and scorers as the rewards.

Answers come from `rewards.answer_letter` (multiple choice: the same parser as the accuracy reward) or
the record's problem type (`rewards.score_answer`), so evaluation and training agree by construction.

Output (JSON Lines, one object per answer)::

    {"problem_id": 7, "sample_idx": 0, "gt": "C", "pred": "C", "correct": true, "reply": "<think>...",
     "data_type": "image_audio", "needs": "audio", "reply_tokens": 93, "truncated": false,
     "model": "/abs/model", "decoding": {"greedy": true, "samples": 1, "max_new_tokens": 256},
     "prompt_version": "echoink-r1-v1", "ablate": "none"}

`pred` is null when the reply cannot be parsed (it then counts as wrong); `reply_tokens` counts the
generated tokens including the closing end-of-turn token; `needs` appears when the record has it.
"""

from __future__ import annotations

from typing import Any

from echoink.data.records import Record
from echoink.eval.protocols import regrade_row
from echoink.rewards import answer_letter, extract_answer, score_answer

Row = dict[str, Any]


def prediction_row(record: Record, sample_idx: int, reply: str, reply_tokens: int, truncated: bool, *, lenient: bool,
                   common: dict[str, Any], protocol: str = "ours") -> Row:
    """One prediction line. Multiple choice: the option letter (`answer_letter`); other problems: the
    stripped answer block scored by the record's problem type (`rewards.score_answer`, the accuracy
    reward's rule): `score` in [0, 1], `correct` iff the score is 1, `pred` None when it does not parse.
    `protocol` "echoink" regrades with EchoInk-R1's answer rule (`protocols.regrade_row`)."""
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
    return row if protocol == "ours" else regrade_row(row, protocol)


def skipped_row(record: Record, sample_idx: int, reason: str, *, lenient: bool, common: dict[str, Any],
                protocol: str = "ours") -> Row:
    """The row of an answer never generated (its prompt was too long): empty reply, wrong, `skipped` says why."""
    row = prediction_row(record, sample_idx, "", 0, False, lenient=lenient, common=common)
    row["skipped"] = reason
    return row if protocol == "ours" else {**row, "protocol": protocol}
