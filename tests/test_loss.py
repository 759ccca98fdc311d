"""policy_loss against numbers worked out by hand (plain Python math below each case)."""

import math

import pytest
import torch

from echoink.grpo import policy_loss

E = math.exp
PAD = 7.0  # garbage in padded positions: must never influence anything

# Two completions, T = 3; completion 0 has 2 real tokens, completion 1 has 3.
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
LOG_RATIOS = [[0.3, -0.5], [-0.4, 0.1, 0.5]]
ADV = torch.tensor([1.0, -0.5])


def _tensors(log_ratios=LOG_RATIOS, base=-1.0):
    """logps = base + log_ratio on real tokens (PAD elsewhere), old_logps = base (-PAD elsewhere)."""
    logps = torch.full((2, 3), PAD, dtype=torch.float64)  # float64: sums near 0 checked at rel=1e-6
    old = torch.full((2, 3), -PAD, dtype=torch.float64)
    for i, row in enumerate(log_ratios):
        for t, r in enumerate(row):
            logps[i, t] = base + r
            old[i, t] = base
    return logps.requires_grad_(True), old


# Token level, epsilon 0.2, hand-evaluated per-token loss -min(r A, clip(r) A):
#   completion 0 (A = +1): r = e^0.3 = 1.35 > 1.2 -> clipped: -1.2 ;  r = e^-0.5 (A > 0, low side unclipped): -e^-0.5
#   completion 1 (A = -0.5): r = e^-0.4 = 0.67 < 0.8 -> clipped: +0.5*0.8 = 0.4 ; r = e^0.1: 0.5 e^0.1 ;
#                            r = e^0.5 (A < 0, high side unclipped): 0.5 e^0.5
TOKEN_LOSS = [[-1.2, -E(-0.5)], [0.4, 0.5 * E(0.1), 0.5 * E(0.5)]]
TOKEN_SUM = sum(TOKEN_LOSS[0]) + sum(TOKEN_LOSS[1])


@pytest.mark.parametrize(
    "loss_type, kwargs, expected",
    [
        ("grpo", {}, (sum(TOKEN_LOSS[0]) / 2 + sum(TOKEN_LOSS[1]) / 3) / 2),
        ("bnpo", {}, TOKEN_SUM / 5),
        ("dr_grpo", {"max_completion_length": 4}, TOKEN_SUM / (2 * 4)),
        ("dapo", {}, TOKEN_SUM / 5),
        ("dapo", {"num_items_in_batch": 10}, TOKEN_SUM / 10),
        ("dapo", {"num_items_in_batch": torch.tensor(10.0)}, TOKEN_SUM / 10),
    ],
)
def test_token_level_aggregations(loss_type, kwargs, expected):
    logps, old = _tensors()
    loss, stats = policy_loss(logps, old, None, ADV, MASK, loss_type=loss_type, **kwargs)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["kl"].item() == 0.0
    assert stats["clip_ratio/low_mean"].item() == pytest.approx(1 / 5)
    assert stats["clip_ratio/high_mean"].item() == pytest.approx(1 / 5)
    assert stats["clip_ratio/region_mean"].item() == pytest.approx(2 / 5)
    ratios = [E(0.3), E(-0.5), E(-0.4), E(0.1), E(0.5)]
    assert stats["ratio_mean"].item() == pytest.approx(sum(ratios) / 5, rel=1e-6)
    assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())


def test_token_level_gradient_is_zero_exactly_on_clipped_tokens():
    logps, old = _tensors()
    loss, _ = policy_loss(logps, old, None, ADV, MASK, loss_type="bnpo")
    loss.backward()
    g = logps.grad
    # d/dlogp of -r*A is -A*r; bnpo divides by 5 tokens
    assert g[0, 0].item() == 0.0  # high-clipped (A > 0)
    assert g[1, 0].item() == 0.0  # low-clipped (A < 0)
    assert g[0, 1].item() == pytest.approx(-1.0 * E(-0.5) / 5, rel=1e-6)
    assert g[1, 1].item() == pytest.approx(0.5 * E(0.1) / 5, rel=1e-6)
    assert g[1, 2].item() == pytest.approx(0.5 * E(0.5) / 5, rel=1e-6)
    assert g[0, 2].item() == 0.0  # padding


def test_epsilon_high_widens_upper_clip_only():
    logps, old = _tensors()
    loss, stats = policy_loss(logps, old, None, ADV, MASK, loss_type="bnpo", epsilon_high=0.28)
    # e^0.3 = 1.3499 > 1.28 still clipped, now at 1.28; lower side unchanged
    expected = (-1.28 - E(-0.5) + 0.4 + 0.5 * E(0.1) + 0.5 * E(0.5)) / 5
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    logps, old = _tensors()
    loss, stats = policy_loss(logps, old, None, ADV, MASK, loss_type="bnpo", epsilon_high=0.4)
    expected = (-E(0.3) - E(-0.5) + 0.4 + 0.5 * E(0.1) + 0.5 * E(0.5)) / 5
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["clip_ratio/high_mean"].item() == 0.0


# Sequence level (GSPO): one ratio per completion, exp(mean of its real-token log-ratios).
#   completion 0: mean(0.3, -0.5) = -0.1, r = e^-0.1 in [0.8, 1.2], A = +1 -> every token -e^-0.1
#   completion 1: mean(-0.4, 0.1, 0.5) = 1/15, r = e^(1/15), A = -0.5 -> every token 0.5 e^(1/15)
S0, S1 = -E(-0.1), 0.5 * E(1 / 15)


@pytest.mark.parametrize(
    "loss_type, kwargs, expected",
    [
        ("grpo", {}, (S0 + S1) / 2),
        ("bnpo", {}, (2 * S0 + 3 * S1) / 5),
        ("dr_grpo", {"max_completion_length": 3}, (2 * S0 + 3 * S1) / 6),
        ("dapo", {}, (2 * S0 + 3 * S1) / 5),
    ],
)
def test_sequence_level_aggregations(loss_type, kwargs, expected):
    logps, old = _tensors()
    loss, stats = policy_loss(
        logps, old, None, ADV, MASK, loss_type=loss_type, importance_sampling_level="sequence", **kwargs
    )
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["ratio_mean"].item() == pytest.approx((E(-0.1) + E(1 / 15)) / 2, rel=1e-6)  # mean over sequences
    assert stats["clip_ratio/region_mean"].item() == 0.0


def test_sequence_level_clipping_both_sides_zeroes_whole_sequence_gradient():
    # completion 0: mean(0.4, 0.2) = 0.3 -> r = 1.35 > 1.2 with A > 0: clipped high
    # completion 1: mean(-0.5, -0.3, -0.4) = -0.4 -> r = 0.67 < 0.8 with A < 0: clipped low
    logps, old = _tensors([[0.4, 0.2], [-0.5, -0.3, -0.4]])
    loss, stats = policy_loss(logps, old, None, ADV, MASK, loss_type="grpo", importance_sampling_level="sequence")
    assert loss.item() == pytest.approx((-1.2 + 0.5 * 0.8) / 2, rel=1e-6)
    loss.backward()
    assert torch.count_nonzero(logps.grad).item() == 0
    # clip metrics at sequence level are fractions of sequences
    assert stats["clip_ratio/low_mean"].item() == pytest.approx(0.5)
    assert stats["clip_ratio/high_mean"].item() == pytest.approx(0.5)
    assert stats["clip_ratio/region_mean"].item() == pytest.approx(1.0)


def test_sequence_level_gradient_spreads_over_tokens():
    # unclipped: loss_i = -A_i exp(mean_t lr) ; d/dlogp_t = -A_i r_i / len_i ; grpo averages 2 sequences
    logps, old = _tensors()
    loss, _ = policy_loss(logps, old, None, ADV, MASK, loss_type="grpo", importance_sampling_level="sequence")
    loss.backward()
    # grpo: per sequence the loss is mean over its tokens of the same value -> -A r ; then / 2 sequences
    g0 = -1.0 * E(-0.1) / 2 / 2
    g1 = 0.5 * E(1 / 15) / 3 / 2
    assert logps.grad[0, :2].tolist() == pytest.approx([g0, g0], rel=1e-6)
    assert logps.grad[1].tolist() == pytest.approx([g1, g1, g1], rel=1e-6)
    assert logps.grad[0, 2].item() == 0.0


def _k3(d):
    return E(d) - d - 1  # d = ref - logp


def test_zero_advantage_leaves_only_kl():
    logps = torch.tensor([[-1.0, -2.0, PAD], [-0.5, -0.5, -1.5]], requires_grad=True)
    ref = torch.tensor([[-0.5, -2.2, -PAD], [-0.5, -1.0, -1.0]])
    d = [[0.5, -0.2], [0.0, -0.5, 0.5]]
    kl = [[_k3(x) for x in row] for row in d]
    beta = 0.04
    loss, stats = policy_loss(logps, None, ref, torch.zeros(2), MASK, beta=beta)
    expected = beta * (sum(kl[0]) / 2 + sum(kl[1]) / 3) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["kl"].item() == pytest.approx((sum(kl[0]) + sum(kl[1])) / 5, rel=1e-6)
    loss.backward()
    # d/dlogp k3(ref - logp) = 1 - exp(ref - logp)
    assert logps.grad[0, 0].item() == pytest.approx(beta * (1 - E(0.5)) / 2 / 2, rel=1e-5)


def test_beta_with_off_policy_ratio_and_bias_correction():
    logps, old = _tensors()
    ref = old.clone()  # ref = base: d = ref - logp = -log_ratio on real tokens
    beta = 0.1
    kl = [[_k3(-r) for r in row] for row in LOG_RATIOS]
    ratios = [[E(r) for r in row] for row in LOG_RATIOS]

    loss, stats = policy_loss(logps, old, ref, ADV, MASK, loss_type="bnpo", beta=beta)
    plain = [TOKEN_LOSS[i][t] + beta * kl[i][t] for i in range(2) for t in range(len(kl[i]))]
    assert loss.item() == pytest.approx(sum(plain) / 5, rel=1e-6)
    assert stats["kl"].item() == pytest.approx(sum(map(sum, kl)) / 5, rel=1e-6)

    logps, old = _tensors()
    loss, stats = policy_loss(
        logps, old, ref, ADV, MASK, loss_type="bnpo", beta=beta, use_bias_correction_kl=True
    )
    corrected = [
        TOKEN_LOSS[i][t] + beta * kl[i][t] * ratios[i][t] for i in range(2) for t in range(len(kl[i]))
    ]
    assert loss.item() == pytest.approx(sum(corrected) / 5, rel=1e-6)
    assert stats["kl"].item() == pytest.approx(
        sum(kl[i][t] * ratios[i][t] for i in range(2) for t in range(len(kl[i]))) / 5, rel=1e-6
    )


def test_bias_correction_at_sequence_level_uses_sequence_ratio():
    logps, old = _tensors()
    ref = old.clone()
    kl = [[_k3(-r) for r in row] for row in LOG_RATIOS]
    seq_ratio = [E(-0.1), E(1 / 15)]
    loss, _ = policy_loss(
        logps, old, ref, ADV, MASK, loss_type="dapo", beta=0.5,
        importance_sampling_level="sequence", use_bias_correction_kl=True,
    )
    expected = (2 * S0 + 3 * S1 + 0.5 * sum(seq_ratio[i] * k for i in range(2) for k in kl[i])) / 5
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_on_policy_is_plain_policy_gradient():
    logps = torch.tensor([[-1.0, -2.0, PAD], [-0.5, -0.5, -1.5]], requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    loss, stats = policy_loss(logps, None, None, adv, MASK)
    assert loss.item() == pytest.approx((-2.0 + 1.0) / 2)  # ratio 1: loss = mean_i(-A_i)
    assert stats["ratio_mean"].item() == 1.0
    assert stats["clip_ratio/region_mean"].item() == 0.0
    loss.backward()
    assert logps.grad[0].tolist() == pytest.approx([-2.0 / 2 / 2, -2.0 / 2 / 2, 0.0])
    assert logps.grad[1].tolist() == pytest.approx([1 / 3 / 2] * 3)


def test_matches_echoink_r1_loss_on_policy():
    """EchoInk-R1 (num_iterations=1): per token -(exp(logp - sg(logp)) A - beta kl), mean per sequence, then mean."""
    torch.manual_seed(0)
    n, t, beta = 6, 9, 0.001
    base = torch.randn(n, t) - 2.0
    ref = base + 0.3 * torch.randn(n, t)
    adv = torch.randn(n)
    mask = torch.ones(n, t)
    for i, length in enumerate([9, 3, 5, 1, 7, 8]):
        mask[i, length:] = 0

    ours_logps = base.clone().requires_grad_(True)
    ours, _ = policy_loss(ours_logps, None, ref, adv, mask, beta=beta)
    ours.backward()

    theirs_logps = base.clone().requires_grad_(True)
    kl = torch.exp(ref - theirs_logps) - (ref - theirs_logps) - 1
    per_token = torch.exp(theirs_logps - theirs_logps.detach()) * adv.unsqueeze(1)
    per_token = -(per_token - beta * kl)
    theirs = ((per_token * mask).sum(dim=1) / mask.sum(dim=1)).mean()
    theirs.backward()

    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6, abs=1e-7)
    assert torch.allclose(ours_logps.grad, theirs_logps.grad, rtol=1e-5, atol=1e-8)


def test_bool_mask_and_empty_sequence():
    logps = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]], requires_grad=True)
    mask = torch.tensor([[True, True], [False, False]])
    loss, stats = policy_loss(logps, None, None, torch.tensor([1.0, 5.0]), mask)
    # the empty completion contributes 0 (denominator clamped to 1) but still counts as a sequence
    assert loss.item() == pytest.approx(-1.0 / 2)
    assert not torch.isnan(loss)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_non_finite_padding_cannot_poison_loss_or_gradient(level):
    logps = torch.tensor([[-1.0, float("-inf")], [-0.5, float("nan")]], requires_grad=True)
    old = torch.tensor([[-1.1, float("nan")], [-0.4, float("-inf")]])
    ref = torch.tensor([[-0.9, float("inf")], [-0.6, 0.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    loss, stats = policy_loss(logps, old, ref, torch.tensor([1.0, -1.0]), mask, beta=0.1,
                              importance_sampling_level=level, use_bias_correction_kl=True)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logps.grad).all()
    assert logps.grad[:, 1].tolist() == [0.0, 0.0]
    assert all(torch.isfinite(v) for v in stats.values())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"beta": 0.1}, "ref_logps"),
        ({"loss_type": "dr_grpo"}, "max_completion_length"),
        ({"loss_type": "ppo"}, "loss_type"),
        ({"importance_sampling_level": "word"}, "importance_sampling_level"),
        ({"epsilon": -0.1}, "epsilon"),
        ({"beta": -1.0}, "beta"),
    ],
)
def test_invalid_options(kwargs, message):
    logps, old = _tensors()
    with pytest.raises(ValueError, match=message):
        policy_loss(logps, old, None, ADV, MASK, **kwargs)


def test_invalid_shapes():
    logps, old = _tensors()
    with pytest.raises(ValueError, match="old_logps"):
        policy_loss(logps, old[:, :2], None, ADV, MASK)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logps, old, None, ADV.unsqueeze(1), MASK)
    with pytest.raises(ValueError, match="mask"):
        policy_loss(logps, old, None, ADV, MASK[:1])
    with pytest.raises(ValueError, match="logps"):
        policy_loss(logps[0], None, None, ADV, MASK[0])
