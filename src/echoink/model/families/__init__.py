"""Model families: what differs between omni model families, behind one interface (`OmniFamily`,
families/base.py, which lists every method).

A family is chosen from a checkpoint's `config.json` `model_type` (the published full layout's or
our thinker-only one). Everything family-specific lives in one module per family:

    qwen2_5_omni.py   Qwen2.5-Omni (dense thinker)          model_type qwen2_5_omni / qwen2_5_omni_thinker
    qwen3_omni.py     Qwen3-Omni-30B-A3B (MoE thinker)      model_type qwen3_omni_moe / qwen3_omni_moe_thinker
    qwen_thinker.py   the forward both share (Qwen-shaped thinkers: embeddings, M-RoPE, deepstack, generate)

Code outside these modules asks the family (`family_for_model_type`, `family_of_model`, `family_by_name`)
and never tests `model_type` strings or names a thinker attribute. A third family is one new module
(a subclass of `OmniFamily`, or of `QwenThinker` for a Qwen-shaped thinker) added to `FAMILIES`, plus
its tiny builder in `echoink.model.tiny_families`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from echoink.model.families.base import DecoderOutput, EmbeddedPrompt, OmniFamily, UnsupportedModelError
from echoink.model.families.qwen2_5_omni import FAMILY as QWEN2_5_OMNI
from echoink.model.families.qwen3_omni import FAMILY as QWEN3_OMNI

FAMILIES: tuple[OmniFamily, ...] = (QWEN2_5_OMNI, QWEN3_OMNI)
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


__all__ = ["FAMILIES", "FAMILY_NAMES", "DEFAULT_FAMILY", "DecoderOutput", "EmbeddedPrompt", "OmniFamily",
           "UnsupportedModelError", "family_by_name", "family_for_model_type", "family_of_model"]
