"""dscoder.torch_import: torch imported with its Python meta kernels deferred, and loaded on need.

Each check runs in a fresh interpreter: this one imported torch already (import_torch then
changes nothing, as the last test shows)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from dscoder.torch_import import import_torch, is_deferred


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


# a meta kernel that only torch/_meta_registrations.py provides
META_TAKE = textwrap.indent("""
def meta_take():
    x = torch.empty(4, device="meta")
    try:
        torch.take(x, torch.zeros(2, dtype=torch.long, device="meta"))
        return "ok"
    except NotImplementedError:
        return "missing"
""", " " * 8)


def test_meta_kernels_wait_for_load_deferred_and_then_serve_a_compile():
    done = _python("""
        import types
        from dscoder.torch_import import import_torch, is_deferred, load_deferred
        torch = import_torch()
        """ + META_TAKE + """
        print(is_deferred(), meta_take())
        load_deferred()
        load_deferred()  # once is enough
        real = type(torch._meta_registrations) is types.ModuleType
        print(is_deferred(), meta_take(), real)
        compiled = torch.compile(lambda a: a.sin() * 2, backend="aot_eager")  # fake tensors
        print(compiled(torch.zeros(3)).tolist())
    """)
    assert done.stdout.split("\n")[:3] == ["True missing", "False ok True", "[0.0, 0.0, 0.0]"]


def test_an_attribute_the_placeholder_lacks_loads_the_real_module():
    done = _python("""
        from dscoder.torch_import import import_torch, is_deferred
        torch = import_torch()
        """ + META_TAKE + """
        before = is_deferred()
        from torch._meta_registrations import meta_index_Tensor
        import torch._decomp.decompositions
        print(before, is_deferred(), callable(meta_index_Tensor), meta_take())
    """)
    assert done.stdout.split() == ["True", "False", "True", "ok"]


def test_the_cli_generates_with_the_meta_kernels_deferred(tiny_checkpoint):
    """The CLI imports torch through import_torch, and a one-shot command loads the model and
    generates (eager, on CPU) without ever loading the deferred module."""
    done = _python("""
        import os, sys
        from dscoder.cli import app
        from dscoder.torch_import import is_deferred
        real_exit = os._exit
        def exit(code):
            print("deferred:", is_deferred(), file=sys.stderr, flush=True)
            real_exit(code)
        os._exit = exit
        sys.argv = ["dscoder", "--model", sys.argv[1], "--device", "cpu", "--dtype", "float32",
                    "-n", "4", "complete"]
        app.main()
    """, str(tiny_checkpoint))
    assert "deferred: True" in done.stderr


def test_torch_already_imported_imports_as_usual():
    assert import_torch() is torch and not is_deferred()
