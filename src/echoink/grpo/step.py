"""One GRPO step in two phases: `collect` experience, then `update` the policy on it.

    collect(context, prompts) -> CollectedBatch            (no gradient; immutable result)
        rollouts     G completions per prompt, all prompts in one engine call            engine.generate
                     (over-long prompts, records with undecodable media: skipped, counted) skips
        rewards      [G, R] per group, weighted totals [B*G]                             scoring.score_group
        advantages   (r - group mean) / (group std + eps), exactly 0 for all-equal groups advantages.group_advantages
        counts       the step's sequences and masked tokens over every process            loss.StepCounts
        old / ref    per-token log-probs [G, C] without grad (num_iterations > 1 / beta > 0)

    update(context, batch) -> metrics                       (num_iterations optimizer updates)
        per micro-batch: policy log-probs [B*G, C] with grad -> GRPOLoss(..., counts) -> backward
        then: non-finite check (on every process alike) -> clip -> optimizer and scheduler step

`GRPOLoss` returns exactly the value to back-propagate (normalised by the step's global counts), so
gradient accumulation and DDP / ZeRO / FSDP averaging give the step's true mean; nothing here scales
losses by loss type.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch
from accelerate import Accelerator

from echoink.config import TrainConfig
from echoink.data.media import MediaError
from echoink.grpo.advantages import group_advantages
from echoink.grpo.distributed import (
    accumulation,
    check_micro_batches,
    gathered_for_generation,
    grad_norm_value,
    is_deepspeed,
    sum_over_processes,
)
from echoink.grpo.logprobs import group_token_logps
from echoink.grpo.loss import GRPOLoss, StepCounts
from echoink.grpo.nonfinite import NonFiniteModelError, weights_finite
from echoink.grpo.sampling import GroupSelection, StepPrompts, informative, skips_zero_advantage_groups
from echoink.grpo.scoring import RewardSet, score_group
from echoink.grpo.skips import PromptSkips, RecordSkips
from echoink.grpo.step_metrics import step_metrics
from echoink.grpo.types import CollectedBatch, ScoredGroup
from echoink.model.engine import Group, RolloutEngine
from echoink.model.generation import SamplingSettings
from echoink.model.inputs import MediaOptions, encode_prompt
from echoink.model.trainable import router_aux_loss_metrics
from echoink.prompts import PromptTemplate


class NonFiniteError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient."""


@dataclass
class StepContext:
    """What every GRPO step works with, built once by `train`."""

    config: TrainConfig
    accelerator: Accelerator
    policy: torch.nn.Module          # accelerate-wrapped `Policy`: log-probs with grad go through its forward
    thinker: torch.nn.Module         # the unwrapped (LoRA-injected) thinker: rollouts and no-grad passes
    engine: RolloutEngine            # samples the groups (from `thinker`; synced after every step)
    reference: torch.nn.Module | None  # frozen copy when beta > 0 without LoRA
    peft_model: object | None
    optimizer: torch.optim.Optimizer
    scheduler: object
    processor: object
    rewards: RewardSet
    loss: GRPOLoss
    sampling: SamplingSettings
    media_options: MediaOptions
    template: PromptTemplate
    model_dtype: torch.dtype
    consecutive_nonfinite: int = 0   # state that spans steps: this, and the two skip counters below
    steps_to_run: int | None = None  # steps this run (or resumed run) will take: a shorter run decides skips at its end
    prompt_skips: PromptSkips = field(init=False)  # prompts over max_prompt_length; too many early on stop the run
    record_skips: RecordSkips = field(init=False)  # records whose media fail to decode: named, up to a limit

    @property
    def trained_parameters(self) -> list[torch.Tensor]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    def __post_init__(self) -> None:
        prompts_per_step = (self.config.per_device_train_batch_size * self.accelerator.num_processes
                            * self.config.gradient_accumulation_steps)
        self.prompt_skips = PromptSkips(self.config, prompts_per_step, self.steps_to_run)
        self.record_skips = RecordSkips(self.config)


@dataclass(frozen=True)
class StepResult:
    metrics: dict
    groups: list[ScoredGroup]


def grpo_step(context: StepContext, prompts: StepPrompts) -> StepResult:
    """One GRPO step on this rank's prompts (`StepPrompts`: one planned list per micro-batch, more on request)."""
    batch = collect(context, prompts)
    update_metrics = update(context, batch)
    metrics = step_metrics(batch.groups, context.rewards, context.config.num_generations)
    metrics.update(batch.stats)
    metrics.update(update_metrics)
    seconds = batch.stats["rollout_seconds"] + batch.stats["logprob_seconds"] + update_metrics["backward_seconds"]
    metrics["tokens_per_second"] = batch.counts.tokens / batch.counts.world_size / seconds if seconds > 0 else 0.0
    return StepResult(metrics=metrics, groups=batch.groups)


#: With dynamic sampling, a line on stderr every this many draw rounds of one micro-batch (rounds, informative share).
SAMPLING_REPORT_ROUNDS = 8


# ---- collect -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Draw:
    """One micro-batch's sampled groups: (record, Group, rewards [G, R]) kept for training, and what it cost."""

    kept: list[tuple]
    skipped_prompts: int
    rounds: int
    rolled_out: int
    surplus: int


def collect(context: StepContext, prompts: StepPrompts) -> CollectedBatch:
    """Rollouts (with dynamic sampling: more rounds until groups inform), rewards, advantages, the step's
    global counts, old and reference log-probs (no grad)."""
    config, accelerator = context.config, context.accelerator
    t = time.perf_counter()
    draws = [_draw_micro_batch(context, prompts, m) for m in range(config.gradient_accumulation_steps)]
    rollout_seconds = time.perf_counter() - t
    skipped_records = context.record_skips.end_step(accelerator)    # every rank stops alike past the limits
    context.prompt_skips.end_step(accelerator)
    check_micro_batches(accelerator, [[record for record, _, _ in draw.kept] for draw in draws])

    scored = _advantages(context, [draw.kept for draw in draws])      # per micro-batch: [ScoredGroup]
    counts = _step_counts(context, scored)

    t = time.perf_counter()
    scored = _with_old_and_reference_logps(context, scored)
    groups = [g for batch in scored for g in batch]
    informative_groups = sum(informative(g.rewards, context.rewards.weights) for g in groups)
    rolled_out = sum(draw.rolled_out for draw in draws)
    stats = {"skipped_prompts": float(sum(draw.skipped_prompts for draw in draws)),
             "skipped_records": float(skipped_records),
             "informative_groups": float(informative_groups),
             "informative_share": informative_groups / len(groups) if groups else float("nan"),
             "skipped_groups": float(sum(not g.trained for g in groups)),
             "sampling_rounds": float(sum(draw.rounds for draw in draws)),
             "rollout_groups": float(rolled_out),
             "surplus_groups": float(sum(draw.surplus for draw in draws)),
             "rollouts_per_informative_group": rolled_out / informative_groups if informative_groups else float("nan"),
             "rollout_seconds": rollout_seconds, "logprob_seconds": time.perf_counter() - t}
    return CollectedBatch(micro_batches=tuple(tuple(batch) for batch in scored), counts=counts, stats=stats)


def _draw_micro_batch(context: StepContext, prompts: StepPrompts, index: int) -> _Draw:
    """Roll out micro-batch `index`'s planned prompts; with dynamic sampling, draw further rounds until every
    process holds `per_device_train_batch_size` informative groups (or `max_sampling_rounds` is reached),
    keeping only what the batch can still use (`GroupSelection`)."""
    config, accelerator = context.config, context.accelerator
    kept, skipped = _rollouts(context, prompts.planned(index))
    rounds, rolled_out = 1, len(kept)
    if not config.dynamic_sampling:
        return _Draw(kept, skipped, rounds, rolled_out, surplus=0)
    selection = GroupSelection(config.per_device_train_batch_size, context.rewards.weights)
    selection.add(kept)
    while rounds < config.max_sampling_rounds and _any_process(accelerator, not selection.enough):
        more, more_skipped = _rollouts(context, prompts.next_round())
        selection.add(more)
        skipped, rounds, rolled_out = skipped + more_skipped, rounds + 1, rolled_out + len(more)
        if rounds % SAMPLING_REPORT_ROUNDS == 0:  # the same rounds on every process: the sum is collective
            informative_groups, groups = sum_over_processes(accelerator, [selection.informative_seen, selection.seen])
            if accelerator.is_main_process:
                print(f"dynamic sampling, step {prompts.step + 1}, micro-batch {index + 1}: {rounds} rounds so far "
                      f"(max_sampling_rounds={config.max_sampling_rounds}), {int(informative_groups)} of "
                      f"{int(groups)} groups informative ({100 * informative_groups / max(groups, 1):.1f}%)",
                      file=sys.stderr, flush=True)
    return _Draw(selection.chosen(), skipped, rounds, rolled_out, surplus=selection.surplus)


def _rollouts(context: StepContext, records: list) -> tuple[list[tuple], int]:
    """-> [(record, Group, rewards [G, R])] and the number of prompts skipped for exceeding max_prompt_length.

    Every prompt of the round goes to the rollout engine in one call (it may decode them together)."""
    accelerator, processor = context.accelerator, context.processor
    context.thinker.eval()  # the no-grad passes that follow (old / reference log-probs) run in eval mode too
    kept, prompts, skipped = [], [], 0
    for record in records:
        # outside autocast: the processor's audio feature extractor runs torch ops and wants fp32
        try:
            prompt = encode_prompt(record, processor, context.media_options, context.template)
        except MediaError as error:  # a file validation did not decode: skip it, naming the file
            print(f"warning: {context.record_skips.skip(error)}", file=sys.stderr, flush=True)
            continue
        prompt = prompt.to(accelerator.device, context.model_dtype)
        if context.prompt_skips.too_long(prompt.length):
            skipped += 1  # never truncate through media placeholders: skip and count
            continue
        kept.append(record)
        prompts.append(prompt)
    with gathered_for_generation(accelerator, context.policy), _autocast(accelerator):
        groups = context.engine.generate(prompts, context.sampling)
    return [(record, group, score_group(context.rewards, group, record)) for record, group in zip(kept, groups)], skipped


def _advantages(context: StepContext, micro_batches: list[list[tuple]]) -> list[list[ScoredGroup]]:
    """Weighted totals [B*G] -> advantages [B*G] (batch std pooled over processes); zero-advantage groups are
    marked untrained when skipping is on."""
    config, weights = context.config, context.rewards.weights
    items = [item for batch in micro_batches for item in batch]
    totals = torch.cat([rewards @ weights for _, _, rewards in items]) if items else torch.zeros(0)  # [B*G]
    batch_std = _global_std(context.accelerator, totals) if config.scale_rewards == "batch" else None
    advantages = group_advantages(totals, config.num_generations, scale=config.scale_rewards, batch_std=batch_std)
    skip = skips_zero_advantage_groups(config)
    scored = iter([ScoredGroup(group=group, record=record, rewards=rewards, advantages=adv,
                               trained=not (skip and not bool(adv.any())))
                   for (record, group, rewards), adv in zip(items, advantages.split(config.num_generations))])
    return [[next(scored) for _ in batch] for batch in micro_batches]


def _step_counts(context: StepContext, scored: list[list[ScoredGroup]]) -> StepCounts:
    """Sequences and masked completion tokens of the step (skipped groups included), summed over processes."""
    groups = [g for batch in scored for g in batch]
    tokens = sum(float(_loss_mask(context.config, g).sum()) for g in groups)
    sequences, tokens = sum_over_processes(context.accelerator, [sum(g.size for g in groups), tokens])
    return StepCounts(sequences=int(sequences), tokens=int(tokens), world_size=context.accelerator.num_processes,
                      micro_batches=context.config.gradient_accumulation_steps)


def _with_old_and_reference_logps(context: StepContext, scored: list[list[ScoredGroup]]) -> list[list[ScoredGroup]]:
    """Attach old-policy (num_iterations > 1) and reference (beta > 0) log-probs [G, C] of the groups the update
    trains on, computed without grad."""
    config, accelerator, thinker = context.config, context.accelerator, context.thinker
    trained = [g for batch in scored for g in batch if g.trained]
    old = ref = [None] * len(trained)
    with torch.no_grad(), _autocast(accelerator), gathered_for_generation(accelerator, context.policy):
        if config.num_iterations > 1 and trained:
            old = group_token_logps(thinker, trained, config.group_sharing, config.temperature)
        if config.beta > 0 and trained:
            peft = context.peft_model
            with (peft.disable_adapter() if peft is not None else nullcontext()):
                model = context.reference if context.reference is not None else thinker
                ref = group_token_logps(model, trained, config.group_sharing, config.temperature)
    filled = {id(g): replace(g, old_logps=o, ref_logps=r) for g, o, r in zip(trained, old, ref)}
    return [[filled.get(id(g), g) for g in batch] for batch in scored]


# ---- update --------------------------------------------------------------------------------------------

def update(context: StepContext, batch: CollectedBatch) -> dict:
    """num_iterations optimizer updates on the collected completions; returns loss and gradient metrics.

    Only groups marked `trained` get a policy forward/backward. A micro-batch runs when any process trains a
    group in it (decided alike everywhere: ZeRO-3 needs the same forwards on every rank); a process with no
    trained group there runs one zero-weight forward instead. When no group trains anywhere, one zero-weight
    forward still runs, so the optimizer steps on a zero gradient exactly as without skipping.
    """
    config, accelerator, policy = context.config, context.accelerator, context.policy
    optimizer, scheduler = context.optimizer, context.scheduler
    t = time.perf_counter()
    context.thinker.train()
    trained = [tuple(g for g in groups if g.trained) for groups in batch.micro_batches]
    active = _micro_batches_to_run(accelerator, batch.micro_batches, trained)
    loss_stats: list[dict] = []
    grad_norm, nonfinite_updates = float("nan"), 0
    for _ in range(config.num_iterations):
        for index in active:
            # gradients of the micro-batches add up locally; the last one synchronises (and steps DeepSpeed)
            with accumulation(accelerator, policy, sync=index == active[-1]):
                if trained[index]:
                    loss, stats = _micro_batch_loss(context, trained[index], batch.counts,
                                                    micro_batch_tokens=_tokens(config, batch.micro_batches[index]))
                else:  # zero weight: the same forwards on every process, no gradient
                    loss, stats = _zero_weight_loss(context, batch.micro_batches[index][:1]), {}
                if is_deepspeed(accelerator) and _any_process(accelerator, not bool(torch.isfinite(loss))):
                    raise NonFiniteError("non-finite loss under DeepSpeed, whose engine steps inside backward (the "
                                         "update cannot be skipped there): stopped before it reached the weights; "
                                         "lower learning_rate, check the rewards and the data")
                accelerator.backward(loss)
            if trained[index]:
                loss_stats.append({"loss": loss.detach().float().item(), **{k: float(v) for k, v in stats.items()}})
        if not active:
            continue
        if _any_process(accelerator, not _gradients_finite(policy)):
            nonfinite_updates += 1  # skipped alike on every process; the scheduler does not step either
            optimizer.zero_grad(set_to_none=True)
            continue
        if config.max_grad_norm > 0:
            grad_norm = grad_norm_value(accelerator.clip_grad_norm_(policy.parameters(), config.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if _any_process(accelerator, not weights_finite(context.trained_parameters)):  # before the next rollout
            raise NonFiniteModelError("the weights after this step's update are not finite (or overflow)")
    _count_nonfinite(context, nonfinite_updates)
    metrics = {key: sum(s[key] for s in loss_stats) / len(loss_stats) for key in (loss_stats[0] if loss_stats else {})}
    metrics.update({"grad_norm": grad_norm, "nonfinite_steps": float(nonfinite_updates > 0),
                    "backward_seconds": time.perf_counter() - t})
    metrics.update(router_aux_loss_metrics(context.thinker))  # MoE families, when router_aux_loss_coef > 0
    return metrics


def _micro_batches_to_run(accelerator, micro_batches, trained) -> list[int]:
    """Indices of the micro-batches any process trains a group in (the same list on every process)."""
    local = [1.0 if groups else 0.0 for groups in trained]
    if accelerator.num_processes > 1 and local:
        local = accelerator.reduce(torch.tensor(local, device=accelerator.device), reduction="sum").tolist()
    active = [i for i, value in enumerate(local) if value > 0]
    if not active:  # nothing to learn anywhere: one zero-weight forward keeps the optimizer step as it was
        active = [i for i, groups in enumerate(micro_batches) if groups][:1]
    return active


def _micro_batch_loss(context: StepContext, groups: tuple[ScoredGroup, ...], counts: StepCounts,
                      micro_batch_tokens: float | None = None):
    """Policy log-probs [B*G, C] with grad for one micro-batch -> the configured loss (and its stats)."""
    config, device = context.config, context.accelerator.device
    with _autocast(context.accelerator):
        logps = _pad_cat(context.policy(list(groups), sharing=config.group_sharing,
                                        temperature=config.temperature))          # [B*G, C]
    mask = _pad_cat([_loss_mask(config, g) for g in groups]).to(logps.dtype)      # [B*G, C]
    return context.loss(
        logps,
        _pad_cat([g.old_logps for g in groups]) if config.num_iterations > 1 else None,
        _pad_cat([g.ref_logps for g in groups]) if config.beta > 0 else None,
        torch.cat([g.advantages for g in groups]).to(device),                     # [B*G]
        mask,
        counts,
        micro_batch_tokens,
    )


def _zero_weight_loss(context: StepContext, groups: tuple[ScoredGroup, ...]) -> torch.Tensor:
    """A policy forward whose loss is 0 (its gradient is zero for every parameter it reaches)."""
    with _autocast(context.accelerator):
        logps = context.policy(list(groups), sharing=context.config.group_sharing,
                               temperature=context.config.temperature)
    return sum(torch.where(g.completion_mask.bool(), lp, 0.0).sum() for g, lp in zip(groups, logps)) * 0.0


def _tokens(config: TrainConfig, groups) -> float:
    """Masked completion tokens of a micro-batch's groups (bnpo's per-micro-batch denominator)."""
    return sum(float(_loss_mask(config, g).sum()) for g in groups)


def _loss_mask(config: TrainConfig, group: ScoredGroup | Group) -> torch.Tensor:
    """[G, C] completion tokens the loss sees: truncated completions are dropped when they are masked."""
    mask = group.completion_mask
    if config.mask_truncated_completions:
        mask = mask * (~group.truncated).to(mask.dtype)[:, None]
    return mask


def _count_nonfinite(context: StepContext, nonfinite_updates: int) -> None:
    limit = context.config.max_consecutive_nonfinite_steps
    context.consecutive_nonfinite = context.consecutive_nonfinite + 1 if nonfinite_updates else 0
    if limit and context.consecutive_nonfinite >= limit:
        raise NonFiniteError(
            f"{context.consecutive_nonfinite} consecutive steps had a non-finite loss or gradient (their updates were "
            "skipped); lower learning_rate or max_grad_norm, check the rewards and the data, or raise "
            "max_consecutive_nonfinite_steps")


# ---- small pieces ------------------------------------------------------------------------------------

def _gradients_finite(policy) -> bool:
    return all(bool(torch.isfinite(p.grad).all()) for p in policy.parameters() if p.grad is not None)


def _any_process(accelerator, flag: bool) -> bool:
    """True when `flag` holds on any process (an all-reduce, so every process decides alike)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def _global_std(accelerator, values: torch.Tensor) -> float:
    """Unbiased std of `values` [N] pooled over every process (scale_rewards: batch, as TRL)."""
    v = values.double()
    n, total, squares = sum_over_processes(accelerator, [v.numel(), v.sum().item(), (v * v).sum().item()])
    if n < 2:
        return 0.0
    return math.sqrt(max(0.0, (squares - total * total / n) / (n - 1)))


def _pad_cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate [G_i, C_i] tensors along dim 0, right-padding dim 1 with zeros to max C_i."""
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in tensors])


def _autocast(accelerator):
    return accelerator.autocast() if accelerator.mixed_precision != "no" else nullcontext()
