import math
import statistics

import pytest
import torch

from echoink.grpo import group_advantages
from echoink.grpo.advantages import group_reward_stats


def test_group_scale_matches_hand_computation():
    rewards = torch.tensor([1.0, 0.0, 2.0, 1.0, 5.0, 5.0, 5.0, 5.0])
    adv = group_advantages(rewards, num_generations=4)
    # group 0: mean 1, unbiased std sqrt((0+1+1+0)/3)
    std0 = math.sqrt(2 / 3)
    expected0 = [0.0, -1 / (std0 + 1e-4), 1 / (std0 + 1e-4), 0.0]
    assert adv[:4].tolist() == pytest.approx(expected0, rel=1e-6)
    # group 1 has zero variance: advantage exactly 0
    assert adv[4:].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_batch_scale_uses_whole_batch_std():
    values = [1.0, 0.0, 3.0, 2.0]
    adv = group_advantages(torch.tensor(values), num_generations=2, scale="batch", eps=0.0)
    batch_std = statistics.stdev(values)  # unbiased, like torch's default
    expected = [0.5 / batch_std, -0.5 / batch_std, 0.5 / batch_std, -0.5 / batch_std]
    assert adv.tolist() == pytest.approx(expected, rel=1e-6)


def test_none_scale_only_centres():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 2.0, 4.0, 6.0]), num_generations=3, scale="none")
    assert adv.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, -2.0, 0.0, 2.0], rel=1e-6)


def test_single_generation_gives_zero_advantage():
    for scale in ("group", "batch", "none"):
        adv = group_advantages(torch.tensor([1.0, 0.0, 3.0]), num_generations=1, scale=scale)
        assert adv.tolist() == [0.0, 0.0, 0.0]
        assert not torch.isnan(adv).any()


def test_integer_rewards_and_empty_batch():
    adv = group_advantages(torch.tensor([1, 0]), num_generations=2, eps=0.0)
    assert adv.dtype.is_floating_point
    s = math.sqrt(0.5)
    assert adv.tolist() == pytest.approx([0.5 / s, -0.5 / s])
    assert group_advantages(torch.zeros(0), num_generations=4).shape == (0,)


@pytest.mark.parametrize(
    "rewards, g, scale, message",
    [
        (torch.zeros(5), 2, "group", "multiple"),
        (torch.zeros(4), 0, "group", "num_generations"),
        (torch.zeros(2, 2), 2, "group", "1-D"),
        (torch.zeros(4), 2, "std", "scale"),
    ],
)
def test_invalid_inputs(rewards, g, scale, message):
    with pytest.raises(ValueError, match=message):
        group_advantages(rewards, g, scale=scale)


def test_rejects_non_tensor():
    with pytest.raises(TypeError):
        group_advantages([1.0, 2.0], 2)


def test_group_reward_stats():
    stats = group_reward_stats(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0]), num_generations=2)
    # groups: (1,0) std sqrt(0.5); (1,1) std 0; (0,0) std 0
    assert stats["reward_std"] == pytest.approx(math.sqrt(0.5) / 3)
    assert stats["frac_reward_zero_std"] == pytest.approx(2 / 3)
    lone = group_reward_stats(torch.tensor([1.0, 0.0]), num_generations=1)
    assert lone == {"reward_std": 0.0, "frac_reward_zero_std": 1.0}
