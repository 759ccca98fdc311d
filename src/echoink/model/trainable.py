"""What trains: freezing switches for the encoders, LoRA adapters (wrap and merge), and the family's
training settings (`prepare_for_training`: unsupported group sharing refused, the MoE router's
auxiliary-loss weight)."""

from __future__ import annotations

import re

from torch import nn

from echoink.model.families import UnsupportedModelError, family_of_model

#: The words `lora_target_modules` may use instead of module-name suffixes.
LORA_TARGET_WORDS = ("language_model", "vision", "audio", "experts")


#: Attribute of a thinker holding the weight of its router's auxiliary loss in each policy forward (0: off).
ROUTER_AUX_LOSS_WEIGHT = "echoink_router_aux_loss_weight"
#: Attribute of a thinker holding the router aux-loss values of the policy forwards since the last log.
ROUTER_AUX_LOSS_VALUES = "echoink_router_aux_loss_values"


def prepare_for_training(thinker: nn.Module, config) -> None:
    """Family checks and settings for a training run, before any work starts.

    Refuses a `group_sharing` the family does not support yet; sets the weight of the MoE router's
    load-balancing loss (`router_aux_loss_coef`, refused for a dense model). The weight is
    coef / gradient_accumulation_steps per policy forward, so that each update minimises
    policy loss + coef x (mean aux loss over its micro-batches), the policy loss being averaged too.
    """
    check_family_settings(family_of_model(thinker), config)
    coef = float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
    setattr(thinker, ROUTER_AUX_LOSS_WEIGHT, coef / config.gradient_accumulation_steps)


def check_family_settings(family, config) -> None:
    """The settings a model family cannot honour, refused from its config.json alone (train, before the model
    loads, and `train --dry-run`): group sharing, the router aux loss, LoRA on the experts."""
    family.require_group_sharing(config.group_sharing)
    coef = float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
    if coef > 0 and not family.mixture_of_experts:
        raise UnsupportedModelError(f"router_aux_loss_coef={coef}: {family.display_name} has no mixture-of-experts "
                                    "router; set router_aux_loss_coef: 0")
    if getattr(config, "use_peft", False) and "experts" in (getattr(config, "lora_target_modules", None) or []):
        if family.lora_expert_parameters is None:
            raise UnsupportedModelError(f"lora_target_modules: {family.display_name} has no mixture-of-experts "
                                        "layers (drop 'experts')")
        if config.lora_dropout:
            raise UnsupportedModelError(f"lora_target_modules with 'experts': PEFT's LoRA on the fused expert "
                                        f"parameters has no dropout; set lora_dropout: 0 (got {config.lora_dropout})")


def router_aux_loss_weight(thinker: nn.Module) -> float:
    """The router aux-loss weight set by `prepare_for_training` (0 when unset: never outside training)."""
    return float(getattr(thinker, ROUTER_AUX_LOSS_WEIGHT, 0.0))


def record_router_aux_loss(thinker: nn.Module, value: float) -> None:
    """Keep one policy forward's router aux-loss value until the step's metrics take it."""
    vars(thinker).setdefault(ROUTER_AUX_LOSS_VALUES, []).append(value)


def router_aux_loss_metrics(thinker: nn.Module) -> dict[str, float]:
    """{"router_aux_loss": mean of the values recorded since the last call} ({} when it is off); clears them."""
    values = vars(thinker).pop(ROUTER_AUX_LOSS_VALUES, [])
    return {"router_aux_loss": sum(values) / len(values)} if values else {}


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
    try:
        return get_peft_model(thinker, lora)
    except (ValueError, TypeError, KeyError) as exc:  # PEFT's message may dump every module name: one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UnsupportedModelError(f"LoRA with lora_target_modules={config.lora_target_modules}, lora_dropout="
                                    f"{config.lora_dropout}: PEFT refused it: {first[:300]}") from None


def merge_adapter(model_path, adapter_dir, out_dir):
    """Base thinker from `model_path` + the LoRA adapter in `adapter_dir`, merged, saved to `out_dir`
    as a thinker-only checkpoint (load_thinker reads it). Works whatever sharding trained the adapter:
    LoRA leaves the base weights untouched, so the base is read back from disk."""
    from peft import PeftModel

    from echoink.model import load_thinker, save_thinker

    base, processor = load_thinker(model_path, dtype="auto")
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return save_thinker(merged, processor, out_dir)
