"""The tiny offline checkpoint of any family (`echoink model tiny --family ...`, tests, the demo).

Each family's builder lives beside it (`model/tiny.py` for Qwen2.5-Omni, `model/families/qwen3_omni_tiny.py`
for Qwen3-Omni); this module only picks one by family name, so the family modules never import their
builders (which import them).
"""

from __future__ import annotations

from pathlib import Path

from echoink.model import tiny as qwen2_5_omni_tiny
from echoink.model.families import DEFAULT_FAMILY, family_by_name
from echoink.model.families import qwen3_omni_tiny

#: family name -> its builder's `write_tiny_checkpoint(out_dir, layout=, seed=, size=)`
TINY_BUILDERS = {"qwen2.5-omni": qwen2_5_omni_tiny.write_tiny_checkpoint,
                 "qwen3-omni": qwen3_omni_tiny.write_tiny_checkpoint}


def write_tiny_checkpoint(out_dir: str | Path, family: str = DEFAULT_FAMILY.name, layout: str = "thinker",
                          seed: int = 0, size: str = "tiny") -> Path:
    """A tiny random checkpoint of the named family in `layout` ("full" or "thinker"); returns its path."""
    if layout not in ("full", "thinker"):
        raise ValueError(f"layout must be 'full' or 'thinker', got {layout!r}")
    name = family_by_name(family).name
    return TINY_BUILDERS[name](Path(out_dir), layout=layout, seed=seed, size=size)
