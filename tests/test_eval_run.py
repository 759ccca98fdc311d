"""Batched, resumable evaluation (echoink.eval.run) and prompt batching (echoink.model.batching).

One tiny checkpoint and one 16-item synthetic set (every family: image_audio, image, audio,
video_audio, text) are built once for the module.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from echoink.cli import app
from echoink.data import load_dataset
from echoink.data.media import load_audio, load_image
from echoink.data.synth import write_synthetic_dataset
from echoink.eval.run import evaluate, evaluate_loaded
from echoink.eval.run_files import RunSignatureError, run_file_path
from echoink.model.families import family_of_model
from echoink.model import load_thinker
from echoink.model.batching import collate_prompts, split_by_audio_in_video
from echoink.model.inputs import MID_GREY, encode_prompt
from echoink.model.tiny import write_tiny_checkpoint

MAX_NEW = 8
RESUME_LIMIT = 8


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_run")
    model_dir = write_tiny_checkpoint(root / "model", layout="thinker", seed=0)
    info = write_synthetic_dataset(root / "data", n_train=0, n_valid=16, seed=0)
    data_path = Path(info["splits"]["valid"]["json"])
    model, processor = load_thinker(model_dir)
    records = load_dataset(data_path)
    return {"root": root, "model_dir": Path(model_dir), "data": data_path, "model": model,
            "processor": processor, "records": records}


@pytest.fixture(scope="module")
def greedy_bs1(env):
    """Reference: greedy rows at batch size 1, keyed by (problem_id, sample_idx)."""
    out = env["root"] / "bs1.jsonl"
    evaluate_loaded(env["model"], env["processor"], env["records"], out_path=out, batch_size=1,
                    max_new_tokens=MAX_NEW)
    return _rows_by_key(out)


def _rows_by_key(path: Path) -> dict[tuple[str, int], dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    keys = [(str(r["problem_id"]), r["sample_idx"]) for r in rows]
    assert len(keys) == len(set(keys)), "duplicate rows"
    return dict(zip(keys, rows))


# ---- batching ------------------------------------------------------------------------------------


def test_collate_left_pads_and_concatenates_media(env):
    processor, records = env["processor"], env["records"]
    pad = processor.tokenizer.pad_token_id
    prompts = [encode_prompt(r, processor) for r in records[:6]]
    groups = split_by_audio_in_video(prompts)
    assert sorted(i for g in groups for i in g) == list(range(6))
    plain = [prompts[i] for i in groups[0]] if not prompts[groups[0][0]].use_audio_in_video else \
        [prompts[i] for i in groups[1]]
    batch = collate_prompts(plain, pad)
    length = max(p.length for p in plain)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (len(plain), length)
    for row, p in enumerate(plain):
        assert torch.equal(batch["input_ids"][row, length - p.length:], p.input_ids[0])
        assert batch["attention_mask"][row].tolist() == [0] * (length - p.length) + [1] * p.length
        assert (batch["input_ids"][row, : length - p.length] == pad).all()
    for key in ("pixel_values", "image_grid_thw", "input_features", "feature_attention_mask"):
        parts = [p.media[key] for p in plain if key in p.media]
        if parts:
            assert torch.equal(batch[key], torch.cat(parts)), key
    assert "use_audio_in_video" not in batch
    # repeats: rows p0, p0, p1, p1 with the media repeated alongside
    doubled = collate_prompts(plain[:2], pad, repeats=2)
    assert torch.equal(doubled["input_ids"][0], doubled["input_ids"][1])
    video = [p for p in prompts if p.use_audio_in_video]
    if video:
        with pytest.raises(ValueError, match="use_audio_in_video"):
            collate_prompts([plain[0], video[0]], pad)


def test_left_padded_forward_matches_single_prompts(env):
    """The rope index uses attention_mask: a padded row's logits equal those of the prompt alone."""
    model, processor = env["model"], env["processor"]
    records = env["records"]
    subset = [next(r for r in records if r.data_type == t) for t in ("image_audio", "image", "text", "audio")]
    subset += [r for r in records if r.data_type == "video_audio"]
    prompts = [encode_prompt(r, processor) for r in subset]
    for members in split_by_audio_in_video(prompts):
        group = [prompts[i] for i in members]
        batch = collate_prompts(group, processor.tokenizer.pad_token_id)
        with torch.no_grad():
            batched = model(**batch).logits[:, -1]
            single = torch.stack([model(**collate_prompts([p], processor.tokenizer.pad_token_id)).logits[0, -1]
                                  for p in group])
        assert torch.allclose(batched, single, atol=1e-4, rtol=1e-4)


def test_batched_greedy_equals_batch_size_one(env, greedy_bs1):
    records = env["records"]
    assert {"image_audio", "image", "audio", "video_audio", "text"} <= {r.data_type for r in records}
    lengths = {encode_prompt(r, env["processor"]).length for r in records}
    assert len(lengths) > 3  # prompts of different lengths share batches
    summary = evaluate_loaded(env["model"], env["processor"], records, batch_size=6, max_new_tokens=MAX_NEW,
                              out_path=env["root"] / "bs5.jsonl")
    batched = _rows_by_key(env["root"] / "bs5.jsonl")
    assert batched.keys() == greedy_bs1.keys() and len(batched) == len(records)
    for key, row in greedy_bs1.items():
        assert batched[key]["reply"] == row["reply"], key
        assert batched[key]["pred"] == row["pred"]
        assert batched[key]["reply_tokens"] == row["reply_tokens"]
    assert summary["n"] == len(records) and summary["generated"] == len(records)
    row = next(iter(batched.values()))
    assert set(row) >= {"problem_id", "sample_idx", "gt", "pred", "correct", "reply", "data_type", "needs",
                        "reply_tokens", "model", "decoding", "prompt_version", "ablate"}
    assert row["decoding"] == {"greedy": True, "samples": 1, "max_new_tokens": MAX_NEW}
    # unparsed replies are wrong
    assert all(r["correct"] is False for r in batched.values() if r["pred"] is None)


# ---- sampling ------------------------------------------------------------------------------------


def test_k_samples_lines_seeded_and_aligned(env, greedy_bs1):
    model, processor, records = env["model"], env["processor"], env["records"]
    common = dict(greedy=False, samples=3, temperature=1.0, max_new_tokens=4, batch_size=4, limit=4)
    first = evaluate_loaded(model, processor, records, out_path=env["root"] / "k1.jsonl", seed=1, **common)
    again = evaluate_loaded(model, processor, records, out_path=env["root"] / "k2.jsonl", seed=1, **common)
    other = evaluate_loaded(model, processor, records, out_path=env["root"] / "k3.jsonl", seed=2, **common)
    a, b, c = (_rows_by_key(env["root"] / f"k{i}.jsonl") for i in (1, 2, 3))
    expected = {(str(r.problem_id), s) for r in records[:4] for s in range(3)}
    assert a.keys() == expected and first["n"] == 12 and first["samples_per_problem"] == 3
    assert [a[k]["reply"] for k in sorted(expected)] == [b[k]["reply"] for k in sorted(expected)]
    assert [a[k]["reply"] for k in sorted(expected)] != [c[k]["reply"] for k in sorted(expected)]
    assert again["accuracy"] == first["accuracy"] and other["n"] == 12
    # top_k=1 sampling is greedy: each of the K expanded rows must still belong to its own prompt
    evaluate_loaded(model, processor, records, out_path=env["root"] / "k_top1.jsonl", greedy=False, samples=2,
                    top_k=1, max_new_tokens=MAX_NEW, batch_size=8)
    top1 = _rows_by_key(env["root"] / "k_top1.jsonl")
    for (problem_id, _), row in top1.items():
        assert row["reply"] == greedy_bs1[(problem_id, 0)]["reply"]


# ---- resume --------------------------------------------------------------------------------------


def test_resume_after_kill_has_no_duplicates_and_no_gaps(env, greedy_bs1, tmp_path):
    out = tmp_path / "pred.jsonl"
    script = tmp_path / "slow_eval.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from echoink.eval.run import evaluate
        evaluate(sys.argv[1], sys.argv[2], sys.argv[3], batch_size=1, max_new_tokens={MAX_NEW}, progress=False,
                 limit={RESUME_LIMIT}, on_batch=lambda rows: time.sleep(0.25))
    """), encoding="utf-8")
    process = subprocess.Popen([sys.executable, str(script), str(env["model_dir"]), str(env["data"]), str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while not (out.is_file() and out.read_bytes().count(b"\n") >= 2):
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the evaluation subprocess wrote nothing"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    written = out.read_bytes().count(b"\n")
    assert 2 <= written < RESUME_LIMIT, "the kill must land mid-run"
    with out.open("ab") as handle:  # a line cut by the kill
        handle.write(b'{"problem_id": 3, "sample_idx": 0, "gt": "B", "pre')

    summary = evaluate(env["model_dir"], env["data"], out, batch_size=3, max_new_tokens=MAX_NEW, progress=False,
                       limit=RESUME_LIMIT)
    assert out.read_bytes().endswith(b"\n")
    resumed = _rows_by_key(out)  # asserts no duplicates
    expected = {(str(r.problem_id), 0) for r in env["records"][:RESUME_LIMIT]}
    assert resumed.keys() == expected  # no gaps
    assert summary["resumed"] == written and summary["generated"] == RESUME_LIMIT - written
    for key in expected:
        assert resumed[key]["reply"] == greedy_bs1[key]["reply"]
    # a finished run resumes to a no-op
    again = evaluate(env["model_dir"], env["data"], out, max_new_tokens=MAX_NEW, progress=False, limit=RESUME_LIMIT)
    assert again["generated"] == 0 and again["n"] == RESUME_LIMIT


def test_changed_settings_are_refused(env, tmp_path):
    model, processor, records = env["model"], env["processor"], env["records"]
    out = tmp_path / "pred.jsonl"
    evaluate_loaded(model, processor, records, out_path=out, limit=2, max_new_tokens=4)
    signature = json.loads(run_file_path(out).read_text())
    assert signature["decoding"] == {"greedy": True, "samples": 1, "max_new_tokens": 4}
    for changed in ({"max_new_tokens": 5}, {"greedy": False, "temperature": 0.7}, {"ablate": "mute-audio"},
                    {"lenient": True}):
        with pytest.raises(RunSignatureError, match="other settings"):
            evaluate_loaded(model, processor, records, out_path=out, limit=2, **{"max_new_tokens": 4, **changed})
    # batch size and limit are throughput/extent knobs: the same run continues
    more = evaluate_loaded(model, processor, records, out_path=out, limit=3, batch_size=2, max_new_tokens=4)
    assert more["generated"] == 1 and more["resumed"] == 2 and len(out.read_text().splitlines()) == 3
    # a file with rows but no signature is never appended to
    stray = tmp_path / "stray.jsonl"
    stray.write_text('{"problem_id": 0, "correct": true}\n')
    with pytest.raises(RunSignatureError, match="no run signature"):
        evaluate_loaded(model, processor, records, out_path=stray, limit=1, max_new_tokens=4)


def test_cli_eval_runs_and_fails_cleanly(env, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli.jsonl"
    base = ["eval", "--model", str(env["model_dir"]), "--data", str(env["data"]), "--out", str(out),
            "--limit", "2", "--max-new-tokens", "4", "--no-progress"]
    result = runner.invoke(app, base)
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and len(out.read_text().splitlines()) == 2
    refused = runner.invoke(app, base[:-1] + ["--samples", "2", "--no-progress"])
    assert refused.exit_code == 1 and "other settings" in refused.output
    def argv_with(changes: dict[str, str], extra: list[str]) -> list[str]:
        argv = list(base)
        for flag, value in changes.items():
            argv[argv.index(flag) + 1] = value
        return argv + extra

    for argv, message in (
        (argv_with({"--model": str(tmp_path / "missing")}, []), "does not exist"),
        (argv_with({"--data": str(tmp_path / "missing.json")}, []), "missing.json"),
        (argv_with({}, ["--temperature", "0.7"]), "--samples"),
        (argv_with({}, ["--greedy", "--samples", "2"]), "exclude"),
        (argv_with({}, ["--ablate", "deafen"]), "ablate"),
    ):
        result = runner.invoke(app, argv)
        assert result.exit_code == 1, (argv, result.output)
        assert "error:" in result.output and message in result.output, result.output


# ---- ablations change the model inputs as stated ---------------------------------------------------


def test_ablations_change_the_tensors_as_stated(env):
    processor, records = env["processor"], env["records"]
    placeholders = set(family_of_model(env["model"]).media_token_ids(processor.tokenizer))
    record = next(r for r in records if r.data_type == "image_audio")
    base = encode_prompt(record, processor)

    muted = encode_prompt(record, processor, ablate="mute-audio")
    samples = load_audio(record.media["audio"])
    silence = processor.feature_extractor([np.zeros_like(samples)], sampling_rate=16_000, padding="max_length",
                                          return_attention_mask=True, return_tensors="pt")
    assert torch.equal(muted.input_ids, base.input_ids)
    assert torch.equal(muted.media["feature_attention_mask"], base.media["feature_attention_mask"])
    assert torch.allclose(muted.media["input_features"], silence["input_features"])
    assert not torch.allclose(muted.media["input_features"], base.media["input_features"])
    assert torch.equal(muted.media["pixel_values"], base.media["pixel_values"])

    blank = encode_prompt(record, processor, ablate="blank-image")
    image = load_image(record.media["image"])
    grey = processor.image_processor(images=[Image.new("RGB", image.size, (MID_GREY,) * 3)], return_tensors="pt")
    assert torch.equal(blank.input_ids, base.input_ids)
    assert torch.equal(blank.media["image_grid_thw"], base.media["image_grid_thw"])
    assert torch.allclose(blank.media["pixel_values"], torch.as_tensor(grey["pixel_values"]))
    assert not torch.allclose(blank.media["pixel_values"], base.media["pixel_values"])
    assert torch.equal(blank.media["input_features"], base.media["input_features"])

    for data_type in ("image_audio", "video_audio", "audio", "image"):
        item = next(r for r in records if r.data_type == data_type)
        bare = encode_prompt(item, processor, ablate="no-media")
        assert bare.media == {} and not bare.use_audio_in_video
        assert not placeholders & set(bare.input_ids[0].tolist()), data_type
