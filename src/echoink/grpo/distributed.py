"""What the trainer needs from accelerate's back-ends (DDP, FSDP, DeepSpeed ZeRO-2/3), in one place.

Launch with `accelerate launch --config_file configs/accelerate/<file>.yaml -m echoink.cli train ...`
or with plain `torchrun` (then DeepSpeed is chosen by the `ACCELERATE_USE_DEEPSPEED` /
`ACCELERATE_DEEPSPEED_CONFIG_FILE` environment variables that `accelerate launch` would set).

* `make_accelerator`      the Accelerator: DDP with `find_unused_parameters` (a frozen or unused
                          encoder parameter must not hang the all-reduce); one LR-scheduler step per
                          update whatever the number of processes; on a machine without a GPU it uses
                          the gloo backend, so `torchrun --nproc_per_node 2` runs on CPU.
* `configure_deepspeed`   fills the DeepSpeed config's "auto" entries from the training config
                          (micro-batch = prompts per device, clipping = max_grad_norm, bf16); gradient
                          accumulation stays in our loop, so the DeepSpeed value must be 1 or "auto".
* `accumulation`          a micro-batch whose backward must not synchronise / step (all but the last
                          micro-batch of an update): DDP `no_sync`; DeepSpeed: no engine step.
* `gathered_for_generation`  rollouts call the unwrapped thinker directly; under ZeRO-3 / FSDP its
                          parameters are sharded, so they are gathered for the rollout (TRL does the same).
* `full_state_dict`       the thinker's full weights on the main process (a collective under ZeRO-3 / FSDP).
* `check_*`               ZeRO and FSDP gather parameters and bucket gradients inside forward/backward,
                          so every rank must run the same encoders in the same order: a dataset that
                          mixes media patterns is refused up front (DDP accepts it), and a step where
                          the ranks disagree raises on every rank instead of hanging.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs

from echoink.compat import (
    deepspeed_engine_step_deferred,
    remove_zero3_hooks,
    require_zero3_hook_internals,
    reset_accelerate_state,
    restore_zero3_hooks,
)
from echoink.config import ConfigError
from echoink.grpo.trackers import make_trackers

_AUTO = "auto"


def _has_device() -> bool:
    """True when torch sees a GPU (or another accelerator): then accelerate picks nccl & co."""
    accelerator_api = getattr(torch, "accelerator", None)
    if accelerator_api is not None:
        return bool(accelerator_api.is_available())
    return torch.cuda.is_available()


def _use_deepspeed_from_env() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(config) -> Accelerator:
    """The run's Accelerator. Raises if the launcher started more processes than accelerate joined."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched == 1 and not torch.distributed.is_initialized():
        # accelerate keeps its state per process; a fresh one lets a notebook or a test suite call train()
        # again with other settings (e.g. bf16 after fp32), which accelerate would otherwise refuse
        reset_accelerate_state()
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)]  # e.g. the audio tower's unused parameter
    cpu = False
    if not _has_device():
        if _use_deepspeed_from_env():
            handlers.append(InitProcessGroupKwargs(backend="gloo"))  # DeepSpeed on CPU: gloo, not ccl
        else:
            cpu = True  # accelerate only forms a CPU process group (gloo) when told cpu=True
    # step_scheduler_with_optimizer=False: accelerate would otherwise step the LR scheduler once per
    # process at every update (its DataLoader convention), running the schedule num_processes times too fast
    accelerator = Accelerator(cpu=cpu, mixed_precision="bf16" if config.bf16 else "no", kwargs_handlers=handlers,
                              step_scheduler_with_optimizer=False, log_with=make_trackers(config) or None,
                              project_dir=config.output_dir)
    if launched > 1 and accelerator.num_processes == 1:
        raise RuntimeError(f"the launcher started {launched} processes (WORLD_SIZE) but accelerate formed no "
                           "process group: every process would train alone, writing the same files")
    configure_deepspeed(accelerator, config)
    return accelerator


def is_deepspeed(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator) -> int:
    return accelerator.state.deepspeed_plugin.zero_stage if is_deepspeed(accelerator) else 0


def is_sharded(accelerator) -> bool:
    """Parameters are partitioned across ranks (ZeRO-3 or FSDP): full weights need a collective."""
    return zero_stage(accelerator) == 3 or accelerator.distributed_type == DistributedType.FSDP


def configure_deepspeed(accelerator, config) -> None:
    """Fill the DeepSpeed config's "auto" entries that accelerate cannot infer (we have no DataLoader)."""
    if not is_deepspeed(accelerator):
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    if ds.get("train_micro_batch_size_per_gpu", _AUTO) == _AUTO:
        ds["train_micro_batch_size_per_gpu"] = config.per_device_train_batch_size  # prompts; bookkeeping only
    accumulation_steps = ds.get("gradient_accumulation_steps", _AUTO)
    if accumulation_steps not in (_AUTO, 1):
        raise ConfigError(f"DeepSpeed config: gradient_accumulation_steps={accumulation_steps}; set it to 1 or "
                          "\"auto\" and use the training config's gradient_accumulation_steps instead")
    ds["gradient_accumulation_steps"] = 1
    if ds.get("train_batch_size", _AUTO) == _AUTO:
        ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * accelerator.num_processes
    if ds.get("gradient_clipping", _AUTO) == _AUTO:
        ds["gradient_clipping"] = float(config.max_grad_norm)
    for precision, enabled in (("bf16", config.bf16), ("fp16", False)):
        if precision in ds and ds[precision].get("enabled", _AUTO) == _AUTO:
            ds[precision]["enabled"] = enabled
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") == 3 and zero.get("stage3_gather_16bit_weights_on_model_save", _AUTO) in (_AUTO, False):
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # saving the thinker needs full weights


@contextmanager
def accumulation(accelerator, policy, sync: bool):
    """Backward inside this context accumulates only (sync=False) or finishes the update (sync=True)."""
    if sync:
        yield
        return
    if is_deepspeed(accelerator):
        # accelerate's backward steps the DeepSpeed engine when sync_gradients is True
        with deepspeed_engine_step_deferred(accelerator):
            yield
    else:
        with accelerator.no_sync(policy):
            yield


def make_reference(accelerator, config, thinker):
    """The frozen reference policy (for the KL term), in eval mode, on the run's device.

    A copy of the (still untrained) thinker, bf16 when the run is bf16 (the policy keeps fp32 master
    weights). Under ZeRO-3 the thinker is already partitioned at load (transformers builds it inside
    `deepspeed.zero.Init`), so a copy would be an orphaned shard: the reference is loaded again and
    wrapped in its own parameter-sharded DeepSpeed engine (no optimizer), costing 1/N of a model per GPU.
    """
    if zero_stage(accelerator) == 3:
        import copy

        import deepspeed

        from echoink.model import load_thinker

        reference, _ = load_thinker(config.model_path, dtype="float32", attn_implementation=config.attn_implementation)
        ds_config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
        for key in ("optimizer", "scheduler"):
            ds_config.pop(key, None)
        ds_config["zero_optimization"].pop("offload_optimizer", None)
        engine, *_ = deepspeed.initialize(model=reference.requires_grad_(False), config=ds_config)
        return engine.module.eval()
    import copy

    reference = copy.deepcopy(thinker).eval().requires_grad_(False)
    return reference.to(accelerator.device, torch.bfloat16 if config.bf16 else torch.float32)


def gathered_for_generation(accelerator, policy):
    """Context in which the unwrapped thinker holds its full parameters on every rank (ZeRO-3 / FSDP1)."""
    if zero_stage(accelerator) == 3:
        return _zero3_full_parameters(policy)
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.summon_full_params(policy, recurse=True, writeback=False)
    return nullcontext()  # DDP / ZeRO-2 / FSDP2 (its per-module hooks gather on each call)


@contextmanager
def _zero3_full_parameters(engine):
    """Gather every parameter of a ZeRO-3 engine once, and keep it gathered for the whole rollout.

    `GatheredParameters` alone is not enough: ZeRO-3's per-module hooks release a module's parameters
    after each call and fetch them again at the next, i.e. an all-gather per layer per sampled token.
    The hooks are set aside while the parameters are gathered and re-registered afterwards (as TRL
    does), through `echoink.compat` (which names the internal a newer DeepSpeed lacks).
    """
    import deepspeed

    params = list(engine.module.parameters())
    optimizer = getattr(engine, "optimizer", None)
    offload = getattr(optimizer, "parameter_offload", optimizer)
    require_zero3_hook_internals(offload)
    with deepspeed.zero.GatheredParameters(params):
        for param in params:
            param.ds_active_sub_modules.clear()
        remove_zero3_hooks(offload)
        try:
            yield
        finally:
            restore_zero3_hooks(offload)


def full_state_dict(accelerator, policy) -> dict[str, torch.Tensor] | None:
    """The thinker's full state dict on the main process (None elsewhere); collective when sharded.

    Keys are the thinker's own (the Policy's `thinker.` prefix removed).
    """
    if is_sharded(accelerator):
        state = accelerator.get_state_dict(policy)  # every rank must call this
    else:
        state = accelerator.unwrap_model(policy).state_dict() if accelerator.is_main_process else None
    if not accelerator.is_main_process or state is None:
        return None
    prefix = "thinker."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def needs_same_graph(accelerator) -> bool:
    """DeepSpeed ZeRO and FSDP run collectives inside forward/backward (parameter gathers, gradient
    buckets in hook order), so every rank must run the same modules in the same order. DDP with
    find_unused_parameters does not need that."""
    return accelerator.num_processes > 1 and accelerator.distributed_type in (DistributedType.DEEPSPEED,
                                                                              DistributedType.FSDP)


def _media_pattern(record) -> str:
    return "+".join(sorted(record.media)) or "text"


def check_dataset_modalities(accelerator, records) -> None:
    """Refuse, before any model is loaded, a dataset that mixes media patterns under ZeRO / FSDP."""
    if not needs_same_graph(accelerator):
        return
    patterns = sorted({_media_pattern(r) for r in records})
    if len(patterns) > 1:
        raise ConfigError(
            f"{accelerator.distributed_type.value} with {accelerator.num_processes} processes needs every prompt to "
            f"use the same media (the ranks must run the same encoders in step), but train_data mixes "
            f"{', '.join(patterns)}; use DDP (configs/accelerate/ddp_*.yaml) or one media pattern per run")


def check_micro_batches(accelerator, batches) -> None:
    """Before any backward: every rank has groups in the same micro-batches (else the others would wait
    forever in a gradient all-reduce) and, under ZeRO / FSDP, the same media per group. Raises the
    same error on every rank instead of hanging.

    batches: per micro-batch, the records this rank rolled out (prompts skipped by length left out).
    """
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import gather_object

    local = [[_media_pattern(record) for record in records] for records in batches]
    everyone = gather_object([local])  # one entry per rank
    for index in range(len(local)):
        sizes = {len(rank[index]) for rank in everyone}
        if 0 in sizes and len(sizes) > 1:
            raise ValueError(f"micro-batch {index}: some ranks have no prompt left (all skipped: over "
                             "max_prompt_length, or media that cannot be decoded) while others do; raise "
                             "max_prompt_length or fix the media (echoink data validate --check-media)")
        if needs_same_graph(accelerator) and len({tuple(rank[index]) for rank in everyone}) > 1:
            raise ValueError(f"micro-batch {index}: the ranks' prompts use different media "
                             f"({[rank[index] for rank in everyone]}); ZeRO / FSDP need the same on every rank")


def sum_over_processes(accelerator, values: list[float]) -> list[float]:
    """Element-wise sum of `values` over every process (the same list on each; an all-reduce)."""
    if accelerator.num_processes == 1:
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(tensor, reduction="sum").tolist()


def grad_norm_value(value) -> float:
    """accelerate's clip_grad_norm_ returns a tensor, a float (DeepSpeed) or None (before the first step)."""
    if value is None:
        return float("nan")
    return float(value)
