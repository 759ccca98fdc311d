"""Group-relative advantages: how much better each completion did than its siblings.

In GRPO a prompt is answered ``G`` times (``num_generations``). The rewards of one step arrive as a flat
vector ``[B*G]`` in which consecutive blocks of ``G`` belong to one prompt (group ``b`` occupies
indices ``b*G .. b*G+G-1``). The advantage of completion ``i`` of group ``b`` is

    A[b, i] = (r[b, i] - mean_j r[b, j]) / (scale + eps)

where ``scale`` is

* ``"group"`` (GRPO, EchoInk-R1, TRL's ``scale_rewards="group"``): the group's standard deviation,
* ``"batch"``: the standard deviation over the whole ``[B*G]`` batch,
* ``"none"`` (Dr. GRPO): 1, i.e. the advantage is only centred, never divided (``eps`` is not added).

Standard deviations are torch's default, unbiased (Bessel-corrected, divisor ``n - 1``).
"""

from __future__ import annotations

from typing import Literal

import torch

from echoink.choices import SCALE_REWARDS

AdvantageScale = Literal["group", "batch", "none"]


def _grouped(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Validate ``rewards [B*G]`` and view it as ``[B, G]``."""
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B*G], got shape {tuple(rewards.shape)}")
    if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 1:
        raise ValueError(f"num_generations must be an integer >= 1, got {num_generations!r}")
    if rewards.numel() % num_generations != 0:
        raise ValueError(
            f"rewards has {rewards.numel()} entries, which is not a multiple of num_generations={num_generations}"
        )
    if not rewards.is_floating_point():
        rewards = rewards.float()
    return rewards.view(-1, num_generations)


def group_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    scale: AdvantageScale = "group",
    eps: float = 1e-4,
    *,
    batch_std: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Group-relative advantages of a flat reward vector.

    Args:
        rewards: ``[B*G]`` total reward per completion; consecutive blocks of ``G`` are one prompt's group.
        num_generations: ``G``, completions per prompt (>= 1).
        scale: ``"group"`` divides by the group's std, ``"batch"`` by the std of all ``B*G`` rewards,
            ``"none"`` only subtracts the group mean.
        eps: added to the std before dividing (ignored for ``"none"``).
        batch_std: with ``scale="batch"``, the std to divide by instead of this tensor's own — the
            trainer passes the std over the whole step's rewards on all processes (TRL's definition).

    Returns:
        ``[B*G]`` advantages, same order as ``rewards``, floating point, no gradient history of its own
        beyond what ``rewards`` carries.

    Edge cases:
        * ``G == 1``: a lone completion has nothing to be compared with (its std is undefined), so its
          advantage is defined as 0 for every ``scale``.
        * A group whose rewards are all equal (max == min) gets advantages of exactly 0, for every
          ``scale`` (float rounding of the mean would otherwise leave values like 6e-4).
        * An empty reward vector gives an empty result.
    """
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale must be one of {SCALE_REWARDS}, got {scale!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    grouped = _grouped(rewards, num_generations)  # [B, G]
    if num_generations == 1 or grouped.numel() == 0:
        return torch.zeros(grouped.numel(), dtype=grouped.dtype, device=grouped.device)

    centred = grouped - grouped.mean(dim=1, keepdim=True)  # [B, G]
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        std = grouped.std() if batch_std is None else torch.as_tensor(batch_std, dtype=grouped.dtype)
        centred = centred / (std + eps)  # grouped.numel() >= 2 here, so the std is finite
    all_equal = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)  # [B, 1]
    return torch.where(all_equal, torch.zeros_like(centred), centred).reshape(-1)


def group_reward_stats(rewards: torch.Tensor, num_generations: int) -> dict[str, float]:
    """Spread of rewards inside groups, the quantity that decides whether GRPO has any signal.

    Args:
        rewards: ``[B*G]`` as for :func:`group_advantages`.
        num_generations: ``G``.

    Returns:
        ``reward_std``: mean over the ``B`` groups of the within-group (unbiased) std;
        ``frac_reward_zero_std``: fraction of groups whose rewards are all equal, max == min (these
        contribute no policy gradient, only KL). With ``G == 1`` every group counts as zero-std.
        Both are ``nan`` for an empty batch.
    """
    grouped = _grouped(rewards, num_generations)
    if grouped.numel() == 0:
        return {"reward_std": float("nan"), "frac_reward_zero_std": float("nan")}
    if num_generations == 1:
        std = torch.zeros(grouped.shape[0], dtype=grouped.dtype)
    else:
        std = grouped.detach().std(dim=1)  # [B]
    zero = grouped.amax(dim=1) == grouped.amin(dim=1)  # [B] all rewards equal: no policy gradient
    return {"reward_std": std.mean().item(), "frac_reward_zero_std": zero.float().mean().item()}
