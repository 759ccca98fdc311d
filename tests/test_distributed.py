"""Multi-process training on CPU: DDP (torchrun, gloo) and DeepSpeed ZeRO-2 / ZeRO-3 (accelerate launch
with the shipped configs/accelerate files), two processes each, on the tiny model.

Every rank writes its final weights (tests/_train_worker.py); the ranks must agree bitwise, the
logged reward must be the mean over both ranks' groups, and the LR schedule must advance once per
update whatever the number of processes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "_train_worker.py"
BIN = Path(sys.executable).parent
LR = 1e-3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    for key in list(env):  # a clean launch: no distributed / accelerate settings from the outside
        if key.startswith(("ACCELERATE_", "MASTER_", "LOCAL_RANK", "WORLD_SIZE", "RANK")):
            env.pop(key)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO / "src"), env.get("PYTHONPATH", "")]))
    return env


def _overrides(model_dir, data_file, out: Path, **extra) -> list[str]:
    values = {
        "model_path": model_dir, "train_data": data_file, "output_dir": out,
        "num_generations": 4, "max_completion_length": 12, "max_steps": 2, "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 2, "num_iterations": 2, "beta": 0.04, "learning_rate": LR, "save_steps": 0, "seed": 3,
        "reward_funcs": "[_train_worker:spread_reward,format]",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def _run(command: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, command))}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-8000:]}"
    return result


def _rank_reports(out: Path) -> list[dict]:
    return [json.loads((out / "dump" / f"rank{r}.json").read_text()) for r in range(2)]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_reward_is_mean_over_ranks(out: Path, steps: int = 2, groups: int = 4, generations: int = 4) -> None:
    """Each step: 2 ranks x 2 accumulation micro-batches x 1 prompt = 4 groups, all in completions.jsonl."""
    metrics = {row["step"]: row for row in _jsonl(out / "metrics.jsonl")}
    rows = _jsonl(out / "completions.jsonl")
    assert sorted(metrics) == list(range(1, steps + 1))
    for step, row in metrics.items():
        mine = [r for r in rows if r["step"] == step]
        assert len(mine) == groups * generations  # gathered from both ranks
        assert len({r["problem_id"] for r in mine}) == groups
        totals = [sum(r["rewards"].values()) for r in mine]
        assert row["reward"] == pytest.approx(sum(totals) / len(totals), abs=1e-6)
        assert row["num_groups"] == groups


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(tmp_path, tiny_model_dir, mixed_dataset):
    """torchrun --nproc_per_node 2: gloo DDP with find_unused_parameters on a dataset mixing media
    (so the ranks use different encoders in the same step), two accumulation micro-batches (no_sync)."""
    out = tmp_path / "ddp"
    result = _run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()), str(WORKER),
                   "--dump", str(out / "dump"),
                   *_overrides(tiny_model_dir, mixed_dataset / "train" / "omni_rl_format_train.json", out)])
    reports = _rank_reports(out)
    assert [r["num_processes"] for r in reports] == [2, 2]
    assert reports[0]["distributed_type"].endswith("MULTI_CPU")
    assert reports[0]["sha256"] == reports[1]["sha256"]  # both ranks end with identical weights

    trained = load_file(str(out / "dump" / "rank0.safetensors"))
    initial = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    final = load_file(str(out / "final" / "model.safetensors"))
    assert set(final) == set(initial)
    assert sum(not torch.equal(final[k], initial[k]) for k in final) > len(final) // 2  # it trained
    assert torch.equal(final["lm_head.weight"], trained["thinker.lm_head.weight"])

    _assert_reward_is_mean_over_ranks(out)
    # the cosine schedule over 2 steps x 2 updates: after step 1 the LR is half way, not run 2x too fast
    rates = [row["learning_rate"] for row in _jsonl(out / "metrics.jsonl")]
    assert rates == pytest.approx([LR / 2, 0.0], abs=1e-9)
    assert "2 process(es); per step 4 prompts x 4 completions = 16 completions" in " ".join(result.stderr.split())


def _deepspeed_available() -> str | None:
    try:
        import deepspeed  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means: skip
        return f"deepspeed does not import: {exc}"
    return None


@pytest.fixture(scope="module")
def image_audio_dataset(tmp_path_factory):
    """Every item has an image and an audio clip (like AVQA): ZeRO needs the same media on every rank."""
    from echoink.data.synth import write_synthetic_dataset

    out = tmp_path_factory.mktemp("image_audio")
    write_synthetic_dataset(out, 8, 0, seed=0,
                            families=["audio_beeps", "image_shape", "colour_by_beeps", "colour_by_pitch"])
    return out / "train" / "omni_rl_format_train.json"


def _accelerate_launch(config_file: str, out: Path, model_dir, data_file) -> None:
    _run([str(BIN / "accelerate"), "launch", "--config_file", config_file, "--num_processes", "2",
          "--main_process_port", str(_free_port()), str(WORKER), "--dump", str(out / "dump"),
          *_overrides(model_dir, data_file, out, save_steps=2)], timeout=400)


@pytest.mark.slow
@pytest.mark.skipif(_deepspeed_available() is not None, reason=str(_deepspeed_available()))
def test_deepspeed_zero2_and_zero3_two_processes_on_cpu(tmp_path, tiny_model_dir, image_audio_dataset):
    """The shipped ZeRO-2 and ZeRO-3 accelerate files, two CPU processes (gloo), two accumulation
    micro-batches: the ranks agree, both stages train the weights DDP trains on the same data, and
    checkpoints / the final model load with load_thinker."""
    from echoink.model import load_thinker

    ddp = tmp_path / "ddp"
    _run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()), str(WORKER),
          *_overrides(tiny_model_dir, image_audio_dataset, ddp)])
    finals = {"ddp": load_file(str(ddp / "final" / "model.safetensors"))}
    for stage in (2, 3):
        out = tmp_path / f"zero{stage}"
        _accelerate_launch(f"configs/accelerate/zero{stage}_8gpu.yaml", out, tiny_model_dir, image_audio_dataset)
        reports = _rank_reports(out)
        assert [r["distributed_type"].rsplit(".", 1)[-1] for r in reports] == ["DEEPSPEED", "DEEPSPEED"]
        if stage == 2:  # under ZeRO-3 each rank holds only its shard; the gathered final model is compared below
            assert reports[0]["sha256"] == reports[1]["sha256"]
        _assert_reward_is_mean_over_ranks(out)
        rates = [row["learning_rate"] for row in _jsonl(out / "metrics.jsonl")]
        assert rates == pytest.approx([LR / 2, 0.0], abs=1e-9)  # DeepSpeed steps the scheduler once per update
        assert (out / "checkpoint-2" / "trainer_state.json").is_file()
        finals[stage] = load_file(str(out / "final" / "model.safetensors"))
        load_thinker(out / "checkpoint-2")  # the gathered (not sharded) weights, in the usual key layout

    initial = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    assert set(finals[2]) == set(finals[3]) == set(finals["ddp"]) == set(initial)
    for stage in (2, 3):  # fp32: only the order of the reductions differs
        assert max((finals[stage][k] - finals["ddp"][k]).abs().max().item() for k in initial) < 1e-4
    assert sum(not torch.equal(finals[3][k], initial[k]) for k in initial) > len(initial) // 2


def test_mixed_media_is_refused_under_zero_and_fsdp(mixed_dataset):
    from accelerate.utils import DistributedType

    from echoink.config import ConfigError
    from echoink.data import load_dataset
    from echoink.grpo.distributed import check_dataset_modalities

    records = load_dataset(mixed_dataset / "train" / "omni_rl_format_train.json")
    for kind in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        with pytest.raises(ConfigError, match="same media"):
            check_dataset_modalities(SimpleNamespace(num_processes=2, distributed_type=kind), records)
    check_dataset_modalities(SimpleNamespace(num_processes=2, distributed_type=DistributedType.MULTI_GPU), records)
    check_dataset_modalities(SimpleNamespace(num_processes=1, distributed_type=DistributedType.DEEPSPEED), records)
    same = [r for r in records if r.data_type == "image_audio"]
    check_dataset_modalities(SimpleNamespace(num_processes=2, distributed_type=DistributedType.DEEPSPEED), same)


def test_deepspeed_auto_entries_are_filled_from_the_training_config():
    from accelerate.utils import DistributedType

    from echoink.config import ConfigError, TrainConfig
    from echoink.grpo.distributed import configure_deepspeed

    ds = json.loads((REPO / "configs" / "deepspeed" / "zero3.json").read_text())
    plugin = SimpleNamespace(deepspeed_config=ds, zero_stage=3)
    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=8,
                                  state=SimpleNamespace(deepspeed_plugin=plugin))
    config = TrainConfig(per_device_train_batch_size=1, max_grad_norm=5.0, bf16=True)
    configure_deepspeed(accelerator, config)
    assert ds["train_micro_batch_size_per_gpu"] == 1 and ds["gradient_accumulation_steps"] == 1
    assert ds["train_batch_size"] == 8 and ds["gradient_clipping"] == 5.0 and ds["bf16"]["enabled"] is True
    ds["gradient_accumulation_steps"] = 4
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        configure_deepspeed(accelerator, config)


@pytest.mark.slow
def test_fsdp1_rollouts_with_gathered_parameters_on_cpu(tmp_path, tiny_model_dir, image_audio_dataset):
    """accelerate enables FSDP only on GPU back-ends, so this checks the trainer's FSDP pieces at the
    torch level: the unwrapped thinker samples inside `gathered_for_generation` (summon_full_params) and
    the wrapped policy trains through FSDP, on two gloo processes."""
    out = tmp_path / "fsdp"
    _run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()),
          str(REPO / "tests" / "_fsdp_worker.py"), str(tiny_model_dir), str(image_audio_dataset), str(out)])
    initial = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    total = sum(t.numel() for t in initial.values())
    for rank in range(2):
        report = json.loads((out / f"rank{rank}.json").read_text())
        assert report["sharded_numel"] < total <= report["full_numel"]  # sharded, then gathered for the rollout
        assert report["completion_shape"] == [3, 6] and report["logps_finite"] and report["params_with_grad"] > 0
