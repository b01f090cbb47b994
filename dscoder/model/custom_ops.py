"""The operators (dscoder::gemv, dscoder::mla_decode, dscoder::latent_row, dscoder::route) that
compiled decode code calls in place of dscoder's Triton kernels. Inductor launches a traced
Triton kernel itself, without programmatic dependent launch (dscoder.model.pdl), and failed to
build the MLA split kernel; an opaque operator launches the kernel as an eager call does.

Each is defined by whoever compiles (dscoder.model.transformer.compile_decode_layer), not at
import: only the compile needs them, and a one-shot command never compiles."""
from __future__ import annotations

import threading
from collections.abc import Callable

_LOCK = threading.Lock()
_DEFINED: set[str] = set()


def define_once(name: str, define: Callable[[], None]) -> None:
    """Run define() (which defines the operator `name`) unless it already ran in this process."""
    with _LOCK:
        if name not in _DEFINED:
            define()
            _DEFINED.add(name)
