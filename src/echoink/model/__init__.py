"""Model layer: the families (each owns its thinker's forward), loading and saving, model inputs, the rollout
engine (`echoink.model.engine`) and the attention kernels; tiny offline checkpoints for tests and the demo."""

from echoink.model.loading import ModelLoadError, load_thinker
from echoink.model.saving import save_thinker

__all__ = ["ModelLoadError", "load_thinker", "save_thinker"]
