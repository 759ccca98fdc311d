"""A training run as a script, for the multi-process tests (launched by torchrun / a subprocess).

    python tests/_train_worker.py --dump DIR key=value ...

Runs `echoink.grpo.trainer.train` with the given config overrides. With `--dump DIR`, every rank
writes, just before the run ends, the trained policy's weights as `DIR/rank<r>.safetensors` and
their SHA-256 as `DIR/rank<r>.json`, so a test can compare the ranks' final weights.

`spread_reward` is a reward with many distinct values (the tiny random model never earns the
accuracy or format reward), so a test can check that the logged reward averages every rank's groups.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path


def spread_reward(completions, **columns):
    """A completion-dependent reward in [0, 1): the completion's length modulo 7, over 7."""
    return [(len(text) % 7) / 7.0 for text in completions]


def weights_digest(state: dict) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(tensor.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return digest.hexdigest()


def _install_dump(dump: Path) -> None:
    """Make every rank write its policy weights when the run ends (in Accelerator.end_training)."""
    from accelerate import Accelerator
    from safetensors.torch import save_file

    original = Accelerator.end_training

    def end_training(self):
        model = self.unwrap_model(self._models[0])
        state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        rank = self.process_index
        dump.mkdir(parents=True, exist_ok=True)
        save_file(state, str(dump / f"rank{rank}.safetensors"))
        (dump / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "sha256": weights_digest(state),
                                                           "num_processes": self.num_processes,
                                                           "distributed_type": str(self.distributed_type)}))
        return original(self)

    Accelerator.end_training = end_training


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dump", type=Path, default=None)
    args, overrides = parser.parse_known_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # so "_train_worker:spread_reward" imports

    from echoink.config import load_config
    from echoink.grpo.trainer import train

    if args.dump is not None:
        _install_dump(args.dump)
    train(load_config(None, overrides), progress=False)


if __name__ == "__main__":
    main(sys.argv[1:])
