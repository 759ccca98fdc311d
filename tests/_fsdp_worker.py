"""FSDP (version 1) at the torch level on CPU, for tests/test_distributed.py (accelerate only enables FSDP
on GPU back-ends, so the trainer's FSDP path cannot run end to end on CPU).

    torchrun --nproc_per_node 2 tests/_fsdp_worker.py MODEL_DIR DATA_JSON OUT_DIR

Wraps the Policy the way configs/accelerate/fsdp_8gpu.yaml asks accelerate to (decoder layers, audio
layers and vision blocks as units, use_orig_params), samples a group with the unwrapped thinker inside
`distributed.gathered_for_generation`, then runs the policy's forward/backward through FSDP.
Each rank writes OUT_DIR/rank<r>.json.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as omni

from echoink.data import load_dataset
from echoink.grpo.distributed import gathered_for_generation
from echoink.model.engine import SharedPrefillEngine
from echoink.model.generation import SamplingSettings
from echoink.model import load_thinker
from echoink.model.inputs import encode_prompt
from echoink.grpo.logprobs import Policy


def main(model_dir: str, data_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(rank)
    thinker, processor = load_thinker(model_dir, dtype="float32")
    units = {omni.Qwen2_5OmniDecoderLayer, omni.Qwen2_5OmniAudioEncoderLayer, omni.Qwen2_5OmniVisionBlock}
    policy = FSDP(Policy(thinker), auto_wrap_policy=functools.partial(transformer_auto_wrap_policy,
                                                                       transformer_layer_cls=units),
                  use_orig_params=True, device_id=torch.device("cpu"))
    accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False,
                                  state=SimpleNamespace(deepspeed_plugin=None))
    record = load_dataset(data_file)[rank]
    inner = policy.module.thinker
    sharded_numel = sum(p.numel() for p in inner.parameters())
    inner.eval()
    with gathered_for_generation(accelerator, policy):
        full_numel = sum(p.numel() for p in inner.parameters())
        engine = SharedPrefillEngine(inner, processor.tokenizer)
        group = engine.generate([encode_prompt(record, processor)], SamplingSettings(3, 6))[0]
    inner.train()
    logps = policy([group])[0]
    (logps * group.completion_mask).sum().backward()
    grads = sum(p.grad is not None for p in policy.parameters())
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({
        "sharded_numel": sharded_numel, "full_numel": full_numel, "completion_shape": list(group.completion_ids.shape),
        "logps_finite": bool(torch.isfinite(logps).all()), "params_with_grad": grads}))
    dist.barrier()  # the process group is left to the exit: gloo's teardown can abort on a race ("terminate called")


if __name__ == "__main__":
    main(*sys.argv[1:4])
