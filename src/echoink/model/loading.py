"""Load the thinker of an omni model (never the talker or the speech decoder) from a local directory; save it.

The family (Qwen2.5-Omni, Qwen3-Omni: `echoink.model.families`) is chosen from config.json's
`model_type`. Two directory layouts are accepted for each family:

(a) the published full checkpoint: config.json with the full model_type (`qwen2_5_omni`,
    `qwen3_omni_moe`) and a `thinker_config` beside the talker / speech-decoder configs; weights
    prefixed `thinker.`, `talker.`, ... Only the thinker config is used to build the model, so
    nothing else is constructed, and only `thinker.*` weights are read (the family's key mapping,
    or transformers' own conversion, turns the published names into the thinker class's).
    No `"hidden_size"` edit of config.json is needed: nothing here reads the top-level hidden size.
(b) a thinker-only directory (`qwen2_5_omni_thinker`, `qwen3_omni_moe_thinker`), which our trainer
    writes and plain transformers' `<Thinker class>.from_pretrained` loads.

Weights are read from safetensors only: a pickle weight file (`pytorch_model.bin`, `*.pt`) where
weights are expected is refused, since unpickling can run code. Checked at load, each as one line
naming the file: the model_type (the supported families are named), missing weight files or
thinker weights, and the tokenizer's media token ids against the config's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from echoink.hub_ids import hub_id_hint, looks_like_hub_id
from echoink.io import read_object_file
from echoink.model.families import OmniFamily, UnsupportedModelError, family_for_model_type
from echoink.model.processor import load_processor
from echoink.model.saving import quiet_transformers

DTYPES = {"auto": "auto", "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
          "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}
PICKLE_WEIGHT_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
#: Pickle files of a published full layout that are not weights (Qwen2.5-Omni's talker speakers): never read
#: by echoink, and no reason to call the directory a pickle checkpoint.
NOT_WEIGHT_FILES = ("spk_dict.pt",)
#: (tokenizer attribute, config attribute) pairs that must name the same token id.
MEDIA_TOKEN_PAIRS = (("audio_token", "audio_token_id"), ("image_token", "image_token_id"),
                     ("video_token", "video_token_id"))


class ModelLoadError(ValueError):
    """A model directory that cannot be loaded; the message is one line naming what and where."""


def read_checkpoint(path: str | Path) -> tuple[OmniFamily, object, bool]:
    """-> (family, thinker config, is_full_layout) of a checkpoint directory; checks the directory and weights."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(hub_id_hint(path, "model") if looks_like_hub_id(path)
                             else f"{path}: model directory does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"{path}: not a directory (expected a model directory with config.json)")
    config_file = path / "config.json"
    raw = read_object_file(config_file, ModelLoadError, missing="missing (not a model directory)")
    try:
        family, full = family_for_model_type(raw.get("model_type"), str(config_file))
    except UnsupportedModelError as exc:
        raise ModelLoadError(str(exc)) from None
    try:
        if full:
            if not isinstance(raw.get("thinker_config"), dict):
                raise ModelLoadError(f"{config_file}: model_type {family.full_model_type} but no thinker_config")
            config = family.thinker_config_from_full(raw)
        else:
            config = family.thinker_config_class.from_pretrained(str(path))
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ModelLoadError):
            raise
        raise ModelLoadError(f"{config_file}: bad thinker config: {str(exc).splitlines()[0]}") from None
    _check_weights(path, full)
    return family, config, full


def _check_weights(path: Path, full: bool) -> None:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise ModelLoadError(f"{index}: not a valid safetensors index (JSON with a weight_map)") from None
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise ModelLoadError(f"{path}: weight files listed in {index.name} are missing: {', '.join(missing)}")
        if full and not any(key.startswith("thinker.") for key in weight_map):
            raise ModelLoadError(f"{index}: no thinker weights (no key starts with 'thinker.'); "
                                 "this is not a full checkpoint of the thinker")
        return
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(f.name for pattern in PICKLE_WEIGHT_PATTERNS for f in path.glob(pattern)
                     if f.name not in NOT_WEIGHT_FILES)
    if pickles:
        raise ModelLoadError(f"{path / pickles[0]}: pickle weight files are not loaded (unpickling can run code); "
                             "convert the weights to safetensors (model.save_pretrained(..., safe_serialization=True))")
    raise ModelLoadError(f"{path}: no weight files (*.safetensors or model.safetensors.index.json)")


def load_thinker(path: str | Path, dtype: str = "auto", attn_implementation: str | None = None):
    """Load the thinker and its processor from `path` (published full layout or thinker-only, any family).

    dtype: "auto" (the checkpoint's dtype), "bfloat16" or "float32".
    attn_implementation: e.g. "sdpa", "eager", "flash_attention_2"; None lets transformers choose.
    Returns (thinker, processor); raises ModelLoadError with a one-line message for a bad directory.
    """
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    path = Path(path)
    family, config, full = read_checkpoint(path)
    kwargs = {"config": config, "dtype": DTYPES[dtype], "use_safetensors": True, "output_loading_info": True}
    if full and family.full_key_mapping:
        kwargs["key_mapping"] = family.full_key_mapping
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with quiet_transformers():
        try:
            model, info = family.thinker_class.from_pretrained(str(path), **kwargs)
        except OSError as exc:
            raise ModelLoadError(f"{path}: cannot read weights: {str(exc).splitlines()[0]}") from None
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            raise ModelLoadError(f"{path}: {len(missing)} thinker weight(s) missing from the checkpoint, e.g. "
                                 f"{', '.join(missing[:3])}")
        try:
            processor = load_processor(path, family.processor_class)
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"{path}: cannot load processor files: {str(exc).splitlines()[0]}") from None
    _check_media_token_ids(path, processor.tokenizer, model.config)
    eos_id = getattr(config, "eos_token_id", None)
    if eos_id is not None:
        model.generation_config.eos_token_id = eos_id
    if processor.tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model.eval(), processor


def _check_media_token_ids(path: Path, tokenizer, config) -> None:
    """The tokenizer's placeholder tokens must have the ids the model's config expects (else features land elsewhere)."""
    for token_attr, config_attr in MEDIA_TOKEN_PAIRS:
        token = getattr(tokenizer, token_attr, None)
        expected = getattr(config, config_attr, None)
        if token is None or expected is None:
            continue
        actual = tokenizer.convert_tokens_to_ids(token)
        if actual != expected:
            raise ModelLoadError(
                f"{path}: the tokenizer gives {token} id {actual} but config.json's {config_attr} is {expected} "
                "(tokenizer files and config.json come from different models)")
