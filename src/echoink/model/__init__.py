"""Model layer: load/save the Qwen2.5-Omni thinker and build tiny offline checkpoints."""

from echoink.model.loading import ModelLoadError, load_thinker, save_thinker

__all__ = ["ModelLoadError", "load_thinker", "save_thinker"]
