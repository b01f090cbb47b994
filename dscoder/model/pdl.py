"""Programmatic dependent launch (PDL) for the kernels of the decode step (Hopper and later).

A graph-replayed decode step of Lite is several hundred kernels in a row (an MoE layer had 18 in
the H100 profile before the cache row kernel: 4 GEMVs, 2 MLA kernels, 12 of Inductor's), most a
few microseconds long. Normally a kernel's programs start only once the kernel before has finished and its
writes are flushed, and the SMs idle while each kernel ramps up. Launched with PDL, a kernel's
programs are scheduled as soon as every program of the kernel before has signalled
(gdc_launch_dependents), and wait (gdc_wait) only before they read what earlier kernels wrote:
a dense matrix-vector product reads its first tile of weights before it waits.

The rule every PDL kernel here keeps, as Inductor's own do: wait before signalling. A kernel
that signalled has then seen the kernel before it finish, and that one the kernel before it, so
whatever a kernel reads after its wait is complete, however far back it was written; and nothing
is written before the wait (the kernel before may still be reading a buffer that is reused).

dscoder's Triton kernels (dscoder.model.gemv, the MLA split and combine of
dscoder.model.mla_decode) launch with PDL, and so do Inductor's kernels of the compiled step
(torch._inductor.config.triton.enable_pdl). On an H100 decode went from 363.2 to 380.0 tok/s at a
2K context and from 308.7 to 319.3 at 32K (BENCHMARKS.md, two runs each on one machine).
DSCODER_PDL=0 turns it off.
"""
from __future__ import annotations

import os

import torch

SWITCH = os.environ.get("DSCODER_PDL", "1") != "0"
# Triton's interpreter (the CPU tests) has no grid dependency control: the kernels run without it
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_CAPABLE: dict[int, bool] = {}  # device index -> compute capability 9.0 or later
_triton_has_pdl: bool | None = None  # asked once: see _triton_supports


def enabled(device: torch.device) -> bool:
    """Whether kernels launched on `device` use PDL (a CUDA device of compute capability 9.0 or
    later: griddepcontrol does not exist before Hopper; and a Triton that can launch with it)."""
    if not SWITCH or _INTERPRET or device.type != "cuda" or not _triton_supports():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABLE:
        _CAPABLE[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _CAPABLE[index]


def _triton_supports() -> bool:
    """Whether the installed Triton has gdc_wait and the launch_pdl option (added after Triton
    3.3.0, triton-lang/triton#6394; the project allows 3.2, which torch 2.6 ships)."""
    global _triton_has_pdl
    if _triton_has_pdl is None:
        try:
            from triton.backends.nvidia.compiler import CUDAOptions
            from triton.language.extra.cuda import gdc_wait  # noqa: F401

            _triton_has_pdl = "launch_pdl" in CUDAOptions.__dataclass_fields__
        except (ImportError, AttributeError):
            _triton_has_pdl = False
    return _triton_has_pdl


def launch_options(device: torch.device) -> dict[str, bool]:
    """The keyword arguments of a Triton launch: launch_pdl where enabled(device)."""
    return {"launch_pdl": True} if enabled(device) else {}


def inductor_options() -> dict[str, bool]:
    """torch.compile options that give Inductor's kernels of the compiled step PDL too (Inductor
    checks the device itself); for this compile only, not every compile of the process."""
    if not SWITCH or not _triton_supports():
        return {}
    import torch._inductor.config as inductor_config

    return {"triton.enable_pdl": True} if hasattr(inductor_config.triton, "enable_pdl") else {}
