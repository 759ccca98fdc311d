"""Shared fixtures: a tiny offline Qwen2.5-Omni checkpoint and a small synthetic dataset (built once per session)."""

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
