"""Import user code named in a config as ``"package.module:attribute"`` (rewards, problem types).

Bottom layer: imports nothing of echoink. **Importing runs the module's top-level code**, so callers
document that only trusted modules may be named.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["load_object"]


def load_object(spec: str, kind: str) -> Any:
    """The object ``spec`` names: ``"package.module:name"`` or ``"package.module:Outer.name"``.

    ``kind`` ("reward", "problem type") starts every error message, which names what to fix:
    ``reward 'pkg.mod:f': cannot import module 'pkg.mod': ...`` or ``... has no attribute 'f'``.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name.strip() or not attribute.strip():
        raise ValueError(f"{kind} {spec!r} must look like 'package.module:name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{kind} {spec!r}: cannot import module {module_name!r}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - the module's own code failed (a SyntaxError, anything it raises)
        raise ValueError(f"{kind} {spec!r}: importing module {module_name!r} failed: "
                         f"{type(exc).__name__}: {exc}") from exc
    target: Any = module
    for part in attribute.split("."):
        if not part or not hasattr(target, part):
            raise ValueError(f"{kind} {spec!r}: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    return target
