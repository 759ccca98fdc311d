"""Multi-node training on one machine: two torchrun "nodes" on the loopback address, one CPU process
each (gloo), must train exactly what the single-node two-process run trains.

This is the launch form of the 2 nodes x 8 GPUs recipe (docs/qwen3_omni.md, docs/reproduce.md) with
one process per node: `torchrun --nnodes 2 --node_rank 0|1 --master_addr ... --master_port ...`, the
two launchers started together. The single-node harness (launch helpers, the worker that dumps each
rank's weights) is tests/test_distributed.py's.
"""

from __future__ import annotations

import subprocess

import pytest
import torch
from safetensors.torch import load_file

from test_distributed import (BIN, REPO, WORKER, _accelerate_launch, _assert_reward_is_mean_over_ranks,
                              _deepspeed_available, _env, _free_port, _jsonl, _overrides, _rank_reports, _run,
                              image_audio_dataset)  # noqa: F401 - image_audio_dataset is a fixture used here

TIMING_KEYS = ("seconds", "time", "per_second", "tokens_per", "memory")


def _launch_nodes(commands: list[list[str]], timeout: int = 400) -> None:
    """Start one launcher per node together; every one must succeed."""
    launchers = [subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for command in commands]
    try:
        outputs = [launcher.communicate(timeout=timeout) for launcher in launchers]
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                launcher.kill()
                launcher.wait()
    for rank, (launcher, (stdout, stderr)) in enumerate(zip(launchers, outputs)):
        assert launcher.returncode == 0, f"node {rank} failed\n--- stdout\n{stdout[-4000:]}\n--- stderr\n{stderr[-8000:]}"


def _comparable(row: dict) -> dict:
    """A metrics row without its wall-clock and memory measurements (they differ between any two runs)."""
    return {k: v for k, v in row.items() if not any(part in k for part in TIMING_KEYS)}


@pytest.mark.slow
def test_two_nodes_on_loopback_train_what_one_node_with_two_processes_trains(tmp_path, qwen3_model_dir,
                                                                              mixed_dataset):
    """The tiny Qwen3-Omni (MoE, deepstack), group sharing full, DDP with two accumulation micro-batches and
    mixed media: the same data order, the same gradients all-reduced, the same weights, bit for bit."""
    data = mixed_dataset / "train" / "omni_rl_format_train.json"
    one_node, two_nodes = tmp_path / "one_node", tmp_path / "two_nodes"
    _run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()), str(WORKER),
          "--dump", str(one_node / "dump"), *_overrides(qwen3_model_dir, data, one_node, group_sharing="full")])
    port = str(_free_port())  # static rendezvous at 127.0.0.1:port, node 0 hosting it
    _launch_nodes([[str(BIN / "torchrun"), "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
                    "--master_addr", "127.0.0.1", "--master_port", port, str(WORKER), "--dump", str(two_nodes / "dump"),
                    *_overrides(qwen3_model_dir, data, two_nodes, group_sharing="full")] for rank in (0, 1)])

    single, multi = _rank_reports(one_node), _rank_reports(two_nodes)
    assert [r["num_processes"] for r in multi] == [2, 2]
    assert multi[0]["distributed_type"].endswith("MULTI_CPU")
    assert multi[0]["sha256"] == multi[1]["sha256"]  # the two nodes end with identical weights ...
    assert multi[0]["sha256"] == single[0]["sha256"]  # ... and with the single node's
    initial = load_file(str(qwen3_model_dir / "model.safetensors"))
    finals = [load_file(str(out / "final" / "model.safetensors")) for out in (one_node, two_nodes)]
    assert set(finals[1]) == set(initial)
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in initial)
    assert sum(not torch.equal(finals[1][k], initial[k]) for k in initial) > len(initial) // 2  # it trained

    _assert_reward_is_mean_over_ranks(two_nodes)  # node 1's groups reach node 0's log
    rows = [[_comparable(row) for row in _jsonl(out / "metrics.jsonl")] for out in (one_node, two_nodes)]
    assert rows[0] == rows[1]  # rewards, losses, KL, clip fractions, learning rates: identical, step by step
    completions = [[(r["step"], r["problem_id"], r["completion"]) for r in _jsonl(out / "completions.jsonl")]
                   for out in (one_node, two_nodes)]
    assert sorted(completions[0]) == sorted(completions[1])


@pytest.mark.slow
@pytest.mark.skipif(_deepspeed_available() is not None, reason=str(_deepspeed_available()))
def test_the_shipped_two_node_zero3_file_on_loopback_trains_what_one_node_trains(tmp_path, qwen3_model_dir,
                                                                                 image_audio_dataset):
    """configs/accelerate/zero3_2nodes_16gpu.yaml with one process per node (`--num_processes 2`), node
    rank and head address on the command line as the recipe does it, against the single-node ZeRO-3 file
    with two processes: the same gathered final weights and the same logged metrics."""
    one_node, two_nodes = tmp_path / "one_node", tmp_path / "two_nodes"
    _accelerate_launch("configs/accelerate/zero3_8gpu.yaml", one_node, qwen3_model_dir, image_audio_dataset)
    port = str(_free_port())
    _launch_nodes([[str(BIN / "accelerate"), "launch", "--config_file", "configs/accelerate/zero3_2nodes_16gpu.yaml",
                    "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                    "--main_process_port", port, str(WORKER), "--dump", str(two_nodes / "dump"),
                    *_overrides(qwen3_model_dir, image_audio_dataset, two_nodes, save_steps=2)] for rank in (0, 1)])

    assert [r["distributed_type"].rsplit(".", 1)[-1] for r in _rank_reports(two_nodes)] == ["DEEPSPEED"] * 2
    assert [r["num_processes"] for r in _rank_reports(two_nodes)] == [2, 2]
    finals = [load_file(str(out / "final" / "model.safetensors")) for out in (one_node, two_nodes)]
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
    rows = [[_comparable(row) for row in _jsonl(out / "metrics.jsonl")] for out in (one_node, two_nodes)]
    assert rows[0] == rows[1]
    assert (two_nodes / "checkpoint-2" / "trainer_state.json").is_file()  # both ranks' ZeRO shards, one checkpoint
