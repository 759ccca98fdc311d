"""GRPO training, readable top to bottom: validate, load, resume, then `grpo_step` (collect -> update, in
`step.py`) for every step, logging, checkpoints and the final model.

One step = `gradient_accumulation_steps` micro-batches of `per_device_train_batch_size` prompts per
device, each prompt answered `num_generations` times, followed by `num_iterations` optimizer
updates on those same completions (TRL's μ). Distribution (DDP / FSDP / DeepSpeed) comes from
accelerate (`distributed.py` holds what the back-ends need); groups stay whole on one rank.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import get_scheduler

from echoink.config import ConfigError, TrainConfig
from echoink.data import load_dataset
from echoink.grpo.batches import BatchPlan
from echoink.grpo.checkpoint import (
    ResumeChoice,
    changed_settings,
    latest_checkpoint,
    choose_resume_checkpoint,
    load_checkpoint_state,
    run_settings,
    save_checkpoint,
    save_model_files,
)
from echoink.grpo.distributed import check_dataset_modalities, make_accelerator, make_reference
from echoink.grpo.logprobs import Policy
from echoink.grpo.loss import GRPOLoss
from echoink.grpo.nonfinite import LogitsGuard, NonFiniteModelError
from echoink.grpo.preemption import Preempted, PreemptionNotice
from echoink.grpo.run_dir import check_output_dir, clear_previous_run, locked_output_dir
from echoink.grpo.run_log import RunLog, transformers_bars_as_found
from echoink.grpo.sampling import StepPrompts, skips_zero_advantage_groups
from echoink.grpo.scoring import RewardSet
from echoink.grpo.step import NonFiniteError, StepContext, grpo_step
from echoink.grpo.zero_signal import ZeroSignalWatch
from echoink.io import write_json_atomic
from echoink.model import load_thinker
from echoink.model.engine import rollout_engine
from echoink.model.generation import SamplingSettings
from echoink.model.inputs import MediaOptions
from echoink.model.loading import read_checkpoint
from echoink.model.prompt_settings import PromptSettings, write_prompt_settings
from echoink.model.trainable import (
    apply_freezing,
    check_family_settings,
    merge_adapter,
    prepare_for_training,
    wrap_lora,
)
from echoink.problem_types import register_problem_types
from echoink.prompts import PromptTemplate


def train(config: TrainConfig, resume_from: str | None = None, progress: bool = True,
          evaluate: Callable[[torch.nn.Module, object], dict] | None = None) -> Path:
    """Run GRPO as `config` says; returns the directory of the final model.

    evaluate: the in-training evaluation, called every `eval_steps` on the main process as
        `evaluate(thinker, processor) -> {"eval/...": value}` (build it with
        `echoink.eval.run.training_evaluator(config)`; the CLI and the demo do). Required when eval_steps > 0.
    """
    # --- 1. validate everything a user gave us before loading the model ---
    if not config.model_path:
        raise ValueError("config: model_path is required")
    if not config.train_data:
        raise ValueError("config: train_data is required")
    # one run per output_dir at a time (run_dir.py); an error leaves transformers' bars as they were
    with locked_output_dir(config.output_dir), transformers_bars_as_found():
        return _train(config, resume_from, progress, evaluate)


def _train(config: TrainConfig, resume_from: str | None, progress: bool,
           evaluate: Callable[[torch.nn.Module, object], dict] | None) -> Path:
    run = _open_run(config, resume_from, progress, evaluate)  # 1. everything checked before the model loads
    model = _load_model(run)                                    # 2. model, reference, optimizer, scheduler
    start_step, data_position = _resume_position(run)           # 3. resume
    context = _step_context(run, model, start_step)
    log, accelerator, plan, engine = run.log, run.accelerator, run.plan, context.engine

    # --- 4. the loop (SIGTERM / SIGUSR1: finish the step, checkpoint, exit; preemption.py) ---
    log.begin(start_step)  # the bar and the pace count from the resumed step
    zero_signal = ZeroSignalWatch()  # warns when several steps in a row learn nothing
    with PreemptionNotice() as notice:
        for step in range(start_step, run.total_steps):
            t0 = time.perf_counter()
            prompts = StepPrompts(plan, run.records, accelerator.process_index, step, dynamic=config.dynamic_sampling,
                                  first_round=data_position)
            try:
                with LogitsGuard(context.thinker):  # nothing non-finite reaches a rollout (nonfinite.py)
                    result = grpo_step(context, prompts)
            except NonFiniteModelError as exc:
                raise NonFiniteError(_nonfinite_message(exc, step + 1, config)) from None
            engine.sync(context.thinker, step + 1)  # later groups are sampled by the policy after step + 1 steps
            data_position += prompts.rounds_used
            result.metrics["step_seconds"] = time.perf_counter() - t0
            result.metrics["learning_rate"] = context.scheduler.get_last_lr()[0]
            if evaluate is not None and (step + 1) % config.eval_steps == 0:
                result.metrics.update(_evaluate_on_main(evaluate, context.thinker, context.processor, accelerator))
            logged = log.step(step + 1, result.metrics, result.groups, context.rewards.names,
                              every=config.logging_steps)
            warning = zero_signal.observe(step + 1, logged)
            if warning:
                log.warn(warning)
            periodic = bool(config.save_steps) and (step + 1) % config.save_steps == 0
            if periodic:
                _checkpoint(run, context, step + 1, data_position)
            if notice.requested(accelerator) and step + 1 < run.total_steps:
                written = (run.output_dir / f"checkpoint-{step + 1}" if periodic
                           else _checkpoint(run, context, step + 1, data_position))
                log.close()
                raise Preempted(notice.signal_name, step + 1, run.total_steps, written)
    return _save_final_model(run, context)  # 5.


@dataclass(frozen=True)
class _Run:
    """What `_open_run` checked and opened: the run's data, processes, log and batch plan."""

    config: TrainConfig
    records: list
    accelerator: Accelerator
    resume: ResumeChoice    # validated, not loaded yet
    log: RunLog
    plan: BatchPlan
    total_steps: int
    prompt_settings: PromptSettings  # saved with every model: eval prompts it the same way
    template: PromptTemplate
    rewards: RewardSet

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)


def _open_run(config: TrainConfig, resume_from: str | None, progress: bool, evaluate) -> _Run:
    """Validate everything a user gave us, start the processes and the log; nothing is loaded yet."""
    previous_run = check_output_dir(config, resume_from)  # never mix two runs in one output_dir (run_dir.py)
    register_problem_types(config.problem_types)  # user types, before the data that uses them is validated
    records = load_dataset(config.train_data)
    if config.eval_steps and evaluate is None:
        raise ConfigError("eval_steps > 0 needs an evaluation: call train(config, evaluate=echoink.eval.run."
                          "training_evaluator(config)) (the CLI does this), or set eval_steps=0")
    template = PromptTemplate.from_dict(config.prompt_template)
    rewards = RewardSet.for_config(config)  # reward_funcs / reward_weights, and the len_control column
    if config.torch_num_threads:
        torch.set_num_threads(config.torch_num_threads)
    accelerator = make_accelerator(config)  # DDP (find_unused_parameters) / FSDP / DeepSpeed, from `accelerate launch`
    check_dataset_modalities(accelerator, records)
    resume = choose_resume_checkpoint(config, resume_from, accelerator.num_processes)  # validated, not loaded yet
    family, _, _ = read_checkpoint(config.model_path)  # config.json and the weight files, not the weights
    check_family_settings(family, config)  # settings this family cannot honour, before the model loads
    set_seed(config.seed, device_specific=True)
    cleared = clear_previous_run(previous_run) if previous_run and accelerator.is_main_process else ""
    accelerator.wait_for_everyone()
    arithmetic = config.step_arithmetic(len(records), accelerator.num_processes)
    log = RunLog(Path(config.output_dir), accelerator, arithmetic["total_steps"],
                 enabled=progress and not config.disable_tqdm, log_completions=config.log_completions,
                 num_completions_to_print=config.num_completions_to_print,
                 logging_first_step=config.logging_first_step)
    log.announce(config, arithmetic, len(records))
    if config.beta > 0 and skips_zero_advantage_groups(config):
        log.note("skip_zero_advantage_groups with beta > 0: groups whose rewards are all equal get no update, so "
                 "their KL term is dropped (the gradient differs from not skipping by that term)")
    for line in ([cleared] if cleared else []) + resume.notes:
        log.note(line)
    for line in resume.warnings:
        log.warn(line)
    plan = BatchPlan(num_items=len(records), per_device_batch=config.per_device_train_batch_size,
                     num_processes=accelerator.num_processes, grad_accum=config.gradient_accumulation_steps,
                     seed=config.seed, shuffle=config.shuffle_dataset,
                     answer_letters=tuple(r.answer for r in records) if config.balance_answer_letters else None)
    return _Run(config, records, accelerator, resume, log, plan, arithmetic["total_steps"],
                PromptSettings.from_config(config), template, rewards)


class _Model(NamedTuple):
    """The loaded, accelerate-prepared model and what updates it."""

    thinker: torch.nn.Module   # unwrapped (LoRA-injected): rollouts and no-grad passes
    processor: object
    policy: torch.nn.Module    # accelerate-wrapped `Policy`
    peft_model: object | None
    reference: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: object


def _load_model(run: _Run) -> _Model:
    """Load the model (LoRA, freezing, checkpointing), the reference, the optimizer and the scheduler."""
    config, accelerator, log = run.config, run.accelerator, run.log
    # fp32 master weights for whatever trains; under LoRA + bf16 the frozen base is held in bf16 (half the memory)
    base_dtype = "bfloat16" if config.use_peft and config.bf16 else "float32"
    log.note(f"loading the model from {config.model_path} ...")
    loading_started = time.monotonic()
    thinker, processor = load_thinker(config.model_path, dtype=base_dtype, attn_implementation=config.attn_implementation)
    log.note(f"model loaded in {time.monotonic() - loading_started:.0f} s")
    prepare_for_training(thinker, config)  # family checks (group sharing it cannot do) and the router aux-loss weight
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
    updates = run.total_steps * config.num_iterations
    warmup = config.warmup_steps * config.num_iterations if config.warmup_steps else int(config.warmup_ratio * updates)
    scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=updates)
    policy, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    thinker = accelerator.unwrap_model(policy).thinker
    return _Model(thinker, processor, policy, peft_model, reference, optimizer, scheduler)


def _step_context(run: _Run, model: _Model, start_step: int) -> StepContext:
    """What every step works with: the model, its rollout engine (policy version = the resumed step), rewards, loss."""
    config = run.config
    engine = rollout_engine(model.thinker, model.processor.tokenizer, config.group_sharing, policy_version=start_step,
                            batch_size=config.rollout_batch_size, token_budget=config.rollout_token_budget)
    sampling = SamplingSettings(config.num_generations, config.max_completion_length, config.temperature,
                                config.top_p, config.top_k)
    return StepContext(config, run.accelerator, model.policy, model.thinker, engine, model.reference,
                       model.peft_model, model.optimizer, model.scheduler, model.processor,
                       run.rewards, GRPOLoss.from_config(config), sampling,
                       MediaOptions.from_config(config), run.template,
                       torch.bfloat16 if config.bf16 else torch.float32, steps_to_run=run.total_steps - start_step)


def _resume_position(run: _Run) -> tuple[int, int]:
    """Load the chosen checkpoint's state; returns (first step to run, draw rounds consumed)."""
    start_step, data_position = 0, 0  # data_position: draw rounds consumed (dynamic sampling only)
    if run.resume.checkpoint:
        state = load_checkpoint_state(run.accelerator, run.resume.checkpoint)
        start_step, data_position = state["step"], state.get("data_position", 0)
        run.log.truncate_after(start_step)  # steps logged after the checkpoint are about to be redone
        run.log.note(f"resumed from {run.resume.checkpoint} at step {start_step}")
        changed = changed_settings(run.resume.state, run.config, run.accelerator.num_processes)
        if changed:
            run.log.warn(f"resuming with settings that differ from the checkpoint's run: {', '.join(changed)}; "
                         "the rest of the run will not match an uninterrupted one")
    elif run.config.resume:
        run.log.note(f"resume=true: no checkpoint in {run.output_dir} yet; starting at step 0")
    return start_step, data_position


def _save_model(run: _Run, context: StepContext, directory: Path, atomic: bool = True) -> None:
    """Write the model files (adapter under LoRA) with the prompt settings; on every rank (gathering is collective)."""
    save_model_files(run.accelerator, context.policy, context.processor, directory, context.peft_model,
                     atomic=atomic, prompt_settings=run.prompt_settings)


def _checkpoint(run: _Run, context: StepContext, step: int, data_position: int) -> Path:
    """Save checkpoint-<step> with the state resume compares and needs; returns its directory."""
    config, plan = run.config, run.plan
    state = {"step": step, "prompts_seen": step * plan.prompts_per_step,
             **run_settings(config, run.accelerator.num_processes)}  # compared on resume
    if config.dynamic_sampling:  # the data position is state only here (draw rounds consumed)
        state.update(data_position=data_position,
                     prompts_seen=data_position * plan.per_device_batch * plan.num_processes)
    saved = save_checkpoint(run.accelerator, lambda directory: _save_model(run, context, directory, atomic=False),
                            run.output_dir, step, state, save_total_limit=config.save_total_limit)
    run.log.checkpoint_saved(step, saved)
    return saved


def _save_final_model(run: _Run, context: StepContext) -> Path:
    """final/ (or adapter/ under LoRA, plus the merged final/ on request) and config.resolved.json."""
    config, accelerator, output_dir = run.config, run.accelerator, run.output_dir
    lora = context.peft_model is not None
    final = output_dir / "final"
    run.log.note(f"saving the final model to {output_dir / 'adapter' if lora else final}")
    accelerator.wait_for_everyone()
    _save_model(run, context, output_dir if lora else final)  # under LoRA: output_dir/adapter
    if accelerator.is_main_process:
        if lora and config.save_merged_model:  # (+ the merged thinker in final/ on request)
            merge_adapter(config.model_path, output_dir / "adapter", final)
            write_prompt_settings(final, run.prompt_settings)
        write_json_atomic(output_dir / "config.resolved.json", config.to_dict())
    accelerator.wait_for_everyone()
    run.log.close()
    accelerator.end_training()
    return final if (not lora or config.save_merged_model) else output_dir / "adapter"


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


def _nonfinite_message(error: Exception, step: int, config: TrainConfig) -> str:
    """The one line for weights or logits that stopped being finite: the step, the checkpoint, the setting."""
    last = latest_checkpoint(config.output_dir)
    resume = (f"the last good checkpoint is {last}: resume from it with a lower learning_rate" if last is not None
              else "no checkpoint was written before it: start again with a lower learning_rate")
    return (f"step {step}: {error}; the run stopped before the next rollout. Likely setting: learning_rate="
            f"{config.learning_rate} (max_grad_norm={config.max_grad_norm}); {resume}")
