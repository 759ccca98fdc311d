"""The rollout engine: one generation pipeline for training rollouts and evaluation.

    interface.py              Group, RolloutEngine (generate, sync), InProcessEngine (the in-process base)
    shared_prefill.py         SharedPrefillEngine: prefill once per prompt, many groups per decode loop
    batched_decode.py         the loop itself: per-group prompt K/V, compaction, per-prompt draws, loop plans
    streams.py                per-prompt random streams: prompt_seed, prompt_generators
    transformers_generate.py  TransformersGenerateEngine: the thinker's own generate, left-padded batches

`rollout_engine(model, tokenizer, group_sharing)` picks the training engine from the one config value
`group_sharing` ("full": shared prefill; otherwise transformers' generate, one prompt per call).
An out-of-process engine (vLLM) is one more module here implementing `RolloutEngine`
(docs/architecture.md says which methods and where the weights are synced).
"""

from __future__ import annotations

from echoink.choices import GROUP_SHARING
from echoink.model.families import family_of_model
from echoink.model.engine.interface import Group, InProcessEngine, RolloutEngine
from echoink.model.engine.shared_prefill import SharedPrefillEngine
from echoink.model.engine.streams import prompt_generators, prompt_seed
from echoink.model.engine.transformers_generate import TransformersGenerateEngine


def rollout_engine(model, tokenizer, group_sharing: str, policy_version: int = 0, batch_size: int | None = None,
                   token_budget: int | None = None) -> RolloutEngine:
    """The training rollouts' engine for `group_sharing` (none | encoders | full), sampling from `model`;
    `batch_size` / `token_budget` bound the shared-prefill engine's decode loops (`rollout_batch_size`,
    `rollout_token_budget`)."""
    if group_sharing not in GROUP_SHARING:
        raise ValueError(f"group_sharing must be one of {GROUP_SHARING}, got {group_sharing!r}")
    if group_sharing == "full":
        return SharedPrefillEngine(model, tokenizer, policy_version, batch_size, token_budget)
    return TransformersGenerateEngine(model, tokenizer, policy_version)


def evaluation_engine(model, tokenizer) -> RolloutEngine:
    """Evaluation's engine: the shared-prefill engine (every prompt of a call in one decode loop) where the family's
    shared paths are exact and the decoder has full attention only; elsewhere transformers' generate (with
    per-prompt generators: one prompt per call)."""
    family = family_of_model(model)
    if family.supports_group_sharing and not getattr(family.decoder(model), "has_sliding_layers", False):
        return SharedPrefillEngine(model, tokenizer)
    return TransformersGenerateEngine(model, tokenizer)


__all__ = ["Group", "InProcessEngine", "RolloutEngine", "SharedPrefillEngine", "TransformersGenerateEngine",
           "evaluation_engine", "prompt_generators", "prompt_seed", "rollout_engine"]
