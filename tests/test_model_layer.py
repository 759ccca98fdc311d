"""The model layer: tiny offline checkpoints in both layouts, loading, processor, forward/generate, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from echoink.model import ModelLoadError, load_thinker, save_thinker
from echoink.model.tiny import SPECIAL_TOKENS


def _media_files(tmp_path):
    wav = tmp_path / "tone.wav"
    sf.write(str(wav), (0.5 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32), 16000)
    jpg = tmp_path / "red.jpg"
    Image.new("RGB", (112, 84), (220, 30, 30)).save(jpg)
    return wav, jpg


def _audio_image_inputs(processor, wav, jpg):
    from echoink.data.media import load_audio, load_image

    messages = [{"role": "user", "content": [{"type": "image", "image": str(jpg)}, {"type": "audio", "audio": str(wav)},
                                             {"type": "text", "text": "What colour is the shape?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(text=[text], images=[load_image(jpg)], audio=[load_audio(wav)], return_tensors="pt")


def test_chat_template_renders_like_qwen25_omni(tiny_model_dir):
    _, processor = load_thinker(tiny_model_dir)
    messages = [{"role": "user", "content": [{"type": "image", "image": "x.jpg"}, {"type": "audio", "audio": "y.wav"},
                                             {"type": "video", "video": "z.mp4"}, {"type": "text", "text": "Q?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_bos|><|IMAGE|><|vision_eos|><|audio_bos|><|AUDIO|><|audio_eos|>"
                    "<|vision_bos|><|VIDEO|><|vision_eos|>Q?<|im_end|>\n<|im_start|>assistant\n")
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert processor.apply_chat_template(with_system, tokenize=False).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_tokenizer_carries_every_special_token(tiny_model_dir):
    _, processor = load_thinker(tiny_model_dir)
    tok = processor.tokenizer
    for token in SPECIAL_TOKENS:
        ids = tok(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, token
        assert tok.convert_ids_to_tokens(ids[0]) == token
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.image_token == "<|IMAGE|>" and tok.audio_token == "<|AUDIO|>" and tok.video_token == "<|VIDEO|>"
    text = "<think>let me think</think><answer>C</answer>"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert processor.feature_extractor.feature_size == 128


def test_full_layout_loads_thinker_only(tiny_full_dir):
    config = json.loads((tiny_full_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_omni" and {"thinker_config", "talker_config", "token2wav_config"} <= set(config)
    index = json.loads((tiny_full_dir / "model.safetensors.index.json").read_text())
    prefixes = {key.split(".")[0] for key in index["weight_map"]}
    assert prefixes == {"thinker", "talker", "token2wav"}
    model, _ = load_thinker(tiny_full_dir)
    assert type(model).__name__ == "Qwen2_5OmniThinkerForConditionalGeneration"
    assert not any("talker" in name or "token2wav" in name for name, _ in model.named_modules())


def test_both_layouts_give_identical_logits(tiny_full_dir, tiny_model_dir, tmp_path):
    wav, jpg = _media_files(tmp_path)
    full, processor = load_thinker(tiny_full_dir)
    thinker, _ = load_thinker(tiny_model_dir)
    inputs = _audio_image_inputs(processor, wav, jpg)
    with torch.no_grad():
        assert torch.equal(full(**inputs).logits, thinker(**inputs).logits)


def test_forward_generate_and_save_roundtrip(tiny_model_dir, tmp_path):
    wav, jpg = _media_files(tmp_path)
    model, processor = load_thinker(tiny_model_dir)
    inputs = _audio_image_inputs(processor, wav, jpg)
    assert inputs["input_features"].shape == (1, 128, 3000)
    assert int((inputs["input_ids"] == processor.tokenizer.audio_token_id).sum()) == 25  # 1 s of audio
    with torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    save_thinker(model, processor, tmp_path / "saved")
    again, _ = load_thinker(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, logits)


def test_video_with_audio_track(tiny_model_dir, mixed_dataset):
    from echoink.data import load_dataset
    from echoink.model.inputs import encode_prompt

    model, processor = load_thinker(tiny_model_dir)
    records = [r for r in load_dataset(mixed_dataset / "train" / "omni_rl_format_train.json") if r.data_type == "video_audio"]
    prompt = encode_prompt(records[0], processor)
    assert prompt.use_audio_in_video and "pixel_values_videos" in prompt.media and "input_features" in prompt.media
    with torch.no_grad():
        out = model.generate(**prompt.model_kwargs(), max_new_tokens=4, do_sample=False)
    assert out.shape[1] == prompt.length + 4 or out.shape[1] > prompt.length


def test_bf16_forward_with_audio_and_image(tiny_model_dir, tmp_path):
    wav, jpg = _media_files(tmp_path)
    model, processor = load_thinker(tiny_model_dir, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    inputs = _audio_image_inputs(processor, wav, jpg)
    inputs = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in inputs.items()}
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


@pytest.mark.parametrize("breakage, message", [
    ("missing", "does not exist"),
    ("no_config", "config.json: missing"),
    ("bad_type", "unsupported model_type 'llama'"),
    ("no_weights", "no weight files"),
    ("missing_shard", "are missing: model-00002-of-00002.safetensors"),
])
def test_bad_directories_give_one_line_errors(tiny_full_dir, tmp_path, breakage, message):
    target = tmp_path / "model"
    if breakage != "missing":
        shutil.copytree(tiny_full_dir, target)
    if breakage == "no_config":
        (target / "config.json").unlink()
    elif breakage == "bad_type":
        (target / "config.json").write_text(json.dumps({"model_type": "llama"}))
    elif breakage == "no_weights":
        for f in list(target.glob("*.safetensors")) + [target / "model.safetensors.index.json"]:
            f.unlink()
    elif breakage == "missing_shard":
        (target / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError) as info:
        load_thinker(target)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_cli_model_tiny_then_load(tmp_path):
    out = tmp_path / "t"
    result = subprocess.run([sys.executable, "-m", "echoink.cli", "model", "tiny", "--out", str(out), "--layout", "full"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    model, processor = load_thinker(out)
    bad = subprocess.run([sys.executable, "-m", "echoink.cli", "eval", "--model", str(tmp_path / "nope"),
                          "--data", str(tmp_path / "x.json"), "--out", str(tmp_path / "p.jsonl")],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr


def test_cli_help_lists_subcommands():
    result = subprocess.run([sys.executable, "-m", "echoink.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("model", "data", "train", "eval", "metrics", "plot", "aha"):
        assert command in result.stdout
