"""The ONE place that turns a dataset record into model inputs (training, evaluation and the demo).

    Record ──build_messages──▶ chat messages ──chat template──▶ prompt text
    Record ──load_record_media──▶ image / audio / video frames (+ the video's own audio track)
    text + media ──processor──▶ PromptInputs (input_ids [1, P] and the media tensors, once)

Ablations replace what the model sees while keeping the prompt's shape: "mute-audio" feeds silence
of the same length, "blank-image" a mid-grey image (and mid-grey video frames) of the same size,
"no-media" drops every media part, leaving the text alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from echoink.data.media import LoadedVideo, load_record_media
from echoink.data.records import Record
from echoink.grpo.types import MEDIA_KEYS, PromptInputs
from echoink.prompts import DEFAULT_TEMPLATE, PromptTemplate, build_messages

ABLATIONS = ("none", "mute-audio", "blank-image", "no-media")
MID_GREY = 128


@dataclass(frozen=True)
class MediaOptions:
    """Media caps (EchoInk-R1's defaults) and whether a video's own audio track is used."""

    max_audio_seconds: float = 10.0
    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 256 * 28 * 28
    video_fps: float = 2.0
    video_max_frames: int = 16
    use_audio_in_video: bool = True

    @classmethod
    def from_config(cls, config) -> "MediaOptions":
        """The media fields of a TrainConfig."""
        return cls(config.max_audio_seconds, config.min_pixels, config.max_pixels, config.video_fps,
                   config.video_max_frames, config.use_audio_in_video)


def encode_prompt(
    record: Record,
    processor,
    media_options: MediaOptions = MediaOptions(),
    template: PromptTemplate = DEFAULT_TEMPLATE,
    ablate: str = "none",
) -> PromptInputs:
    """Record -> PromptInputs for one prompt (no padding, no truncation)."""
    if ablate not in ABLATIONS:
        raise ValueError(f"ablate must be one of {ABLATIONS}, got {ablate!r}")
    drop = frozenset(record.media) if ablate == "no-media" else frozenset()
    messages = build_messages(record, template, drop_media=drop)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    media = {} if ablate == "no-media" else load_record_media(
        record,
        max_audio_seconds=media_options.max_audio_seconds,
        min_pixels=media_options.min_pixels,
        max_pixels=media_options.max_pixels,
        video_fps=media_options.video_fps,
        video_max_frames=media_options.video_max_frames,
    )
    media = apply_ablation(media, ablate)

    use_audio_in_video = media_options.use_audio_in_video and "video_audio" in media
    kwargs: dict = {"text": [text], "return_tensors": "pt"}
    audio = [media["audio"]] if "audio" in media else []
    if "image" in media:
        kwargs["images"] = [media["image"]]
    if "video" in media:
        video: LoadedVideo = media["video"]
        kwargs["videos"] = [video.frames]
        kwargs["videos_kwargs"] = {"fps": float(video.fps)}
        if use_audio_in_video:
            audio.append(media["video_audio"])
            kwargs["load_audio_from_video"] = True
            kwargs["audio_from_video_indices"] = [None] * (len(audio) - 1) + [0]
    if audio:
        kwargs["audio"] = audio
    encoded = processor(**kwargs)
    tensors = {key: torch.as_tensor(encoded[key]) for key in MEDIA_KEYS if key in encoded}
    if "video_second_per_grid" in tensors:
        tensors["video_second_per_grid"] = tensors["video_second_per_grid"].float()
    return PromptInputs(
        input_ids=torch.as_tensor(encoded["input_ids"]),
        media=tensors,
        use_audio_in_video=use_audio_in_video,
        problem_id=record.problem_id,
    )


def apply_ablation(media: dict, ablate: str) -> dict:
    """Replace decoded media as `ablate` says (shapes kept). Pure: returns a new dict."""
    media = dict(media)
    if ablate == "mute-audio":
        for key in ("audio", "video_audio"):
            if key in media:
                media[key] = np.zeros_like(media[key])
    elif ablate == "blank-image":
        if "image" in media:
            media["image"] = Image.new("RGB", media["image"].size, (MID_GREY,) * 3)
        if "video" in media:
            video: LoadedVideo = media["video"]
            media["video"] = video._replace(frames=np.full_like(video.frames, MID_GREY))
    elif ablate == "no-media":
        media = {}
    return media
