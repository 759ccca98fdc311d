"""The loss's normalisation over micro-batches and processes (issue: bnpo summed under accumulation).

The same completions, laid out as 1 micro-batch of 2 prompts, 2 micro-batches of 1 prompt (different
completion lengths) or 2 processes x 1 prompt (real DDP, gloo), must give the same parameter gradient
for grpo, dr_grpo and dapo (beta 0 and > 0; token and sequence importance sampling). bnpo keeps TRL's
definition: the mean over micro-batches of each micro-batch's own token mean.

Two levels: a toy log-prob model (the loss alone, incl. the two-process run) and the trainer's real
`update` on the tiny thinker (the gradient the optimizer receives).
"""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from echoink.grpo import policy_loss
from echoink.grpo.loss import GRPOLoss, StepCounts

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
SETTINGS = [(loss_type, beta, level) for loss_type in LOSS_TYPES for beta in (0.0, 0.04)
            for level in ("token", "sequence")]
G, V, H, MAX_LEN = 3, 7, 5, 9


def _toy_groups(seed: int = 0):
    """Two groups of G completions with different lengths; fixed features, targets, advantages, old/ref."""
    generator = torch.Generator().manual_seed(seed)
    groups = []
    for lengths in ([2, 7, 4], [9, 1, 5]):
        t = max(lengths)
        mask = (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).float()      # [G, T]
        groups.append(dict(
            features=torch.randn(G, t, H, generator=generator),                            # [G, T, H]
            targets=torch.randint(0, V, (G, t), generator=generator),                     # [G, T]
            mask=mask,
            advantages=torch.randn(G, generator=generator),                               # [G]
            old_shift=0.3 * torch.randn(G, t, generator=generator),
            ref_shift=0.3 * torch.randn(G, t, generator=generator),
        ))
    return groups


def _logps(weight: torch.Tensor, group: dict) -> torch.Tensor:
    """[G, T] log-probs of the targets under logits = features @ weight^T."""
    return torch.log_softmax(group["features"] @ weight.T, dim=-1).gather(-1, group["targets"][..., None])[..., 0]


def _pad(tensors, width):
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in tensors])


def _micro_batch_loss(loss: GRPOLoss, weight, groups, counts):
    width = max(g["mask"].shape[1] for g in groups)
    logps = _pad([_logps(weight, g) for g in groups], width)
    old = _pad([_logps(weight, g).detach() + g["old_shift"] for g in groups], width)
    ref = _pad([_logps(weight, g).detach() + g["ref_shift"] for g in groups], width)
    mask = _pad([g["mask"] for g in groups], width)
    advantages = torch.cat([g["advantages"] for g in groups])
    return loss(logps, old, ref if loss.beta else None, advantages, mask, counts)[0]


def _counts(groups, world_size=1, micro_batches=1):
    return StepCounts(sequences=G * len(groups), tokens=int(sum(g["mask"].sum() for g in groups)),
                      world_size=world_size, micro_batches=micro_batches)


def _grad(loss: GRPOLoss, weight0, layout, counts):
    weight = weight0.clone().requires_grad_(True)
    for micro_batch in layout:
        _micro_batch_loss(loss, weight, micro_batch, counts).backward()
    return weight.grad


def _close(a, b, rtol=1e-6):
    """Relative difference of the whole gradient: ||a - b|| <= rtol * ||b|| (and b is not zero)."""
    assert float(b.norm()) > 0
    assert float((a - b).norm()) <= rtol * float(b.norm()), float((a - b).norm() / b.norm())


@pytest.mark.parametrize("loss_type,beta,level", SETTINGS)
def test_one_or_two_micro_batches_give_the_same_gradient(loss_type, beta, level):
    groups = _toy_groups()
    weight0 = torch.randn(V, H, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    groups = [{k: v.double() if v.is_floating_point() else v for k, v in g.items()} for g in groups]
    loss = GRPOLoss(loss_type=loss_type, beta=beta, importance_sampling_level=level, max_completion_length=MAX_LEN)
    one = _grad(loss, weight0, [groups], _counts(groups, micro_batches=1))
    two = _grad(loss, weight0, [[groups[0]], [groups[1]]], _counts(groups, micro_batches=2))
    _close(two, one)
    # one micro-batch on one process: exactly policy_loss's value for the whole batch
    weight = weight0.clone().requires_grad_(True)
    ours = _micro_batch_loss(loss, weight, groups, _counts(groups))
    width = MAX_LEN
    reference, _ = policy_loss(_pad([_logps(weight, g) for g in groups], width),
                               _pad([_logps(weight, g).detach() + g["old_shift"] for g in groups], width),
                               _pad([_logps(weight, g).detach() + g["ref_shift"] for g in groups], width),
                               torch.cat([g["advantages"] for g in groups]), _pad([g["mask"] for g in groups], width),
                               loss_type=loss_type, beta=beta, importance_sampling_level=level,
                               max_completion_length=MAX_LEN)
    assert torch.allclose(ours, reference, rtol=1e-12)


def test_bnpo_is_the_mean_of_micro_batch_token_means():
    """TRL's bnpo under accumulation: sum over micro-batches of (token mean / accumulation steps).
    The old trainer back-propagated each token mean unscaled: gradient x accumulation steps."""
    groups = [{k: v.double() if v.is_floating_point() else v for k, v in g.items()} for g in _toy_groups()]
    weight0 = torch.randn(V, H, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    loss = GRPOLoss(loss_type="bnpo", beta=0.04)
    ours = _grad(loss, weight0, [[groups[0]], [groups[1]]], _counts(groups, micro_batches=2))

    weight = weight0.clone().requires_grad_(True)
    for g in groups:  # TRL's formula, written out
        per_micro, _ = policy_loss(_logps(weight, g), _logps(weight, g).detach() + g["old_shift"],
                                   _logps(weight, g).detach() + g["ref_shift"], g["advantages"], g["mask"],
                                   loss_type="bnpo", beta=0.04)
        (per_micro / 2).backward()
    _close(ours, weight.grad)
    summed = weight.grad * 2  # what the old trainer produced
    assert not torch.allclose(ours, summed)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, port: int, settings: list, weight0: torch.Tensor, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    groups = [{k: v.double() if v.is_floating_point() else v for k, v in g.items()} for g in _toy_groups()]
    results = {}
    for loss_type, beta, level in settings:
        module = torch.nn.Linear(H, V, bias=False).double()
        with torch.no_grad():
            module.weight.copy_(weight0)
        ddp = torch.nn.parallel.DistributedDataParallel(module)
        loss = GRPOLoss(loss_type=loss_type, beta=beta, importance_sampling_level=level, max_completion_length=MAX_LEN)
        # global counts: all-reduced by the trainer; here both ranks know the whole step
        counts = _counts(groups, world_size=2, micro_batches=1)
        mine = [groups[rank]]
        width = max(g["mask"].shape[1] for g in mine)

        def logps(g):
            return torch.log_softmax(ddp(g["features"]), dim=-1).gather(-1, g["targets"][..., None])[..., 0]

        value, _ = loss(_pad([logps(g) for g in mine], width),
                        _pad([logps(g).detach() + g["old_shift"] for g in mine], width),
                        _pad([logps(g).detach() + g["ref_shift"] for g in mine], width) if beta else None,
                        torch.cat([g["advantages"] for g in mine]), _pad([g["mask"] for g in mine], width), counts)
        value.backward()
        results[(loss_type, beta, level)] = module.weight.grad.tolist()  # plain lists: no shared memory
    queue.put((rank, results))
    dist.barrier()  # the process group is left to the process's exit (gloo's teardown can abort on a race)


def test_two_processes_give_the_one_process_gradient():
    """Real DDP (gloo, 2 processes x 1 prompt) averages gradients; the loss's world_size factor makes the
    average the step's mean for grpo, dr_grpo and dapo."""
    weight0 = torch.randn(V, H, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_ddp_worker, args=(rank, port, SETTINGS, weight0, queue)) for rank in (0, 1)]
    for process in processes:
        process.start()
    by_rank = dict(queue.get(timeout=300) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    assert by_rank[0] == by_rank[1]  # DDP left both ranks with the same averaged gradient
    results = by_rank[0]
    groups = [{k: v.double() if v.is_floating_point() else v for k, v in g.items()} for g in _toy_groups()]
    for loss_type, beta, level in SETTINGS:
        loss = GRPOLoss(loss_type=loss_type, beta=beta, importance_sampling_level=level, max_completion_length=MAX_LEN)
        # nn.Linear computes features @ W^T: the same log-probs as _logps(weight0, g)
        expected = _grad(loss, weight0, [groups], _counts(groups))
        _close(torch.tensor(results[(loss_type, beta, level)], dtype=torch.float64), expected)


# ---- the trainer's real update on the tiny thinker ----------------------------------------------------------

class _GradientRecorder(torch.optim.Optimizer):
    """An optimizer that only records the gradients it is asked to apply (the weights never change)."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.0})
        self.seen: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.seen.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                          for group in self.param_groups for p in group["params"]])


def _update_gradient(thinker, scored_layout, config, counts):
    from accelerate import Accelerator

    from echoink.grpo.logprobs import Policy
    from echoink.grpo.step import StepContext, update
    from echoink.grpo.types import CollectedBatch

    policy = Policy(thinker)
    optimizer = _GradientRecorder([p for p in policy.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    context = StepContext(config, Accelerator(cpu=True), policy, thinker, None, None, None, optimizer, scheduler, None,
                          None, GRPOLoss.from_config(config), None, None, None, torch.float32)
    batch = CollectedBatch(micro_batches=tuple(tuple(b) for b in scored_layout), counts=counts, stats={})
    update(context, batch)
    return torch.cat([g.flatten() for g in optimizer.seen[0]])


@pytest.mark.parametrize("loss_type", ("grpo", "dr_grpo", "dapo", "bnpo"))
def test_trainer_update_gradient_does_not_depend_on_the_micro_batch_layout(tiny_model_dir, mixed_dataset, loss_type):
    from test_group_sharing import make_group

    from echoink.config import TrainConfig
    from echoink.data import load_dataset
    from echoink.grpo.types import ScoredGroup
    from echoink.model import load_thinker
    from echoink.model.inputs import encode_prompt

    thinker, processor = load_thinker(tiny_model_dir)
    records = load_dataset(mixed_dataset / "train" / "omni_rl_format_train.json")[:2]
    tokenizer = processor.tokenizer
    groups = [make_group(encode_prompt(records[0], processor), [5, 2, 5], tokenizer, seed=1),
              make_group(encode_prompt(records[1], processor), [3, 8, 1], tokenizer, seed=2)]
    scored = [ScoredGroup(group=g, record=r, rewards=torch.zeros(3, 1), advantages=torch.tensor(a))
              for g, r, a in zip(groups, records, ([1.0, -0.5, -0.5], [0.2, -1.0, 0.8]))]
    config = TrainConfig(num_generations=3, max_completion_length=8, loss_type=loss_type, beta=0.0,
                         max_grad_norm=0.0, gradient_accumulation_steps=2)
    tokens = int(sum(g.completion_mask.sum() for g in groups))
    together = _update_gradient(thinker, [scored], config, StepCounts(6, tokens, 1, micro_batches=1))
    apart = _update_gradient(thinker, [[scored[0]], [scored[1]]], config, StepCounts(6, tokens, 1, micro_batches=2))
    if loss_type != "bnpo":
        _close(apart, together, rtol=1e-5)
        return
    # bnpo: each micro-batch's token mean, averaged over the two micro-batches (TRL), not summed
    singles = [_update_gradient(thinker, [[s]], config, StepCounts(3, 0, 1, micro_batches=1)) for s in scored]
    _close(apart, (singles[0] + singles[1]) / 2, rtol=1e-5)
