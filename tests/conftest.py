"""Shared fixtures: tiny offline checkpoints of each model family (Qwen2.5-Omni, Qwen3-Omni) and a small synthetic
dataset (built once per session); `family_dirs` parametrises a test over the families."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from echoink.model.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "thinker", layout="thinker", seed=0)


@pytest.fixture(scope="session")
def tiny_full_dir(tmp_path_factory):
    from echoink.model.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_full") / "full", layout="full", seed=0)


@pytest.fixture(scope="session")
def mixed_dataset(tmp_path_factory):
    """Train/valid splits mixing image_audio, video_audio, image-only, audio-only and text items."""
    from echoink.data.synth import write_synthetic_dataset

    out = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(out, 16, 8, seed=0)
    return out


@pytest.fixture(scope="session")
def qwen3_model_dir(tmp_path_factory):
    from echoink.model.tiny_families import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_qwen3") / "thinker", family="qwen3-omni",
                                 layout="thinker", seed=0)


@pytest.fixture(scope="session")
def qwen3_full_dir(tmp_path_factory):
    from echoink.model.tiny_families import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_qwen3_full") / "full", family="qwen3-omni",
                                 layout="full", seed=0)


FAMILY_FIXTURES = {"qwen2.5-omni": ("tiny_model_dir", "tiny_full_dir"), "qwen3-omni": ("qwen3_model_dir", "qwen3_full_dir")}


@pytest.fixture(params=sorted(FAMILY_FIXTURES))
def family_dirs(request):
    """(family name, thinker-layout dir, published-layout dir) of each model family's tiny checkpoint."""
    thinker, full = FAMILY_FIXTURES[request.param]
    return request.param, request.getfixturevalue(thinker), request.getfixturevalue(full)
