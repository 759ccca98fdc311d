"""Rollouts never sample media placeholders; over-long prompts are skipped and counted, never truncated."""

from __future__ import annotations

import json

import pytest
import torch

from echoink.data import load_dataset
from echoink.model.engine import rollout_engine
from echoink.model.families import family_of_model
from echoink.model.generation import SamplingSettings, completion_mask
from echoink.model import load_thinker
from echoink.model.inputs import encode_prompt


class _MediaLovingHead(torch.nn.Module):
    """An lm_head whose logits put +50 on every media token and 0 elsewhere."""

    def __init__(self, vocab: int, favoured: list[int]) -> None:
        super().__init__()
        self.bias = torch.zeros(vocab)
        self.bias[favoured] = 50.0

    def forward(self, hidden):
        return self.bias.to(hidden.dtype).expand(*hidden.shape[:-1], -1)


@pytest.mark.parametrize("sharing", ["none", "full"])
def test_media_tokens_are_never_sampled(tiny_model_dir, mixed_dataset, sharing):
    model, processor = load_thinker(tiny_model_dir)
    media = family_of_model(model).media_token_ids(processor.tokenizer)
    names = processor.tokenizer.convert_ids_to_tokens(media)
    assert {"<|AUDIO|>", "<|IMAGE|>", "<|VIDEO|>", "<|audio_bos|>", "<|audio_eos|>", "<|vision_bos|>", "<|vision_eos|>"} <= set(names)
    model.lm_head = _MediaLovingHead(model.config.text_config.vocab_size, media)
    record = load_dataset(mixed_dataset / "train" / "omni_rl_format_train.json")[0]
    torch.manual_seed(0)
    engine = rollout_engine(model, processor.tokenizer, sharing)
    group = engine.generate([encode_prompt(record, processor)], SamplingSettings(num_generations=4, max_new_tokens=6))[0]
    assert not torch.isin(group.completion_ids, torch.tensor(media)).any()


def test_completion_mask_includes_the_first_eos_only():
    ids = torch.tensor([[5, 7, 9, 9], [9, 5, 5, 5], [5, 5, 5, 5]])
    mask, truncated = completion_mask(ids, eos_id=9)
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]


def test_over_long_prompts_are_skipped_and_counted(tiny_model_dir, mixed_dataset, tmp_path):
    """A step mixing short and long prompts trains on exactly the short ones and counts the long ones."""
    from echoink.config import load_config
    from echoink.data import load_dataset
    from echoink.grpo.batches import BatchPlan
    from echoink.grpo.trainer import train
    from echoink.model import load_thinker
    from echoink.model.inputs import encode_prompt

    data = mixed_dataset / "train" / "omni_rl_format_train.json"
    records = load_dataset(data)
    _, processor = load_thinker(tiny_model_dir)
    lengths = {r.problem_id: encode_prompt(r, processor).length for r in records}
    plan = BatchPlan(num_items=len(records), per_device_batch=6, num_processes=1, grad_accum=1, seed=0)
    step_ids = [records[i].problem_id for i in plan.step_indices(0, 0)[0]]
    limit = sorted(lengths[i] for i in step_ids)[2]  # the three shortest fit (ties aside), the others do not
    long_ids = {i for i in step_ids if lengths[i] > limit}
    assert 0 < len(long_ids) < len(step_ids)

    cfg = load_config(None, [f"model_path={tiny_model_dir}", f"train_data={data}", f"output_dir={tmp_path / 'run'}",
                             "num_generations=2", "max_completion_length=4", "max_steps=1", "seed=0",
                             "per_device_train_batch_size=6", f"max_prompt_length={limit}", "beta=0"])
    train(cfg, progress=False)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["skipped_prompts"] == len(long_ids) and row["num_groups"] == len(step_ids) - len(long_ids)
    trained = {json.loads(line)["problem_id"] for line in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()}
    assert trained == set(step_ids) - long_ids
