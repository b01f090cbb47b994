"""Every Triton kernel of the model launches through launch(), so that a dry run can list the
launches of a decode step instead of running them (dscoder.kernel_prebuild builds those
kernels on several threads while the weights load).

Triton compiles a kernel at its first launch with a new specialization (its constexprs, each
tensor's dtype and 16-byte alignment, each integer's width and whether it is 1 or a multiple
of 16) and, on CUDA, builds a C launcher for each new signature. One at a time, inside the
first graph capture, that took 6.4 s of the first run after install on an H100 (Triton 3.6:
11 kernels, 8 launchers); the same builds on 8 threads take a fraction of it.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Launch:
    """One launch as the kernel would have had it."""

    kernel: Any  # a triton.JITFunction
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class Recording:
    """The launches of a dry run, one per specialization (specialization()); on_new sees each
    as it is first recorded. Several threads may record into one."""

    on_new: Callable[[Launch], None] | None = None
    launches: list[Launch] = field(default_factory=list)
    _seen: set = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, launch: Launch) -> None:
        key = specialization(launch)
        with self._lock:
            if key in self._seen:
                return
            self._seen.add(key)
            self.launches.append(launch)
        if self.on_new is not None:
            self.on_new(launch)


_LOCAL = threading.local()  # .recording: this thread's dry run, if one is on


def launch(kernel: Any, grid: Sequence[int], *args: Any, **kwargs: Any) -> None:
    """kernel[grid](*args, **kwargs), or, inside recording() on this thread, its record only:
    nothing runs, and the outputs keep whatever their memory held."""
    recording = getattr(_LOCAL, "recording", None)
    if recording is None:
        kernel[tuple(grid)](*args, **kwargs)
    else:
        recording.add(Launch(kernel, tuple(grid), args, kwargs))


@contextmanager
def recording(on_new: Callable[[Launch], None] | None = None,
              into: Recording | None = None) -> Iterator[Recording]:
    """Record this thread's launches instead of running them (into `into`, which other threads
    may be recording into too, or a new Recording). Only for code whose other work never reads
    a kernel's output as an index or a size on the host (the decode step: the outputs feed
    other kernels and elementwise torch ops alone)."""
    previous = getattr(_LOCAL, "recording", None)
    _LOCAL.recording = rec = into if into is not None else Recording(on_new)
    try:
        yield rec
    finally:
        _LOCAL.recording = previous


def specialization(launch: Launch) -> tuple:
    """What decides which compiled kernel a launch uses (Triton's default specialization): two
    launches with equal keys share one compile and one launcher. Constexprs (and the launch
    options among the keyword arguments) count by value, other arguments by their kind."""
    params = getattr(launch.kernel, "params", None) or ()
    constexpr = [getattr(p, "is_constexpr", False) for p in params]
    args = tuple(a if i < len(constexpr) and constexpr[i] else _arg_key(a)
                 for i, a in enumerate(launch.args))
    return launch.kernel, args, tuple(sorted(launch.kwargs.items()))


def _arg_key(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return ("tensor", a.dtype, a.device.type, a.data_ptr() % 16 == 0)
    if isinstance(a, bool) or a is None:
        return a
    if isinstance(a, int):
        return ("int", a == 1, a % 16 == 0, -2**31 <= a < 2**31)
    if isinstance(a, float):
        return "float"
    return a
