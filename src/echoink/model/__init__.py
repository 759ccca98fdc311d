"""Model layer: load/save the thinker of an omni model family (Qwen2.5-Omni, Qwen3-Omni) and build tiny offline checkpoints."""

from echoink.model.loading import ModelLoadError, load_thinker, save_thinker

__all__ = ["ModelLoadError", "load_thinker", "save_thinker"]
