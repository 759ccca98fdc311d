"""EchoInk-R1's evaluation protocol (echoink.eval.protocols): its parser with its quirks, its prompt, its decoding,
and `echoink metrics --against echoink` on the same predictions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from echoink.cli import app
from echoink.data import load_dataset
from echoink.data.synth import write_synthetic_dataset
from echoink.eval.protocols import (ECHOINK_BASE_INSTRUCTION, echoink_answer_letter, echoink_fallback_counts,
                                    protocol_settings, regrade_row)
from echoink.model import load_thinker
from echoink.model.inputs import encode_prompt
from echoink.prompts import ANSWER_SUFFIX, THINK_PROMPT, build_messages, build_prompt_text


# ---- the parser, quirks included ------------------------------------------------------------------


@pytest.mark.parametrize("reply, expected", [
    ("<think>hmm</think><answer>C</answer>", "C"),
    ("<think>hmm</think><answer> c </answer>", "C"),             # case-insensitive, spaces inside the tags
    ("<ANSWER>b</Answer>", "B"),                                  # the tags themselves in any case
    ("<answer>E</answer> then B", "B"),                           # only A-D in the tag; else the first bare letter
    ("<answer>Police car siren</answer>", None),                  # no standalone A-D letter anywhere
    ("I hear a dog barking, so the answer is C.", "A"),           # the article "a" is read as option A
    ("The answer is (d), I think.", "D"),                         # lower-case letters count
    ("Bad CD", None),                                             # letters inside words do not
    ("<answer>Ca</answer> <answer>B</answer>", "B"),              # the first tag that holds one letter wins
    ("", None),
])
def test_echoink_parser_reproduces_its_rule(reply, expected):
    assert echoink_answer_letter(reply) == expected


def test_ours_and_echoink_grade_the_same_reply_differently():
    row = {"problem_id": 1, "gt": "A", "reply": "<think>a dog barks</think><answer>dog</answer>",
           "pred": None, "correct": False}
    echoink = regrade_row(row, "echoink")
    ours = regrade_row(row, "ours")
    assert echoink["pred"] == "A" and echoink["correct"] is True and echoink["protocol"] == "echoink"
    assert ours["pred"] is None and ours["correct"] is False
    assert regrade_row({**row, "reply": "<answer>a</answer>"}, "ours")["pred"] is None     # ours: capitals only
    with pytest.raises(ValueError, match="not an option letter"):
        regrade_row({**row, "gt": "blue"}, "echoink", where="p.jsonl: row 3")
    counts = echoink_fallback_counts([row, {**row, "reply": "<answer>B</answer>"}, {**row, "reply": "none"},
                                      {**row, "reply": "so B"}])
    assert counts == {"tagged": 1, "fallback": 2, "article_a": 1, "none": 1}


# ---- prompt, decoding, media ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("protocols")
    info = write_synthetic_dataset(root / "data", n_train=0, n_valid=6, seed=1, families=["image_colour"])
    return load_dataset(Path(info["splits"]["valid"]["json"]))


def test_echoink_prompts_are_its_evaluation_prompts(synth):
    record = synth[0]
    rl = protocol_settings("echoink", seed=3)
    text = build_prompt_text(record, rl.template)
    assert text == record.problem + "\n" + "\n".join(record.options) + "\n" + THINK_PROMPT + ANSWER_SUFFIX
    assert " Options:" not in text and " Options:" in build_prompt_text(record)        # ours keeps the label
    assert [m["role"] for m in build_messages(record, rl.template)] == ["user"]
    assert rl.decoding.as_dict() == {"greedy": False, "samples": 1, "temperature": 1.0, "top_p": 0.95, "top_k": None,
                                     "seed": 3, "max_new_tokens": 1024}
    assert (rl.media_options.min_pixels, rl.media_options.max_pixels) == (3136, 12845056)

    base = protocol_settings("echoink", base_model=True)
    messages = build_messages(record, base.template)
    assert messages[0] == {"role": "system", "content": "You are a helpful assistant."}
    assert messages[1]["content"][-1]["text"] == (record.problem + "\n" + "\n".join(record.options) + "\n"
                                                  + ECHOINK_BASE_INSTRUCTION + ANSWER_SUFFIX)
    assert base.decoding.as_dict() == {"greedy": True, "samples": 1, "max_new_tokens": 1024}
    ours = protocol_settings("ours")
    assert ours.decoding is None and ours.template.version == "echoink-r1-v1"
    with pytest.raises(ValueError, match="base_model only applies"):
        protocol_settings("ours", base_model=True)
    with pytest.raises(ValueError, match="protocol must be one of"):
        protocol_settings("lmms")


def test_echoink_image_caps_reach_the_processor(synth, tiny_model_dir):
    _, processor = load_thinker(tiny_model_dir)
    record = synth[0]
    ours = encode_prompt(record, processor)
    theirs = encode_prompt(record, processor, protocol_settings("echoink").media_options,
                           protocol_settings("echoink").template)
    # the synthetic images are 320 x 240 = 76,800 px: under both caps, so the same patches; the text differs
    assert ours.media["image_grid_thw"].tolist() == theirs.media["image_grid_thw"].tolist()
    assert ours.length - theirs.length == len(processor.tokenizer(" Options:")["input_ids"])


@pytest.mark.slow
def test_eval_protocol_echoink_end_to_end(synth, tiny_model_dir, tmp_path):
    """`echoink eval --protocol echoink`: its prompt version and decoding in every row, its parser's verdicts."""
    data = Path(synth[0].source)
    out = tmp_path / "echoink.jsonl"
    base = ["eval", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out), "--limit", "2",
            "--no-progress", "--protocol", "echoink"]
    runner = CliRunner()
    result = runner.invoke(app, base)
    assert result.exit_code == 0, result.output
    assert "protocol echoink" in result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert row["prompt_version"] == "echoink-r1-eval-rl" and row["protocol"] == "echoink"
        assert row["decoding"]["top_p"] == 0.95 and row["decoding"]["max_new_tokens"] == 1024
        assert row["pred"] == echoink_answer_letter(row["reply"]) and row["correct"] == (row["pred"] == row["gt"])
    for extra, message in ((["--temperature", "0.5"], "fixes the decoding"), (["--lenient"], "--lenient"),
                           (["--base-model", "--samples", "2"], "decodes greedily")):
        refused = runner.invoke(app, base + extra)
        assert refused.exit_code == 1 and message in refused.output, refused.output
    refused = runner.invoke(app, base[:-2] + ["--base-model"])
    assert refused.exit_code == 1 and "only applies with --protocol echoink" in refused.output


# ---- metrics --against echoink ----------------------------------------------------------------------


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_metrics_against_echoink_shows_the_difference(tmp_path):
    rows = [
        {"problem_id": 1, "gt": "A", "reply": "<think>a cat</think><answer>cat</answer>"},   # echoink: A (article)
        {"problem_id": 2, "gt": "B", "reply": "<think>x</think><answer>B</answer>"},         # both right
        {"problem_id": 3, "gt": "C", "reply": "<think>x</think><answer> c </answer>"},       # echoink only
        {"problem_id": 4, "gt": "D", "reply": "<think>x</think><answer>A</answer>"},         # both wrong
    ]
    rows = [regrade_row({**row, "pred": None, "correct": False}, "ours") for row in rows]
    path = _write_rows(tmp_path / "ours.jsonl", rows)
    runner = CliRunner()
    result = runner.invoke(app, ["metrics", str(path), "--against", "echoink", "--json"])
    assert result.exit_code == 0, result.output
    comparison = json.loads(result.output)["against"]["comparisons"][str(path)]
    assert comparison["accuracy_a"] == 0.25 and comparison["accuracy_b"] == 0.75
    assert comparison["echoink_parser"] == {"tagged": 3, "fallback": 1, "article_a": 1, "none": 0}
    table = runner.invoke(app, ["metrics", str(path), "--against", "echoink"], terminal_width=80)
    assert table.exit_code == 0, table.output
    assert "graded by protocol 'echoink'" in table.output and "of which article 'a'" in table.output
    assert "-50.0" in table.output                                                # 25 % vs 75 %, in points
