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
)


#: The most dynamic-sampling draw rounds per micro-batch `max_sampling_rounds` may ask for (each round rolls out
#: per_device_train_batch_size more prompts).
MAX_SAMPLING_ROUNDS = 100


class ConfigError(ValueError):
    """An unknown key or a bad value in a training config; raised before any work starts."""


@dataclass
class TrainConfig:
    # --- model and data (omni fields) ---
    model_path: str = ""
    train_data: str = ""
    output_dir: str = "runs/echoink"
    freeze_vision: bool = False  # EchoInk-R1 trains everything
    freeze_audio: bool = False
    use_audio_in_video: bool = True
    max_audio_seconds: float = 10.0
    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 256 * 28 * 28  # 200,704: EchoInk-R1's cap
    video_fps: float = 2.0
    video_max_frames: int = 16
    prompt_template: dict = field(default_factory=dict)  # overrides of echoink.prompts.PromptTemplate fields
    attn_implementation: str | None = None

    # --- GRPO (TRL GRPOConfig names) ---
    num_generations: int = 16
    beta: float = 0.001
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: str = "grpo"
    importance_sampling_level: str = "token"
    scale_rewards: str = "group"
    num_iterations: int = 1
    use_bias_correction_kl: bool = False
    mask_truncated_completions: bool = False
    max_prompt_length: int | None = 2048
    max_completion_length: int = 768
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    reward_funcs: list = field(default_factory=lambda: ["accuracy", "format"])
    reward_weights: list | None = None
    group_sharing: str = "full"  # none | encoders | full: compute each prompt once per group
    # groups whose rewards are all equal (zero advantage): skip their update (None: on when beta == 0), and
    # dynamic sampling (DAPO): draw up to max_sampling_rounds rounds until the batch holds informative groups
    skip_zero_advantage_groups: bool | None = None
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4

    # --- problem types and the length reward (docs/rewards.md) ---
    problem_types: list = field(default_factory=list)  # user problem types: "package.module:Class" (imported!)
    len_control: bool = False          # EchoInk-R1's length bonus, as a reward column named "length"
    len_control_min_tokens: int = 160
    len_control_max_tokens: int = 256
    len_control_bonus: float = 0.2
    len_control_threshold: float = 0.1  # accuracy above this counts as correct for the bonus

    # --- optimisation (TRL / transformers TrainingArguments names) ---
    learning_rate: float = 1e-6
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 5.0
    max_consecutive_nonfinite_steps: int = 3  # updates with a non-finite loss/gradient are skipped; stop after N in a row
    per_device_train_batch_size: int = 1  # PROMPTS per device (TRL: completions) - see module docstring
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 1.0
    max_steps: int = -1
    seed: int = 42
    bf16: bool = False
    gradient_checkpointing: bool = False
    shuffle_dataset: bool = True
    balance_answer_letters: bool = False  # order each epoch so every batch mixes the answer letters
    torch_num_threads: int | None = None

    # --- mixture-of-experts models (Qwen3-Omni) ---
    # The router's load-balancing loss (transformers' `router_aux_loss_coef`): 0 = off, the RL default (the
    # policy gradient alone moves the router); > 0 adds coef x aux to the loss of each update and logs
    # `router_aux_loss`. Needs a mixture-of-experts model and group_sharing: none.
    router_aux_loss_coef: float = 0.0

    # --- LoRA (peft) ---
    use_peft: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list | None = None  # None: the family's default (docs/qwen3_omni.md); or words/suffixes
    save_merged_model: bool = False

    # --- logging, checkpoints, evaluation ---
    logging_steps: int = 1
    log_completions: bool = True  # write every completion to completions.jsonl
    num_completions_to_print: int = 0  # show this many completions of each logged step in the console
    report_to: list = field(default_factory=list)  # accelerate trackers: "tensorboard", "wandb"
    save_steps: int = 0  # 0: only the final model
    save_total_limit: int | None = None
    resume: bool = False
    resume_from_checkpoint: str | None = None
    eval_steps: int = 0
    eval_data: str | None = None
    eval_limit: int | None = 200
    eval_batch_size: int = 8
    eval_max_new_tokens: int | None = None

    # --- faults: what a run refuses, skips and tolerates (docs/faults.md) ---
    overwrite_output_dir: bool = False  # transformers' name: clear a previous run in output_dir instead of refusing
    allow_inexact_resume: bool = False  # resume from a checkpoint without its RNG states (a loud warning, not an error)
    max_skipped_prompt_fraction: float = 0.5  # stop if more of the prompts of the first steps are over max_prompt_length
    skipped_prompt_check_steps: int = 4  # ... over this many first steps
    max_skipped_records: int = 10  # records whose media fail to decode in training: skipped (named) up to this many

    def __post_init__(self) -> None:
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
        check(self.epsilon > 0, f"epsilon must be > 0, got {self.epsilon}")
        check(self.epsilon_high is None or self.epsilon_high > 0, f"epsilon_high must be > 0, got {self.epsilon_high}")
        check(self.max_completion_length >= 1, f"max_completion_length must be >= 1, got {self.max_completion_length}")
        check(self.max_prompt_length is None or self.max_prompt_length >= 1,
              f"max_prompt_length must be >= 1 or null, got {self.max_prompt_length}")
        check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        check(self.top_k is None or self.top_k >= 0, f"top_k must be >= 0 or null, got {self.top_k}")
        check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
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
        check(self.num_completions_to_print >= 0,
              f"num_completions_to_print must be >= 0, got {self.num_completions_to_print}")
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
             f"report_to entries must be among {REPORT_TO}, got {self.report_to}"),
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
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8-sig")) or {}
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the config as UTF-8") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of config keys")
        values.update(loaded)
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


def config_from_dict(values: dict[str, Any], source: str = "config") -> TrainConfig:
    hints = get_type_hints(TrainConfig)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown config key(s): {', '.join(unknown)}")
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
