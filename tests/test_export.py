"""`echoink export` and the model card (issue 16, items 1-2).

Acceptance: train the tiny model 2 steps from the full layout, export it to the full layout, load the export
with transformers' `Qwen2_5OmniForConditionalGeneration`, and get `echoink eval`'s greedy text; the talker and
token2wav tensors are byte-identical to the base's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from echoink.cli import app
from echoink.data import load_dataset
from echoink.export import ExportError, export_model, write_model_card
from echoink.model.families.qwen2_5_omni import FAMILY as QWEN2_5_OMNI
from echoink.model.tiny import write_tiny_checkpoint


def _tensor_bytes(directory: Path, prefixes: tuple[str, ...]) -> dict[str, tuple[str, bytes]]:
    """name -> (dtype, raw bytes) of every stored tensor whose name starts with one of `prefixes`."""
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for name, file in index.items():
        if name.startswith(prefixes):
            with safe_open(str(directory / file), "pt") as handle:
                tensor = handle.get_tensor(name)
            out[name] = (str(tensor.dtype), tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return out


@pytest.fixture(scope="module")
def trained_run(tiny_full_dir, mixed_dataset, tmp_path_factory):
    """`echoink train` 2 steps from the tiny full layout (the CLI writes the model card)."""
    out = tmp_path_factory.mktemp("export_run") / "run"
    result = CliRunner().invoke(app, [
        "train", f"model_path={tiny_full_dir}", f"train_data={mixed_dataset}/train/omni_rl_format_train.json",
        f"output_dir={out}", "num_generations=2", "max_completion_length=8", "learning_rate=1e-3", "seed=0",
        "max_steps=2", "per_device_train_batch_size=2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "model card" in result.output
    return out


@pytest.mark.slow
def test_export_full_layout_loads_in_transformers_with_eval_greedy_text(trained_run, tiny_full_dir, mixed_dataset,
                                                                        tmp_path):
    from transformers import Qwen2_5OmniForConditionalGeneration

    from echoink.model.generation import SamplingSettings
    from echoink.model.inputs import encode_prompt
    from echoink.model.processor import load_processor

    final = trained_run / "final"
    card = (final / "README.md").read_text()
    assert card.startswith("---\n") and "## Reward curves" in card and "| `reward` |" in card
    exported = tmp_path / "exported"
    runner = CliRunner()
    result = runner.invoke(app, ["export", "--model", str(final), "--base", str(tiny_full_dir), "--out", str(exported)])
    assert result.exit_code == 0, result.output
    # the prompt the model was trained with goes with it: `echoink eval` of the export prompts it the same way
    assert (exported / "echoink_prompt.json").read_bytes() == (final / "echoink_prompt.json").read_bytes()

    # talker and token2wav: the base's tensors, same dtype (token2wav stays bfloat16), same bytes; speakers as a file
    base_parts = _tensor_bytes(tiny_full_dir, ("talker.", "token2wav."))
    assert base_parts and _tensor_bytes(exported, ("talker.", "token2wav.")) == base_parts
    assert {dtype for dtype, _ in base_parts.values()} == {"torch.float32", "torch.bfloat16"}
    assert (exported / "spk_dict.pt").read_bytes() == (tiny_full_dir / "spk_dict.pt").read_bytes()
    # the thinker is the trained one, not the base's
    assert _tensor_bytes(exported, ("thinker.model.norm",)) != _tensor_bytes(tiny_full_dir, ("thinker.model.norm",))
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_omni" and config["thinker_config"]["model_type"] == "qwen2_5_omni_thinker"
    assert config["talker_config"] == json.loads((tiny_full_dir / "config.json").read_text())["talker_config"]
    assert "## How to load" in (exported / "README.md").read_text()
    assert "\n# exported\n" in (exported / "README.md").read_text()

    # echoink eval's greedy text on the trained model ...
    data = mixed_dataset / "valid" / "omni_rl_format_valid.json"
    preds = tmp_path / "preds.jsonl"
    result = runner.invoke(app, ["eval", "--model", str(final), "--data", str(data), "--out", str(preds),
                                 "--limit", "3", "--max-new-tokens", "8", "--no-progress"])
    assert result.exit_code == 0, result.output
    replies = [json.loads(line)["reply"] for line in preds.read_text().splitlines()]

    # ... equals what transformers' full model generates from the export, on the same prompts
    full = Qwen2_5OmniForConditionalGeneration.from_pretrained(str(exported)).eval()
    assert full.has_talker and set(full.speaker_map) == {"Chelsie", "Ethan"}
    processor = load_processor(exported)
    tokenizer = processor.tokenizer
    eos, pad = QWEN2_5_OMNI.eos_id(tokenizer), tokenizer.pad_token_id
    suppress = QWEN2_5_OMNI.media_token_ids(tokenizer)
    generation = SamplingSettings(greedy=True, max_new_tokens=8).generation_config(eos, pad, suppress)
    for record, reply in zip(load_dataset(data)[:3], replies):
        prompt = encode_prompt(record, processor)
        with torch.no_grad():
            sequences = full.generate(**prompt.model_kwargs(), generation_mode="text", thinker_max_new_tokens=8,
                                      thinker_generation_config=generation)
        text = tokenizer.decode(sequences[0, prompt.length:], skip_special_tokens=True)
        assert text == reply and len(text) > 0


def test_export_refuses_a_base_that_does_not_fit(tiny_full_dir, tiny_model_dir, tmp_path):
    other_size = write_tiny_checkpoint(tmp_path / "bench_full", layout="full", size="bench")
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="architecture: thinker text_config.hidden_size is 128 .* 512 in the base"):
        export_model(tiny_model_dir, out, base_dir=other_size)
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())

    shifted = tmp_path / "shifted_base"
    shutil.copytree(tiny_full_dir, shifted)
    config = json.loads((shifted / "config.json").read_text())
    config["thinker_config"]["image_token_index"] += 1
    (shifted / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["export", "--model", str(tiny_model_dir), "--base", str(shifted),
                                      "--out", str(out)])
    assert result.exit_code == 1 and "special-token id: thinker image_token_index" in result.output
    assert "nothing was written" in result.output and not out.exists()

    tokenizer = json.loads((shifted / "tokenizer.json").read_text())
    config["thinker_config"]["image_token_index"] -= 1
    (shifted / "config.json").write_text(json.dumps(config))
    swapped = {"<|IMAGE|>": "<|VIDEO|>", "<|VIDEO|>": "<|IMAGE|>"}
    for token in tokenizer["added_tokens"]:
        token["content"] = swapped.get(token["content"], token["content"])
    (shifted / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ExportError, match=r"special-token id: <\|IMAGE\|> is"):
        export_model(tiny_model_dir, out, base_dir=shifted)

    from echoink.model.tiny_families import write_tiny_checkpoint as write_family_checkpoint

    qwen3 = write_family_checkpoint(tmp_path / "qwen3_full", family="qwen3-omni", layout="full")
    with pytest.raises(ExportError, match="does not fit base .*: architecture: the trained model is Qwen2.5-Omni, "
                                          "the base Qwen3-Omni"):
        export_model(tiny_model_dir, out, base_dir=qwen3)
    qwen3_thinker = write_family_checkpoint(tmp_path / "qwen3_thinker", family="qwen3-omni", layout="thinker")
    with pytest.raises(ExportError, match="export to the Qwen3-Omni full layout is not implemented"):
        export_model(qwen3_thinker, out, base_dir=qwen3)
    with pytest.raises(ExportError, match="needs --base"):
        export_model(tiny_model_dir, out)
    with pytest.raises(ExportError, match="model_type 'qwen2_5_omni_thinker'"):
        export_model(tiny_model_dir, out, base_dir=tiny_model_dir)
    out.mkdir()
    with pytest.raises(ExportError, match="already exists"):
        export_model(tiny_model_dir, out, base_dir=tiny_full_dir)


def test_export_thinker_layout_and_key_names(tiny_model_dir, tiny_full_dir, tmp_path):
    out = tmp_path / "thinker_export"
    predictions = tmp_path / "pred.jsonl"
    predictions.write_text("".join(json.dumps({"problem_id": i, "gt": "A", "pred": "A", "correct": i < 3,
                                               "reply": "<answer>A</answer>"}) + "\n" for i in range(4)))
    result = export_model(tiny_model_dir, out, layout="thinker", base_dir=tiny_full_dir, predictions=[predictions])
    assert result.layout == "thinker" and (out / "README.md").is_file()
    assert "| `pred.jsonl` | 4 | 75.0 | [30.1, 95.4] | ours |" in (out / "README.md").read_text()
    assert (out / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    assert QWEN2_5_OMNI.published_thinker_name("model.language_model.layers.0.mlp.up_proj.weight") == "thinker.model.layers.0.mlp.up_proj.weight"
    assert QWEN2_5_OMNI.published_thinker_name("model.audio_tower.conv1.weight") == "thinker.audio_tower.conv1.weight"
    assert QWEN2_5_OMNI.published_thinker_name("visual.blocks.0.norm1.weight") == "thinker.visual.blocks.0.norm1.weight"


def test_model_card_from_a_run_with_a_cut_metrics_line(tmp_path):
    run = tmp_path / "run"
    model = run / "final"
    model.mkdir(parents=True)
    rows = [{"step": s, "reward": 0.5 + 0.1 * s, "rewards/accuracy": 0.1 * s, "kl": 0.0} for s in range(1, 11)]
    rows[-1]["eval/accuracy"], rows[-1]["eval/ci_low"], rows[-1]["eval/ci_high"], rows[-1]["eval/n"] = 0.6, 0.4, 0.8, 20
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 11, "rew')
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\ntags: [x]\n---\n# Base\n")
    config = {"model_path": str(base), "train_data": "AVQA_R1/train/omni_rl_format_train.json", "beta": 0.0,
              "num_generations": 16, "learning_rate": 1e-6, "reward_funcs": ["accuracy", "format"]}
    card = write_model_card(model, run_dir=run, config=config).read_text()
    assert "\n# run/final\n" in card
    assert "| `kl` | β = 0: no KL term |" in card and "`lora_r`" not in card
    header = card.split("---\n")[1]
    assert "license: apache-2.0" in header and "library_name: transformers" in header
    assert str(base) not in header and "AVQA_R1" not in header  # local paths are no Hub ids
    assert "no base_model" in card and "--base-model-id" in card
    assert "| `num_generations` | `16` |" in card and "| logged steps | 10 (last step 10) |" in card
    assert "| `reward` | 0.6 | 1.5 |" in card                      # first and last logged values
    assert "| 10 | 60.0 | [40.0, 80.0] | 20 |" in card               # the in-training eval table
    assert "metrics.jsonl:11: invalid JSON" in card and "ignored" in card


def test_model_card_metadata_for_the_hub(tmp_path):
    """huggingface_hub reads the header: Hub ids for base model and data, a named license, a model-index with
    each predictions file's accuracy; the prompt template and media caps are stated (issue 22, item 9)."""
    from huggingface_hub import ModelCard

    from echoink.eval.run_files import run_file_path

    model = tmp_path / "model"
    model.mkdir()
    predictions = tmp_path / "rl_greedy.jsonl"
    predictions.write_text("".join(json.dumps({"problem_id": i, "gt": "A", "pred": "A", "correct": i < 3,
                                               "reply": "<answer>A</answer>"}) + "\n" for i in range(4)))
    run_file_path(predictions).write_text(json.dumps({"data": "/data/AVQA_R1/valid/omni_rl_format_valid.json"}))
    config = {"model_path": "/models/Qwen2.5-Omni-7B", "train_data": "/data/train.json", "max_pixels": 200704,
              "max_audio_seconds": 10.0, "video_fps": 2.0, "video_max_frames": 16,
              "prompt_template": {"instruction": "Think in ``` fences, then answer.", "system_prompt": "Be brief."}}
    path = write_model_card(model, config=config, predictions=[predictions], base_model_id="Qwen/Qwen2.5-Omni-7B",
                            dataset_id="harryhsing/OmniInstruct_V1_AVQA_R1", license="apache-2.0")
    card = ModelCard.load(path)
    assert card.data.base_model == "Qwen/Qwen2.5-Omni-7B"
    assert card.data.datasets == ["harryhsing/OmniInstruct_V1_AVQA_R1"] and card.data.license == "apache-2.0"
    assert card.data.library_name == "transformers" and card.data.model_name == "model"
    (result,) = card.data.eval_results
    assert (result.metric_type, result.metric_value) == ("accuracy", 75.0)
    assert result.dataset_type == "harryhsing/OmniInstruct_V1_AVQA_R1" and result.task_type == "multiple-choice"
    assert card.data.to_dict()["model-index"][0]["results"][0]["metrics"][0]["value"] == 75.0
    text = path.read_text()
    assert "````text\nThink in ``` fences, then answer.\n````" in text and "Be brief." in text
    assert "| `max_pixels` | `200704` |" in text and "| `video_max_frames` | `16` |" in text
    assert "custom-" in text  # the changed template's version

    # without ids: no local path in the header, the data set named from the predictions' run signature
    bare = ModelCard.load(write_model_card(model, config=config, predictions=[predictions]))
    assert bare.data.base_model is None and bare.data.datasets is None and bare.data.license == "other"
    assert bare.data.eval_results[0].dataset_name == "omni_rl_format_valid"
    assert ModelCard.load(write_model_card(model, config={**config, "model_path": "Qwen/Qwen2.5-Omni-3B"})
                          ).data.base_model == "Qwen/Qwen2.5-Omni-3B"


def test_lora_adapter_exports_the_merged_model(tiny_model_dir, tiny_full_dir, tmp_path):
    from echoink.config import TrainConfig
    from echoink.model import load_thinker
    from echoink.model.inputs import MediaOptions
    from echoink.model.prompt_settings import PromptSettings, read_prompt_settings, write_prompt_settings
    from echoink.model.trainable import wrap_lora
    from echoink.prompts import PromptTemplate

    thinker, _ = load_thinker(tiny_model_dir, dtype="float32")
    peft_model = wrap_lora(thinker, TrainConfig(use_peft=True, lora_r=2, lora_alpha=4, lora_dropout=0.0))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)                                        # adapters that change the model
    adapter = tmp_path / "run" / "adapter"
    peft_model.save_pretrained(str(adapter))
    merged = {QWEN2_5_OMNI.published_thinker_name(k): v for k, v in peft_model.merge_and_unload().state_dict().items()}

    settings = PromptSettings(PromptTemplate.from_dict({"instruction": "Think briefly."}), MediaOptions())
    write_prompt_settings(adapter, settings)                                       # as training saves it
    out = tmp_path / "exported"
    result = export_model(adapter, out, base_dir=tiny_full_dir)
    assert result.merged_lora
    assert read_prompt_settings(out) == settings                              # the merged export keeps it
    exported = _tensor_bytes(out, ("thinker.",))
    assert set(exported) == set(merged)
    name = "thinker.model.layers.0.self_attn.q_proj.weight"                     # a LoRA target (text model)
    assert exported[name][1] == merged[name].contiguous().view(torch.uint8).numpy().tobytes()
    base_q = _tensor_bytes(tiny_full_dir, (name,))[name][1]
    assert exported[name][1] != base_q                                           # the adapter is in the weights


# ---- the exported processor files name transformers' own classes (issue 22, item 3) -----------------------


def _class_settings(module: str, class_name: str) -> set[str]:
    """Names a transformers class takes as settings, read from its source (importing the video processor module
    needs torchvision): its class-level attributes and the keys of its `...InitKwargs` TypedDict."""
    import ast
    import importlib.util

    tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and (node.name == class_name or node.name == f"{class_name}InitKwargs"):
            for item in node.body:
                if isinstance(item, ast.Assign):
                    names |= {target.id for target in item.targets if isinstance(target, ast.Name)}
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
    return names


@pytest.fixture(scope="module")
def exported_full(tiny_model_dir, tiny_full_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export_processor") / "exported"
    export_model(tiny_model_dir, out, base_dir=tiny_full_dir)
    return out


def test_exported_processor_files_name_only_transformers_classes(exported_full):
    import transformers

    names = {}
    for file in sorted(exported_full.glob("*.json")):
        if file.name in ("config.json", "model.safetensors.index.json", "tokenizer.json", "generation_config.json"):
            continue
        for key, value in json.loads(file.read_text(encoding="utf-8")).items():
            if key.endswith(("_type", "_class")) and isinstance(value, str):
                names[f"{file.name}:{key}"] = value
    assert names["video_preprocessor_config.json:video_processor_type"] == "Qwen2VLVideoProcessor"
    assert names["preprocessor_config.json:processor_class"] == "Qwen2_5OmniProcessor"
    for where, name in names.items():
        assert name in dir(transformers), f"{where} names {name}, not a transformers class"
    for file in exported_full.iterdir():
        if file.suffix in (".json", ".jinja") and file.name != "tokenizer.json":
            text = file.read_text(encoding="utf-8")
            assert "Numpy" not in text and "echoink" not in text, file.name

    video = json.loads((exported_full / "video_preprocessor_config.json").read_text(encoding="utf-8"))
    accepted = (_class_settings("transformers.models.qwen2_vl.video_processing_qwen2_vl", "Qwen2VLVideoProcessor")
                | _class_settings("transformers.video_processing_utils", "BaseVideoProcessor")
                | _class_settings("transformers.video_processing_utils", "VideoProcessorMixin"))
    assert set(video) - {"video_processor_type"} <= accepted
    assert video["size"] == {"shortest_edge": video["min_pixels"], "longest_edge": video["max_pixels"]}


def test_qwen2_5_omni_processor_built_from_the_exported_parts(exported_full, tiny_model_dir, mixed_dataset):
    """Tokenizer, feature extractor and image processor loaded by transformers' Auto classes from the export,
    the video settings from its video_preprocessor_config.json: the processor encodes every kind of item exactly
    as the trained model's own processor does."""
    from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoTokenizer, Qwen2_5OmniProcessor

    from echoink.model.inputs import encode_prompt
    from echoink.model.processor import OmniProcessor, load_processor
    from echoink.model.video_processor import NumpyQwenVideoProcessor

    video_settings = json.loads((exported_full / "video_preprocessor_config.json").read_text(encoding="utf-8"))
    processor = OmniProcessor(
        tokenizer=AutoTokenizer.from_pretrained(str(exported_full)),
        feature_extractor=AutoFeatureExtractor.from_pretrained(str(exported_full)),
        image_processor=AutoImageProcessor.from_pretrained(str(exported_full)),
        video_processor=NumpyQwenVideoProcessor(**video_settings),
        chat_template=(exported_full / "chat_template.jinja").read_text(encoding="utf-8"))
    assert isinstance(processor, Qwen2_5OmniProcessor)
    trained = load_processor(tiny_model_dir)
    records = load_dataset(mixed_dataset / "valid" / "omni_rl_format_valid.json")
    kinds = {}
    for record in records:
        kinds.setdefault(record.data_type, record)
    assert any("video" in kind for kind in kinds) and any("image" in kind for kind in kinds)
    for record in kinds.values():
        ours, theirs = encode_prompt(record, trained).model_kwargs(), encode_prompt(record, processor).model_kwargs()
        assert ours.keys() == theirs.keys()
        for key, value in ours.items():
            same = torch.equal(value, theirs[key]) if isinstance(value, torch.Tensor) else value == theirs[key]
            assert same, (record.data_type, key)


def test_auto_processor_loads_the_export_where_torchvision_is_installed(exported_full):
    pytest.importorskip("torchvision", reason="transformers' AutoProcessor loads video processors with torchvision")
    from transformers import AutoProcessor, Qwen2_5OmniProcessor

    processor = AutoProcessor.from_pretrained(str(exported_full))
    assert type(processor) is Qwen2_5OmniProcessor
    assert type(processor.video_processor).__name__ == "Qwen2VLVideoProcessor"
    assert processor.video_processor.temporal_patch_size == 2 and processor.video_processor.merge_size == 2


def test_model_card_states_the_prompt_saved_with_the_model(tmp_path):
    """The prompt settings saved beside the weights win over the run's config (issue 22, items 2 and 9)."""
    from echoink.model.inputs import MediaOptions
    from echoink.model.prompt_settings import PromptSettings, write_prompt_settings
    from echoink.prompts import PromptTemplate

    model = tmp_path / "final"
    model.mkdir()
    write_prompt_settings(model, PromptSettings(PromptTemplate.from_dict({"suffix": " Answer in <answer>."}),
                                                MediaOptions(max_pixels=50176, video_max_frames=8)))
    text = write_model_card(model, config={"max_pixels": 200704, "prompt_template": {}}).read_text()
    assert "saved with the model (`echoink_prompt.json`" in text
    assert " Answer in <answer>." in text and "| `max_pixels` | `50176` |" in text and "200704" not in text
    assert "| `video_max_frames` | `8` |" in text
