"""Evaluation through the batched shared-prefill engine, both families: greedy and K-sample answers are identical
for every batch size (each prompt draws from its own stream, seeded by (seed, the record's position)), and a
sampled predictions file of the previous format is refused on resume while a greedy one resumes."""

from __future__ import annotations

import json

import pytest

from echoink.data import load_dataset
from echoink.eval.run import evaluate_loaded
from echoink.eval.run_files import RunSignatureError
from echoink.model import load_thinker

MAX_NEW = 6
DATA_TYPES = {"image_audio", "video_audio", "image", "audio", "text"}


@pytest.fixture(scope="module", params=["qwen2.5-omni", "qwen3-omni"])
def setup(request, mixed_dataset):
    thinker_dir = request.getfixturevalue({"qwen2.5-omni": "tiny_model_dir", "qwen3-omni": "qwen3_model_dir"}
                                          [request.param])
    model, processor = load_thinker(thinker_dir, dtype="float32")
    records = load_dataset(mixed_dataset / "train" / "omni_rl_format_train.json")
    chosen = [next(r for r in records if r.data_type == t) for t in sorted(DATA_TYPES)]
    chosen += [r for r in records if r not in chosen][:2]
    return model, processor, chosen


def _replies(path) -> dict:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return {(str(r["problem_id"]), r["sample_idx"]): (r["reply"], r["reply_tokens"]) for r in rows}


@pytest.mark.parametrize("decoding", [dict(), dict(greedy=False, samples=3, seed=4, temperature=0.8, top_p=0.95)],
                         ids=["greedy", "k3"])
def test_every_batch_size_gives_the_same_answers(setup, tmp_path, decoding):
    model, processor, records = setup
    assert {r.data_type for r in records} == DATA_TYPES
    answers = {}
    for batch_size in (1, 6):
        out = tmp_path / f"bs{batch_size}.jsonl"
        summary = evaluate_loaded(model, processor, records, out_path=out, batch_size=batch_size,
                                  max_new_tokens=MAX_NEW, progress=False, **decoding)
        assert summary["generated"] == len(records) * decoding.get("samples", 1)
        answers[batch_size] = _replies(out)
    assert answers[1] == answers[6]
    if decoding:  # the K samples of a problem differ (they are not K copies of one stream)
        by_problem = {}
        for (problem, _), (reply, _) in answers[1].items():
            by_problem.setdefault(problem, set()).add(reply)
        assert any(len(replies) > 1 for replies in by_problem.values())


@pytest.mark.parametrize("greedy", [True, False])
def test_a_previous_format_file_resumes_only_when_greedy(setup, tmp_path, greedy):
    model, processor, records = setup
    decoding = dict(greedy=True) if greedy else dict(greedy=False, samples=2, seed=1)
    out = tmp_path / "pred.jsonl"
    evaluate_loaded(model, processor, records[:2], out_path=out, batch_size=2, max_new_tokens=MAX_NEW,
                    progress=False, **decoding)
    sidecar = out.with_name(out.name + ".run.json")
    signature = json.loads(sidecar.read_text(encoding="utf-8"))
    signature["format"] = "echoink-predictions-v1"   # as written before per-prompt random streams
    sidecar.write_text(json.dumps(signature), encoding="utf-8")
    if greedy:
        summary = evaluate_loaded(model, processor, records[:3], out_path=out, batch_size=2, max_new_tokens=MAX_NEW,
                                  progress=False, **decoding)
        assert summary["resumed"] == 2 and summary["generated"] == 1
    else:
        with pytest.raises(RunSignatureError, match="echoink-predictions-v1") as info:
            evaluate_loaded(model, processor, records[:3], out_path=out, batch_size=2, max_new_tokens=MAX_NEW,
                            progress=False, **decoding)
        assert "\n" not in str(info.value)
