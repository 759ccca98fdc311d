"""Per-prompt random streams: a prompt's completions draw from its own generator, so they do not depend on which
other prompts share a decode loop, on `rollout_batch_size`, or on the number of processes.

    prompt_seed(run seed, step, position)        training: the prompt's position in the step's plan
    prompt_seed(seed, record position)           evaluation: the record's position in the evaluated list
    prompt_generators(seeds, device)             one torch.Generator per prompt, on the model's device
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def prompt_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (numpy's SeedSequence): distinct parts give unrelated streams."""
    words = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(words[0]) << 32 | int(words[1])) & ((1 << 63) - 1))


def prompt_generators(seeds: Sequence[int], device) -> list[torch.Generator]:
    """One generator per seed, on `device` (CUDA sampling needs a CUDA generator)."""
    return [torch.Generator(device=torch.device(device)).manual_seed(int(seed)) for seed in seeds]
