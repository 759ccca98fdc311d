"""GRPO training: advantages, the loss, log-probs, dynamic sampling, one step (collect -> update) and the trainer
(`echoink.grpo.trainer.train`). Rollouts come from the model layer's engine (`echoink.model.engine`)."""

from .advantages import group_advantages
from .loss import policy_loss

__all__ = ["group_advantages", "policy_loss"]
