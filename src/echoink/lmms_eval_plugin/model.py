"""lmms-eval's model ``echoink``: any model directory echoink loads, answering with echoink's own pipeline.

    lmms-eval --model echoink --model_args pretrained=RUN/final --tasks TASK [--include_path DIR]

``pretrained`` is anything `echoink.model.load_thinker` reads: a published Qwen2.5-Omni or Qwen3-Omni layout, a
thinker-only or LoRA-merged echoink model, an export. Each request becomes one echoink prompt:

* on a task written by `echoink lmms-eval-task` (its documents name the echoink data file and record), the
  record itself goes through `model.inputs.encode_prompt` with the template and media caps the model was trained
  with (saved beside it as `echoink_prompt.json`, or a run's config given as ``config=RUN/config.resolved.json``;
  the defaults for a base model): the prompt `echoink eval` builds, so the replies are `echoink eval`'s (greedy,
  float32: the same, item for item);
* on any other task (``prompt=task`` forces it on echoink tasks too), the task's own prompt text with ALL the
  item's media from ``doc_to_visual`` — images (PIL or paths), audio (``{"array", "sampling_rate"}`` or paths),
  a video path with its own sound track — decoded by echoink's loaders with the same caps;

and is answered by `eval.generation.answer_prompts` (echoink's decoding: greedy unless the task asks to sample; replies
end at the end-of-turn token). The task's ``until`` is ignored: lmms-eval's default (``"\\n\\n"``) would cut a
reasoning reply at its first blank line. Model arguments (``--model_args k=v,...``): ``pretrained``, ``device``
(default: CUDA when available), ``dtype`` (auto | bfloat16 | float32), ``batch_size`` (prompts per generate call,
default 8), ``prompt`` (trained | task), ``config`` (a run's config whose template and caps to use), ``seed``
(sampling tasks), ``system_prompt`` (an explicit system turn for task prompts; default: the chat template's own).
"""

from __future__ import annotations

import json
import tempfile
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from lmms_eval.api.model import lmms
from loguru import logger
from PIL import Image

from echoink.data.media import MediaError, load_audio, load_image, load_video, load_video_audio
from echoink.data.records import MEDIA_EXTENSIONS, Record, load_dataset
from echoink.eval.generation import answer_prompts
from echoink.model.generation import SamplingSettings
from echoink.model.inputs import PromptInputs, encode_messages, encode_prompt
from echoink.model.loading import load_thinker
from echoink.model.prompt_settings import settings_for_eval
from echoink.prompts import MEDIA_KINDS

PROMPT_MODES = ("trained", "task")
DEFAULT_MAX_NEW_TOKENS = 256


class EchoinkModel(lmms):
    """An echoink-loadable model behind lmms-eval's simple-model interface (`generate_until`)."""

    is_simple = True

    def __init__(self, pretrained: str, device: str | None = None, dtype: str = "auto", batch_size: int | str = 8,
                 prompt: str = "trained", seed: int | str = 0, system_prompt: str | None = None,
                 config: str | None = None, max_batch_size: Any = None, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"echoink model: unknown model argument(s) {', '.join(sorted(unknown))}; known: pretrained, "
                             "device, dtype, batch_size, prompt, seed, system_prompt, config")
        if prompt not in PROMPT_MODES:
            raise ValueError(f"echoink model: prompt must be one of {', '.join(PROMPT_MODES)}, got {prompt!r}")
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"echoink model: batch_size must be >= 1, got {batch_size!r}")
        self.prompt_mode, self.seed, self.system_prompt = prompt, int(seed), system_prompt
        settings, source = settings_for_eval(pretrained, config)
        if settings.problem_types:
            raise ValueError(f"echoink model: the model was trained with user problem types "
                             f"{', '.join(settings.problem_types)} ({source}); the lmms-eval model imports no user "
                             "code: evaluate it with `echoink eval --problem-types ...`")
        # the template and media caps the model was trained with (as `echoink eval` chooses them)
        self.template, self.media_options = settings.template, settings.media
        logger.info(f"echoink model: {settings.describe()} ({source})")
        self.model, self.processor = load_thinker(pretrained, dtype=dtype)
        self.model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model_dir = str(Path(pretrained).resolve())
        self._warned_until = False

    # ---- lmms-eval's interface ------------------------------------------------------------------------

    def generate_until(self, requests) -> list[str]:
        """One reply per request, in request order; consecutive requests with equal generation settings share a
        generate call (at most `batch_size` prompts)."""
        replies: list[str] = []
        batch: list[tuple[PromptInputs, SamplingSettings, tuple[int, int]]] = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            decoding = self._decoding(gen_kwargs)
            if batch and (len(batch) == self.batch_size or batch[-1][1] != decoding):
                replies.extend(self._answer(batch))
                batch = []
            doc = self.task_dict[task][split][doc_id]
            # a sampled reply draws from a stream named by (seed, task, document): not by its batch or position
            stream = (zlib.crc32(task.encode()), int(doc_id))
            batch.append((self._encode(context, doc, doc_to_visual), decoding, stream))
        if batch:
            replies.extend(self._answer(batch))
        return replies

    def loglikelihood(self, requests):
        raise NotImplementedError("the echoink model answers generation tasks (generate_until) only")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("the echoink model answers single-turn generation tasks only")

    # ---- requests -> echoink prompts ------------------------------------------------------------------

    def _decoding(self, gen_kwargs: dict[str, Any]) -> SamplingSettings:
        """The task's generation settings as echoink's: greedy unless it samples at a positive temperature."""
        if gen_kwargs.get("until") and not self._warned_until:
            logger.warning(f"echoink model: ignoring until={gen_kwargs['until']!r} (replies end at the end of turn)")
            self._warned_until = True
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        max_new_tokens = int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        if not gen_kwargs.get("do_sample") or temperature <= 0:
            return SamplingSettings(greedy=True, max_new_tokens=max_new_tokens)
        top_p = float(gen_kwargs.get("top_p") or 1.0)
        return SamplingSettings(greedy=False, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                seed=self.seed)

    def _encode(self, context: str, doc: dict[str, Any], doc_to_visual) -> PromptInputs:
        record = _echoink_record(doc)
        if record is not None and self.prompt_mode == "trained":
            return encode_prompt(record, self.processor, self.media_options, self.template)
        visuals = list(record.media[kind] for kind in MEDIA_KINDS if kind in record.media) if record is not None \
            else _flatten(doc_to_visual(doc))
        media, parts = self._load_visuals(visuals, video_sound=record is None or record.data_type == "video_audio")
        content = [{"type": kind, kind: str(parts[kind])} for kind in MEDIA_KINDS if kind in parts]
        content.append({"type": "text", "text": context})
        system = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        return encode_messages([*system, {"role": "user", "content": content}], media, self.processor,
                               self.media_options)

    def _load_visuals(self, visuals: list[Any], video_sound: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        """Decode a task's visuals with echoink's loaders and caps: at most one image, one audio, one video."""
        options = self.media_options
        media: dict[str, Any] = {}
        parts: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(prefix="echoink-lmms-") as scratch:
            for position, visual in enumerate(visuals):
                kind, path = _media_file(visual, Path(scratch) / f"visual_{position}")
                if kind in parts:
                    raise ValueError(f"echoink model: an item has more than one {kind}; echoink prompts take at most "
                                     "one image, one audio and one video")
                parts[kind] = path
                try:
                    if kind == "image":
                        media["image"] = load_image(path, options.min_pixels, options.max_pixels)
                    elif kind == "audio":
                        media["audio"] = load_audio(path, options.max_audio_seconds)
                    else:
                        media["video"] = load_video(path, options.video_fps, max_frames=options.video_max_frames)
                        if video_sound and _has_sound_track(path):
                            media["video_audio"] = load_video_audio(path, options.max_audio_seconds)
                except MediaError as exc:
                    raise ValueError(f"echoink model: {exc}") from None
        return media, parts

    def _answer(self, batch: list[tuple[PromptInputs, SamplingSettings, tuple[int, int]]]) -> list[str]:
        prompts = [prompt for prompt, _, _ in batch]
        replies = answer_prompts(self.model, self.processor, prompts, batch[0][1], seed=self.seed,
                                 stream_keys=[key for _, _, key in batch])
        return [samples[0] for samples in replies]


# ---- helpers -----------------------------------------------------------------------------------------


def _echoink_record(doc: dict[str, Any]) -> Record | None:
    """The echoink record a document of an `echoink lmms-eval-task` task stands for (None: another task's)."""
    if not isinstance(doc, dict) or "echoink_data" not in doc or "echoink_index" not in doc:
        return None
    records = _dataset(str(doc["echoink_data"]))
    index = int(doc["echoink_index"])
    if not 0 <= index < len(records) or records[index].index != index:
        raise ValueError(f"{doc['echoink_data']}: has no record {index}: the task was written for another version "
                         "of the file; write it again with `echoink lmms-eval-task`")
    return records[index]


@lru_cache(maxsize=8)
def _dataset(path: str) -> list[Record]:
    return load_dataset(path)


def _flatten(visuals: Any) -> list[Any]:
    if visuals is None:
        return []
    if isinstance(visuals, (list, tuple)):
        return [leaf for item in visuals for leaf in _flatten(item)]
    return [visuals]


def _media_file(visual: Any, scratch: Path) -> tuple[str, Path]:
    """(kind, file) for one visual: paths are classified by extension; in-memory images and audio are written
    to `scratch` (PNG, float WAV at their own rate) so echoink's loaders decode them like files."""
    if isinstance(visual, Image.Image):
        path = scratch.with_suffix(".png")
        visual.save(path, format="PNG")
        return "image", path
    if isinstance(visual, dict) and "array" in visual and "sampling_rate" in visual:
        path = scratch.with_suffix(".wav")
        samples = np.asarray(visual["array"], dtype=np.float32)
        sf.write(str(path), samples.T if samples.ndim == 2 and samples.shape[0] < samples.shape[1] else samples,
                 int(visual["sampling_rate"]), subtype="FLOAT")
        return "audio", path
    if isinstance(visual, (str, Path)):
        path = Path(visual)
        for kind in ("image", "audio", "video"):
            if path.suffix.lower() in MEDIA_EXTENSIONS[kind]:
                return kind, path
        raise ValueError(f"echoink model: {json.dumps(str(visual))}: not an image, audio or video file extension")
    raise ValueError(f"echoink model: a visual of type {type(visual).__name__} is not an image, audio or video")


def _has_sound_track(path: Path) -> bool:
    import av

    try:
        with av.open(str(path)) as container:
            return bool(container.streams.audio)
    except Exception:  # noqa: BLE001 - an unreadable container has no usable track; load_video reports it
        return False
