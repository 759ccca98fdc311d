"""Guards around transformers' `generate` shared by rollouts and evaluation.

* `own_generation_defaults`: in transformers 5 every field a GenerationConfig leaves unset is filled
  from the checkpoint's generation_config.json (Qwen ships sampling defaults there). Swapping in an
  empty config for the call makes our explicit settings the only ones that apply.
* `forget_rope_deltas`: `generate` leaves per-batch M-RoPE deltas on the thinker; clearing them
  keeps a later forward from reusing another batch's positions.
"""

from __future__ import annotations

from contextlib import contextmanager

from transformers import GenerationConfig


def generation_owner(model):
    """The module whose generation_config `generate` reads (the base model under a PEFT wrapper)."""
    base = getattr(model, "get_base_model", None)
    return base() if callable(base) else model


@contextmanager
def own_generation_defaults(model):
    """Within the block, unset generation fields fall back to transformers' neutral defaults."""
    target = generation_owner(model)
    saved = target.generation_config
    target.generation_config = GenerationConfig()
    try:
        yield
    finally:
        target.generation_config = saved


def forget_rope_deltas(model) -> None:
    inner = getattr(generation_owner(model), "model", None)
    if inner is not None and hasattr(inner, "rope_deltas"):
        inner.rope_deltas = None
