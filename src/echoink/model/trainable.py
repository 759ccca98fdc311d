"""What trains: freezing switches for the encoders, LoRA adapters (wrap and merge)."""

from __future__ import annotations

import re

from torch import nn

from echoink.model.families import UnsupportedModelError, family_of_model

#: The words `lora_target_modules` may use instead of module-name suffixes.
LORA_TARGET_WORDS = ("language_model", "vision", "audio", "experts")


def apply_freezing(thinker: nn.Module, freeze_vision: bool, freeze_audio: bool) -> None:
    """Freeze encoders; frozen encoders then run without building a graph (no parameter needs grad)."""
    if freeze_vision:
        thinker.model.visual.requires_grad_(False)
    if freeze_audio:
        thinker.model.audio_tower.requires_grad_(False)


def lora_targets(thinker: nn.Module, targets: list | None) -> tuple[list[str], list[str]]:
    """-> (peft `target_modules`, peft `target_parameters`) for `lora_target_modules` on this thinker's family.

    None: the family's default — the language model's linear layers (Qwen2.5-Omni: attention and MLP;
    Qwen3-Omni: attention only, its experts being fused 3-D parameters). The words "language_model",
    "vision", "audio" pick the family's linear layers of those parts; "experts" adds the MoE experts'
    fused parameters through PEFT's parameter targeting (merged like any LoRA). Anything else is a
    list of module-name suffixes, passed to PEFT as is.

    The family's patterns are resolved here to the full names of the modules they match: PEFT rewrites
    a regex into bare leaf names for MoE models (to map transformers 4 expert names), which would also
    catch the encoders' `q_proj`/`k_proj`/`v_proj`.
    """
    family = family_of_model(thinker)
    if targets and not set(targets) <= set(LORA_TARGET_WORDS):
        return list(targets), []
    words = targets or ["language_model"]
    patterns = [re.compile(family.lora_linears[word]) for word in ("language_model", "vision", "audio") if word in words]
    modules = [name for name, _ in thinker.named_modules() if any(p.fullmatch(name) for p in patterns)]
    parameters: list[str] = []
    if "experts" in words:
        if family.lora_expert_parameters is None:
            raise UnsupportedModelError(f"lora_target_modules: {family.display_name} has no mixture-of-experts "
                                        "layers (drop 'experts')")
        parameters = list(family.lora_expert_parameters)
    return modules, parameters


def wrap_lora(thinker: nn.Module, config):
    """Inject LoRA adapters (peft) into `thinker` in place; returns the PeftModel.

    Targets: `lora_target_modules` (see `lora_targets`), else the family's default.
    """
    from peft import LoraConfig, get_peft_model

    target_modules, target_parameters = lora_targets(thinker, config.lora_target_modules)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=target_modules, target_parameters=target_parameters or None, bias="none")
    return get_peft_model(thinker, lora)


def merge_adapter(model_path, adapter_dir, out_dir):
    """Base thinker from `model_path` + the LoRA adapter in `adapter_dir`, merged, saved to `out_dir`
    as a thinker-only checkpoint (load_thinker reads it). Works whatever sharding trained the adapter:
    LoRA leaves the base weights untouched, so the base is read back from disk."""
    from peft import PeftModel

    from echoink.model import load_thinker, save_thinker

    base, processor = load_thinker(model_path, dtype="auto")
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return save_thinker(merged, processor, out_dir)
