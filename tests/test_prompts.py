"""The EchoInk-R1 prompt, character by character, and the chat messages built from records."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from data_fixtures import good_record, make_dataset
from echoink.data import Record, load_dataset
from echoink.prompts import (
    ANSWER_SUFFIX,
    DEFAULT_TEMPLATE,
    PROMPT_VERSION,
    THINK_PROMPT,
    PromptTemplate,
    build_messages,
    build_prompt_text,
    build_question_text,
    uses_audio_in_video,
)

# Written out independently of the module, as EchoInk-R1 has it (no period after "thought expressions").
EXPECTED_PARAGRAPH = (
    "Please think about this question as if you were a human pondering deeply. Make sure to carefully "
    "consider both the visual and audio information before answering. Engage in an internal dialogue using "
    "expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', 'let's break it down', etc, or other "
    "natural language thought expressions It's encouraged to include self-reflection or verification in the "
    "reasoning process. Provide your detailed reasoning between the <think> </think> tags, and then give your "
    "final answer between the <answer> </answer> tags."
)
EXPECTED_SUFFIX = " Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags."


def _assert_same_text(actual: str, expected: str) -> None:
    for position, (a, e) in enumerate(zip(actual, expected)):
        assert a == e, f"first difference at character {position}: {actual[position-20:position+20]!r}"
    assert len(actual) == len(expected)


@pytest.fixture()
def record(tmp_path) -> Record:
    return load_dataset(make_dataset(tmp_path, [good_record(1234)]))[0]


def test_constants_match_echoink_r1_exactly():
    _assert_same_text(THINK_PROMPT, EXPECTED_PARAGRAPH)
    _assert_same_text(ANSWER_SUFFIX, EXPECTED_SUFFIX)
    assert "thought expressions It's" in THINK_PROMPT
    assert PROMPT_VERSION == "echoink-r1-v1"


def test_full_text_character_by_character(record):
    expected = (
        "What is making the sound? Options:\n"
        "A. Machine gun\nB. Car engine accelerating\nC. Police car siren\nD. Ambulance siren"
        "\n" + EXPECTED_PARAGRAPH + EXPECTED_SUFFIX
    )
    _assert_same_text(build_prompt_text(record), expected)
    assert build_question_text(record) == ("What is making the sound? Options:\nA. Machine gun\n"
                                           "B. Car engine accelerating\nC. Police car siren\nD. Ambulance siren")


def test_messages_order_image_audio_text_and_no_system(record):
    messages = build_messages(record)
    assert len(messages) == 1 and messages[0]["role"] == "user"
    content = messages[0]["content"]
    assert [part["type"] for part in content] == ["image", "audio", "text"]
    assert content[0]["image"] == str(record.media["image"]) and Path(content[0]["image"]).is_absolute()
    assert content[1]["audio"] == str(record.media["audio"])
    assert content[2]["text"] == build_prompt_text(record)
    assert not uses_audio_in_video(record)


def test_video_items_put_the_video_first(record):
    video = replace(record, data_type="video_audio", media={"video": Path("/data/v.mp4")})
    content = build_messages(video)[0]["content"]
    assert content[0] == {"type": "video", "video": "/data/v.mp4"}
    assert [part["type"] for part in content] == ["video", "text"]
    assert uses_audio_in_video(video)
    assert not uses_audio_in_video(video, drop_media={"audio"})
    assert not uses_audio_in_video(replace(video, data_type="video"))
    both = replace(record, media={"image": Path("/i.jpg"), "video": Path("/v.mp4"), "audio": Path("/a.wav")})
    assert [p["type"] for p in build_messages(both)[0]["content"]] == ["video", "image", "audio", "text"]


def test_drop_media_for_ablations(record):
    assert [p["type"] for p in build_messages(record, drop_media={"audio"})[0]["content"]] == ["image", "text"]
    assert [p["type"] for p in build_messages(record, drop_media={"image", "audio"})[0]["content"]] == ["text"]
    with pytest.raises(ValueError, match="unknown kind"):
        build_messages(record, drop_media={"smell"})


def test_text_only_and_free_form(record):
    text_only = replace(record, data_type="text", media={})
    assert build_messages(text_only)[0]["content"] == [{"type": "text", "text": build_prompt_text(record)}]
    free = replace(record, problem_type="free-form", options=())
    assert build_question_text(free) == "What is making the sound?"
    assert build_prompt_text(free).startswith("What is making the sound?\n" + EXPECTED_PARAGRAPH)
    assert not build_prompt_text(free).endswith(EXPECTED_SUFFIX)


def test_template_overrides(record):
    template = PromptTemplate.from_dict({"instruction": "Answer.", "suffix": ""})
    assert build_prompt_text(record, template).endswith("D. Ambulance siren\nAnswer.")
    assert template.version.startswith("custom-") and template.version != PROMPT_VERSION
    assert PromptTemplate.from_dict({}) == DEFAULT_TEMPLATE
    assert PromptTemplate.from_dict({"suffix": "", "version": "mine"}).version == "mine"
    with pytest.raises(ValueError, match="unknown prompt setting"):
        PromptTemplate.from_dict({"sufix": ""})
    with pytest.raises(ValueError, match="unknown placeholder"):
        PromptTemplate(question_template="{question} {choices}")
    braces = replace(record, problem="Which set {a, b} is bigger?")  # braces in the data are not placeholders
    assert build_question_text(braces).startswith("Which set {a, b} is bigger? Options:\n")
