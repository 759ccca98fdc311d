"""`echoink lmms-eval-task`: the task YAML, its documents and its grading functions (run here without lmms-eval:
the functions module is imported by path, as lmms-eval does, and must not need torch)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import yaml

from echoink.data.synth import write_synthetic_dataset
from echoink.eval.lmms_task import FUNCTIONS_MODULE, default_task_name, write_lmms_task
from echoink.eval.protocols import regrade_row


class _TaskLoader(yaml.SafeLoader):
    """Reads lmms-eval's `!function module.name` tags as plain strings."""


_TaskLoader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms_task")
    write_synthetic_dataset(root / "synth", n_train=0, n_valid=12, seed=0)
    data = root / "synth" / "valid" / "omni_rl_format_valid.json"
    return data, write_lmms_task(data, root / "tasks")


def _functions(task_dir):
    spec = importlib.util.spec_from_file_location(FUNCTIONS_MODULE, task_dir / f"{FUNCTIONS_MODULE}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_yaml_sets_what_would_change_the_numbers(task):
    data, written = task
    config = yaml.load(written.yaml_path.read_text(), Loader=_TaskLoader)
    assert config["task"] == written.name == default_task_name(data) == "echoink_omni_rl_format_valid"
    assert config["reasoning_tags"] == "none"
    assert config["generation_kwargs"] == {"max_new_tokens": 256, "do_sample": False, "temperature": 0, "until": []}
    assert config["dataset_path"] == "json" and config["dataset_kwargs"]["data_files"]["test"] == str(written.docs_path)
    assert config["process_results"] == f"!function {FUNCTIONS_MODULE}.process_results"
    metrics = [entry["metric"] for entry in config["metric_list"]]
    assert metrics[:2] == ["strict_accuracy", "echoink_r1_accuracy"]
    assert set(written.data_types) == {"image", "audio", "image_audio", "video_audio", "text"}
    assert {f"strict_accuracy_{t}" for t in written.data_types} <= set(metrics)
    assert {f"echoink_r1_accuracy_{t}" for t in written.data_types} <= set(metrics)
    assert all(entry["aggregation"] == "mean" for entry in config["metric_list"])


def test_documents_point_at_the_records(task):
    from echoink.data.records import load_dataset
    from echoink.prompts import build_prompt_text

    data, written = task
    records = load_dataset(data)
    documents = [json.loads(line) for line in written.docs_path.read_text().splitlines()]
    assert len(documents) == len(records) == written.count
    for record, doc in zip(records, documents):
        assert doc["echoink_data"] == str(data.resolve()) and doc["echoink_index"] == record.index
        assert doc["prompt"] == build_prompt_text(record) and doc["answer"] == record.answer
        assert doc["media"] == [str(record.media[k]) for k in ("video", "image", "audio") if k in record.media]


@pytest.mark.parametrize("reply", [
    "<think>a dog</think><answer>C</answer>", "<answer> c </answer>", "I hear a dog.", "B. the second",
    "<answer>C.</answer>", "", "<think>x</think>\n\n<answer>A</answer>", "<answer>D</answer><answer>C</answer>",
])
def test_metrics_are_echoinks_two_rules(task, reply):
    data, written = task
    functions = _functions(written.yaml_path.parent)
    doc = json.loads(written.docs_path.read_text().splitlines()[0])
    metrics = functions.process_results(doc, [reply])
    row = {"gt": doc["answer"], "reply": reply}
    assert metrics["strict_accuracy"] == float(regrade_row(row, "ours")["correct"])
    assert metrics["echoink_r1_accuracy"] == float(regrade_row(row, "echoink")["correct"])
    data_type = doc["data_type"]
    assert metrics[f"strict_accuracy_{data_type}"] == metrics["strict_accuracy"]
    assert set(metrics) == {"strict_accuracy", "echoink_r1_accuracy", f"strict_accuracy_{data_type}",
                            f"echoink_r1_accuracy_{data_type}"}
    assert functions.doc_to_text(doc, {"pre_prompt": "P:", "post_prompt": ":Q"}) == f"P:{doc['prompt']}:Q"
    assert functions.doc_to_visual(doc) == doc["media"]


def test_other_problem_types_get_strict_only(tmp_path):
    write_synthetic_dataset(tmp_path / "s", n_train=0, n_valid=4, seed=1, families=["beep_count", "tone_hz"])
    written = write_lmms_task(tmp_path / "s" / "valid" / "omni_rl_format_valid.json", tmp_path / "t", name="counts")
    config = yaml.load(written.yaml_path.read_text(), Loader=_TaskLoader)
    assert "echoink_r1_accuracy" not in [entry["metric"] for entry in config["metric_list"]]
    functions = _functions(tmp_path / "t")
    for line in written.docs_path.read_text().splitlines():
        doc = json.loads(line)
        right = functions.process_results(doc, [f"<think>.</think><answer>{doc['answer']}</answer>"])
        assert right == {"strict_accuracy": 1.0, f"strict_accuracy_{doc['data_type']}": 1.0}
        assert functions.process_results(doc, ["<answer>999999</answer>"])["strict_accuracy"] == 0.0


def test_functions_module_does_not_load_torch(task):
    _, written = task
    code = ("import importlib.util, sys; p = sys.argv[1]; s = importlib.util.spec_from_file_location('f', p); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            "print(sorted(n for n in ('torch', 'transformers', 'echoink.model', 'echoink.eval') if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(written.yaml_path.parent / f"{FUNCTIONS_MODULE}.py")],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_writes_task_and_refuses_bad_input(tmp_path, task):
    from typer.testing import CliRunner

    from echoink.cli import app

    data, _ = task
    runner = CliRunner()
    result = runner.invoke(app, ["lmms-eval-task", str(data), "--out", str(tmp_path / "t"), "--name", "mine"])
    assert result.exit_code == 0, result.output
    assert "wrote task mine (12 documents" in result.output and "--include_path" in result.output
    assert (tmp_path / "t" / "mine.yaml").is_file() and (tmp_path / "t" / f"{FUNCTIONS_MODULE}.py").is_file()
    result = runner.invoke(app, ["lmms-eval-task", str(data), "--out", str(tmp_path / "t"), "--name", "2bad"])
    assert result.exit_code == 1 and "task name '2bad': use a letter" in result.output
    bad = tmp_path / "bad.json"
    bad.write_text('[{"problem_id": 1}]')
    result = runner.invoke(app, ["lmms-eval-task", str(bad), "--out", str(tmp_path / "u")])
    assert result.exit_code == 1 and f"{bad}:0:data_type: missing" in result.output
    assert not (tmp_path / "u").exists()
