"""A tiny random-initialised Qwen2.5-Omni checkpoint, built entirely offline.

Tests, the demo and the benchmarks use it in place of Qwen2.5-Omni-7B. It has the real model's
architecture classes, special tokens, chat template, processors and file layout, so the code that
loads and trains it is the code that loads and trains the 7B model:

    layout "full"     config.json with model_type qwen2_5_omni (thinker + talker + token2wav configs),
                      weights prefixed `thinker.` / `talker.` / `token2wav.` in the published key naming
                      and spk_dict.pt: a real (tiny) talker and token2wav, so transformers'
                      `Qwen2_5OmniForConditionalGeneration` builds and loads it
    layout "thinker"  config.json with model_type qwen2_5_omni_thinker, what our trainer saves

Sizes (`TinySpec`): "tiny" (1.6 M parameters: text hidden 128 x 2 layers, audio d_model 64 x 1,
vision hidden 64 x 1) for tests and the demo; "bench" (text hidden 512 x 4, encoders 4 layers) for
the group-sharing benchmark.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2Tokenizer,
    WhisperFeatureExtractor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from echoink.model.families.qwen2_5_omni import FAMILY
from echoink.model.processor import OmniProcessor, save_processor
from echoink.model.saving import quiet_transformers, save_thinker
from echoink.model.video_processor import NumpyQwenVideoProcessor

# Qwen2.5-Omni's special tokens, in the published order (ids 151643 ... 151656 there; here they
# follow the tiny BPE vocabulary in the same order).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_bos|>", "<|vision_eos|>", "<|vision_pad|>",
    "<|IMAGE|>", "<|VIDEO|>",
]
# Attribute names the processor looks up on the tokenizer.
NAMED_SPECIAL_TOKENS = {
    "image_token": "<|IMAGE|>",
    "audio_token": "<|AUDIO|>",
    "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
}
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Renders messages the way Qwen2.5-Omni's published chat template does: the default system message
# when the conversation has none, then each media part as its placeholder between boundary tokens.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part -%}{{- '<|vision_bos|><|IMAGE|><|vision_eos|>' -}}"
    "{%- elif part['type'] == 'audio' or 'audio' in part -%}{{- '<|audio_bos|><|AUDIO|><|audio_eos|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}{{- '<|vision_bos|><|VIDEO|><|vision_eos|>' -}}"
    "{%- elif 'text' in part -%}{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Text the tiny BPE is trained on: the prompt, the answer format and the words of our synthetic tasks.
_CORPUS_EXTRA = [
    "<think>", "</think>", "<answer>", "</answer>", "<think>ok</think><answer>A</answer>",
    "A. B. C. D. A B C D Options:", "What colour is the shape? What is the pitch of the tone?",
    "red green blue yellow purple orange white black circle square triangle star",
    "low high medium very low very high beeps one two three four five six",
    "How many beeps are there? Which shape is moving? What is making the sound?",
    "let me think wait Hmm oh, I see let's break it down actually on second thought re-check",
    "The answer is so the tone is the colour of the shape is I hear I see",
    "You are a helpful assistant.",
]


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny thinker. Output widths of both encoders equal `text_hidden` (a Qwen constraint)."""

    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 256
    audio_d_model: int = 64
    audio_layers: int = 1
    audio_heads: int = 2
    vision_hidden: int = 64
    vision_layers: int = 1
    vision_heads: int = 2
    bpe_vocab: int = 1000


TINY = TinySpec()
BENCH = TinySpec(text_hidden=512, text_layers=4, text_heads=8, text_kv_heads=2, text_intermediate=1024,
                 audio_d_model=128, audio_layers=4, audio_heads=4, vision_hidden=128, vision_layers=4,
                 vision_heads=4)
SPECS = {"tiny": TINY, "bench": BENCH}


def build_tokenizer(bpe_vocab: int = 1000, special_tokens: list[str] = SPECIAL_TOKENS,
                    named_tokens: dict[str, str] = NAMED_SPECIAL_TOKENS, chat_template: str = CHAT_TEMPLATE,
                    plain_tokens: tuple[str, ...] = ()) -> Qwen2Tokenizer:
    """Byte-level BPE trained offline on `_CORPUS_EXTRA` + the EchoInk-R1 prompt, plus Qwen's special tokens.

    The defaults are Qwen2.5-Omni's; other families pass theirs (`plain_tokens`: added tokens that
    are not special, so decoding with skip_special_tokens keeps them, like Qwen3's `<think>`).
    """
    from echoink.prompts import ANSWER_SUFFIX, THINK_PROMPT

    corpus = [THINK_PROMPT, ANSWER_SUFFIX, *_CORPUS_EXTRA]
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=bpe_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    trainer_tok.train_from_iterator(corpus * 4, trainer=trainer)
    model = json.loads(trainer_tok.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    for token in special_tokens:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, extra_special_tokens=dict(named_tokens),
        additional_special_tokens=list(special_tokens), model_max_length=32768,
    )
    # Register every special token as an atomic added token (the constructor alone does not for all of them).
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens], special_tokens=True)
    if plain_tokens:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain_tokens])
    tokenizer.chat_template = chat_template
    return tokenizer


def build_processor(spec: TinySpec = TINY) -> OmniProcessor:
    tokenizer = build_tokenizer(spec.bpe_vocab)
    feature_extractor = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160,
                                                chunk_length=30, n_fft=400, return_attention_mask=True)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=4 * 28 * 28, max_pixels=256 * 28 * 28)
    video_processor = NumpyQwenVideoProcessor(min_pixels=4 * 28 * 28, max_pixels=128 * 28 * 28)
    return OmniProcessor(image_processor=image_processor, video_processor=video_processor,
                         feature_extractor=feature_extractor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def thinker_config(tokenizer: Qwen2Tokenizer, spec: TinySpec = TINY) -> Qwen2_5OmniThinkerConfig:
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    vocab_size = -(-len(tokenizer) // 64) * 64
    head_dim = spec.text_hidden // spec.text_heads
    quarter = head_dim // 2 // 4  # mrope_section must sum to head_dim / 2, split (t, h, w) ~ (1/4, 3/8, 3/8)
    mrope = [quarter, (head_dim // 2 - quarter) // 2, head_dim // 2 - quarter - (head_dim // 2 - quarter) // 2]
    return Qwen2_5OmniThinkerConfig(
        audio_config={
            "num_mel_bins": 128, "encoder_layers": spec.audio_layers, "encoder_attention_heads": spec.audio_heads,
            "encoder_ffn_dim": 2 * spec.audio_d_model, "d_model": spec.audio_d_model,
            "output_dim": spec.text_hidden, "max_source_positions": 1500, "n_window": 100,
        },
        vision_config={
            "depth": spec.vision_layers, "hidden_size": spec.vision_hidden, "num_heads": spec.vision_heads,
            "intermediate_size": 2 * spec.vision_hidden, "out_hidden_size": spec.text_hidden,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
            "fullatt_block_indexes": [spec.vision_layers - 1], "in_channels": 3,
        },
        text_config={
            "vocab_size": vocab_size, "hidden_size": spec.text_hidden, "intermediate_size": spec.text_intermediate,
            "num_hidden_layers": spec.text_layers, "num_attention_heads": spec.text_heads,
            "num_key_value_heads": spec.text_kv_heads, "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope},
            "tie_word_embeddings": False, "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
        },
        audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"], video_token_index=ids["<|VIDEO|>"],
        audio_start_token_id=ids["<|audio_bos|>"], audio_end_token_id=ids["<|audio_eos|>"],
        vision_start_token_id=ids["<|vision_bos|>"], vision_end_token_id=ids["<|vision_eos|>"],
        user_token_id=tokenizer.convert_tokens_to_ids("user") if "user" in tokenizer.get_vocab() else 0,
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )


def build_tiny_thinker(spec: TinySpec = TINY, seed: int = 0):
    """-> (random-initialised thinker in fp32, processor)."""
    processor = build_processor(spec)
    config = thinker_config(processor.tokenizer, spec)
    torch.manual_seed(seed)
    model = Qwen2_5OmniThinkerForConditionalGeneration(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    return model.eval(), processor


def write_tiny_checkpoint(out_dir: str | Path, layout: str = "thinker", seed: int = 0, size: str = "tiny") -> Path:
    """Write a tiny checkpoint + processor files to `out_dir` in the given layout; returns the path."""
    if layout not in ("full", "thinker"):
        raise ValueError(f"layout must be 'full' or 'thinker', got {layout!r}")
    if size not in SPECS:
        raise ValueError(f"size must be one of {sorted(SPECS)}, got {size!r}")
    out_dir = Path(out_dir)
    model, processor = build_tiny_thinker(SPECS[size], seed)
    if layout == "thinker":
        save_thinker(model, processor, out_dir)
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    save_processor(processor, out_dir)
    _write_full_layout(model, out_dir, seed)
    return out_dir


def _write_full_layout(model, out_dir: Path, seed: int) -> None:
    """The published Qwen2.5-Omni layout: one config for thinker/talker/token2wav, prefixed weights, speakers.

    The published checkpoint predates transformers' `model.language_model` nesting: its thinker
    keys are `thinker.audio_tower.*`, `thinker.visual.*`, `thinker.model.*` (the text model) and
    `thinker.lm_head.*`. We write the same names, so loading exercises the same key conversion.
    The talker and token2wav are real, tiny and random (`TALKER_SHAPE`, `TOKEN2WAV_SHAPE`):
    `Qwen2_5OmniForConditionalGeneration` builds and loads the directory, while our loader skips
    them. token2wav is stored in bfloat16 (as published; transformers casts it to fp32 when it
    loads), so anything that re-saves it from a loaded model instead of copying the file changes its
    bytes. `spk_dict.pt` holds two speakers in the published structure (a torch.save'd dict; only
    transformers reads it, with `weights_only=True`).
    """
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniTalkerForConditionalGeneration, Qwen2_5OmniToken2WavModel

    with quiet_transformers():  # transformers' default talker config warns about its own 7B token ids
        config = Qwen2_5OmniConfig(thinker_config=model.config.to_dict(), talker_config=talker_config(model.config),
                                   token2wav_config=dict(TOKEN2WAV_SHAPE), enable_audio_output=True)
        config.architectures = ["Qwen2_5OmniModel"]
        config.dtype = "float32"
        config.save_pretrained(str(out_dir))
    tensors = {}
    for name, tensor in model.state_dict().items():
        tensors[FAMILY.published_thinker_name(name)] = tensor.contiguous()
    torch.manual_seed(seed + 1)
    talker = Qwen2_5OmniTalkerForConditionalGeneration(config.talker_config)
    token2wav = Qwen2_5OmniToken2WavModel(config.token2wav_config)
    tensors.update({f"talker.{k}": v.contiguous() for k, v in talker.state_dict().items()})
    tensors.update({f"token2wav.{k}": v.to(torch.bfloat16).contiguous() for k, v in token2wav.state_dict().items()})
    generator = torch.Generator().manual_seed(seed)
    dit = TOKEN2WAV_SHAPE["dit_config"]
    speakers = {name: {"bos_token": config.talker_config.tts_text_start_token_id,
                       "cond": torch.randn(dit["enc_emb_dim"], generator=generator),
                       "ref_mel": torch.randn(24, dit["mel_dim"], generator=generator)}
                for name in ("Chelsie", "Ethan")}
    torch.save(speakers, out_dir / "spk_dict.pt")
    write_published_shards(tensors, out_dir)


def write_published_shards(tensors: dict[str, torch.Tensor], out_dir: Path) -> None:
    """Two safetensors shards + model.safetensors.index.json, like a published checkpoint."""
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(out_dir / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in keys})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


#: The tiny talker: a 1-layer Qwen2 decoder over a codec vocabulary (published: 28 layers, 8448 codes).
TALKER_SHAPE = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                "head_dim": 16, "intermediate_size": 64, "max_position_embeddings": 4096}
#: The tiny token2wav: a 2-layer DiT (mel generator) and a BigVGAN vocoder. BigVGAN's residual blocks
#: need exactly three dilations each (its AMP blocks are built for three).
TOKEN2WAV_SHAPE = {
    "dit_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "head_dim": 16,
                   "emb_dim": 16, "num_embeds": 64, "mel_dim": 16, "enc_emb_dim": 8, "enc_dim": 8,
                   "enc_channels": [16, 16, 16, 16, 48], "enc_attention_channels": 8, "enc_se_channels": 8,
                   "look_ahead_layers": [1], "look_backward_layers": [0]},
    "bigvgan_config": {"mel_dim": 16, "upsample_initial_channel": 32, "resblock_kernel_sizes": [3],
                       "resblock_dilation_sizes": [[1, 3, 5]], "upsample_rates": [2, 2],
                       "upsample_kernel_sizes": [4, 4]},
}


def talker_config(thinker: Qwen2_5OmniThinkerConfig) -> dict:
    """The tiny talker's config, its token ids taken from the thinker (as in the published config).

    The talker reads thinker token ids (media placeholders, and the three TTS text tokens, which are
    the last ids of the thinker's padded vocabulary here), so its vocabulary is the thinker's size;
    its own codec tokens (pad, start, end, mask) are four ids near the end of it.
    """
    vocab = thinker.text_config.vocab_size
    head_dim = TALKER_SHAPE["head_dim"]
    quarter = head_dim // 2 // 4
    mrope = [quarter, (head_dim // 2 - quarter) // 2, head_dim // 2 - quarter - (head_dim // 2 - quarter) // 2]
    return {
        **TALKER_SHAPE, "vocab_size": vocab, "embedding_size": thinker.text_config.hidden_size,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope},
        "audio_token_index": thinker.audio_token_index, "image_token_index": thinker.image_token_index,
        "video_token_index": thinker.video_token_index, "vision_start_token_id": thinker.vision_start_token_id,
        "vision_end_token_id": thinker.vision_end_token_id, "audio_start_token_id": thinker.audio_start_token_id,
        "audio_end_token_id": thinker.audio_end_token_id,
        "tts_text_pad_token_id": vocab - 3, "tts_text_start_token_id": vocab - 2, "tts_text_end_token_id": vocab - 1,
        "tts_codec_pad_token_id": vocab - 8, "tts_codec_start_token_id": vocab - 7, "tts_codec_end_token_id": vocab - 6,
        "tts_codec_mask_token_id": vocab - 5,
    }
