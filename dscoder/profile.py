"""Where start-up time goes: a small recorder that the loader and the engine report into.

`--verbose` prints it after loading (and again with the first reply's numbers), the benchmark
reads it from `engine.startup_profile`. No torch here: the CLI times `import torch` with it.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# the order phases are printed in (others follow in the order they were first recorded)
ORDER = ("before import", "import", "config", "tokenizer", "allocate", "load weights", "kernel builds",
         "pin experts", "map experts", "graph capture", "first prefill", "compile (background)")


class StartupProfile:
    """Seconds per named phase, plus counts (bytes loaded, compiles, graphs captured).

    Phases may be recorded from several threads (a background compile, the capture-ahead
    worker); a phase recorded twice adds up."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] = self.counts.get(name, 0) + n

    @contextmanager
    def phase(self, name: str, sync: Callable[[], None] | None = None) -> Iterator[None]:
        """Time the block; `sync` (e.g. torch.cuda.synchronize) runs before the clock stops, so
        that queued GPU work is charged to the phase that queued it."""
        t = time.perf_counter()
        try:
            yield
        finally:
            if sync is not None:
                sync()
            self.add(name, time.perf_counter() - t)

    def capture_reporter(self) -> Callable[[float, bool], None]:
        """For dscoder.graphs: count captures; time those made in the background (a capture made
        in the foreground is timed by the phase around it, at load, or by the reply it is in)."""
        def report(seconds: float, background: bool) -> None:
            self.count("graphs captured")
            if background:
                self.add("graph capture (background)", seconds)
                self.count("graphs captured ahead")
        return report

    def ordered(self) -> list[tuple[str, float]]:
        with self._lock:
            items = dict(self.seconds)
        first = [(k, items.pop(k)) for k in ORDER if k in items]
        return first + list(items.items())

    def summary(self) -> str:
        """One line: 'start-up: import 1.62 s, config 0.01 s, load weights 3.10 s, ...'."""
        parts = [f"{name} {secs:.2f} s" for name, secs in self.ordered()]
        counts = self.counts
        if counts.get("bytes loaded") and self.seconds.get("load weights"):
            rate = counts["bytes loaded"] / self.seconds["load weights"] / 1e9
            parts.append(f"{counts['bytes loaded'] / 1e9:.1f} GB at {rate:.1f} GB/s")
        if counts.get("bytes staged") and self.seconds.get("staging (beside import)"):
            # from the page cache to the GPU, before the load copied them on the device
            rate = counts["bytes staged"] / self.seconds["staging (beside import)"] / 1e9
            parts.append(f"{counts['bytes staged'] / 1e9:.1f} GB staged at {rate:.1f} GB/s")
        for name in ("compiles", "graphs captured"):
            if name in counts:
                parts.append(f"{counts[name]} {name}")
        age = process_age()
        if age is not None:  # the phases' sum falls short of this by what no phase names
            parts.append(f"process {age:.2f} s")
        return "start-up: " + ", ".join(parts)

    def as_dict(self) -> dict:
        return {"seconds": dict(self.ordered()), "counts": dict(self.counts)}


_ACTIVE: StartupProfile | None = None


@contextmanager
def recording(profile: StartupProfile) -> Iterator[StartupProfile]:
    """Make `profile` the one that code deep in loading reports into (see current()), without
    threading it through every call in between."""
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, profile
    try:
        yield profile
    finally:
        _ACTIVE = previous


def current() -> StartupProfile | None:
    return _ACTIVE


def process_age() -> float | None:
    """Seconds since this process started (Linux: /proc), interpreter start-up included."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            start_ticks = int(f.read().rpartition(")")[2].split()[19])
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None
