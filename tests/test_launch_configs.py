"""The shipped accelerate and DeepSpeed files load, validate and agree with each other."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))
HIDDEN = 3584  # Qwen2.5-Omni-7B's text hidden size
BUCKET_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")


def test_the_expected_files_are_shipped():
    names = {p.name for p in ACCELERATE}
    assert {"ddp_8gpu.yaml", "zero2_8gpu.yaml", "zero3_8gpu.yaml", "zero3_4gpu.yaml", "fsdp_8gpu.yaml",
            "zero3_2nodes_16gpu.yaml"} <= names


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    expected = int(re.search(r"_(\d+)gpu", path.name).group(1))
    nodes = re.search(r"_(\d+)nodes_", path.name)
    assert config.num_processes == expected  # all machines together
    assert config.num_machines == (int(nodes.group(1)) if nodes else 1) and not config.use_cpu
    if config.num_machines > 1:  # every node runs the same file; rank and head address come on the command line
        assert config.machine_rank == 0 and config.main_process_ip is None and config.rdzv_backend == "static"
    kind = str(config.distributed_type).rsplit(".", 1)[-1]
    prefix = path.name.split("_")[0]
    assert kind == {"ddp": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "fsdp": "FSDP"}[prefix]
    if kind == "DEEPSPEED":
        ds_file = REPO / config.deepspeed_config["deepspeed_config_file"]
        assert ds_file.is_file(), f"{path.name} references a missing {ds_file}"
        ds = json.loads(ds_file.read_text())  # valid JSON
        assert ds["zero_optimization"]["stage"] == int(prefix[-1])
        # with a DeepSpeed file, accelerate refuses duplicate settings in the yaml
        assert set(config.deepspeed_config) <= {"deepspeed_config_file", "deepspeed_multinode_launcher",
                                                "zero3_init_flag"}
        assert config.mixed_precision in (None, "no")
    if kind == "FSDP":
        from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as omni

        for name in config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(","):
            assert hasattr(omni, name), name
        assert config.fsdp_config["fsdp_use_orig_params"]  # frozen and trainable parameters share units


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_deepspeed_json_has_numeric_bucket_sizes(path):
    ds = json.loads(path.read_text())
    zero = ds["zero_optimization"]
    for key in BUCKET_KEYS:
        if key in zero or zero["stage"] == 3:
            assert isinstance(zero[key], int), f"{path.name}: {key} must be a number, not {zero.get(key)!r}"
    assert zero["reduce_bucket_size"] == HIDDEN * HIDDEN
    if zero["stage"] == 3:
        assert zero["stage3_prefetch_bucket_size"] == int(0.9 * HIDDEN * HIDDEN)
        assert zero["stage3_param_persistence_threshold"] == 10 * HIDDEN
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # the trainer saves full weights
    # our loop accumulates micro-batches itself; DeepSpeed must not scale again
    assert ds.get("gradient_accumulation_steps", "auto") in ("auto", 1)
    assert "optimizer" not in ds and "scheduler" not in ds  # the trainer builds AdamW and the LR schedule


def test_cli_runs_as_a_module():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "echoink.cli", "train", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--resume" in result.stdout
