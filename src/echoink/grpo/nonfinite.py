"""Nothing non-finite reaches a rollout: the weights after every optimizer step, and the logits before sampling.

An update can leave the loss and the gradient finite and still ruin the weights (`learning_rate=1e30`: AdamW
moves every weight by about the learning rate). The next rollout would then die inside sampling
("probability tensor contains inf/nan", or a device-side assert on a GPU). Two checks stop the run first:

* `weights_finite(params)` after each optimizer step: one fused norm over the trained parameters (an
  overflowing norm counts as non-finite too: weights near the float limit are as unusable);
* `LogitsGuard`, a forward hook on the output projection that, outside gradient computation, checks the
  last position's logits ([B, V]: what the sampler draws from next) before they reach the sampler.

Either raises `NonFiniteModelError`; the trainer turns it into one line naming the step, the last good
checkpoint and the likely setting.
"""

from __future__ import annotations

import torch

from echoink.model.families import family_of_model


class NonFiniteModelError(RuntimeError):
    """The weights or the logits stopped being finite; `what` says which."""


def weights_finite(params: list[torch.Tensor]) -> bool:
    """Whether every value of `params` is finite and their joint 2-norm does not overflow (one fused norm)."""
    tensors = [p.detach() for p in params if p.numel()]
    if not tensors:
        return True
    norm = torch.nn.utils.get_total_norm(tensors, norm_type=2.0, foreach=True)
    return bool(torch.isfinite(norm))


class LogitsGuard:
    """`with LogitsGuard(model):` the logits of every sampling step are checked before sampling."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.module = family_of_model(model).output_head(model)  # the family knows where the logits come from
        self.handle = None

    def __enter__(self) -> "LogitsGuard":
        if self.module is not None:
            self.handle = self.module.register_forward_hook(self._check)
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    @staticmethod
    def _check(module, inputs, output) -> None:
        logits = output if isinstance(output, torch.Tensor) else None
        if logits is None or torch.is_grad_enabled():
            return
        if logits.dim() == 3:  # [B, L, V]: the position sampled from next is the last one
            logits = logits[:, -1]
        if not bool(torch.isfinite(logits).all()):
            raise NonFiniteModelError("the model's logits before sampling are not finite (inf or NaN)")
