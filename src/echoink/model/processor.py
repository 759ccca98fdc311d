"""The omni processor, assembled from its parts without torchvision.

One loader serves the published checkpoints and our own (tiny or trained) directories of every
family; the family gives the processor class (`OmniProcessor` for Qwen2.5-Omni, the Qwen3-Omni one
in `families/qwen3_omni.py`), both built from the same parts:

    tokenizer            tokenizer.json / tokenizer_config.json   (AutoTokenizer)
    feature extractor    preprocessor_config.json                 (WhisperFeatureExtractor, 128 mel bins)
    image processor      preprocessor_config.json                 (Qwen2VLImageProcessorPil: PIL + numpy)
    video processor      video_preprocessor_config.json if present, else the image processor's settings
                                                                   (NumpyQwenVideoProcessor)
    chat template        chat_template.jinja, or chat_template.json, or the tokenizer's template
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer, Qwen2_5OmniProcessor, WhisperFeatureExtractor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.video_processing_utils import VideoProcessorMixin

from echoink.model.video_processor import NumpyQwenVideoProcessor

PREPROCESSOR_CONFIG = "preprocessor_config.json"
VIDEO_PREPROCESSOR_CONFIG = "video_preprocessor_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


class NumpyVideoProcessing:
    """Mixin for a transformers omni processor whose video processor is `NumpyQwenVideoProcessor`.

    transformers looks the video processor class up in a registry that is empty without
    torchvision; we check it ourselves instead. `published_class_name` is what
    preprocessor_config.json names as the processor class.
    """

    published_class_name: str

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor":
            if not isinstance(argument, VideoProcessorMixin):
                raise TypeError(f"video_processor must be a VideoProcessorMixin, got {type(argument).__name__}")
            return type(argument)
        return super().check_argument_for_proper_class(argument_name, argument)

    @classmethod
    def from_pretrained(cls, path, **kwargs):  # type: ignore[override]
        return load_processor(path, cls)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):  # type: ignore[override]
        save_processor(self, save_directory)
        return []


class OmniProcessor(NumpyVideoProcessing, Qwen2_5OmniProcessor):
    """`Qwen2_5OmniProcessor` whose video processor is `NumpyQwenVideoProcessor`."""

    published_class_name = "Qwen2_5OmniProcessor"


def load_processor(path: str | Path, processor_class: type = OmniProcessor):
    """Build the processor for the checkpoint directory `path` (published layout or ours).

    processor_class: the family's processor (a `NumpyVideoProcessing` subclass).
    """
    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    feature_extractor = WhisperFeatureExtractor.from_pretrained(str(path))
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(path))
    video_settings = _read_json(path / VIDEO_PREPROCESSOR_CONFIG) or _read_json(path / PREPROCESSOR_CONFIG) or {}
    video_processor = NumpyQwenVideoProcessor(**_video_kwargs(video_settings))
    chat_template = _read_chat_template(path) or getattr(tokenizer, "chat_template", None)
    return processor_class(image_processor=image_processor, video_processor=video_processor,
                         feature_extractor=feature_extractor, tokenizer=tokenizer, chat_template=chat_template)


def save_processor(processor: NumpyVideoProcessing, directory: str | Path) -> None:
    """Write the processor in the published file layout (see module docstring)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    processor.tokenizer.save_pretrained(str(directory))
    merged = {**processor.feature_extractor.to_dict(), **processor.image_processor.to_dict()}
    merged["processor_class"] = processor.published_class_name
    _write_json(directory / PREPROCESSOR_CONFIG, merged)
    _write_json(directory / VIDEO_PREPROCESSOR_CONFIG, processor.video_processor.to_dict())
    if processor.chat_template:
        (directory / CHAT_TEMPLATE_FILE).write_text(processor.chat_template, encoding="utf-8")


def _video_kwargs(settings: dict) -> dict:
    size = settings.get("size") or {}
    kwargs = {
        "patch_size": settings.get("patch_size", 14),
        "temporal_patch_size": settings.get("temporal_patch_size", 2),
        "merge_size": settings.get("merge_size", 2),
        "min_pixels": settings.get("min_pixels", size.get("shortest_edge", 128 * 28 * 28)),
        "max_pixels": settings.get("max_pixels", size.get("longest_edge", 768 * 28 * 28)),
    }
    for key in ("image_mean", "image_std"):
        if key in settings:
            kwargs[key] = settings[key]
    return kwargs


def _read_chat_template(path: Path) -> str | None:
    if (path / CHAT_TEMPLATE_FILE).is_file():
        return (path / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    data = _read_json(path / "chat_template.json")
    return data.get("chat_template") if data else None


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
