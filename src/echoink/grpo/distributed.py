"""What the trainer needs from accelerate's back-ends (DDP, FSDP, DeepSpeed ZeRO-2/3), in one place.

Launch with `accelerate launch --config_file configs/accelerate/<file>.yaml -m echoink.cli train ...`
or with plain `torchrun` (then DeepSpeed is chosen by the `ACCELERATE_USE_DEEPSPEED` /
`ACCELERATE_DEEPSPEED_CONFIG_FILE` environment variables that `accelerate launch` would set).

* `make_accelerator`      the Accelerator: DDP with `find_unused_parameters` (a frozen or unused
                          encoder parameter must not hang the all-reduce); on a machine without a GPU
                          it uses the gloo backend, so `torchrun --nproc_per_node 2` runs on CPU.
* `configure_deepspeed`   fills the DeepSpeed config's "auto" entries from the training config
                          (micro-batch = prompts per device, clipping = max_grad_norm); gradient
                          accumulation stays in our loop, so the DeepSpeed value must be 1 or "auto".
* `accumulation`          a micro-batch whose backward must not synchronise / step (all but the last
                          micro-batch of an update): DDP `no_sync`; DeepSpeed: no engine step.
* `gathered_for_generation`  rollouts call the unwrapped thinker directly; under ZeRO-3 / FSDP its
                          parameters are sharded, so they are gathered for the rollout (TRL does the same).
* `full_state_dict`       the thinker's full weights on the main process (a collective under ZeRO-3 / FSDP).
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs

from echoink.config import ConfigError

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
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)]  # e.g. the audio tower's unused parameter
    cpu = False
    if not _has_device():
        if _use_deepspeed_from_env():
            handlers.append(InitProcessGroupKwargs(backend="gloo"))  # DeepSpeed on CPU: gloo, not ccl
        else:
            cpu = True  # accelerate only forms a CPU process group (gloo) when told cpu=True
    accelerator = Accelerator(cpu=cpu, mixed_precision="bf16" if config.bf16 else "no", kwargs_handlers=handlers,
                              log_with=config.report_to or None, project_dir=config.output_dir)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(f"the launcher started {launched} processes but accelerate joined "
                           f"{accelerator.num_processes}: every process would train alone")
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
        accelerator.gradient_state._set_sync_gradients(False)
        try:
            yield
        finally:
            accelerator.gradient_state._set_sync_gradients(True)
    else:
        with accelerator.no_sync(policy):
            yield


def gathered_for_generation(accelerator, policy):
    """Context in which the unwrapped thinker holds its full parameters on every rank (ZeRO-3 / FSDP1)."""
    if zero_stage(accelerator) == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(accelerator.unwrap_model(policy).parameters()))
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.summon_full_params(policy, recurse=True, writeback=False)
    return nullcontext()  # DDP / ZeRO-2 / FSDP2 (its per-module hooks gather on each call)


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


def grad_norm_value(value) -> float:
    """accelerate's clip_grad_norm_ returns a tensor, a float (DeepSpeed) or None (before the first step)."""
    if value is None:
        return float("nan")
    return float(value)
