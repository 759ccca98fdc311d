"""The GRPO training loop, readable top to bottom. It orchestrates; the math lives elsewhere:

    rollout.sample_group        G completions per prompt (eval mode, KV cache, prefill once)
    scoring.score_group         rewards [G, R]
    advantages.group_advantages (r - group mean) / (group std + eps)
    logprobs.group_token_logps  per-token log-probs (policy with grad; old / reference without)
    loss.policy_loss            clipped surrogate + k3 KL

One step = `gradient_accumulation_steps` micro-batches of `per_device_train_batch_size` prompts per
device, each prompt answered `num_generations` times, followed by `num_iterations` optimizer
updates on those same completions (TRL's μ). Distribution (DDP / FSDP / DeepSpeed) comes from
accelerate (`distributed.py` holds what the back-ends need); groups stay whole on one rank.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import get_scheduler

from echoink.io import write_json_atomic
from echoink.config import ConfigError, TrainConfig
from echoink.data import load_dataset
from echoink.grpo.advantages import group_advantages
from echoink.grpo.batches import BatchPlan
from echoink.grpo.checkpoint import (
    latest_checkpoint,
    load_checkpoint_state,
    save_checkpoint,
    save_model_files,
)
from echoink.grpo.distributed import (
    accumulation,
    check_dataset_modalities,
    check_micro_batches,
    gathered_for_generation,
    grad_norm_value,
    make_accelerator,
    make_reference,
)
from echoink.grpo.logprobs import Policy, group_token_logps
from echoink.grpo.loss import policy_loss
from echoink.grpo.rollout import sample_group
from echoink.grpo.run_log import RunLog
from echoink.grpo.step_metrics import step_metrics
from echoink.grpo.scoring import RewardSet, score_group
from echoink.grpo.types import Group
from echoink.model import load_thinker
from echoink.model.generation import SamplingSettings
from echoink.model.inputs import MediaOptions, encode_prompt
from echoink.model.trainable import apply_freezing, merge_adapter, wrap_lora
from echoink.prompts import PromptTemplate


@dataclass
class StepContext:
    """What every GRPO step works with, built once by `train`."""

    config: TrainConfig
    accelerator: Accelerator
    policy: torch.nn.Module          # accelerate-wrapped `Policy`: log-probs with grad go through its forward
    thinker: torch.nn.Module         # the unwrapped (LoRA-injected) thinker: rollouts and no-grad passes
    reference: torch.nn.Module | None  # frozen copy when beta > 0 without LoRA
    peft_model: object | None
    optimizer: torch.optim.Optimizer
    scheduler: object
    processor: object
    rewards: RewardSet
    sampling: SamplingSettings
    media_options: MediaOptions
    template: PromptTemplate
    model_dtype: torch.dtype


@dataclass
class StepResult:
    metrics: dict
    groups: list[Group]


def train(config: TrainConfig, resume_from: str | None = None, progress: bool = True,
          evaluate: Callable[[torch.nn.Module, object], dict] | None = None) -> Path:
    """Run GRPO as `config` says; returns the directory of the final model.

    evaluate: the in-training evaluation, called every `eval_steps` on the main process as
        `evaluate(thinker, processor) -> {"eval/...": value}` (build it with
        `echoink.eval.training_evaluator(config)`; the CLI and the demo do). Required when eval_steps > 0.
    """
    # --- 1. validate everything a user gave us before loading the model ---
    if not config.model_path:
        raise ValueError("config: model_path is required")
    if not config.train_data:
        raise ValueError("config: train_data is required")
    records = load_dataset(config.train_data)
    if config.eval_steps and evaluate is None:
        raise ConfigError("eval_steps > 0 needs an evaluation: call train(config, evaluate=echoink.eval."
                          "training_evaluator(config)) (the CLI does this), or set eval_steps=0")
    template = PromptTemplate.from_dict(config.prompt_template)
    rewards = RewardSet.from_config(config.reward_funcs, config.reward_weight_list)
    if config.torch_num_threads:
        torch.set_num_threads(config.torch_num_threads)

    accelerator = make_accelerator(config)  # DDP (find_unused_parameters) / FSDP / DeepSpeed, from `accelerate launch`
    check_dataset_modalities(accelerator, records)
    set_seed(config.seed, device_specific=True)
    output_dir = Path(config.output_dir)
    arithmetic = config.step_arithmetic(len(records), accelerator.num_processes)
    log = RunLog(output_dir, accelerator, arithmetic["total_steps"], enabled=progress)
    log.announce(config, arithmetic, len(records))

    # --- 2. model, reference, optimizer ---
    # fp32 master weights for whatever trains; under LoRA + bf16 the frozen base is held in bf16 (half the memory)
    base_dtype = "bfloat16" if config.use_peft and config.bf16 else "float32"
    thinker, processor = load_thinker(config.model_path, dtype=base_dtype, attn_implementation=config.attn_implementation)
    apply_freezing(thinker, freeze_vision=config.freeze_vision, freeze_audio=config.freeze_audio)
    peft_model = wrap_lora(thinker, config) if config.use_peft else None
    if config.gradient_checkpointing:
        thinker.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        thinker.config.use_cache = False
    reference = None
    if config.beta > 0 and peft_model is None:
        reference = make_reference(accelerator, config, thinker)  # a frozen copy; sharded under ZeRO-3
    policy = Policy(thinker)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=config.learning_rate,
                                  betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                                  weight_decay=config.weight_decay)
    updates = arithmetic["total_steps"] * config.num_iterations
    scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=int(config.warmup_ratio * updates),
                              num_training_steps=updates)
    policy, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    thinker = accelerator.unwrap_model(policy).thinker

    # --- 3. resume ---
    start_step = 0
    checkpoint = resume_from or config.resume_from_checkpoint or (latest_checkpoint(output_dir) if config.resume else None)
    if checkpoint:
        start_step = load_checkpoint_state(accelerator, checkpoint)["step"]
        log.truncate_after(start_step)  # steps logged after the checkpoint are about to be redone
        log.note(f"resumed from {checkpoint} at step {start_step}")

    plan = BatchPlan(num_items=len(records), per_device_batch=config.per_device_train_batch_size,
                     num_processes=accelerator.num_processes, grad_accum=config.gradient_accumulation_steps,
                     seed=config.seed, shuffle=config.shuffle_dataset,
                     answer_letters=tuple(r.answer for r in records) if config.balance_answer_letters else None)
    media_options = MediaOptions.from_config(config)
    sampling = SamplingSettings(config.num_generations, config.max_completion_length, config.temperature,
                                config.top_p, config.top_k)
    model_dtype = torch.bfloat16 if config.bf16 else torch.float32

    def save_model(directory: Path) -> None:  # called on every rank (gathering sharded weights is collective)
        save_model_files(accelerator, policy, processor, directory, peft_model, atomic=False)

    context = StepContext(config, accelerator, policy, thinker, reference, peft_model, optimizer, scheduler, processor,
                          rewards, sampling, media_options, template, model_dtype)

    # --- 4. the loop ---
    for step in range(start_step, arithmetic["total_steps"]):
        t0 = time.perf_counter()
        micro_batches = [[records[i] for i in indices] for indices in plan.step_indices(step, accelerator.process_index)]
        result = grpo_step(context, micro_batches)
        result.metrics["step_seconds"] = time.perf_counter() - t0
        result.metrics["learning_rate"] = scheduler.get_last_lr()[0]
        if evaluate is not None and (step + 1) % config.eval_steps == 0:
            result.metrics.update(_evaluate_on_main(evaluate, thinker, processor, accelerator))
        log.step(step + 1, result.metrics, result.groups, rewards.names, every=config.logging_steps)
        if config.save_steps and (step + 1) % config.save_steps == 0:
            save_checkpoint(accelerator, save_model, output_dir, step + 1, {"step": step + 1, "seed": config.seed,
                            "prompts_seen": (step + 1) * plan.prompts_per_step},
                            save_total_limit=config.save_total_limit)

    # --- 5. final model ---
    final = output_dir / "final"
    accelerator.wait_for_everyone()
    save_model_files(accelerator, policy, processor, output_dir if peft_model is not None else final,
                     peft_model)  # under LoRA: output_dir/adapter (+ the merged thinker in final/ on request)
    if accelerator.is_main_process:
        if peft_model is not None and config.save_merged_model:
            merge_adapter(config.model_path, output_dir / "adapter", final)
        write_json_atomic(output_dir / "config.resolved.json", config.to_dict())
    accelerator.wait_for_everyone()
    log.close()
    accelerator.end_training()
    return final if (peft_model is None or config.save_merged_model) else output_dir / "adapter"


def grpo_step(context: StepContext, micro_batches: list[list]) -> StepResult:
    """One GRPO step: rollouts, rewards, advantages, reference/old log-probs, num_iterations updates.

    micro_batches: this rank's records, one list of `per_device_train_batch_size` per accumulation step.
    """
    config, accelerator, policy, thinker = context.config, context.accelerator, context.policy, context.thinker
    processor, rewards, sampling = context.processor, context.rewards, context.sampling
    media_options, template, model_dtype = context.media_options, context.template, context.model_dtype
    reference, peft_model, optimizer, scheduler = context.reference, context.peft_model, context.optimizer, context.scheduler
    device = accelerator.device
    timings = {"rollout_seconds": 0.0, "logprob_seconds": 0.0, "backward_seconds": 0.0}
    sharing = config.group_sharing

    # 1. rollouts: G completions per prompt, eval mode, KV cache on
    t = time.perf_counter()
    thinker.eval()
    batches: list[list[Group]] = []
    skipped = 0
    with gathered_for_generation(accelerator, policy):
        for records in micro_batches:
            groups = []
            for record in records:
                # outside autocast: the processor's audio feature extractor runs torch ops and wants fp32
                prompt = encode_prompt(record, processor, media_options, template).to(device, model_dtype)
                if config.max_prompt_length and prompt.length > config.max_prompt_length:
                    skipped += 1  # never truncate through media placeholders: skip and count
                    continue
                with _autocast(accelerator):
                    group = sample_group(thinker, prompt, sampling, processor.tokenizer,
                                         share_prefill=sharing == "full")
                group.record = record
                groups.append(group)
            batches.append(groups)
    timings["rollout_seconds"] = time.perf_counter() - t
    check_micro_batches(accelerator, batches)
    all_groups = [g for groups in batches for g in groups]

    # 2. rewards [G, R] per group -> weighted totals [B*G] -> group-normalised advantages [B*G]
    for group in all_groups:
        group.rewards = score_group(rewards, group)
    if all_groups:
        totals = torch.cat([g.rewards @ rewards.weights for g in all_groups])
        advantages = group_advantages(totals, config.num_generations, scale=config.scale_rewards)
        for group, group_adv in zip(all_groups, advantages.split(config.num_generations)):
            group.advantages = group_adv

    # 3. old-policy and reference log-probs (no grad)
    t = time.perf_counter()
    with torch.no_grad(), _autocast(accelerator), gathered_for_generation(accelerator, policy):
        if config.num_iterations > 1:
            for group, logps in zip(all_groups, group_token_logps(thinker, all_groups, sharing, config.temperature)):
                group.old_logps = logps
        if config.beta > 0:
            with (peft_model.disable_adapter() if peft_model is not None else nullcontext()):
                ref_model = reference if reference is not None else thinker
                for group, logps in zip(all_groups, group_token_logps(ref_model, all_groups, sharing, config.temperature)):
                    group.ref_logps = logps
    timings["logprob_seconds"] = time.perf_counter() - t

    # 4. num_iterations policy updates on these completions
    t = time.perf_counter()
    thinker.train()
    loss_stats: list[dict] = []
    grad_norm = torch.tensor(0.0)
    tokens_in_step = sum(int(g.completion_mask.sum()) for g in all_groups)
    last_batch = max((i for i, groups in enumerate(batches) if groups), default=-1)
    active_batches = sum(1 for groups in batches if groups)
    for _ in range(config.num_iterations):
        for index, groups in enumerate(batches):
            if not groups:
                continue
            # gradients of the micro-batches add up locally; the last one synchronises (and steps DeepSpeed)
            with accumulation(accelerator, policy, sync=index == last_batch):
                with _autocast(accelerator):
                    logps = _pad_cat(policy(groups, sharing=sharing, temperature=config.temperature))  # [B*G, C]
                mask = _pad_cat([g.completion_mask for g in groups]).to(logps.dtype)
                if config.mask_truncated_completions:
                    mask = mask * (~torch.cat([g.truncated for g in groups])).to(mask.dtype)[:, None]
                loss, stats = policy_loss(
                    logps,
                    _pad_cat([g.old_logps for g in groups]) if config.num_iterations > 1 else None,
                    _pad_cat([g.ref_logps for g in groups]) if config.beta > 0 else None,
                    torch.cat([g.advantages for g in groups]).to(device),
                    mask,
                    loss_type=config.loss_type, epsilon=config.epsilon, epsilon_high=config.epsilon_high,
                    beta=config.beta, importance_sampling_level=config.importance_sampling_level,
                    max_completion_length=config.max_completion_length,
                    use_bias_correction_kl=config.use_bias_correction_kl,
                    num_items_in_batch=tokens_in_step if config.loss_type in ("dapo", "bnpo") else None,
                )
                # per-sequence losses average over micro-batches; token-normalised ones already use the step's tokens
                scale = 1.0 if config.loss_type in ("dapo", "bnpo") else 1.0 / active_batches
                accelerator.backward(loss * scale)
                loss_stats.append({"loss": loss.detach().float().item(), **{k: float(v) for k, v in stats.items()}})
        if config.max_grad_norm > 0:
            grad_norm = grad_norm_value(accelerator.clip_grad_norm_(policy.parameters(), config.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    timings["backward_seconds"] = time.perf_counter() - t

    metrics = step_metrics(all_groups, rewards, loss_stats, grad_norm, skipped, config.num_generations)
    metrics.update(timings)
    total_seconds = sum(timings.values())
    metrics["tokens_per_second"] = tokens_in_step / total_seconds if total_seconds > 0 else 0.0
    return StepResult(metrics=metrics, groups=all_groups)


def _pad_cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate [G_i, C_i] tensors along dim 0, right-padding dim 1 with zeros to max C_i."""
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in tensors])


def _autocast(accelerator):
    return accelerator.autocast() if accelerator.mixed_precision != "no" else nullcontext()


def _evaluate_on_main(evaluate, thinker, processor, accelerator) -> dict:
    """Run the caller's evaluation on the main process in eval mode; every rank waits for it."""
    metrics = {}
    if accelerator.is_main_process:
        was_training = thinker.training
        thinker.eval()
        metrics = evaluate(thinker, processor)
        thinker.train(was_training)
    accelerator.wait_for_everyone()
    return metrics
