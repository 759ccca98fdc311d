"""The rollout engine: one generation pipeline for training rollouts and evaluation.

    interface.py              Group, RolloutEngine (generate, sync), InProcessEngine (the in-process base)
    shared_prefill.py         SharedPrefillEngine: prefill once per prompt, G continuations on one prompt K/V
    transformers_generate.py  TransformersGenerateEngine: the thinker's own generate, left-padded batches

`rollout_engine(model, tokenizer, group_sharing)` picks the training engine from the one config value
`group_sharing` ("full": shared prefill; otherwise transformers' generate, one prompt per call).
An out-of-process engine (vLLM) is one more module here implementing `RolloutEngine`
(docs/architecture.md says which methods and where the weights are synced).
"""

from __future__ import annotations

from echoink.choices import GROUP_SHARING
from echoink.model.engine.interface import Group, InProcessEngine, RolloutEngine
from echoink.model.engine.shared_prefill import SharedPrefillEngine
from echoink.model.engine.transformers_generate import TransformersGenerateEngine


def rollout_engine(model, tokenizer, group_sharing: str, policy_version: int = 0) -> RolloutEngine:
    """The training rollouts' engine for `group_sharing` (none | encoders | full), sampling from `model`."""
    if group_sharing not in GROUP_SHARING:
        raise ValueError(f"group_sharing must be one of {GROUP_SHARING}, got {group_sharing!r}")
    if group_sharing == "full":
        return SharedPrefillEngine(model, tokenizer, policy_version)
    return TransformersGenerateEngine(model, tokenizer, policy_version)


__all__ = ["Group", "InProcessEngine", "RolloutEngine", "SharedPrefillEngine", "TransformersGenerateEngine",
           "rollout_engine"]
