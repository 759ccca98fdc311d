"""Write a thinker-only checkpoint (`save_thinker`), and silence transformers while our code reads or writes
parts of a checkpoint on purpose (`quiet_transformers`). Imports no model family: the tiny builders save
through it."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from transformers.utils import logging as hf_logging

from echoink.io import building_directory
from echoink.model.processor import save_processor


@contextmanager
def quiet_transformers():
    """The talker / speech-decoder weights and configs are skipped on purpose: silence transformers' notes on them."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:  # as they were: a training run keeps them off for its whole length (grpo/run_log.py)
            hf_logging.enable_progress_bar()


def save_thinker(model, processor, out_dir: str | Path) -> Path:
    """Write a thinker-only checkpoint (safetensors + processor files) atomically to `out_dir`.

    Written into a temporary sibling directory and renamed, so a crash never leaves a half-written
    model at `out_dir`; an existing `out_dir` is replaced.
    """
    with building_directory(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        save_processor(processor, tmp)
    return out_dir
