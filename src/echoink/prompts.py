"""The prompt: EchoInk-R1's training template, reproduced exactly, and the chat messages built from it.

For a multiple-choice record the text part of the user turn is::

    {problem} Options:
    A. ...
    B. ...
    {THINK_PROMPT}{ANSWER_SUFFIX}

i.e. the question, a newline, the "think like a human" paragraph and the answer-format suffix (which
starts with a space). The paragraph is kept verbatim, including its missing period after
"thought expressions". The user turn's content is ordered image, audio, text (video first for video
items); there is no system message, so the chat template's default system prompt applies.

Other problem types follow EchoInk-R1 too: the question is the problem alone (temporal retrieval:
``Query: “{problem}” (The video duration is {duration:.2f} seconds.)``), and the suffix is the type's
own (:data:`echoink.problem_types.ECHOINK_SUFFIXES`, character for character); a user type without a
suffix gets ``free_form_suffix``.

Training and evaluation use the same template by default (EchoInk-R1's evaluation used a different
one). Any part can be overridden from config with :meth:`PromptTemplate.from_dict`.
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from echoink.problem_types import MULTIPLE_CHOICE, PROBLEM_TYPES, get_problem_type

__all__ = [
    "ANSWER_SUFFIX",
    "DEFAULT_TEMPLATE",
    "FREE_FORM_SUFFIX",
    "MEDIA_KINDS",
    "PROMPT_VERSION",
    "THINK_PROMPT",
    "PromptTemplate",
    "build_messages",
    "build_prompt_text",
    "build_question_text",
    "uses_audio_in_video",
]

PROMPT_VERSION = "echoink-r1-v1"

THINK_PROMPT = (
    "Please think about this question as if you were a human pondering deeply. "
    "Make sure to carefully consider both the visual and audio information before answering. "
    "Engage in an internal dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', "
    "'let's break it down', etc, or other natural language thought expressions "
    "It's encouraged to include self-reflection or verification in the reasoning process. "
    "Provide your detailed reasoning between the <think> </think> tags, and then give your final answer "
    "between the <answer> </answer> tags."
)

ANSWER_SUFFIX = " Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags."

#: Suffix for problem types that define none (user types); EchoInk-R1 had no suffix for those.
FREE_FORM_SUFFIX = " Please provide your final answer within the <answer> </answer> tags."

#: Media kinds a message part can carry, in the order they appear in the user turn.
MEDIA_KINDS = ("video", "image", "audio")

_PLACEHOLDERS = {
    "question_template": {"problem", "options"},
    "free_form_template": {"problem"},
    "text_template": {"question", "instruction", "suffix"},
}


@dataclass(frozen=True)
class PromptTemplate:
    """The parts of the prompt text.

    ``question_template`` builds the multiple-choice question from ``{problem}`` and ``{options}``
    (the options joined by newlines); ``free_form_template`` builds other problem types from
    ``{problem}`` (after the type's own question form, e.g. temporal retrieval's "Query: ..."); ``text_template``
    joins ``{question}``, ``{instruction}`` and ``{suffix}`` (the suffix is ``suffix`` for multiple
    choice, the problem type's own suffix for the other types, ``free_form_suffix`` for a type without one).
    ``system_prompt``, when set, is sent as an explicit system turn (None: no system message, so the chat
    template's default applies, as in EchoInk-R1's training). ``version`` is logged
    with every run so results say which prompt produced them.
    """

    question_template: str = "{problem} Options:\n{options}"
    free_form_template: str = "{problem}"
    instruction: str = THINK_PROMPT
    suffix: str = ANSWER_SUFFIX
    free_form_suffix: str = FREE_FORM_SUFFIX
    text_template: str = "{question}\n{instruction}{suffix}"
    system_prompt: str | None = None
    version: str = PROMPT_VERSION

    def __post_init__(self) -> None:
        for name, allowed in _PLACEHOLDERS.items():
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"prompt {name} must be a string, got {type(value).__name__}")
            try:
                used = {field_name for _, field_name, _, _ in string.Formatter().parse(value) if field_name is not None}
            except ValueError as exc:
                raise ValueError(f"prompt {name} is not a valid template: {exc}") from None
            unknown = used - allowed
            if unknown:
                raise ValueError(f"prompt {name} uses unknown placeholder(s) {sorted(unknown)}; "
                                 f"allowed: {sorted(allowed)}")
        for name in ("instruction", "suffix", "free_form_suffix", "version"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"prompt {name} must be a string")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise TypeError("prompt system_prompt must be a string or null")

    @classmethod
    def from_dict(cls, overrides: Mapping[str, Any] | None) -> "PromptTemplate":
        """The default template with some parts replaced (e.g. from a YAML ``prompt:`` section).

        Unknown keys are an error. When text is overridden without a new ``version``, the version
        becomes ``custom-<hash>`` so logs never claim the EchoInk-R1 prompt for a changed one.
        """
        overrides = dict(overrides or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown prompt setting(s) {unknown}; known: {sorted(known)}")
        template = cls(**overrides)
        if "version" not in overrides and template.text_fields() != DEFAULT_TEMPLATE.text_fields():
            digest = hashlib.sha256(repr(template.text_fields()).encode()).hexdigest()[:8]
            template = cls(**{**overrides, "version": f"custom-{digest}"})
        return template

    def text_fields(self) -> dict[str, str]:
        """Every field except ``version``."""
        return {k: v for k, v in asdict(self).items() if k != "version"}


DEFAULT_TEMPLATE = PromptTemplate()


def build_question_text(record: Any, template: PromptTemplate = DEFAULT_TEMPLATE) -> str:
    """The question: ``problem + " Options:\\n" + "\\n".join(options)`` for multiple choice (default
    template), just the problem for other problem types."""
    if record.problem_type == MULTIPLE_CHOICE:
        return template.question_template.format(problem=record.problem, options="\n".join(record.options))
    problem = record.problem
    if record.problem_type in PROBLEM_TYPES:
        problem = get_problem_type(record.problem_type).question(problem, record)
    return template.free_form_template.format(problem=problem)


def build_prompt_text(record: Any, template: PromptTemplate = DEFAULT_TEMPLATE) -> str:
    """The whole text part of the user turn: question, newline, instruction paragraph, suffix."""
    suffix = template.suffix if record.problem_type == MULTIPLE_CHOICE else _type_suffix(record.problem_type, template)
    return template.text_template.format(
        question=build_question_text(record, template), instruction=template.instruction, suffix=suffix
    )


def _type_suffix(problem_type: str, template: PromptTemplate) -> str:
    kind = PROBLEM_TYPES.get(problem_type)
    suffix = getattr(kind, "suffix", None)
    return suffix if isinstance(suffix, str) else template.free_form_suffix


def build_messages(
    record: Any,
    template: PromptTemplate = DEFAULT_TEMPLATE,
    *,
    drop_media: set[str] | frozenset[str] = frozenset(),
) -> list[dict]:
    """Qwen2.5-Omni chat messages for a record: one user turn (after a system turn only when the template
    has a ``system_prompt``).

    ``[{"role": "user", "content": [{"type": "image", "image": "/abs.jpg"},
    {"type": "audio", "audio": "/abs.wav"}, {"type": "text", "text": ...}]}]``; a video item starts
    with ``{"type": "video", "video": "/abs.mp4"}``. For ``video_audio`` items the sound comes from the
    video's own track: set ``use_audio_in_video`` (see :func:`uses_audio_in_video`).

    ``drop_media`` leaves out media kinds ("image", "audio", "video") for modality ablations; dropping
    "audio" of a ``video_audio`` item is done by not using the video's track.
    """
    unknown = set(drop_media) - set(MEDIA_KINDS)
    if unknown:
        raise ValueError(f"drop_media has unknown kind(s) {sorted(unknown)}; expected among {MEDIA_KINDS}")
    content: list[dict] = []
    for kind in MEDIA_KINDS:
        path = record.media.get(kind)
        if path is not None and kind not in drop_media:
            content.append({"type": kind, kind: str(path)})
    content.append({"type": "text", "text": build_prompt_text(record, template)})
    system = [] if template.system_prompt is None else [{"role": "system", "content": template.system_prompt}]
    return [*system, {"role": "user", "content": content}]


def uses_audio_in_video(record: Any, drop_media: set[str] | frozenset[str] = frozenset()) -> bool:
    """Whether the processor should read the video's own sound track (``video_audio`` items)."""
    return record.data_type == "video_audio" and "video" not in drop_media and "audio" not in drop_media
