"""dscoder: run DeepSeek-Coder-V2 from a terminal.

The public Python API is re-exported lazily so that ``import dscoder`` (and therefore
``dscoder --help``) never imports torch.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_engine": ("dscoder.engine", "load_engine"),
    "Engine": ("dscoder.engine", "Engine"),
    "Session": ("dscoder.engine", "Session"),
    "GenerationSettings": ("dscoder.events", "GenerationSettings"),
    "TextDelta": ("dscoder.events", "TextDelta"),
    "Finished": ("dscoder.events", "Finished"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'dscoder' has no attribute {name!r}")
