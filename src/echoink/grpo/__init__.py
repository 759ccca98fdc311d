"""GRPO: advantages, loss (and, later, rollout, log-probs and the trainer)."""

from .advantages import group_advantages
from .loss import policy_loss

__all__ = ["group_advantages", "policy_loss"]
