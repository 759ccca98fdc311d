"""echoink inside lmms-eval, for real: the `echoink` model (found through the `lmms_eval.models` entry point)
answers tasks written by `echoink lmms-eval-task`, over an AVQA-R1-format file and converted AVQA and Daily-Omni
fixtures; every reply, every per-item grade and every accuracy equals `echoink eval`'s on the same files.

Not part of `make test` (it lies outside `testpaths` and needs lmms-eval): `make test-lmms-eval` builds the
environment and runs it. The model is the tiny offline Qwen2.5-Omni thinker after a short format warm-up, so
it answers in the `<think>…</think><answer>X</answer>` format with letters that are right about a quarter of
the time: accuracies that are not all zero.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmark_fixtures import write_avqa, write_daily_omni

BIN = Path(sys.executable).parent
MAX_NEW_TOKENS = 32
ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(*command: str, cwd: Path | None = None) -> str:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, env=ENV, cwd=cwd)
    assert result.returncode == 0, f"{' '.join(map(str, command))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A warmed tiny model, three datasets, their lmms-eval tasks, `echoink eval` on each, one lmms-eval run."""
    import torch

    from echoink.data.avqa import convert_avqa
    from echoink.data.daily_omni import convert_daily_omni
    from echoink.data.records import load_dataset
    from echoink.data.synth import write_synthetic_dataset
    from echoink.demo.format_warmup import format_warmup
    from echoink.model.loading import load_thinker
    from echoink.model.saving import save_thinker
    from echoink.model.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("lmms")
    torch.manual_seed(0)
    write_synthetic_dataset(root / "synth", n_train=16, n_valid=10, seed=0)
    write_tiny_checkpoint(root / "tiny", layout="thinker", seed=0)
    model, processor = load_thinker(root / "tiny", dtype="float32")
    format_warmup(model, processor, load_dataset(root / "synth" / "train" / "omni_rl_format_train.json"), steps=60,
                  batch_size=8, log=lambda *args, **kwargs: None)
    save_thinker(model, processor, root / "model")

    qa, videos = write_avqa(root / "avqa", count=5, missing=1)
    convert_avqa(qa, videos, root / "avqa" / "avqa_val.json")
    qa, videos = write_daily_omni(root / "daily", count=4)
    convert_daily_omni(qa, videos, root / "daily" / "daily_all.json", mode="all")
    datasets = {"echoink_synth": root / "synth" / "valid" / "omni_rl_format_valid.json",
                "echoink_avqa": root / "avqa" / "avqa_val.json", "echoink_daily": root / "daily" / "daily_all.json"}
    predictions = {}
    for name, data in datasets.items():
        run(BIN / "echoink", "lmms-eval-task", data, "--out", root / "tasks", "--name", name,
            "--max-new-tokens", MAX_NEW_TOKENS)
        predictions[name] = root / f"{name}.jsonl"
        run(BIN / "echoink", "eval", "--model", root / "model", "--data", data, "--out", predictions[name],
            "--batch-size", 4, "--max-new-tokens", MAX_NEW_TOKENS, "--dtype", "float32", "--no-progress")
    run(BIN / "lmms-eval", "eval", "--model", "echoink", "--model_args", f"pretrained={root / 'model'},dtype=float32",
        "--tasks", ",".join(datasets), "--include_path", root / "tasks", "--batch_size", 3, "--log_samples",
        "--output_path", root / "lmms_out", cwd=root)
    return root, datasets, predictions


def _lmms_outputs(root: Path, task: str) -> tuple[dict, list[dict]]:
    results_file, = root.glob("lmms_out/*/*_results.json")
    samples_file, = root.glob(f"lmms_out/*/*_samples_{task}.jsonl")
    results = json.loads(results_file.read_text())["results"][task]
    samples = [json.loads(line) for line in samples_file.read_text().splitlines() if line.strip()]
    return results, samples


@pytest.mark.parametrize("task", ["echoink_synth", "echoink_avqa", "echoink_daily"])
def test_lmms_eval_equals_echoink_eval(workspace, task):
    from echoink.eval.protocols import regrade_row

    root, datasets, predictions = workspace
    rows = {str(row["problem_id"]): row for row in map(json.loads, predictions[task].read_text().splitlines())}
    results, samples = _lmms_outputs(root, task)
    documents = [json.loads(line) for line in (root / "tasks" / f"{task}.jsonl").read_text().splitlines()]
    assert len(samples) == len(rows) == len(documents) > 0
    for sample in samples:
        row = rows[documents[sample["doc_id"]]["problem_id"]]
        reply = sample["filtered_resps"][0] if isinstance(sample["filtered_resps"], list) else sample["filtered_resps"]
        assert reply.strip() == row["reply"].strip(), f"{task} doc {sample['doc_id']}"
        assert sample["strict_accuracy"] == float(row["correct"])
        if row["problem_type"] == "multiple choice":
            assert sample["echoink_r1_accuracy"] == float(regrade_row(row, "echoink")["correct"])
    correct = [float(row["correct"]) for row in rows.values()]
    assert results["strict_accuracy,none"] == pytest.approx(np.mean(correct))
    choice_rows = [row for row in rows.values() if row["problem_type"] == "multiple choice"]
    r1 = [float(regrade_row(row, "echoink")["correct"]) for row in choice_rows]
    assert results["echoink_r1_accuracy,none"] == pytest.approx(np.mean(r1))
    for data_type in {row["data_type"] for row in rows.values()}:
        of_type = [float(row["correct"]) for row in rows.values() if row["data_type"] == data_type]
        assert results[f"strict_accuracy_{data_type},none"] == pytest.approx(np.mean(of_type))


def test_the_warmed_model_answers_in_format(workspace):
    """The comparison above is not of empty replies: most replies parse, and some are right."""
    _, _, predictions = workspace
    rows = [json.loads(line) for path in predictions.values() for line in path.read_text().splitlines()]
    assert np.mean([row["pred"] is not None for row in rows]) >= 0.5
    assert any(row["correct"] for row in rows)


def test_model_is_registered_through_the_entry_point():
    from importlib.metadata import entry_points

    from lmms_eval.models import get_model, get_model_manifest

    from echoink.lmms_eval_plugin.model import EchoinkModel

    names = [entry.name for entry in entry_points().select(group="lmms_eval.models")]
    assert "echoink" in names
    assert get_model_manifest("echoink").simple_class_path == "echoink.lmms_eval_plugin.model.EchoinkModel"
    assert get_model("echoink") is EchoinkModel


def test_other_tasks_get_all_media(tmp_path):
    """An OmniBench-style item (`doc_to_visual` -> [audio dict, PIL image]) is one prompt with both; in-memory media
    decode exactly like the same media read from files; published full layouts load too."""
    import soundfile as sf

    from echoink.lmms_eval_plugin.model import EchoinkModel
    from echoink.model.tiny import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path / "full", layout="full", seed=1)
    model = EchoinkModel(pretrained=str(tmp_path / "full"), dtype="float32", batch_size="2")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8))
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(24_000) / 24_000)).astype(np.float32)
    in_memory = model._encode("Which?", {"id": 1}, lambda doc: [{"array": tone, "sampling_rate": 24_000}, image])
    assert {"input_features", "pixel_values"} <= set(in_memory.media)
    image.save(tmp_path / "i.png")
    sf.write(str(tmp_path / "a.wav"), tone, 24_000, subtype="FLOAT")
    from_files = model._encode("Which?", {"id": 1}, lambda doc: [str(tmp_path / "a.wav"), str(tmp_path / "i.png")])
    assert from_files.input_ids.tolist() == in_memory.input_ids.tolist()
    for key in ("input_features", "pixel_values"):
        assert np.array_equal(from_files.media[key].numpy(), in_memory.media[key].numpy())
    with pytest.raises(ValueError, match="more than one image"):
        model._encode("Which?", {}, lambda doc: [image, image])
    with pytest.raises(ValueError, match="unknown model argument"):
        EchoinkModel(pretrained=str(tmp_path / "full"), temprature=1)


def test_task_prompt_on_echoink_documents_is_the_training_prompt(tmp_path):
    """`prompt=task` builds the prompt from the task's text and `doc_to_visual`; on an echoink task that text is the
    training template's, so both modes give the same tokens and media tensors (image, audio, video + its track)."""
    import torch

    from echoink.data.synth import write_synthetic_dataset
    from echoink.eval.lmms_task import write_lmms_task
    from echoink.lmms_eval_plugin.model import EchoinkModel
    from echoink.model.tiny import write_tiny_checkpoint

    write_synthetic_dataset(tmp_path / "synth", n_train=0, n_valid=8, seed=3)
    task = write_lmms_task(tmp_path / "synth" / "valid" / "omni_rl_format_valid.json", tmp_path / "task")
    write_tiny_checkpoint(tmp_path / "tiny", layout="thinker", seed=0)
    trained = EchoinkModel(pretrained=str(tmp_path / "tiny"), dtype="float32")
    as_task = EchoinkModel(pretrained=str(tmp_path / "tiny"), dtype="float32", prompt="task")
    for line in task.docs_path.read_text().splitlines():
        doc = json.loads(line)
        a = trained._encode(doc["prompt"], doc, lambda d: d["media"])
        b = as_task._encode(doc["prompt"], doc, lambda d: d["media"])
        assert a.input_ids.tolist() == b.input_ids.tolist(), doc["data_type"]
        assert set(a.media) == set(b.media) and a.use_audio_in_video == b.use_audio_in_video
        assert all(torch.equal(a.media[key], b.media[key]) for key in a.media)


def test_the_template_saved_with_the_model_is_used(tmp_path):
    """A model trained with another template and caps answers lmms-eval with them, as `echoink eval` does."""
    from echoink.data.records import load_dataset
    from echoink.data.synth import write_synthetic_dataset
    from echoink.eval.lmms_task import write_lmms_task
    from echoink.lmms_eval_plugin.model import EchoinkModel
    from echoink.model.inputs import MediaOptions, encode_prompt
    from echoink.model.prompt_settings import PromptSettings, write_prompt_settings
    from echoink.model.tiny import write_tiny_checkpoint
    from echoink.prompts import PromptTemplate

    write_synthetic_dataset(tmp_path / "synth", n_train=0, n_valid=4, seed=5)
    data = tmp_path / "synth" / "valid" / "omni_rl_format_valid.json"
    task = write_lmms_task(data, tmp_path / "task")
    write_tiny_checkpoint(tmp_path / "tiny", layout="thinker", seed=0)
    settings = PromptSettings(PromptTemplate.from_dict({"instruction": "Think briefly."}),
                              MediaOptions(max_audio_seconds=2.0, max_pixels=64 * 28 * 28))
    write_prompt_settings(tmp_path / "tiny", settings)
    model = EchoinkModel(pretrained=str(tmp_path / "tiny"), dtype="float32")
    assert (model.template, model.media_options) == (settings.template, settings.media)
    records = load_dataset(data)
    for line in task.docs_path.read_text().splitlines():
        doc = json.loads(line)
        expected = encode_prompt(records[doc["echoink_index"]], model.processor, settings.media, settings.template)
        assert model._encode(doc["prompt"], doc, None).input_ids.tolist() == expected.input_ids.tolist()


def test_sampled_replies_do_not_depend_on_the_batch(tmp_path):
    """A sampling task's reply to a document draws from a stream named by (seed, task, document): the same reply
    whatever `batch_size` (before, every batch restarted the streams at its own positions 0, 1, ...)."""
    from types import SimpleNamespace

    from echoink.data.synth import write_synthetic_dataset
    from echoink.eval.lmms_task import write_lmms_task
    from echoink.lmms_eval_plugin.model import EchoinkModel
    from echoink.model.tiny import write_tiny_checkpoint

    write_synthetic_dataset(tmp_path / "synth", n_train=0, n_valid=4, seed=7)
    task = write_lmms_task(tmp_path / "synth" / "valid" / "omni_rl_format_valid.json", tmp_path / "task")
    write_tiny_checkpoint(tmp_path / "tiny", layout="thinker", seed=0)
    docs = [json.loads(line) for line in task.docs_path.read_text().splitlines()]
    sampling = {"do_sample": True, "temperature": 1.0, "max_new_tokens": 12}

    def replies(batch_size: str, order: list[int]) -> dict[int, str]:
        model = EchoinkModel(pretrained=str(tmp_path / "tiny"), dtype="float32", batch_size=batch_size, seed=3)
        model.task_dict = {task.name: {"test": dict(enumerate(docs))}}
        requests = [SimpleNamespace(args=(docs[i]["prompt"], sampling, None, i, task.name, "test")) for i in order]
        return dict(zip(order, model.generate_until(requests)))

    one_at_a_time = replies("1", [0, 1, 2, 3])
    assert len(set(one_at_a_time.values())) > 1  # sampled replies, not one fixed text
    assert replies("4", [0, 1, 2, 3]) == one_at_a_time
    assert replies("3", [3, 2, 1, 0]) == one_at_a_time
