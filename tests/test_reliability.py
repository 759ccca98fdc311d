"""Nothing lost, nothing silent, round 3 (issue 23): bounded dynamic sampling, short runs whose prompts are all
skipped, unwritable places, user code that fails, non-finite weights."""

from __future__ import annotations

import json
import random

import pytest
import torch
from typer.testing import CliRunner

from echoink.cli import app
from echoink.config import MAX_SAMPLING_ROUNDS, ConfigError, load_config
from echoink.grpo.sampling import GroupSelection, informative


def constant_reward(completions, **columns):
    """A reward that never tells completions apart: no group is ever informative."""
    return [0.5] * len(completions)


def _one_line_error(result, *needles: str) -> str:
    output = result.output
    assert result.exit_code == 1, output
    assert "Traceback" not in output, output
    flat = output.replace("\n", " ")
    for needle in needles:
        assert needle in flat, output
    return flat


def _train_args(tiny_model_dir, mixed_dataset, out, *extra) -> list[str]:
    return ["train", f"model_path={tiny_model_dir}", f"train_data={mixed_dataset}/train/omni_rl_format_train.json",
            f"output_dir={out}", "num_generations=2", "max_completion_length=4", "seed=0",
            "per_device_train_batch_size=1", "save_steps=0", "eval_steps=0", *extra]


# ---- item 3: dynamic sampling in bounded memory ------------------------------------------------------------

def _group(total: float, informative_group: bool) -> tuple:
    rewards = torch.tensor([[total], [total + (1.0 if informative_group else 0.0)]])  # [G=2, R=1]
    return (f"record-{random.random()}", None, rewards)


def _unbounded_choice(items, wanted, weights):
    """The rule dynamic sampling had when it kept every round: first `wanted` informative, newest fillers."""
    useful = [item for item in items if informative(item[2], weights)][:wanted]
    fillers = [item for item in items if not informative(item[2], weights)][::-1][: wanted - len(useful)]
    return useful + fillers, len(items) - len(useful) - len(fillers)


@pytest.mark.parametrize("seed", range(20))
def test_group_selection_chooses_what_keeping_every_round_chose(seed):
    rng = random.Random(seed)
    weights = torch.ones(1)
    wanted = rng.randint(1, 4)
    selection = GroupSelection(wanted, weights)
    items = []
    for _ in range(rng.randint(1, 12)):  # rounds of `wanted` prompts
        batch = [_group(rng.random(), rng.random() < 0.3) for _ in range(rng.randint(0, wanted))]
        selection.add(batch)
        items += batch
    chosen, surplus = _unbounded_choice(items, wanted, weights)
    assert [id(item) for item in selection.chosen()] == [id(item) for item in chosen]
    assert selection.surplus == surplus and selection.seen == len(items)


def test_group_selection_holds_at_most_twice_the_batch_however_many_rounds():
    selection = GroupSelection(4, torch.ones(1))
    for _ in range(20_000):
        selection.add([_group(0.5, False)])
        assert len(selection.useful) + len(selection.fillers) <= 8
    assert selection.seen == 20_000 and selection.informative_seen == 0 and len(selection.chosen()) == 4


def test_max_sampling_rounds_has_a_ceiling():
    with pytest.raises(ConfigError, match=f"max_sampling_rounds must be between 1 and {MAX_SAMPLING_ROUNDS}, "
                                          "got 1000000000"):
        load_config(None, ["max_sampling_rounds=1000000000"])
    assert load_config(None, [f"max_sampling_rounds={MAX_SAMPLING_ROUNDS}"]).max_sampling_rounds == MAX_SAMPLING_ROUNDS


def test_dynamic_sampling_says_how_it_is_going(tiny_model_dir, mixed_dataset, tmp_path):
    result = CliRunner().invoke(app, _train_args(tiny_model_dir, mixed_dataset, tmp_path / "run", "max_steps=1",
                                                 "dynamic_sampling=true", "max_sampling_rounds=9", "--quiet",
                                                 "reward_funcs=[test_reliability:constant_reward]"))
    assert result.exit_code == 0, result.output
    assert ("dynamic sampling, step 1, micro-batch 1: 8 rounds so far (max_sampling_rounds=9), 0 of 8 groups "
            "informative (0.0%)") in result.output
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["sampling_rounds"] == 9 and row["surplus_groups"] == 8 and row["informative_groups"] == 0


# ---- item 4: a short run whose prompts are all skipped fails -----------------------------------------------

@pytest.mark.parametrize("steps", [1, 2])
def test_a_short_run_with_every_prompt_skipped_fails(tiny_model_dir, mixed_dataset, tmp_path, steps):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, _train_args(tiny_model_dir, mixed_dataset, out, f"max_steps={steps}",
                                                 "max_prompt_length=8", "--quiet"))
    _one_line_error(result, f"of the first {steps} step(s) are longer than max_prompt_length=8")
    assert not (out / "final").exists()
