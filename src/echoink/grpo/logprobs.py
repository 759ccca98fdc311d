"""Per-token log-probabilities of each group's completions under a model.

    group_token_logps(model, groups, sharing) -> list of [G, C] tensors (one per group)

logp[i, t] = log softmax(logits / temperature)[completion_ids[i, t]] for the logits that predict
completion token t of completion i. Values under the completion mask's zeros are meaningless.

The hidden states come from the model layer (`model.group_forward.completion_states`), by the
`group_sharing` path ("none", "encoders", "full": exact, equal within float rounding; that module
describes each); the family's output head turns them into logits here. The [N, vocab] logits are
produced in row chunks and reduced to log-probs immediately (with the chunk recomputed in backward),
so [G, C, vocab] fp32 logits never exist at once.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from echoink.model.families import family_of_model
from echoink.model.group_forward import check_sharing, completion_states


def group_token_logps(model, groups, sharing: str = "full", temperature: float = 1.0,
                      chunk_size: int = 1024, prefix: str = "auto") -> list[torch.Tensor]:
    """-> one [G, C] tensor of per-token log-probs per group (with grad if grad is enabled).

    `groups`: Groups or ScoredGroups. `prefix` picks how "full" shares the prompt: "kv", "packed", or
    "auto" (`model.group_forward.full_sharing_path`).
    """
    path = check_sharing(model, sharing, prefix)
    head = family_of_model(model).output_head(model)
    return [token_logps_from_hidden(head, completion_states(model, group.prompt, group.completion_ids,
                                                            group.completion_mask, path),
                                    group.completion_ids, temperature, chunk_size)
            for group in groups]


def token_logps_from_hidden(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                            chunk_size: int = 1024) -> torch.Tensor:
    """hidden [G, C, H] (the states that predict each target), targets [G, C] -> log-probs [G, C].

    Rows are processed `chunk_size` at a time; each chunk's logits are recomputed in backward
    instead of being stored, so peak memory holds one [chunk_size, vocab] fp32 block.
    """
    g, c, h = hidden.shape
    flat_hidden, flat_targets = hidden.reshape(g * c, h), targets.reshape(g * c)
    pieces = []
    for start in range(0, g * c, chunk_size):
        rows = slice(start, start + chunk_size)
        if torch.is_grad_enabled() and flat_hidden.requires_grad:
            pieces.append(checkpoint(_chunk_logps, head, flat_hidden[rows], flat_targets[rows], temperature,
                                     use_reentrant=False))
        else:
            pieces.append(_chunk_logps(head, flat_hidden[rows], flat_targets[rows], temperature))
    return torch.cat(pieces).view(g, c)


def _chunk_logps(head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = head(hidden).float() / temperature                          # [n, V]
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


class Policy(nn.Module):
    """The module accelerate wraps: forward(groups) -> list of [G, C] per-token log-probs (with grad).

    Its forward is a real module call, so DDP's gradient hooks and ZeRO-3's parameter gathering see
    the policy pass; rollouts and the no-grad passes use the unwrapped thinker directly.
    """

    def __init__(self, thinker: nn.Module) -> None:
        super().__init__()
        self.thinker = thinker

    def forward(self, groups, sharing: str = "full", temperature: float = 1.0) -> list[torch.Tensor]:
        return group_token_logps(self.thinker, groups, sharing=sharing, temperature=temperature)
