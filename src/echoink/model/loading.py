"""Load the Qwen2.5-Omni thinker (never the talker or token2wav) from a local directory; save it.

Two directory layouts are accepted:

(a) the published full checkpoint: config.json with `model_type: qwen2_5_omni` and `thinker_config`,
    `talker_config`, `token2wav_config`; weights prefixed `thinker.`, `talker.`, `token2wav.`.
    Only the thinker config is used to build the model, so the talker and token2wav are never
    constructed, and only `thinker.*` weights are read (transformers' key conversion for
    `Qwen2_5OmniThinkerForConditionalGeneration` strips the prefix). No `"hidden_size"` edit of
    config.json is needed: nothing here reads the top-level hidden size.
(b) a thinker-only directory (`model_type: qwen2_5_omni_thinker`), which our trainer writes.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration
from transformers.utils import logging as hf_logging

from echoink.io import building_directory
from echoink.model.processor import OmniProcessor, load_processor, save_processor

FULL_MODEL_TYPE = "qwen2_5_omni"
THINKER_MODEL_TYPE = "qwen2_5_omni_thinker"
DTYPES = {"auto": "auto", "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
          "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}


class ModelLoadError(ValueError):
    """A model directory that cannot be loaded; the message is one line naming what and where."""


def read_thinker_config(path: str | Path) -> Qwen2_5OmniThinkerConfig:
    """The thinker config of a checkpoint directory in either layout (checks the directory)."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: model directory does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"{path}: not a directory (expected a model directory with config.json)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{config_file}: missing (not a model directory)")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{config_file}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    model_type = raw.get("model_type")
    if model_type == FULL_MODEL_TYPE:
        if not isinstance(raw.get("thinker_config"), dict):
            raise ModelLoadError(f"{config_file}: model_type {FULL_MODEL_TYPE} but no thinker_config")
        thinker = dict(raw["thinker_config"])
        thinker.pop("model_type", None)
        config = Qwen2_5OmniThinkerConfig(**thinker)
    elif model_type == THINKER_MODEL_TYPE:
        config = Qwen2_5OmniThinkerConfig.from_pretrained(str(path))
    else:
        raise ModelLoadError(
            f"{config_file}: unsupported model_type {model_type!r} (expected {FULL_MODEL_TYPE!r} or {THINKER_MODEL_TYPE!r})"
        )
    _check_weights(path)
    return config


def _check_weights(path: Path) -> None:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise ModelLoadError(f"{path}: weight files listed in {index.name} are missing: {', '.join(missing)}")
        return
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelLoadError(f"{path}: no weight files (*.safetensors or model.safetensors.index.json)")


def load_thinker(
    path: str | Path,
    dtype: str = "auto",
    attn_implementation: str | None = None,
) -> tuple[Qwen2_5OmniThinkerForConditionalGeneration, OmniProcessor]:
    """Load the thinker and its processor from `path` (published full layout or thinker-only).

    dtype: "auto" (the checkpoint's dtype), "bfloat16" or "float32".
    attn_implementation: e.g. "sdpa", "eager", "flash_attention_2"; None lets transformers choose.
    Raises ModelLoadError with a one-line message for a bad directory.
    """
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    path = Path(path)
    config = read_thinker_config(path)
    kwargs = {"config": config, "dtype": DTYPES[dtype]}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with _quiet_transformers():
        try:
            model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(str(path), **kwargs)
        except OSError as exc:
            raise ModelLoadError(f"{path}: cannot read weights: {str(exc).splitlines()[0]}") from None
        try:
            processor = load_processor(path)
        except (OSError, ValueError, TypeError) as exc:
            raise ModelLoadError(f"{path}: cannot load processor files: {str(exc).splitlines()[0]}") from None
    if config.eos_token_id is not None:
        model.generation_config.eos_token_id = config.eos_token_id
    if processor.tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model.eval(), processor


@contextmanager
def _quiet_transformers():
    """The talker/token2wav weights and configs are skipped on purpose: silence transformers' notes on them."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def save_thinker(model, processor, out_dir: str | Path) -> Path:
    """Write a thinker-only checkpoint (safetensors + processor files) atomically to `out_dir`.

    Written into a temporary sibling directory and renamed, so a crash never leaves a half-written
    model at `out_dir`; an existing `out_dir` is replaced.
    """
    with building_directory(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        save_processor(processor, tmp)
    return out_dir
