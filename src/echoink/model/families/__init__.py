"""Model families: what differs between omni model families, behind one small interface.

A family is chosen from a checkpoint's `config.json` `model_type` (the published full layout's or
our thinker-only one). Everything family-specific lives in one module per family:

    qwen2_5_omni.py   Qwen2.5-Omni (dense thinker)          model_type qwen2_5_omni / qwen2_5_omni_thinker
    qwen3_omni.py     Qwen3-Omni-30B-A3B (MoE thinker)      model_type qwen3_omni_moe / qwen3_omni_moe_thinker

Code outside these modules asks the family (`family_of_config`, `family_of_model`, `family_by_name`)
and never tests `model_type` strings. A third family is one new module added to `FAMILIES`.

What a family says (`OmniFamily`):

* identity: `name` (the CLI's `--family`), `full_model_type`, `thinker_model_type`
* classes: `thinker_config_class`, `thinker_class`, `processor_class`
* the published full layout: `other_parts` (configs/weight prefixes besides the thinker that are
  never built or read), `full_key_mapping` (published weight names -> our thinker's names)
* media: `vision_patch_size` (the image merge unit is 2 x that in pixels)
* group sharing: `supports_group_sharing` (whether the shared paths are exact for it, tested), `deepstack`
  (the vision encoder also hands per-layer features to the first language-model layers; the shared
  paths pass them on: `prompt_embedding.Deepstack`)
* training: `lora_linears` (LoRA target patterns by part), `mixture_of_experts`
* `write_tiny` (the offline tiny checkpoint of this family)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn


class UnsupportedModelError(ValueError):
    """A checkpoint whose model_type no family knows, or a feature a family does not support (one line)."""


class OmniFamily:
    """One omni model family (see module docstring). Subclasses set the class attributes."""

    name: str
    display_name: str
    full_model_type: str
    thinker_model_type: str
    thinker_config_class: type
    thinker_class: type
    processor_class: type
    other_parts: tuple[str, ...]
    full_key_mapping: dict[str, str] | None = None
    vision_patch_size: int
    supports_group_sharing: bool = True
    deepstack: bool = False
    mixture_of_experts: bool = False
    #: LoRA target patterns (regexes over module names) for "language_model", "vision", "audio".
    lora_linears: dict[str, str]
    #: LoRA on the language model's experts (None: not offered for this family).
    lora_expert_parameters: tuple[str, ...] | None = None

    def thinker_config_from_full(self, raw: dict[str, Any]):
        """The thinker config inside a published full-layout config.json (`raw` is its JSON)."""
        thinker = dict(raw["thinker_config"])
        thinker.pop("model_type", None)
        return self.thinker_config_class(**thinker)

    def write_tiny(self, out_dir: Path, layout: str, seed: int, size: str) -> Path:
        raise NotImplementedError

    def require_group_sharing(self, sharing: str) -> None:
        """Refuse a `group_sharing` other than "none" for a family whose shared paths are not exact (yet)."""
        if sharing != "none" and not self.supports_group_sharing:
            raise UnsupportedModelError(
                f"group_sharing: {sharing} is not supported for {self.display_name} (the shared paths are not "
                "exact for this family); set group_sharing: none")

    def router_aux_loss(self, model, router_logits, attention_mask=None):
        """The MoE router's load-balancing loss from a forward's router logits (MoE families only)."""
        raise UnsupportedModelError(f"{self.display_name} has no mixture-of-experts router")


def _families() -> tuple[OmniFamily, ...]:
    from echoink.model.families.qwen2_5_omni import FAMILY as QWEN2_5_OMNI
    from echoink.model.families.qwen3_omni import FAMILY as QWEN3_OMNI

    return (QWEN2_5_OMNI, QWEN3_OMNI)


FAMILIES: tuple[OmniFamily, ...] = _families()
DEFAULT_FAMILY = FAMILIES[0]
FAMILY_NAMES = tuple(f.name for f in FAMILIES)


def family_by_name(name: str) -> OmniFamily:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise UnsupportedModelError(f"unknown model family {name!r} (expected one of {', '.join(FAMILY_NAMES)})")


def family_for_model_type(model_type: Any, source: str = "config.json") -> tuple[OmniFamily, bool]:
    """-> (family, is_full_layout) for a config.json `model_type`; one-line error naming the supported ones."""
    for family in FAMILIES:
        if model_type == family.full_model_type:
            return family, True
        if model_type == family.thinker_model_type:
            return family, False
    supported = ", ".join(f"{f.display_name} ({f.full_model_type!r} or {f.thinker_model_type!r})" for f in FAMILIES)
    raise UnsupportedModelError(f"{source}: unsupported model_type {model_type!r} (supported families: {supported})")


def family_of_model(model: nn.Module) -> OmniFamily:
    """The family of a loaded thinker (also under a PEFT wrapper)."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    for family in FAMILIES:
        if isinstance(base, family.thinker_class):
            return family
    raise UnsupportedModelError(f"{type(base).__name__} is not the thinker of a supported family "
                                f"({', '.join(FAMILY_NAMES)})")


def read_model_type(path: str | Path) -> tuple[OmniFamily, bool, dict]:
    """Family, full-layout flag and JSON of `path`/config.json (the directory's checks are the caller's)."""
    config_file = Path(path) / "config.json"
    raw = json.loads(config_file.read_text(encoding="utf-8"))
    family, full = family_for_model_type(raw.get("model_type") if isinstance(raw, dict) else None, str(config_file))
    return family, full, raw


def write_tiny_checkpoint(out_dir: str | Path, family: str = DEFAULT_FAMILY.name, layout: str = "thinker",
                          seed: int = 0, size: str = "tiny") -> Path:
    """A tiny random checkpoint of the named family (`echoink model tiny --family ...`)."""
    if layout not in ("full", "thinker"):
        raise ValueError(f"layout must be 'full' or 'thinker', got {layout!r}")
    return family_by_name(family).write_tiny(Path(out_dir), layout, seed, size)


__all__ = ["FAMILIES", "FAMILY_NAMES", "DEFAULT_FAMILY", "OmniFamily", "UnsupportedModelError", "family_by_name",
           "family_for_model_type", "family_of_model", "read_model_type", "write_tiny_checkpoint"]
