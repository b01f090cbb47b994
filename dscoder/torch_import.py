"""`import torch` without running torch's Python meta kernels until something needs them.

torch/__init__.py ends by importing torch._meta_registrations, the meta kernels written in Python
(and with them torch._decomp, torch._refs and torch._prims): 0.30-0.33 s of a 0.9-1.3 s import on
the CPU machine. Fake tensors use them (torch.compile's tracing, meta-device models of other
libraries); eager inference on CPU or CUDA, CUDA graphs and Triton kernels never dispatch to
them. So the CLI's one import of torch (import_torch) puts a placeholder module under that name;
torch binds it as torch._meta_registrations, and the real module runs later:

- load_deferred(), which whoever traces with fake tensors calls first (the compile of the decode
  step, the transformers engine): the registrations exist before anything needs them;
- or any attribute the placeholder lacks (`from torch._meta_registrations import x`,
  `torch._meta_registrations.x` in torch._decomp): it loads the real module and answers from it.

A process that never calls either (a one-shot command with a short answer) never runs it. A
torch whose import reads the module's attributes itself just loads it then: no gain, no harm.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import threading
import types

DEFERRED = "torch._meta_registrations"
_LOCK = threading.RLock()  # reentrant: the real module's own imports may reach the placeholder


class _Placeholder(types.ModuleType):
    """Stands for DEFERRED until it runs. It has the real module's __file__ (inspect.getmodule,
    which torch.library calls while torch imports, reads every module's __file__); every other
    attribute it lacks loads the real module."""

    def __getattr__(self, name: str):
        return getattr(load_deferred(), name)


def import_torch() -> types.ModuleType:
    """Import torch with DEFERRED deferred (see the module's doc); a torch already imported, or a
    torch without that module, imports as usual."""
    if "torch" not in sys.modules and DEFERRED not in sys.modules:
        placeholder = _placeholder()
        if placeholder is not None:
            sys.modules[DEFERRED] = placeholder
    try:
        import torch
    except BaseException:
        if isinstance(sys.modules.get(DEFERRED), _Placeholder):
            del sys.modules[DEFERRED]
        raise
    return torch


def is_deferred() -> bool:
    """Whether DEFERRED has not run yet."""
    return isinstance(sys.modules.get(DEFERRED), _Placeholder)


def load_deferred() -> types.ModuleType:
    """Run DEFERRED now if import_torch deferred it (once; any thread), and return it."""
    with _LOCK:
        module = sys.modules.get(DEFERRED)
        if not isinstance(module, _Placeholder):
            return importlib.import_module(DEFERRED)
        del sys.modules[DEFERRED]
        try:
            real = importlib.import_module(DEFERRED)  # the import binds torch._meta_registrations
        except BaseException:
            sys.modules.setdefault(DEFERRED, module)  # a later call tries again
            raise
        return real


def _placeholder() -> _Placeholder | None:
    """A placeholder with the real module's file, found without importing torch."""
    try:
        torch_spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    if torch_spec is None or not torch_spec.submodule_search_locations:
        return None
    spec = importlib.machinery.PathFinder.find_spec(DEFERRED, list(torch_spec.submodule_search_locations))
    if spec is None or not spec.origin:
        return None
    placeholder = _Placeholder(DEFERRED)
    placeholder.__file__ = spec.origin
    return placeholder
