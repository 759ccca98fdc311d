"""Every private attribute of transformers, accelerate, DeepSpeed or torch that echoink touches, in one place.

echoink needs a few internals that no public API offers (listed below). Each is probed when this module is
imported (DeepSpeed's when it is first needed, since DeepSpeed is optional), so a library upgrade that
removes one fails at start with a message naming the attribute and the versions this was tested with,
instead of deep inside a training step.

    transformers  PretrainedConfig._attn_implementation      switch a model's attention function for a while
                  GradientCheckpointingLayer._can_checkpoint_with_cache   let our replay-safe caches through
                  layer._gradient_checkpointing_func          read and wrap the checkpoint function of a layer
                  PreTrainedModel._weight_conversions         key renaming rules recorded at load
    accelerate    AcceleratorState._reset_state, GradientState._reset_state   a fresh state per train() call
                  GradientState._set_sync_gradients           accumulate without a DeepSpeed engine step
    deepspeed     DeepSpeedZeRoOffload._register_deepspeed_module, forward_hooks, backward_hooks
                                                              keep ZeRO-3 parameters gathered for a rollout
    torch         aten._scaled_dot_product_flash_attention_for_cpu (+ _backward)
                                                              CPU flash attention that returns its log-sum-exp
"""

from __future__ import annotations

from contextlib import contextmanager

import accelerate
import torch
import transformers
from accelerate.state import AcceleratorState, GradientState
from transformers import PretrainedConfig
from transformers.modeling_layers import GradientCheckpointingLayer

TESTED_WITH = {"transformers": "5.23", "accelerate": "1.15", "deepspeed": "0.19", "torch": "2.13"}


class CompatibilityError(ImportError):
    """An internal of a library echoink relies on is missing (the library changed)."""


def _require(owner, attribute: str, library: str, version: str) -> None:
    if not hasattr(owner, attribute):
        raise CompatibilityError(
            f"{library} {version} has no {getattr(owner, '__name__', owner)}.{attribute}, which echoink needs; "
            f"echoink was tested with {library} {TESTED_WITH[library]} — install that version")


for _owner, _attribute in ((PretrainedConfig, "_attn_implementation"),
                           (GradientCheckpointingLayer, "_can_checkpoint_with_cache")):
    _require(_owner, _attribute, "transformers", transformers.__version__)
for _owner, _attribute in ((AcceleratorState, "_reset_state"), (GradientState, "_reset_state"),
                           (GradientState, "_set_sync_gradients")):
    _require(_owner, _attribute, "accelerate", accelerate.__version__)
for _attribute in ("_scaled_dot_product_flash_attention_for_cpu",
                   "_scaled_dot_product_flash_attention_for_cpu_backward"):
    _require(torch.ops.aten, _attribute, "torch", torch.__version__)


# ---- torch -----------------------------------------------------------------------------------------------

# (query, key, value, dropout_p, is_causal, *, scale) -> (out [B, H, T, d], logsumexp [B, H, T]); key/value
# may have fewer heads than query (grouped-query attention)
cpu_flash_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
# (grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, *, scale) -> (d_query, d_key, d_value)
cpu_flash_attention_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


# ---- transformers ----------------------------------------------------------------------------------------

def attention_implementation_of(config) -> str | None:
    return config._attn_implementation


@contextmanager
def attention_implementation_set(config, name: str):
    """Within the block, `config`'s models call the attention function registered as `name`."""
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def checkpoint_function_of(layer):
    """The checkpoint function a gradient-checkpointed layer calls (None while checkpointing is off)."""
    return getattr(layer, "_gradient_checkpointing_func", None)


@contextmanager
def checkpoint_functions_wrapped(layers, wrap):
    """Within the block, each checkpointed layer's checkpoint function `f` is replaced by `wrap(f)`."""
    replaced = []
    for layer in layers:
        original = vars(layer).get("_gradient_checkpointing_func")
        if getattr(layer, "gradient_checkpointing", False) and original is not None:
            layer._gradient_checkpointing_func = wrap(original)
            replaced.append((layer, original))
    try:
        yield
    finally:
        for layer, original in replaced:
            layer._gradient_checkpointing_func = original


@contextmanager
def caches_allowed_under_checkpointing(layers):
    """Within the block, checkpointed `layers` pass a cache to attention (transformers drops it there)."""
    layers = [layer for layer in layers if getattr(layer, "gradient_checkpointing", False)]
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache


@contextmanager
def weight_conversions_set_aside(model):
    """Within the block, `save_pretrained` writes the model's own key names (not the ones it was loaded from)."""
    recorded = getattr(model, "_weight_conversions", None)
    model._weight_conversions = None
    try:
        yield
    finally:
        model._weight_conversions = recorded


# ---- accelerate ------------------------------------------------------------------------------------------

def reset_accelerate_state() -> None:
    """Forget accelerate's per-process singletons, so the next Accelerator may use other settings."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@contextmanager
def deepspeed_engine_step_deferred(accelerator):
    """Within the block, accelerate's backward under DeepSpeed accumulates without stepping the engine."""
    accelerator.gradient_state._set_sync_gradients(False)
    try:
        yield
    finally:
        accelerator.gradient_state._set_sync_gradients(True)


# ---- deepspeed ------------------------------------------------------------------------------------------

ZERO3_HOOK_ATTRIBUTES = ("forward_hooks", "backward_hooks", "module", "_register_deepspeed_module")


def require_zero3_hook_internals(offload) -> None:
    """Raise naming the first ZeRO-3 internal this DeepSpeed lacks (probed when DeepSpeed is first used)."""
    import deepspeed

    for name in ZERO3_HOOK_ATTRIBUTES:
        _require(offload, name, "deepspeed", deepspeed.__version__)


def remove_zero3_hooks(offload) -> None:
    for hook in offload.forward_hooks + offload.backward_hooks:
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []


def restore_zero3_hooks(offload) -> None:
    offload._register_deepspeed_module(offload.module)
