"""The ONE place that turns a dataset record into model inputs (training, evaluation and the demo).

    Record ──build_messages──▶ chat messages ──chat template──▶ prompt text
    Record ──load_record_media──▶ image / audio / video frames (+ the video's own audio track)
    text + media ──processor──▶ PromptInputs (input_ids [1, P] and the media tensors, once)

Ablations replace what the model sees while keeping the prompt's shape: "mute-audio" feeds silence
of the same length, "blank-image" a mid-grey image (and mid-grey video frames) of the same size,
"no-media" drops every media part, leaving the text alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from echoink.data.media import LoadedVideo, load_record_media
from echoink.data.records import Record
from echoink.prompts import DEFAULT_TEMPLATE, PromptTemplate, build_messages

# Processor outputs that belong to the media of one prompt (everything but the token ids).
MEDIA_KEYS = (
    "input_features",          # [1, 128, 3000]    log-mel features of the prompt's audio (padded to 30 s)
    "feature_attention_mask",  # [1, 3000]         which feature frames are real audio
    "pixel_values",            # [N_patches, 1176] the image's flattened 14x14x2 patches
    "image_grid_thw",          # [1, 3]            (1, H/14, W/14)
    "pixel_values_videos",     # [N_patches, 1176]
    "video_grid_thw",          # [1, 3]            (F/2, H/14, W/14)
    "video_second_per_grid",   # [1]               seconds per temporal patch
)


@dataclass
class PromptInputs:
    """The processor's output for ONE prompt.

    input_ids: [1, P] token ids, multimodal placeholders expanded (one `<|AUDIO|>` per audio token ...)
    media:     the `MEDIA_KEYS` present for this prompt (tensors, stored once)
    use_audio_in_video: the video's own audio track is interleaved with its frames
    generation_prefix: text the chat template already wrote after the assistant header (a Thinking
        variant's opening `<think>`): part of the assistant's turn, so it is put in front of each decoded
        completion before rewards and metrics read it ("" for templates that write nothing there)
    """

    input_ids: torch.Tensor
    media: dict[str, torch.Tensor] = field(default_factory=dict)
    use_audio_in_video: bool = False
    problem_id: Any = None
    generation_prefix: str = ""

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for one forward/generate call of the thinker on this prompt alone."""
        kwargs: dict[str, Any] = {"input_ids": self.input_ids, "attention_mask": torch.ones_like(self.input_ids)}
        kwargs.update(self.media)
        if self.use_audio_in_video:
            kwargs["use_audio_in_video"] = True
        return kwargs

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "PromptInputs":
        """Move to `device`; floating media tensors (features, pixels) are cast to `dtype` when given."""
        def move(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device)

        return replace(self, input_ids=self.input_ids.to(device), media={k: move(v) for k, v in self.media.items()})


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
    media = {} if ablate == "no-media" else load_record_media(
        record,
        max_audio_seconds=media_options.max_audio_seconds,
        min_pixels=media_options.min_pixels,
        max_pixels=media_options.max_pixels,
        video_fps=media_options.video_fps,
        video_max_frames=media_options.video_max_frames,
    )
    return encode_messages(messages, apply_ablation(media, ablate), processor, media_options,
                           problem_id=record.problem_id)


def encode_messages(messages: list[dict], media: dict[str, Any], processor,
                    media_options: MediaOptions = MediaOptions(), problem_id: Any = None) -> PromptInputs:
    """Chat messages whose media parts are already decoded -> PromptInputs for one prompt.

    `messages` name one media part per kind present in `media` (``{"type": "image", "image": ...}``: the chat
    template only writes its placeholder); `media` is what `data.media.load_record_media` returns: ``image``
    (PIL), ``audio`` (float32 16 kHz), ``video`` (LoadedVideo) and ``video_audio`` (the video's own track,
    used when ``media_options.use_audio_in_video``).
    """
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
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
        problem_id=problem_id,
        generation_prefix=generation_prefix(text),
    )


ASSISTANT_HEADER = "<|im_start|>assistant\n"


def generation_prefix(prompt_text: str) -> str:
    """What a rendered prompt (add_generation_prompt=True) carries after its last assistant header.

    Qwen's Thinking templates end the prompt with an opening `<think>` (and a newline), so the model's
    output starts inside the reasoning block and never repeats the tag.
    """
    head, found, tail = prompt_text.rpartition(ASSISTANT_HEADER)
    return tail if found else ""


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
