"""Groups that teach: exact zero advantages, skipping zero-advantage groups with an identical gradient,
and dynamic sampling (draw rounds, the same decision on every process, the data position)."""

from __future__ import annotations

import json

import pytest
import torch

from echoink.grpo import group_advantages
from echoink.grpo.batches import BatchPlan
from echoink.grpo.loss import StepCounts


@pytest.mark.parametrize("value", [0.1, 0.3, 0.7, 1 / 3, 12345.678])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_all_equal_rewards_give_exactly_zero_advantages(value, scale):
    rewards = torch.tensor([value] * 16 + [0.0, 1.0] * 8)
    advantages = group_advantages(rewards, 16, scale=scale)
    assert torch.equal(advantages[:16], torch.zeros(16))
    assert advantages[16:].abs().min() > 0


def test_round_indices_walk_one_stream_across_epochs():
    plan = BatchPlan(num_items=5, per_device_batch=2, num_processes=2, grad_accum=1, seed=0)
    stream = plan.epoch_order(0) + plan.epoch_order(1)
    drawn = [i for r in range(2) for rank in range(2) for i in plan.round_indices(r, rank)]
    assert drawn == stream[:8]
    assert plan.round_indices(0, 1) == stream[2:4]


# ---- skipping: the same gradient as training on every group ------------------------------------------------

@pytest.fixture(scope="module")
def tiny_groups(tiny_model_dir, mixed_dataset):
    from test_group_sharing import make_group

    from echoink.data import load_dataset
    from echoink.model import load_thinker
    from echoink.model.inputs import encode_prompt

    thinker, processor = load_thinker(tiny_model_dir)
    records = load_dataset(mixed_dataset / "train" / "omni_rl_format_train.json")[:3]
    tokenizer = processor.tokenizer
    groups = [make_group(encode_prompt(records[0], processor), [5, 2, 5], tokenizer, seed=1),
              make_group(encode_prompt(records[1], processor), [3, 8, 1], tokenizer, seed=2),
              make_group(encode_prompt(records[2], processor), [4, 4, 6], tokenizer, seed=3)]
    return thinker, records, groups


def _scored(tiny_groups, trained_zero: bool):
    """Group 1 has all-equal rewards (advantage exactly 0); the others are informative."""
    from echoink.grpo.types import ScoredGroup

    _, records, groups = tiny_groups
    advantages = ([1.0, -0.5, -0.5], [0.0, 0.0, 0.0], [0.2, -1.0, 0.8])
    return [ScoredGroup(group=g, record=r, rewards=torch.zeros(3, 1), advantages=torch.tensor(a),
                        trained=trained_zero or any(a))
            for g, r, a in zip(groups, records, advantages)]


def _gradient(thinker, layout, config, counts):
    from test_loss_normalisation import _update_gradient

    return _update_gradient(thinker, layout, config, counts)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_skipping_zero_advantage_groups_leaves_the_gradient_unchanged(tiny_groups, loss_type, level):
    from echoink.config import TrainConfig

    thinker, _, groups = tiny_groups
    config = TrainConfig(num_generations=3, max_completion_length=8, loss_type=loss_type, beta=0.0,
                         importance_sampling_level=level, max_grad_norm=0.0, gradient_accumulation_steps=2)
    counts = StepCounts(9, int(sum(g.completion_mask.sum() for g in groups)), 1, micro_batches=2)
    for layout in ([[0, 1], [2]],   # accumulation, the zero group beside an informative one
                   [[1], [0, 2]]):  # a micro-batch that is entirely skipped
        every = _scored(tiny_groups, trained_zero=True)
        skipping = _scored(tiny_groups, trained_zero=False)
        full = _gradient(thinker, [[every[i] for i in batch] for batch in layout], config, counts)
        skipped = _gradient(thinker, [[skipping[i] for i in batch] for batch in layout], config, counts)
        assert float(full.norm()) > 0
        assert float((skipped - full).norm()) <= 1e-6 * float(full.norm()), (layout, float((skipped - full).norm()))


def test_a_step_with_nothing_to_learn_still_steps_on_a_zero_gradient(tiny_groups):
    """With every group skipped, one zero-weight forward runs: the optimizer sees a zero gradient, as it would
    without skipping (AdamW's weight decay and moments then move the weights alike)."""
    from test_loss_normalisation import _update_gradient

    from echoink.config import TrainConfig
    from echoink.grpo.types import ScoredGroup

    thinker, records, groups = tiny_groups
    zero = [ScoredGroup(group=g, record=r, rewards=torch.zeros(3, 1), advantages=torch.zeros(3), trained=False)
            for g, r in zip(groups, records)]
    config = TrainConfig(num_generations=3, max_completion_length=8, beta=0.0, max_grad_norm=0.0)
    gradient = _update_gradient(thinker, [zero], config, StepCounts(9, 30, 1, 1))
    assert gradient.numel() > 0 and torch.equal(gradient, torch.zeros_like(gradient))


# ---- through the trainer --------------------------------------------------------------------------------

def _train(tiny_model_dir, mixed_dataset, out, *extra):
    from echoink.config import load_config
    from echoink.grpo.trainer import train

    cfg = load_config(None, [f"model_path={tiny_model_dir}",
                             f"train_data={mixed_dataset}/train/omni_rl_format_train.json", f"output_dir={out}",
                             "num_generations=3", "max_completion_length=8", "learning_rate=1e-4", "seed=0",
                             "max_steps=2", "per_device_train_batch_size=2", "beta=0", *extra])
    train(cfg, progress=False)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], \
        [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]


def test_dynamic_sampling_draws_rounds_and_logs_them(tiny_model_dir, mixed_dataset, tmp_path):
    """The rewards of this tiny model are mostly all-zero: dynamic sampling draws up to max_sampling_rounds rounds
    per step, keeps per_device_train_batch_size groups, and says which were trained on."""
    rows, completions = _train(tiny_model_dir, mixed_dataset, tmp_path / "run",
                               "dynamic_sampling=true", "max_sampling_rounds=3",
                               "reward_funcs=[_train_worker:spread_reward,format]")
    for row in rows:
        assert 1 <= row["sampling_rounds"] <= 3
        assert row["num_groups"] == 2
        assert {"informative_groups", "skipped_groups", "surplus_groups", "rollouts_per_informative_group"} <= set(row)
        assert row["informative_groups"] + row["skipped_groups"] == row["num_groups"]
    assert all(isinstance(c["trained"], bool) for c in completions)
    by_step = {}
    for c in completions:
        by_step.setdefault(c["step"], set()).add(c["problem_id"])
    assert all(len(ids) == 2 for ids in by_step.values())


def test_skipped_groups_are_marked_untrained_in_completions(tiny_model_dir, mixed_dataset, tmp_path):
    rows, completions = _train(tiny_model_dir, mixed_dataset, tmp_path / "run", "reward_funcs=[accuracy]")
    for c in completions:  # with beta = 0 skipping is on by default: a group is trained iff its rewards differ
        group = [d for d in completions if d["step"] == c["step"] and d["problem_id"] == c["problem_id"]]
        differs = len({d["rewards"]["accuracy"] for d in group}) > 1
        assert c["trained"] == differs
    assert sum(r["skipped_groups"] for r in rows) == len({(c["step"], c["problem_id"]) for c in completions
                                                          if not c["trained"]})


def test_len_control_reaches_the_training_log(tiny_model_dir, mixed_dataset, tmp_path):
    """train() builds its rewards from the whole config: the len_control column is scored and logged."""
    rows, completions = _train(tiny_model_dir, mixed_dataset, tmp_path / "run", "len_control=true",
                               "len_control_min_tokens=1", "len_control_max_tokens=8")
    assert all("rewards/length" in row for row in rows)
    assert all("length" in c["rewards"] for c in completions)


# ---- skipping in the two-process harness (real DDP, gloo) ----------------------------------------------------

# Per process, three micro-batches of one group each; "zero" groups have all-equal rewards (advantage 0):
#   micro-batch 0: rank 0 trains, rank 1's group is zero  -> rank 1 runs a zero-weight forward
#   micro-batch 1: rank 0's group is zero, rank 1 trains   -> rank 0 runs a zero-weight forward
#   micro-batch 2: both groups are zero                    -> the micro-batch is not run anywhere
TWO_PROCESS_LAYOUT = {0: [(0, [1.0, -0.5, -0.5]), (1, [0.0, 0.0, 0.0]), (2, [0.0, 0.0, 0.0])],
                      1: [(1, [0.0, 0.0, 0.0]), (2, [0.2, -1.0, 0.8]), (0, [0.0, 0.0, 0.0])]}
TWO_PROCESS_LENGTHS = ([5, 2, 5], [3, 8, 1], [4, 4, 6])
TWO_PROCESS_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")


def _skipping_worker(rank: int, port: int, model_dir: str, data_file: str, queue) -> None:
    """One DDP process: the trainer's `update` with and without skipping, for every loss type."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    import torch.distributed as dist
    from test_group_sharing import make_group
    from test_loss_normalisation import _GradientRecorder

    from echoink.config import TrainConfig
    from echoink.data import load_dataset
    from echoink.grpo.distributed import make_accelerator
    from echoink.grpo.logprobs import Policy
    from echoink.grpo.loss import GRPOLoss
    from echoink.grpo.step import StepContext, update
    from echoink.grpo.types import CollectedBatch, ScoredGroup
    from echoink.model import load_thinker
    from echoink.model.inputs import encode_prompt

    records = load_dataset(data_file)[:3]
    results = {}
    accelerator = None
    for loss_type in TWO_PROCESS_LOSS_TYPES:
        config = TrainConfig(num_generations=3, max_completion_length=8, loss_type=loss_type, beta=0.0,
                             max_grad_norm=0.0, gradient_accumulation_steps=3)
        accelerator = accelerator or make_accelerator(config)
        assert accelerator.num_processes == 2
        for skipping in (False, True):
            thinker, processor = load_thinker(model_dir)  # fresh weights and a fresh DDP wrapper per run
            tokenizer = processor.tokenizer
            groups = [make_group(encode_prompt(r, processor), lengths, tokenizer, seed=i + 1)
                      for i, (r, lengths) in enumerate(zip(records, TWO_PROCESS_LENGTHS))]
            # global counts: every group instance of both processes (6 groups x 3 completions)
            tokens = sum(int(groups[i].completion_mask.sum()) for layout in TWO_PROCESS_LAYOUT.values()
                         for i, _ in layout)
            counts = StepCounts(18, tokens, 2, micro_batches=3)
            micro_batches = tuple(
                (ScoredGroup(group=groups[i], record=records[i], rewards=torch.zeros(3, 1),
                             advantages=torch.tensor(a), trained=not skipping or any(a)),)
                for i, a in TWO_PROCESS_LAYOUT[rank])
            policy = Policy(thinker)
            optimizer = _GradientRecorder([p for p in policy.parameters() if p.requires_grad])
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
            policy, wrapped_optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
            context = StepContext(config, accelerator, policy, thinker, None, None, None, wrapped_optimizer, scheduler,
                                  None, None, GRPOLoss.from_config(config), None, None, None, torch.float32)
            update(context, CollectedBatch(micro_batches=micro_batches, counts=counts, stats={}))
            gradient = torch.cat([g.flatten() for g in optimizer.seen[0]])
            results[(loss_type, skipping)] = gradient.tolist()  # plain lists: no shared memory
            accelerator.free_memory()
    queue.put((rank, results))
    dist.barrier()  # the process group is left to the process's exit (gloo's teardown can abort on a race)


def test_skipping_gives_the_same_gradient_in_two_processes(tiny_model_dir, mixed_dataset):
    """Real DDP over 2 gloo processes, the trainer's `update`: a rank whose micro-batch is all zero-advantage
    runs a zero-weight forward, a micro-batch zero everywhere is not run, and the averaged gradient equals
    the one without skipping for every loss type."""
    import torch.multiprocessing as mp
    from test_loss_normalisation import _free_port

    context = mp.get_context("spawn")
    queue = context.Queue()
    port = _free_port()
    data_file = str(mixed_dataset / "train" / "omni_rl_format_train.json")
    processes = [context.Process(target=_skipping_worker, args=(rank, port, str(tiny_model_dir), data_file, queue))
                 for rank in (0, 1)]
    for process in processes:
        process.start()
    by_rank = dict(queue.get(timeout=600) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    for loss_type in TWO_PROCESS_LOSS_TYPES:
        full = torch.tensor(by_rank[0][(loss_type, False)])
        skipped = torch.tensor(by_rank[0][(loss_type, True)])
        assert by_rank[0][(loss_type, True)] == by_rank[1][(loss_type, True)]  # DDP averaged alike
        assert float(full.norm()) > 0
        assert float((skipped - full).norm()) <= 1e-6 * float(full.norm()), (loss_type, float((skipped - full).norm()))
