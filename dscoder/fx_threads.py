"""torch.fx traces by patching torch.nn.Module.__call__ and __getattr__ on the class, which every
thread sees. The decode step compiles on a background thread (dscoder.warmup) while the engine
runs the model eagerly on others (a prefill, the capture of the uncompiled step's graphs); a
module call there during one of the compiler's traces went through the tracer and failed
("module is not installed as a submodule", seen on an H100 with a second engine decoding
eagerly). After install(), those two patches act only in the thread that made them.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

import torch

_PATCHED = ("__call__", "__getattr__")
_lock = threading.Lock()
_installed = False


def install() -> bool:
    """Make torch.fx's Module patches per-thread (once per process). False, changing nothing,
    where torch.fx has no such patcher (a torch this was not written for)."""
    global _installed
    with _lock:
        if _installed:
            return True
        try:
            from torch.fx._symbolic_trace import _Patcher
        except ImportError:
            return False
        original = getattr(_Patcher, "patch_method", None)
        if original is None:
            return False

        def patch_method(self, cls: type, name: str, new_fn: Callable, deduplicate: bool = True) -> None:
            if cls is torch.nn.Module and name in _PATCHED:
                new_fn = _this_thread_only(new_fn, getattr(cls, name))
            return original(self, cls, name, new_fn, deduplicate)

        _Patcher.patch_method = patch_method
        _installed = True
        return True


def _this_thread_only(patched: Callable, unpatched: Callable) -> Callable:
    owner = threading.get_ident()

    def method(*args, **kwargs):
        if threading.get_ident() == owner:
            return patched(*args, **kwargs)
        return unpatched(*args, **kwargs)

    return method
