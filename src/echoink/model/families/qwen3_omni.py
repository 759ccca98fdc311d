"""Qwen3-Omni-30B-A3B (Instruct, Thinking): a mixture-of-experts thinker with deepstack vision.

Published layout: config.json `model_type: qwen3_omni_moe` with `thinker_config`, `talker_config`,
`code2wav_config` (a variant may ship no talker); weights prefixed `thinker.` / `talker.` /
`code2wav.`, the thinker's in the names Qwen2.5-Omni uses (`thinker.model.*` for the text model,
`thinker.audio_tower.*`, `thinker.visual.*`, `thinker.lm_head.*`) and one tensor per expert
(`...mlp.experts.<e>.gate_proj.weight`). transformers 5 has no prefix conversion for this thinker
class, so `full_key_mapping` renames the published names to the class's own (`model.language_model.*`
...), and its MoE conversion fuses the per-expert tensors into the 3-D `gate_up_proj` / `down_proj`
parameters. Our trainer saves the thinker-only layout (`qwen3_omni_moe_thinker`), which plain
`Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained` loads.

Differences from Qwen2.5-Omni that the rest of echoink meets through this module:

* the language model is a mixture of experts (top-k router, no capacity limit, no token dropping);
  its experts are fused 3-D parameters, not `nn.Linear`: LoRA targets the attention projections
  by default (`lora_linears`); the experts only through PEFT's parameter targeting (see
  `lora_expert_parameters` and docs/qwen3_omni.md);
* vision patches are 16 px (merge unit 32 px) and the vision encoder hands per-layer "deepstack"
  features to the first language-model layers at the visual positions: the group-sharing paths,
  which call the language model directly, pass them on (`qwen_thinker.Deepstack`: with the
  prompt, tiled G ways on the "encoders" path; in the prompt pass, whose K/V then carry them, on
  the "full" path and in rollouts), exact like Qwen2.5-Omni's (tests/test_families.py);
* audio: 13 tokens per 100 feature frames (1 s), so 3 s of audio gives 39 tokens (Qwen2.5: 75);
  positions are floats and audio-only prompts get sequential positions.
"""

from __future__ import annotations

from transformers import Qwen3OmniMoeProcessor, Qwen3OmniMoeThinkerConfig, Qwen3OmniMoeThinkerForConditionalGeneration
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import load_balancing_loss_func

from echoink.model.families.qwen_thinker import QwenThinker
from echoink.model.processor import NumpyVideoProcessing


class Qwen3OmniProcessor(NumpyVideoProcessing, Qwen3OmniMoeProcessor):
    """`Qwen3OmniMoeProcessor` whose video processor is `NumpyQwenVideoProcessor`."""

    published_class_name = "Qwen3OmniMoeProcessor"


class Qwen3Omni(QwenThinker):
    name = "qwen3-omni"
    display_name = "Qwen3-Omni"
    full_model_type = "qwen3_omni_moe"
    thinker_model_type = "qwen3_omni_moe_thinker"
    thinker_config_class = Qwen3OmniMoeThinkerConfig
    thinker_class = Qwen3OmniMoeThinkerForConditionalGeneration
    processor_class = Qwen3OmniProcessor
    other_parts = ("talker", "code2wav")
    # published thinker names -> Qwen3OmniMoeThinkerForConditionalGeneration's (regexes, applied in order)
    full_key_mapping = {
        r"^thinker\.model\.": "model.language_model.",
        r"^thinker\.audio_tower\.": "model.audio_tower.",
        r"^thinker\.visual\.": "model.visual.",
        r"^thinker\.lm_head\.": "lm_head.",
    }
    vision_patch_size = 16
    supports_group_sharing = True  # the shared paths carry the deepstack features
    deepstack = True
    mixture_of_experts = True
    lora_linears = {
        # attention only: the experts are fused 3-D parameters; the router stays as trained
        "language_model": r".*language_model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj",
        "vision": r".*visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(linear_fc1|linear_fc2))",
        "audio": r".*audio_tower\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|fc1|fc2)",
    }
    lora_expert_parameters = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")

    def thinker_config_from_full(self, raw):
        config = super().thinker_config_from_full(raw)
        _require_vision_start(config)
        return config

    def router_aux_loss(self, model, router_logits, attention_mask=None):
        """Switch-Transformer load-balancing loss over the layers' router logits (transformers' function):

            aux = E * sum_e f_e * P_e,  f_e = share of top-k assignments to expert e,
                                        P_e = mean router probability of expert e (over real tokens).
        """
        text = model.config.text_config
        return load_balancing_loss_func(tuple(router_logits), text.num_experts, text.num_experts_per_tok,
                                        attention_mask)


def _require_vision_start(config) -> None:
    """`get_rope_index` reads `vision_start_token_id`, which the thinker config class has no default for."""
    if getattr(config, "vision_start_token_id", None) is None:
        raise ValueError("thinker_config has no vision_start_token_id (the published config sets it; "
                         "the 3-D positions of images and videos need it)")


FAMILY = Qwen3Omni()
