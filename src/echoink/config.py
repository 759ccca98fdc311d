"""Training configuration: one dataclass, loaded from YAML with `key=value` overrides.

Field names follow TRL's `GRPOConfig` wherever the concept is the same, so TRL users feel at home.
Where we differ from TRL (read this if you migrate a TRL config):

* `per_device_train_batch_size` counts PROMPTS per device, each answered `num_generations` times
  (EchoInk-R1's meaning: 1 prompt x 16 completions per GPU). TRL's field counts completions.
* `use_bias_correction_kl` defaults to False (EchoInk-R1's KL); TRL 1.16 defaults to True.
* `loss_type` defaults to "grpo" (EchoInk-R1); TRL 1.16 defaults to "dapo".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from echoink.choices import (
    GROUP_SHARING,
    IMPORTANCE_SAMPLING_LEVELS,
    LOSS_TYPES,
    LR_SCHEDULERS,
    REPORT_TO,
    SCALE_REWARDS,
    STEP_STRATEGIES,
)
from echoink.io import read_object_file


#: The most dynamic-sampling draw rounds per micro-batch `max_sampling_rounds` may ask for (each round rolls out
#: per_device_train_batch_size more prompts).
MAX_SAMPLING_ROUNDS = 100


class ConfigError(ValueError):
    """An unknown key or a bad value in a training config; raised before any work starts."""


def _section(title: str):
    """A field maker for one section of the config: `_grpo(16, "help")` is a field with default 16 (a callable
    default, such as `list`, is a default factory) whose help and section `echoink config --list` prints."""

    def setting(default: Any, help: str) -> Any:
        metadata = {"help": help, "section": title}
        if callable(default):
            return field(default_factory=default, metadata=metadata)
        return field(default=default, metadata=metadata)

    return setting


_data = _section("model and data")
_grpo = _section("GRPO (TRL GRPOConfig names)")
_types = _section("problem types and the length reward (docs/rewards.md)")
_optim = _section("optimisation (TRL / transformers TrainingArguments names)")
_moe = _section("mixture-of-experts models (Qwen3-Omni)")
_lora = _section("LoRA (peft)")
_log = _section("logging, checkpoints, evaluation")
_faults = _section("faults: what a run refuses, skips and tolerates (docs/faults.md)")


@dataclass
class TrainConfig:
    # Every field: `name: type = _<section>(default, "one-line help")`; `echoink config --list` prints them.
    model_path: str = _data("", "Model directory: a published Qwen2.5-Omni / Qwen3-Omni checkpoint or ours.")
    train_data: str = _data("", "Training set: AVQA-R1 JSON/JSONL, parquet or save_to_disk dir (docs/data_format.md).")
    output_dir: str = _data("runs/echoink", "Run directory: metrics, completions, checkpoints, final model.")
    freeze_vision: bool = _data(False, "Keep the vision encoder's weights fixed (EchoInk-R1 trains everything).")
    freeze_audio: bool = _data(False, "Keep the audio encoder's weights fixed.")
    use_audio_in_video: bool = _data(True, "Feed a video's sound track to the audio encoder too.")
    max_audio_seconds: float = _data(10.0, "Audio longer than this is cut (seconds; EchoInk-R1: 10).")
    min_pixels: int = _data(4 * 28 * 28, "Smallest image area after resizing, in pixels.")
    max_pixels: int = _data(256 * 28 * 28, "Largest image area after resizing, in pixels (EchoInk-R1's cap).")
    video_fps: float = _data(2.0, "Frames sampled per second of video.")
    video_max_frames: int = _data(16, "Most frames taken from one video (>= 4).")
    prompt_template: dict = _data(dict, "Overrides of echoink.prompts.PromptTemplate fields (docs/rewards.md).")
    attn_implementation: str | None = _data(None, "Attention kernel: sdpa, eager, flash_attention_2; null: default.")

    num_generations: int = _grpo(16, "Completions per prompt (G, the group size; >= 2).")
    beta: float = _grpo(0.001, "KL coefficient against the reference model (0: no reference model).")
    epsilon: float = _grpo(0.2, "Clipping range of the probability ratio (lower side; upper too unless epsilon_high).")
    epsilon_high: float | None = _grpo(None, "Upper clipping range (DAPO's clip-higher); null: epsilon.")
    loss_type: str = _grpo("grpo", "Loss normalisation: grpo | bnpo | dr_grpo | dapo (TRL defaults to dapo).")
    importance_sampling_level: str = _grpo("token", "Probability ratio per token or per sequence (GSPO).")
    scale_rewards: str = _grpo("group", "Divide advantages by the std of the group, the batch, or none.")
    num_iterations: int = _grpo(1, "Policy updates per collected batch (mu).")
    use_bias_correction_kl: bool = _grpo(False, "Importance-weight the KL term (TRL defaults to true).")
    mask_truncated_completions: bool = _grpo(False, "Leave completions cut at max_completion_length out of the loss.")
    max_prompt_length: int | None = _grpo(2048, "Longer prompts (tokens, media included) are skipped; null: no limit.")
    max_completion_length: int = _grpo(768, "Longest completion in tokens.")
    temperature: float = _grpo(1.0, "Sampling temperature of rollouts.")
    top_p: float = _grpo(1.0, "Nucleus sampling threshold of rollouts (1: off).")
    top_k: int | None = _grpo(None, "Top-k sampling of rollouts; null or 0: off.")
    reward_funcs: list = _grpo(lambda: ["accuracy", "format"],
                               "Rewards by name or 'module:function' (user code, imported; docs/rewards.md).")
    reward_weights: list | None = _grpo(None, "One weight per reward function; null: all 1.")
    group_sharing: str = _grpo("full", "Compute each prompt once per group: none | encoders | full.")
    skip_zero_advantage_groups: bool | None = _grpo(None, "Skip the update of groups whose rewards are all equal; "
                                                          "null: on when beta == 0.")
    dynamic_sampling: bool = _grpo(False, "DAPO: draw more prompts until the batch holds informative groups.")
    max_sampling_rounds: int = _grpo(4, "Most rollout rounds per step with dynamic_sampling.")

    problem_types: list = _types(list, "User problem types 'package.module:Class' (imported: trusted code only).")
    len_control: bool = _types(False, "EchoInk-R1's length bonus, as a reward column named 'length'.")
    len_control_min_tokens: int = _types(160, "Length bonus: shortest completion that earns it, in tokens.")
    len_control_max_tokens: int = _types(256, "Length bonus: longest completion that earns it, in tokens.")
    len_control_bonus: float = _types(0.2, "Length bonus: reward added within the length window.")
    len_control_threshold: float = _types(0.1, "Length bonus: accuracy above this counts as correct.")

    learning_rate: float = _optim(1e-6, "Peak learning rate (AdamW).")
    lr_scheduler_type: str = _optim("cosine", "Learning-rate schedule: constant | linear | cosine | "
                                              "constant_with_warmup.")
    warmup_ratio: float = _optim(0.0, "Fraction of the steps spent warming the learning rate up.")
    warmup_steps: int = _optim(0, "Steps spent warming the learning rate up; > 0 overrides warmup_ratio.")
    weight_decay: float = _optim(0.01, "AdamW weight decay.")
    adam_beta1: float = _optim(0.9, "AdamW beta1.")
    adam_beta2: float = _optim(0.999, "AdamW beta2.")
    adam_epsilon: float = _optim(1e-8, "AdamW epsilon.")
    allow_large_learning_rate: bool = _optim(False, "Accept learning_rate above 1 (refused otherwise: almost "
                                                    "always a typo).")
    max_grad_norm: float = _optim(5.0, "Clip the gradient norm to this (0: no clipping).")
    max_consecutive_nonfinite_steps: int = _optim(3, "Updates with a non-finite loss or gradient are skipped; "
                                                     "stop after this many in a row (0: never).")
    per_device_train_batch_size: int = _optim(1, "PROMPTS per device per micro-step, each answered num_generations "
                                                 "times (TRL counts completions).")
    gradient_accumulation_steps: int = _optim(1, "Micro-steps per optimizer step.")
    num_train_epochs: float = _optim(1.0, "Passes over the training set (when max_steps <= 0).")
    max_steps: int = _optim(-1, "Optimizer steps to run; -1: from num_train_epochs.")
    seed: int = _optim(42, "Seed of data order, sampling and initialisation.")
    bf16: bool = _optim(False, "Train in bfloat16.")
    gradient_checkpointing: bool = _optim(False, "Recompute activations in backward (less memory, more time).")
    shuffle_dataset: bool = _optim(True, "Shuffle the training set every epoch.")
    balance_answer_letters: bool = _optim(False, "Order each epoch so every batch mixes the answer letters.")
    torch_num_threads: int | None = _optim(None, "CPU threads torch uses; null: torch's default.")

    router_aux_loss_coef: float = _moe(0.0, "Mixture-of-experts router load-balancing loss coefficient (0: off; "
                                            "> 0 needs group_sharing: none).")

    use_peft: bool = _lora(False, "Train LoRA adapters (peft) instead of all weights.")
    lora_r: int = _lora(16, "LoRA rank.")
    lora_alpha: int = _lora(32, "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = _lora(0.05, "Dropout on the LoRA input.")
    lora_target_modules: list | None = _lora(None, "Modules that get adapters (words or suffixes); null: the "
                                                   "family's default (docs/qwen3_omni.md).")
    save_merged_model: bool = _lora(False, "Also save the final model with the adapters merged in.")

    logging_steps: int = _log(1, "Write metrics every N steps.")
    log_completions: bool = _log(True, "Write every completion to completions.jsonl.")
    num_completions_to_print: int = _log(0, "Show this many completions of each logged step in the console.")
    logging_first_step: bool = _log(False, "Also log the first step when logging_steps > 1.")
    disable_tqdm: bool = _log(False, "No progress bar: a plain line per logged step instead (as --quiet).")
    report_to: list = _log(list, "Experiment trackers: tensorboard, wandb, ... (installed), all, or none.")
    run_name: str | None = _log(None, "The run's name in trackers (W&B run name); null: output_dir's folder name.")
    logging_dir: str | None = _log(None, "TensorBoard's event-file directory; null: OUTPUT_DIR/echoink.")
    save_strategy: str = _log("steps", "steps: a checkpoint every save_steps; no: only the final model.")
    save_steps: int = _log(0, "Save a checkpoint every N steps (0: only the final model).")
    save_total_limit: int | None = _log(None, "Keep only the newest N checkpoints; null: all.")
    resume: bool = _log(False, "Continue from the newest checkpoint in output_dir.")
    resume_from_checkpoint: str | None = _log(None, "Continue from this checkpoint directory.")
    eval_strategy: str = _log("steps", "steps: evaluate every eval_steps; no: never.")
    eval_steps: int = _log(0, "Evaluate on eval_data every N steps (0: never).")
    eval_data: str | None = _log(None, "Evaluation set (as train_data) for in-training evaluation.")
    eval_limit: int | None = _log(200, "Evaluate on the first N items; null: all.")
    eval_batch_size: int = _log(8, "Prompts per generate call in in-training evaluation.")
    eval_max_new_tokens: int | None = _log(None, "Longest evaluation reply in tokens; null: max_completion_length.")

    overwrite_output_dir: bool = _faults(False, "Clear a previous run in output_dir instead of refusing.")
    allow_inexact_resume: bool = _faults(False, "Resume from a checkpoint without its RNG states (warns loudly).")
    max_skipped_prompt_fraction: float = _faults(0.5, "Stop if more of the first steps' prompts than this are over "
                                                      "max_prompt_length.")
    skipped_prompt_check_steps: int = _faults(4, "... counted over this many first steps.")
    max_skipped_records: int = _faults(10, "Records whose media fail to decode are skipped (named) up to this many.")

    def __post_init__(self) -> None:
        if self.report_to in (["none"], "none"):  # TRL's spelling of "no trackers"
            self.report_to = []
        if self.save_strategy == "no":  # transformers' switches, expressed in the step counts they turn off
            self.save_steps = 0
        if self.eval_strategy == "no":
            self.eval_steps = 0
        self.validate()

    # ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        problems = []

        def check(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        check(self.loss_type in LOSS_TYPES, f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        check(self.importance_sampling_level in IMPORTANCE_SAMPLING_LEVELS,
              f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, got {self.importance_sampling_level!r}")
        check(self.scale_rewards in SCALE_REWARDS,
              f"scale_rewards must be one of {SCALE_REWARDS}, got {self.scale_rewards!r}")
        check(self.lr_scheduler_type in LR_SCHEDULERS,
              f"lr_scheduler_type must be one of {LR_SCHEDULERS}, got {self.lr_scheduler_type!r}")
        check(self.group_sharing in GROUP_SHARING,
              f"group_sharing must be one of {GROUP_SHARING}, got {self.group_sharing!r}")
        check(self.num_generations >= 2, f"num_generations must be >= 2 (GRPO compares completions), got {self.num_generations}")
        check(1 <= self.max_sampling_rounds <= MAX_SAMPLING_ROUNDS,
              f"max_sampling_rounds must be between 1 and {MAX_SAMPLING_ROUNDS}, got {self.max_sampling_rounds} (each "
              "round rolls out per_device_train_batch_size more prompts; a reward still uninformative after "
              f"{MAX_SAMPLING_ROUNDS} rounds needs other rewards or data, not more rounds)")
        check(self.num_iterations >= 1, f"num_iterations must be >= 1, got {self.num_iterations}")
        check(self.beta >= 0, f"beta must be >= 0, got {self.beta}")
        problems.extend(clip_range_problems(self.epsilon, self.epsilon_high))
        check(self.max_completion_length >= 1, f"max_completion_length must be >= 1, got {self.max_completion_length}")
        check(self.max_prompt_length is None or self.max_prompt_length >= 1,
              f"max_prompt_length must be >= 1 or null, got {self.max_prompt_length}")
        problems.extend(sampling_problems(self.temperature, self.top_p, self.top_k))
        check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        check(not math.isfinite(self.learning_rate) or self.learning_rate <= 1 or self.allow_large_learning_rate,
              f"learning_rate={self.learning_rate} is above 1, which ruins the weights at the first update (AdamW "
              "moves each weight by about the learning rate); fine-tuning uses 1e-7 to 1e-3. If you mean it, "
              "set allow_large_learning_rate=true")
        check(0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        check(self.per_device_train_batch_size >= 1,
              f"per_device_train_batch_size must be >= 1, got {self.per_device_train_batch_size}")
        check(self.gradient_accumulation_steps >= 1,
              f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")
        check(self.max_steps > 0 or self.num_train_epochs > 0, "set max_steps > 0 or num_train_epochs > 0")
        check(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {self.max_grad_norm}")
        check(self.max_consecutive_nonfinite_steps >= 0,
              f"max_consecutive_nonfinite_steps must be >= 0 (0: never stop), got {self.max_consecutive_nonfinite_steps}")
        check(self.max_audio_seconds > 0, f"max_audio_seconds must be > 0, got {self.max_audio_seconds}")
        check(0 < self.min_pixels <= self.max_pixels,
              f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")
        check(self.video_fps > 0, f"video_fps must be > 0, got {self.video_fps}")
        check(self.video_max_frames >= 4, f"video_max_frames must be >= 4, got {self.video_max_frames}")
        check(len(self.reward_funcs) >= 1, "reward_funcs must name at least one reward")
        check(self.reward_weights is None or len(self.reward_weights) == len(self.reward_funcs),
              f"reward_weights has {len(self.reward_weights or [])} entries but reward_funcs has {len(self.reward_funcs)}")
        check(self.logging_steps >= 1, f"logging_steps must be >= 1, got {self.logging_steps}")
        check(self.save_steps >= 0, f"save_steps must be >= 0, got {self.save_steps}")
        check(self.save_total_limit is None or self.save_total_limit >= 1,
              f"save_total_limit must be >= 1 or null, got {self.save_total_limit}")
        check(self.eval_steps >= 0, f"eval_steps must be >= 0, got {self.eval_steps}")
        check(self.eval_steps == 0 or bool(self.eval_data), "eval_steps > 0 needs eval_data")
        check(self.eval_limit is None or (not isinstance(self.eval_limit, bool) and isinstance(self.eval_limit, int)
                                          and self.eval_limit >= 1),
              f"eval_limit must be a whole number >= 1 (the first N eval items) or null for all, got "
              f"{self.eval_limit!r} (set eval_steps=0 to turn evaluation off)")
        check(self.lora_r >= 1, f"lora_r must be >= 1, got {self.lora_r}")
        check(math.isfinite(self.router_aux_loss_coef) and self.router_aux_loss_coef >= 0,
              f"router_aux_loss_coef must be a finite number >= 0 (0 = off), got {self.router_aux_loss_coef}")
        check(self.router_aux_loss_coef == 0 or self.group_sharing == "none",
              "router_aux_loss_coef > 0 needs group_sharing: none (the shared paths count prompt tokens once, so "
              "they do not compute the router's loss)")
        for spec in self.problem_types:
            module, _, attribute = spec.partition(":") if isinstance(spec, str) else ("", "", "")
            check(bool(module.strip() and attribute.strip()),
                  f"problem_types entries must look like 'package.module:Class', got {spec!r}")
        check(1 <= self.len_control_min_tokens <= self.len_control_max_tokens,
              "need 1 <= len_control_min_tokens <= len_control_max_tokens, got "
              f"{self.len_control_min_tokens}, {self.len_control_max_tokens}")
        check(math.isfinite(self.len_control_bonus) and self.len_control_bonus >= 0,
              f"len_control_bonus must be a finite number >= 0, got {self.len_control_bonus}")
        check(math.isfinite(self.len_control_threshold) and 0 <= self.len_control_threshold < 1,
              f"len_control_threshold must be in [0, 1), got {self.len_control_threshold}")
        problems.extend(self._fault_setting_problems())
        non_finite = self._non_finite_fields()  # a NaN fails every comparison: say "finite" once, not also "> 0"
        problems = [p for p in problems if p.split(" ", 1)[0] not in non_finite]
        problems += [f"{name} must be a finite number, got {getattr(self, name)}" for name in non_finite]
        if problems:  # one line, every problem named
            raise ConfigError("invalid config: " + "; ".join(problems))

    def _fault_setting_problems(self) -> list[str]:
        """Checks that make every setting fail here, before the model loads, rather than mid-run: reward
        weights, thread counts, evaluation and LoRA ranges, trackers, and the fault-tolerance settings."""
        problems = []
        if self.reward_weights is not None:
            bad = [w for w in self.reward_weights
                   if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)]
            if bad:
                problems.append(f"reward_weights must be finite numbers, got {self.reward_weights}")
        rules = [
            (self.torch_num_threads is None or self.torch_num_threads >= 1,
             f"torch_num_threads must be >= 1 or null (null: torch's default), got {self.torch_num_threads}"),
            (self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}"),
            (self.eval_max_new_tokens is None or self.eval_max_new_tokens >= 1,
             f"eval_max_new_tokens must be >= 1 or null, got {self.eval_max_new_tokens}"),
            (self.num_completions_to_print >= 0,
             f"num_completions_to_print must be >= 0, got {self.num_completions_to_print}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1,
             f"adam_beta1 and adam_beta2 must be in [0, 1), got {self.adam_beta1}, {self.adam_beta2}"),
            (self.adam_epsilon > 0, f"adam_epsilon must be > 0, got {self.adam_epsilon}"),
            (self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}"),
            (0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}"),
            (not self.save_merged_model or self.use_peft, "save_merged_model needs use_peft=true"),
            (all(name in REPORT_TO for name in self.report_to),
             f"report_to entries must be among {REPORT_TO} (or none), got {self.report_to}"),
            (self.save_strategy in STEP_STRATEGIES,
             f"save_strategy must be one of {STEP_STRATEGIES} (a checkpoint every save_steps, or none), got "
             f"{self.save_strategy!r}"),
            (self.eval_strategy in STEP_STRATEGIES,
             f"eval_strategy must be one of {STEP_STRATEGIES} (evaluate every eval_steps, or never), got "
             f"{self.eval_strategy!r}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (0 <= self.max_skipped_prompt_fraction <= 1,
             f"max_skipped_prompt_fraction must be in [0, 1], got {self.max_skipped_prompt_fraction}"),
            (self.skipped_prompt_check_steps >= 1,
             f"skipped_prompt_check_steps must be >= 1, got {self.skipped_prompt_check_steps}"),
            (self.max_skipped_records >= 0, f"max_skipped_records must be >= 0, got {self.max_skipped_records}"),
        ]
        problems.extend(message for ok, message in rules if not ok and message)
        return problems

    def _non_finite_fields(self) -> list[str]:
        """Float settings that are inf or NaN: none of them has a meaning for those."""
        hints = get_type_hints(TrainConfig)
        return [item.name for item in dataclasses.fields(self)
                if float in (get_args(hints[item.name]) or (hints[item.name],))
                and isinstance(getattr(self, item.name), float) and not math.isfinite(getattr(self, item.name))]

    # ------------------------------------------------------------------------------------------
    @property
    def reward_weight_list(self) -> list[float]:
        return [float(w) for w in (self.reward_weights or [1.0] * len(self.reward_funcs))]

    def step_arithmetic(self, num_train_items: int, num_processes: int = 1) -> dict[str, int]:
        """Prompts and completions per optimizer step and the total number of steps."""
        prompts_per_step = self.per_device_train_batch_size * num_processes * self.gradient_accumulation_steps
        steps_per_epoch = max(1, math.ceil(num_train_items / prompts_per_step))  # the last step wraps around
        total = self.max_steps if self.max_steps > 0 else math.ceil(steps_per_epoch * self.num_train_epochs)
        return {
            "num_processes": num_processes,
            "prompts_per_device_per_micro_step": self.per_device_train_batch_size,
            "completions_per_device_per_micro_step": self.per_device_train_batch_size * self.num_generations,
            "prompts_per_step": prompts_per_step,
            "completions_per_step": prompts_per_step * self.num_generations,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total,
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def sampling_problems(temperature: float, top_p: float, top_k: int | None) -> list[str]:
    """The one rule for sampling settings (the config's rollouts, `SamplingSettings`, `echoink eval`): what is
    wrong, one message per setting ([] when all is well)."""
    problems = []
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        problems.append(f"temperature must be a finite number > 0, got {temperature}")
    if not 0 < top_p <= 1:
        problems.append(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 0:
        problems.append(f"top_k must be >= 0 or null, got {top_k}")
    return problems


def clip_range_problems(epsilon: float, epsilon_high: float | None) -> list[str]:
    """The one rule for the ratio's clipping range (the config and `grpo.loss` alike)."""
    problems = []
    if not epsilon > 0:
        problems.append(f"epsilon must be > 0, got {epsilon}")
    if epsilon_high is not None and not epsilon_high > 0:
        problems.append(f"epsilon_high must be > 0, got {epsilon_high}")
    return problems


def describe_run(config: TrainConfig, num_items: int, num_processes: int = 1) -> str:
    """The resolved config and the step arithmetic, as `echoink train --dry-run` prints them."""
    lines = [yaml.safe_dump(config.to_dict(), sort_keys=False).rstrip(), "", f"train items: {num_items}",
             f"processes: {num_processes}",
             "per_device_train_batch_size counts PROMPTS per device (TRL counts completions); "
             f"each prompt is answered num_generations={config.num_generations} times"]
    for key, value in config.step_arithmetic(num_items, num_processes).items():
        lines.append(f"{key}: {value}")
    return "\n".join(lines)


# ---- loading ------------------------------------------------------------------------------------

def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base_dir: str | Path | None = None) -> TrainConfig:
    """YAML file (optional) + `key=value` overrides -> validated TrainConfig.

    Unknown keys and values of the wrong type are errors. Override values are parsed as YAML
    scalars/lists (`beta=0.04`, `reward_funcs=[accuracy,format]`, `top_k=null`).
    """
    values: dict[str, Any] = {}
    if path is not None:
        values.update(read_object_file(path, ConfigError, yaml_text=True, missing="config file not found",
                                       what="config"))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        try:
            values[key.strip()] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: cannot parse value: {exc}") from None
    source = " + ".join(([str(path)] if path is not None else []) + (["overrides"] if overrides else [])) or "config"
    return config_from_dict(values, source=source)


#: TRL / transformers names that mean exactly one of our keys: accepted and renamed.
SAME_MEANING = {"per_device_eval_batch_size": "eval_batch_size", "evaluation_strategy": "eval_strategy"}

#: TRL / transformers names with no meaning here: an error that says so and what to use instead.
NO_MEANING_HERE = {
    "use_vllm": "rollouts use echoink's own engine (one prompt prefill per group); there is no vLLM mode",
    "generation_batch_size": "a step generates per_device_train_batch_size PROMPTS x num_generations "
                             "completions per device (per_device_train_batch_size counts prompts here)",
    "steps_per_generation": "every step generates its own completions; use num_iterations for several updates "
                            "on one batch",
    "optim": "the optimizer is AdamW (set adam_beta1, adam_beta2, adam_epsilon, weight_decay)",
    "fp16": "use bf16: true (float16 is not supported)",
    "logging_strategy": "metrics are logged every logging_steps steps",
    "deepspeed": "pass an accelerate config instead: accelerate launch --config_file configs/accelerate/...",
    "fsdp": "pass an accelerate config instead: accelerate launch --config_file configs/accelerate/fsdp_*.yaml",
    "push_to_hub": "export the model with `echoink export`, then upload the directory",
    "model_init_kwargs": "set model_path, bf16 and attn_implementation",
    "torch_dtype": "set bf16: true or false (training keeps float32 master weights)",
    "gradient_checkpointing_kwargs": "set gradient_checkpointing: true (non-reentrant checkpointing)",
}
NO_MEANING_HERE.update({name: NO_MEANING_HERE["use_vllm"] for name in (
    "vllm_mode", "vllm_server_host", "vllm_server_port", "vllm_gpu_memory_utilization",
    "vllm_tensor_parallel_size", "vllm_importance_sampling_correction")})


def config_from_dict(values: dict[str, Any], source: str = "config") -> TrainConfig:
    hints = get_type_hints(TrainConfig)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = _rename_same_meaning(values, source)
    foreign = [name for name in values if name in NO_MEANING_HERE]
    if foreign:
        raise ConfigError(f"{source}: " + "; ".join(f"{name} has no meaning in echoink: {NO_MEANING_HERE[name]}"
                                                    for name in foreign))
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{source}: {unknown_key_message(unknown)}")
    coerced = {}
    problems = []
    for key, value in values.items():
        try:
            coerced[key] = _coerce(value, hints[key])
        except (TypeError, ValueError):
            problems.append(f"{key}: expected {_type_name(hints[key])}, got {value!r}")
    if problems:
        raise ConfigError(f"{source}: bad value(s): " + "; ".join(problems))
    try:
        return TrainConfig(**coerced)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _rename_same_meaning(values: dict[str, Any], source: str) -> dict[str, Any]:
    """TRL's name for one of our keys becomes that key; both given is an error."""
    renamed = dict(values)
    for trl_name, ours in SAME_MEANING.items():
        if trl_name in renamed:
            if ours in renamed:
                raise ConfigError(f"{source}: {trl_name} and {ours} are the same setting; give only {ours}")
            renamed[ours] = renamed.pop(trl_name)
    for name in ("save_strategy", "eval_strategy"):  # YAML 1.1 reads an unquoted `no` as false
        if renamed.get(name) is False:
            renamed[name] = "no"
    return renamed


def unknown_key_message(names: list[str]) -> str:
    """One line for keys TrainConfig does not have: each with its closest key ("did you mean"), and where
    the list of keys is."""
    import difflib

    known = [item.name for item in dataclasses.fields(TrainConfig)]
    parts = []
    for name in names:
        close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.75)
        parts.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    return f"unknown config key(s): {', '.join(parts)}; every key: echoink config --list"


def _coerce(value: Any, hint: Any) -> Any:
    args = get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise TypeError("null not allowed")
    options = [a for a in args if a is not type(None)] if args and get_origin(hint) is not list else [hint]
    for option in options:
        origin = get_origin(option) or option
        if origin is bool:
            if isinstance(value, bool):
                return value
        elif origin is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
        elif origin is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
                try:
                    return float(value)
                except ValueError:
                    pass
        elif origin is str:
            if isinstance(value, str):
                return value
        elif origin is list:
            if isinstance(value, list):
                return value
            if isinstance(value, str):
                return [value]
        elif origin is dict:
            if isinstance(value, dict):
                return value
    raise TypeError(f"{value!r} does not fit {hint}")


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


# ---- the reference of every key -----------------------------------------------------------------

@dataclass(frozen=True)
class ConfigKey:
    """One config key as `echoink config --list` shows it."""

    name: str
    type: str     # e.g. "int", "float | None", "list"
    default: str  # as YAML/JSON reads it: 16, null, "grpo", ["accuracy", "format"]
    help: str
    section: str


def config_keys() -> list[ConfigKey]:
    """Every key of TrainConfig, in declaration order, with its type, default and one-line help."""
    import json

    hints = get_type_hints(TrainConfig)
    keys = []
    for item in dataclasses.fields(TrainConfig):
        default = item.default_factory() if item.default is dataclasses.MISSING else item.default
        keys.append(ConfigKey(item.name, _type_name(hints[item.name]), json.dumps(default), item.metadata["help"],
                              item.metadata["section"]))
    return keys


def describe_config_keys(width: int = 80) -> str:
    """The key reference as plain text that fits `width` columns (no line is cut): one block per section,
    `name (type, default D)` then the help indented below it."""
    import textwrap

    lines: list[str] = []
    section = None
    for key in config_keys():
        if key.section != section:
            section = key.section
            lines += ([""] if lines else []) + [f"# {section}"]
        lines += textwrap.wrap(f"{key.name} ({key.type}, default {key.default})", width,
                               subsequent_indent="    ", break_on_hyphens=False)
        lines += textwrap.wrap(key.help, width, initial_indent="    ", subsequent_indent="    ",
                               break_on_hyphens=False)
    return "\n".join(lines)
