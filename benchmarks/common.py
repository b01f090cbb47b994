"""Helpers shared by the benchmarks: the Lite checkpoint, timers, memory, output."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def lite_checkpoint(path: Path, shape: str = "lite", device: str | None = None) -> Path:
    """Reuse the random checkpoint at path, or write one (on the GPU when there is one)."""
    from dscoder.random_checkpoint import write_random_checkpoint

    if (path / "model.safetensors.index.json").is_file():
        log(f"reusing checkpoint {path}")
        return path
    t = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    write_random_checkpoint(path, shape, seed=0, device=device)
    log(f"wrote {shape} checkpoint to {path} in {time.perf_counter() - t:.1f} s")
    return path


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextmanager
def timed(into: dict, key: str):
    sync()
    t = time.perf_counter()
    yield
    sync()
    into[key] = time.perf_counter() - t


def replay_us(fn: Callable[[], object], reps: int, calls: int = 1) -> float:
    """Microseconds per call of fn() (which makes `calls` calls), captured in one CUDA graph and
    replayed `reps` times, as decode runs its kernels: their time, not the launches'."""
    from dscoder.graphs import capture_graph

    graph = capture_graph(fn, torch.device("cuda"), warm_up=fn)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / (reps * calls)


def random_prompt(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [100000] + torch.randint(0, 100000, (n - 1,), generator=g).tolist()


def gpu_memory() -> dict:
    if not torch.cuda.is_available():
        return {}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def card() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def print_table(rows: list[tuple[str, str, str]]) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"{'metric'.ljust(width)}  {'dscoder':>14}  {'baseline':>14}")
    for name, ours, base in rows:
        print(f"{name.ljust(width)}  {ours:>14}  {base:>14}")


def emit_json(result: dict, out_dir: str | None) -> None:
    line = json.dumps(result, sort_keys=True)
    if out_dir:
        Path(out_dir, "result.json").write_text(line + "\n")
    print(line)


MiB = 2**20


def process_mib() -> tuple[float | None, str]:
    """This process's GPU memory in MiB as nvidia-smi shows it, and where the number came from."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=10).stdout
        rows = [line.split(",") for line in out.strip().splitlines() if "," in line]
        mine = [float(used) for pid, used in rows if int(pid) == os.getpid()]
        if mine:
            return mine[0], "nvidia-smi"
        if len(rows) == 1:  # a container hides our pid; the only process on the card is us
            return float(rows[0][1]), "nvidia-smi (only process)"
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    if torch.cuda.is_initialized():
        free, total = torch.cuda.mem_get_info()
        return (total - free) / MiB, "mem_get_info (whole device)"
    return None, "none"


class Sampler(threading.Thread):
    """The peak of process_mib() while it runs."""

    def __init__(self, period: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.period, self.peak, self.source = period, 0.0, "none"
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.period)

    def sample(self) -> None:
        mib, source = process_mib()
        if mib is not None and mib > self.peak:
            self.peak, self.source = mib, source

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        self.sample()
        return self.peak
