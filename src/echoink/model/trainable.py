"""What trains: freezing switches for the encoders, LoRA adapters (wrap and merge)."""

from __future__ import annotations

from torch import nn

# The language model's linear layers (the default LoRA targets).
LANGUAGE_MODEL_LINEARS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
ENCODER_LINEARS = {
    "vision": r"|.*visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(gate_proj|up_proj|down_proj))",
    "audio": r"|.*audio_tower\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|fc1|fc2)",
}


def apply_freezing(thinker: nn.Module, freeze_vision: bool, freeze_audio: bool) -> None:
    """Freeze encoders; frozen encoders then run without building a graph (no parameter needs grad)."""
    if freeze_vision:
        thinker.model.visual.requires_grad_(False)
    if freeze_audio:
        thinker.model.audio_tower.requires_grad_(False)


def wrap_lora(thinker: nn.Module, config):
    """Inject LoRA adapters (peft) into `thinker` in place; returns the PeftModel.

    Targets: `lora_target_modules` if set — a list of module-name suffixes, or the words
    "language_model", "vision", "audio" — else the language model's linear layers.
    """
    from peft import LoraConfig, get_peft_model

    targets = config.lora_target_modules
    if not targets:
        target_modules = LANGUAGE_MODEL_LINEARS
    elif set(targets) <= {"language_model", "vision", "audio"}:
        target_modules = LANGUAGE_MODEL_LINEARS if "language_model" in targets else r"(?!)"
        for name in ("vision", "audio"):
            if name in targets:
                target_modules += ENCODER_LINEARS[name]
    else:
        target_modules = list(targets)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=target_modules, bias="none")
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
