"""Qwen2.5-Omni (7B / 3B): a dense thinker with an audio (Whisper-style) and a vision encoder.

Published layout: config.json `model_type: qwen2_5_omni` with `thinker_config`, `talker_config`,
`token2wav_config`; weights prefixed `thinker.` / `talker.` / `token2wav.`. transformers' key
conversion for `Qwen2_5OmniThinkerForConditionalGeneration` strips the `thinker.` prefix and maps
the published names (`thinker.model.*` -> `model.language_model.*`, ...). Our trainer saves the
thinker-only layout (`qwen2_5_omni_thinker`). Vision patches are 14 px (merge unit 28 px).
The forward is `QwenThinker`'s; the tiny offline checkpoint is `echoink.model.tiny`.
"""

from __future__ import annotations

from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

from echoink.model.families.qwen_thinker import QwenThinker
from echoink.model.processor import OmniProcessor


class Qwen2_5Omni(QwenThinker):
    name = "qwen2.5-omni"
    display_name = "Qwen2.5-Omni"
    full_model_type = "qwen2_5_omni"
    thinker_model_type = "qwen2_5_omni_thinker"
    thinker_config_class = Qwen2_5OmniThinkerConfig
    thinker_class = Qwen2_5OmniThinkerForConditionalGeneration
    processor_class = OmniProcessor
    other_parts = ("talker", "token2wav")
    vision_patch_size = 14
    supports_group_sharing = True
    lora_linears = {
        "language_model": r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
        "vision": r".*visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(gate_proj|up_proj|down_proj))",
        "audio": r".*audio_tower\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|fc1|fc2)",
    }


FAMILY = Qwen2_5Omni()
