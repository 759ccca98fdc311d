"""A tiny random-initialised Qwen3-Omni checkpoint, built offline (picked by `echoink.model.tiny_families`).

The real architecture class (`Qwen3OmniMoeThinkerForConditionalGeneration`): a mixture-of-experts text
model (8 experts, top-2 routing), a vision encoder of depth 2 with a deepstack merger at layer 0,
a 1-layer audio encoder; Qwen3-Omni's special tokens with compact ids (after the tiny BPE
vocabulary, in the published order), a Qwen3-Omni-style chat template and the file layouts:

    layout "full"     config.json with model_type qwen3_omni_moe (thinker + talker + code2wav configs),
                      weights prefixed `thinker.` / `talker.` / `code2wav.` in the published naming
                      (text model as `thinker.model.*`, one tensor per expert)
    layout "thinker"  config.json with model_type qwen3_omni_moe_thinker, what our trainer saves

Sizes: "tiny" (tests, demo) and "bench" (the group-sharing benchmark's shape).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import WhisperFeatureExtractor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from echoink.io import building_directory
from echoink.model.families.qwen3_omni import FAMILY, Qwen3OmniProcessor
from echoink.model.processor import save_processor
from echoink.model.saving import save_thinker
from echoink.model.tiny import TinySpec, build_tokenizer, write_published_shards
from echoink.model.video_processor import NumpyQwenVideoProcessor

# Qwen3-Omni's special tokens in the published order (151643 <|endoftext|> ... 151675 <|audio_pad|> there,
# tool-call and fill-in-the-middle tokens left out); here their ids follow the tiny BPE vocabulary.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<|audio_start|>", "<|audio_end|>", "<tts_pad>", "<tts_text_bos>",
    "<tts_text_eod>", "<tts_text_bos_single>", "<|audio_pad|>",
]
# Qwen3's reasoning tags are added tokens that are NOT special: decoding with skip_special_tokens keeps them.
THINK_TOKENS = ("<think>", "</think>")
NAMED_SPECIAL_TOKENS = {
    "image_token": "<|image_pad|>",
    "audio_token": "<|audio_pad|>",
    "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
    "audio_bos_token": "<|audio_start|>",
    "audio_eos_token": "<|audio_end|>",
}
VISION = "<|vision_start|>{}<|vision_end|>"
AUDIO = "<|audio_start|><|audio_pad|><|audio_end|>"


def chat_template(generation_prefix: str = "") -> str:
    """Qwen3-Omni-style rendering: the system turn only when given, each media part as its placeholder
    between boundary tokens. `generation_prefix` is what the template writes after the assistant
    header (the Thinking variant's style pre-inserts an opening `<think>`; tests use this)."""
    return (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' or 'image' in part -%}{{- '" + VISION.format("<|image_pad|>") + "' -}}"
        "{%- elif part['type'] == 'audio' or 'audio' in part -%}{{- '" + AUDIO + "' -}}"
        "{%- elif part['type'] == 'video' or 'video' in part -%}{{- '" + VISION.format("<|video_pad|>") + "' -}}"
        "{%- elif 'text' in part -%}{{- part['text'] -}}"
        "{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{- '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n" + generation_prefix.replace("\n", "\\n")
        + "' -}}{%- endif -%}"
    )


@dataclass(frozen=True)
class TinyQwen3Spec(TinySpec):
    """A tiny thinker's shape (`TinySpec`) plus the mixture of experts and the deepstack layers."""

    vision_layers: int = 2
    moe_intermediate: int = 64
    experts: int = 8
    experts_per_token: int = 2
    deepstack_layers: tuple[int, ...] = (0,)


SPECS = {
    "tiny": TinyQwen3Spec(),
    "bench": TinyQwen3Spec(text_hidden=512, text_layers=4, text_heads=8, text_kv_heads=2, text_intermediate=1024,
                           moe_intermediate=256, experts=16, audio_d_model=128, audio_layers=4, audio_heads=4,
                           vision_hidden=128, vision_layers=4, vision_heads=4, deepstack_layers=(1,)),
}


def build_processor(spec: TinyQwen3Spec = SPECS["tiny"], generation_prefix: str = "") -> Qwen3OmniProcessor:
    template = chat_template(generation_prefix)
    tokenizer = build_tokenizer(spec.bpe_vocab, SPECIAL_TOKENS, NAMED_SPECIAL_TOKENS, template, THINK_TOKENS)
    feature_extractor = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160,
                                                chunk_length=30, n_fft=400, return_attention_mask=True)
    unit = 2 * FAMILY.vision_patch_size  # 32 px
    image_processor = Qwen2VLImageProcessorPil(patch_size=FAMILY.vision_patch_size, merge_size=2,
                                               min_pixels=4 * unit * unit, max_pixels=256 * unit * unit)
    video_processor = NumpyQwenVideoProcessor(patch_size=FAMILY.vision_patch_size, merge_size=2,
                                              min_pixels=4 * unit * unit, max_pixels=128 * unit * unit)
    return Qwen3OmniProcessor(image_processor=image_processor, video_processor=video_processor,
                              feature_extractor=feature_extractor, tokenizer=tokenizer, chat_template=template)


def thinker_config(tokenizer, spec: TinyQwen3Spec = SPECS["tiny"]):
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    vocab_size = -(-len(tokenizer) // 64) * 64
    head_dim = spec.text_hidden // spec.text_heads
    half = head_dim // 2  # mrope_section (t, h, w) sums to head_dim / 2; published split 24/20/20 of 64
    mrope = [half - 2 * (half * 5 // 16), half * 5 // 16, half * 5 // 16]
    return FAMILY.thinker_config_class(
        audio_config={
            "num_mel_bins": 128, "encoder_layers": spec.audio_layers, "encoder_attention_heads": spec.audio_heads,
            "encoder_ffn_dim": 2 * spec.audio_d_model, "d_model": spec.audio_d_model, "output_dim": spec.text_hidden,
            "max_source_positions": 1500, "n_window": 50, "n_window_infer": 800, "conv_chunksize": 500,
            "downsample_hidden_size": 32,
        },
        vision_config={
            "depth": spec.vision_layers, "hidden_size": spec.vision_hidden, "num_heads": spec.vision_heads,
            "intermediate_size": 2 * spec.vision_hidden, "out_hidden_size": spec.text_hidden,
            "patch_size": FAMILY.vision_patch_size, "spatial_merge_size": 2, "temporal_patch_size": 2,
            "num_position_embeddings": 256, "deepstack_visual_indexes": list(spec.deepstack_layers),
            "in_channels": 3,
        },
        text_config={
            "vocab_size": vocab_size, "hidden_size": spec.text_hidden, "intermediate_size": spec.text_intermediate,
            "num_hidden_layers": spec.text_layers, "num_attention_heads": spec.text_heads,
            "num_key_value_heads": spec.text_kv_heads, "head_dim": head_dim, "max_position_embeddings": 32768,
            "moe_intermediate_size": spec.moe_intermediate, "num_experts": spec.experts,
            "num_experts_per_tok": spec.experts_per_token, "decoder_sparse_step": 1, "norm_topk_prob": True,
            "router_aux_loss_coef": 0.001, "output_router_logits": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope,
                                "interleaved": True, "mrope_interleaved": True},
            "tie_word_embeddings": False, "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
        },
        audio_token_id=ids["<|audio_pad|>"], image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        audio_start_token_id=ids["<|audio_start|>"], audio_end_token_id=ids["<|audio_end|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        user_token_id=tokenizer.convert_tokens_to_ids("user") if "user" in tokenizer.get_vocab() else 0,
        position_id_per_seconds=13, seconds_per_chunk=2,
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False,
    )


def build_tiny_thinker(spec: TinyQwen3Spec = SPECS["tiny"], seed: int = 0, generation_prefix: str = ""):
    """-> (random-initialised Qwen3-Omni thinker in fp32, processor)."""
    processor = build_processor(spec, generation_prefix)
    config = thinker_config(processor.tokenizer, spec)
    torch.manual_seed(seed)
    model = FAMILY.thinker_class(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    return model.eval(), processor


def write_tiny_checkpoint(out_dir: str | Path, layout: str = "thinker", seed: int = 0, size: str = "tiny",
                          generation_prefix: str = "") -> Path:
    """Write a tiny Qwen3-Omni checkpoint + processor files to `out_dir` in the given layout."""
    if layout not in ("full", "thinker"):
        raise ValueError(f"layout must be 'full' or 'thinker', got {layout!r}")
    if size not in SPECS:
        raise ValueError(f"size must be one of {sorted(SPECS)}, got {size!r}")
    out_dir = Path(out_dir)
    model, processor = build_tiny_thinker(SPECS[size], seed, generation_prefix)
    if layout == "thinker":
        save_thinker(model, processor, out_dir)
        return out_dir
    with building_directory(out_dir) as tmp:
        save_processor(processor, tmp)
        _write_full_layout(model, tmp, seed)
    return out_dir


def _published_name(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our thinker's parameter -> its published name(s): prefixes as Qwen2.5-Omni's, one tensor per expert."""
    published = FAMILY.published_thinker_name(name)
    if published.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, H] -> per expert gate [I, H] and up [I, H]
        stem = published[: -len("gate_up_proj")]
        gate, up = tensor.chunk(2, dim=1)
        return {**{f"{stem}{e}.gate_proj.weight": gate[e].contiguous() for e in range(tensor.shape[0])},
                **{f"{stem}{e}.up_proj.weight": up[e].contiguous() for e in range(tensor.shape[0])}}
    if published.endswith("mlp.experts.down_proj"):  # [E, H, I] -> per expert [H, I]
        stem = published[: -len("down_proj")]
        return {f"{stem}{e}.down_proj.weight": tensor[e].contiguous() for e in range(tensor.shape[0])}
    return {published: tensor.contiguous()}


def _write_full_layout(model, out_dir: Path, seed: int) -> None:
    """The published Qwen3-Omni layout: one config for thinker/talker/code2wav, prefixed weights in two shards.

    The talker and code2wav weights are small random stand-ins that the loader must skip.
    """
    thinker_cfg = model.config.to_dict()
    config = {
        "architectures": ["Qwen3OmniMoeForConditionalGeneration"],
        "model_type": FAMILY.full_model_type,
        "enable_audio_output": True,
        "thinker_config": thinker_cfg,
        "talker_config": {"model_type": "qwen3_omni_moe_talker", "thinker_hidden_size": thinker_cfg["text_config"]["hidden_size"]},
        "code2wav_config": {"model_type": "qwen3_omni_moe_code2wav"},
        "dtype": "float32",
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        tensors.update(_published_name(name, tensor))
    generator = torch.Generator().manual_seed(seed)
    tensors["talker.model.codec_embedding.weight"] = torch.randn(64, 32, generator=generator)
    tensors["talker.codec_head.weight"] = torch.randn(64, 32, generator=generator)
    tensors["code2wav.pre_transformer.layers.0.mlp.down_proj.weight"] = torch.randn(16, 16, generator=generator)
    write_published_shards(tensors, out_dir)
