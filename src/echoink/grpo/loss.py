"""The GRPO policy loss (clipped surrogate + optional k3 KL), in TRL's four aggregations.

Notation and shapes (``N`` completions in the micro-batch, ``T`` completion tokens after padding):

    logps, old_logps, ref_logps, mask : [N, T]      log pi(y_t | y_<t) under the policy being trained,
                                                    the policy that sampled the completions, the reference;
                                                    mask is 1 on real completion tokens, 0 on padding
    advantages                        : [N]         one scalar per completion (see ``group_advantages``)

Importance weights::

    log_ratio[i, t] = logps[i, t] - old_logps[i, t]
    token level    (GRPO):  w[i, t] = log_ratio[i, t]                                   [N, T]
    sequence level (GSPO):  w[i]    = sum_t log_ratio[i, t] m[i, t] / max(1, sum_t m)   [N, 1] (broadcast over t)
    coef_1 = exp(w)
    coef_2 = clamp(coef_1, 1 - epsilon, 1 + epsilon_high)

Per-token loss::

    L[i, t] = -min(coef_1 * A[i], coef_2 * A[i])
            + beta * KL[i, t]                                  (only when beta != 0)
    KL[i, t] = exp(ref - logps) - (ref - logps) - 1            (Schulman's k3 estimator, >= 0)
    KL[i, t] *= coef_1                                         (only when use_bias_correction_kl)

Aggregation (``m`` = mask):

    grpo    : mean_i [ sum_t L m / max(1, sum_t m) ]           (each sequence weighs the same; EchoInk-R1)
    bnpo    : sum L m / max(1, sum m)                          (each token of this micro-batch weighs the same)
    dr_grpo : sum L m / (N * max_completion_length)            (constant normaliser, no length bias)
    dapo    : sum L m / num_items_in_batch                     (each token of the whole batch weighs the same)

``policy_loss`` (public, stable) computes these for ONE batch, as TRL's ``GRPOTrainer._compute_loss`` (1.16)
does for these loss types and both importance-sampling levels; for dapo, ``num_items_in_batch`` overrides the
token count (default: the batch's own).

``GRPOLoss`` (below) is what training uses: configured once from the config, called per micro-batch with the
step's global ``StepCounts``, it returns exactly the value to back-propagate so that gradient accumulation and
DDP / ZeRO / FSDP averaging give the step's true mean (formulas in its docstring). The trainer chooses no scale.

On-policy (``old_logps=None``, one optimisation step per generation): ``old_logps = logps.detach()``, so
``coef_1 == 1`` in value but still carries the gradient of ``logps``: the surrogate's gradient is the plain
policy gradient ``-A * grad logps``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch

from echoink.choices import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES
from echoink.config import clip_range_problems

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ImportanceSamplingLevel = Literal["token", "sequence"]


def _check_inputs(
    logps: torch.Tensor,
    old_logps: Optional[torch.Tensor],
    ref_logps: Optional[torch.Tensor],
    advantages: torch.Tensor,
    mask: torch.Tensor,
) -> None:
    if logps.dim() != 2:
        raise ValueError(f"logps must be [N, T], got shape {tuple(logps.shape)}")
    for name, tensor in (("old_logps", old_logps), ("ref_logps", ref_logps), ("mask", mask)):
        if tensor is not None and tensor.shape != logps.shape:
            raise ValueError(f"{name} must have the shape of logps {tuple(logps.shape)}, got {tuple(tensor.shape)}")
    if advantages.shape != (logps.shape[0],):
        raise ValueError(f"advantages must be [N] = [{logps.shape[0]}], got shape {tuple(advantages.shape)}")


def _check_settings(loss_type, importance_sampling_level, epsilon, epsilon_high, beta, max_completion_length) -> float:
    """Validate the loss settings; returns epsilon_high (defaulting to epsilon)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, got {importance_sampling_level!r}"
        )
    problems = clip_range_problems(epsilon, epsilon_high)
    if problems:
        raise ValueError("; ".join(problems))
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if loss_type == "dr_grpo" and (max_completion_length is None or max_completion_length < 1):
        raise ValueError(f"loss_type='dr_grpo' needs max_completion_length >= 1, got {max_completion_length!r}")
    return epsilon_high


def _logged_mean(values: torch.Tensor, mask: torch.Tensor, per_sequence: bool) -> torch.Tensor:
    """Mean for logging, TRL's convention: a per-token quantity ``[N, T]`` -> mean over masked tokens;
    a per-sequence quantity ``[N, 1]`` (sequence-level importance sampling) -> plain mean over the ``N`` sequences."""
    if per_sequence:
        return values.mean()
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def policy_loss(
    logps: torch.Tensor,
    old_logps: Optional[torch.Tensor],
    ref_logps: Optional[torch.Tensor],
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: LossType = "grpo",
    epsilon: float = 0.2,
    epsilon_high: Optional[float] = None,
    beta: float = 0.0,
    importance_sampling_level: ImportanceSamplingLevel = "token",
    max_completion_length: Optional[int] = None,
    use_bias_correction_kl: bool = False,
    num_items_in_batch: Optional[Union[int, float, torch.Tensor]] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped GRPO/GSPO surrogate loss with optional k3 KL penalty (formulas in the module docstring).

    Args:
        logps: ``[N, T]`` per-token log-probs of the trained policy (carries the gradient).
        old_logps: ``[N, T]`` log-probs of the sampling policy, or None for on-policy (``logps.detach()``).
        ref_logps: ``[N, T]`` log-probs of the reference policy; required when ``beta != 0``, ignored otherwise.
        advantages: ``[N]`` one advantage per completion.
        mask: ``[N, T]`` 1 (or True) on completion tokens, 0 on padding.
        loss_type: ``"grpo"`` | ``"bnpo"`` | ``"dr_grpo"`` | ``"dapo"`` (aggregation, see module docstring).
        epsilon: lower clip range, ``coef_2 >= 1 - epsilon``.
        epsilon_high: upper clip range, ``coef_2 <= 1 + epsilon_high``; defaults to ``epsilon``.
        beta: KL coefficient (0 disables the KL term and the reference model).
        importance_sampling_level: ``"token"`` (GRPO) or ``"sequence"`` (GSPO).
        max_completion_length: the generation cap; required by ``dr_grpo``.
        use_bias_correction_kl: multiply the per-token KL by ``coef_1`` (TRL 1.16's default is True;
            ours is False, EchoInk-R1's form).
        num_items_in_batch: normaliser for ``dapo`` (see module docstring); default: local active-token count.

    Returns:
        ``(loss, stats)``: ``loss`` a 0-dim tensor with gradient w.r.t. ``logps``; ``stats`` detached 0-dim
        tensors: ``kl`` (masked mean of the per-token KL as added to the loss, 0 when ``beta == 0``),
        ``clip_ratio/low_mean`` (share of ratios below ``1 - epsilon`` with ``A < 0``: the lower clip is
        active), ``clip_ratio/high_mean`` (above ``1 + epsilon_high`` with ``A > 0``),
        ``clip_ratio/region_mean`` (either), ``ratio_mean`` (mean ``coef_1``). Token level: means over
        masked tokens; sequence level: means over sequences (TRL's convention).
    """
    epsilon_high = _check_settings(loss_type, importance_sampling_level, epsilon, epsilon_high, beta,
                                   max_completion_length)
    if beta != 0.0 and ref_logps is None:
        raise ValueError(f"beta={beta} needs ref_logps (the reference model's log-probs); pass them or set beta=0")
    _check_inputs(logps, old_logps, ref_logps, advantages, mask)

    terms = _per_token_terms(logps, old_logps, ref_logps, advantages, mask, epsilon=epsilon,
                             epsilon_high=epsilon_high, beta=beta,
                             importance_sampling_level=importance_sampling_level,
                             use_bias_correction_kl=use_bias_correction_kl)
    tokens = float(terms.mask.sum()) if num_items_in_batch is None else float(num_items_in_batch)
    counts = StepCounts(sequences=logps.shape[0], tokens=tokens)  # the batch is the whole step
    return _aggregate(loss_type, terms, counts, max_completion_length), terms.stats


@dataclass(frozen=True)
class _Terms:
    per_token_loss: torch.Tensor  # [N, T] clipped surrogate (+ beta * KL), not yet masked
    mask: torch.Tensor            # [N, T] float mask in logps' dtype
    stats: dict                   # detached 0-dim tensors (see policy_loss)


def _per_token_terms(logps, old_logps, ref_logps, advantages, mask, *, epsilon, epsilon_high, beta,
                     importance_sampling_level, use_bias_correction_kl) -> _Terms:
    """The per-token loss ``L[i, t]`` of the module docstring and the logged statistics."""
    # Padding may hold anything (even -inf/nan); zero it in every input so it cannot reach the loss or, via
    # 0 * inf in a backward pass, the gradient.
    is_token = mask != 0  # [N, T] bool
    mask = mask.to(logps.dtype)  # [N, T]
    adv = advantages.to(logps.dtype).unsqueeze(1)  # [N, 1]
    logps = torch.where(is_token, logps, 0.0)
    old_logps = logps.detach() if old_logps is None else torch.where(is_token, old_logps, 0.0)
    if ref_logps is not None:
        ref_logps = torch.where(is_token, ref_logps, 0.0)

    log_ratio = logps - old_logps  # [N, T]
    if importance_sampling_level == "token":
        log_weights = log_ratio  # [N, T]
    else:
        log_weights = ((log_ratio * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).unsqueeze(1)  # [N, 1]
    coef_1 = torch.exp(log_weights)
    coef_2 = torch.clamp(coef_1, 1.0 - epsilon, 1.0 + epsilon_high)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)  # [N, T] or [N, 1]

    if beta != 0.0:
        ref_minus_policy = ref_logps - logps  # [N, T]
        per_token_kl = torch.exp(ref_minus_policy) - ref_minus_policy - 1.0
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1
        per_token_loss = per_token_loss + beta * per_token_kl
    per_token_loss = per_token_loss.expand_as(mask)  # [N, T]

    with torch.no_grad():
        is_low_clipped = ((coef_1 < 1.0 - epsilon) & (adv < 0)).to(logps.dtype)
        is_high_clipped = ((coef_1 > 1.0 + epsilon_high) & (adv > 0)).to(logps.dtype)
        is_region_clipped = torch.maximum(is_low_clipped, is_high_clipped)
        per_sequence = importance_sampling_level == "sequence"  # coef_1 and the clip flags are [N, 1]
        zero = torch.zeros((), dtype=logps.dtype, device=logps.device)
        stats = {
            "kl": _logged_mean(per_token_kl, mask, per_sequence=False) if beta != 0.0 else zero,
            "clip_ratio/low_mean": _logged_mean(is_low_clipped, mask, per_sequence),
            "clip_ratio/high_mean": _logged_mean(is_high_clipped, mask, per_sequence),
            "clip_ratio/region_mean": _logged_mean(is_region_clipped, mask, per_sequence),
            "ratio_mean": _logged_mean(coef_1, mask, per_sequence),
        }
    return _Terms(per_token_loss, mask, {name: value.detach() for name, value in stats.items()})


# ---- the loss a training step uses: configured once, normalised by the step's global counts -------------

@dataclass(frozen=True)
class StepCounts:
    """The denominators of one optimizer step, over ALL processes and micro-batches.

    sequences: completions in the step (groups skipped from the update, e.g. zero-advantage ones, included)
    tokens:    their masked completion tokens (truncated completions excluded when they are masked)
    world_size: number of processes (DDP / ZeRO / FSDP average gradients over them)
    micro_batches: gradient-accumulation micro-batches per process (bnpo's divisor)
    """

    sequences: int
    tokens: int | float
    world_size: int = 1
    micro_batches: int = 1


@dataclass(frozen=True)
class GRPOLoss:
    """The policy loss of a run, configured once (``GRPOLoss.from_config``), called per micro-batch.

    ``loss(logps, old_logps, ref_logps, advantages, mask, counts)`` returns exactly the value to
    back-propagate, so that summing gradients over micro-batches and averaging them over processes (what
    accumulation and DDP / ZeRO / FSDP do) gives the step's true mean. With ``S`` = this micro-batch's sum,
    ``W`` = ``counts.world_size``::

        grpo    : W * sum_i [ sum_t L m / max(1, sum_t m) ] / counts.sequences      (mean over the step's sequences)
        dr_grpo : W * sum L m / (counts.sequences * max_completion_length)
        dapo    : W * sum L m / counts.tokens                                      (mean over the step's tokens)
        bnpo    : [ sum L m / max(1, micro_batch_tokens) ] / counts.micro_batches  (TRL's definition: each
                  micro-batch's own token mean, averaged over micro-batches and, by DDP, over processes;
                  micro_batch_tokens defaults to sum m, and is the whole micro-batch's count when some of
                  its groups are left out of the forward)

    Without accumulation on one process these equal ``policy_loss``'s values for the whole batch.
    """

    loss_type: str = "grpo"
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None
    beta: float = 0.0
    importance_sampling_level: str = "token"
    max_completion_length: Optional[int] = None
    use_bias_correction_kl: bool = False

    def __post_init__(self) -> None:
        high = _check_settings(self.loss_type, self.importance_sampling_level, self.epsilon, self.epsilon_high,
                               self.beta, self.max_completion_length)
        object.__setattr__(self, "epsilon_high", high)

    @classmethod
    def from_config(cls, config) -> "GRPOLoss":
        return cls(loss_type=config.loss_type, epsilon=config.epsilon, epsilon_high=config.epsilon_high,
                   beta=config.beta, importance_sampling_level=config.importance_sampling_level,
                   max_completion_length=config.max_completion_length,
                   use_bias_correction_kl=config.use_bias_correction_kl)

    def __call__(self, logps: torch.Tensor, old_logps: Optional[torch.Tensor], ref_logps: Optional[torch.Tensor],
                 advantages: torch.Tensor, mask: torch.Tensor, counts: StepCounts,
                 micro_batch_tokens: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """logps, old_logps, ref_logps, mask: [N, T]; advantages: [N] -> (loss to back-propagate, stats)."""
        if self.beta != 0.0 and ref_logps is None:
            raise ValueError(f"beta={self.beta} needs ref_logps (the reference model's log-probs)")
        _check_inputs(logps, old_logps, ref_logps, advantages, mask)
        terms = _per_token_terms(logps, old_logps, ref_logps, advantages, mask, epsilon=self.epsilon,
                                 epsilon_high=self.epsilon_high, beta=self.beta,
                                 importance_sampling_level=self.importance_sampling_level,
                                 use_bias_correction_kl=self.use_bias_correction_kl)
        return _aggregate(self.loss_type, terms, counts, self.max_completion_length, micro_batch_tokens), terms.stats


def _aggregate(loss_type: str, terms: "_Terms", counts: StepCounts, max_completion_length: Optional[int],
               micro_batch_tokens: float | None = None) -> torch.Tensor:
    """The one place the loss type is switched on: per-token losses [N, T] -> the value to back-propagate
    (`GRPOLoss`'s formulas; `policy_loss` is the case of one micro-batch on one process)."""
    m = terms.mask
    masked_loss = terms.per_token_loss * m  # [N, T]
    if loss_type == "bnpo":
        tokens = m.sum() if micro_batch_tokens is None else torch.as_tensor(float(micro_batch_tokens))
        return masked_loss.sum() / tokens.clamp(min=1.0) / max(1, counts.micro_batches)
    if loss_type == "grpo":
        total = (masked_loss.sum(dim=1) / m.sum(dim=1).clamp(min=1.0)).sum()
        denominator = counts.sequences
    elif loss_type == "dr_grpo":
        total = masked_loss.sum()
        denominator = counts.sequences * max_completion_length
    else:  # dapo
        total = masked_loss.sum()
        denominator = counts.tokens
    return total * (counts.world_size / max(1, denominator))
