"""Build the decode step's Triton kernels on several threads while the weights load.

The first graph capture built each Triton kernel at its first launch, one after another: with
an empty cache (the first run after install) that was 4.7-6.9 s of the capture on an H100
(Triton 3.6: 11 kernels and 8 C launchers). Here, as soon as the parameters have their memory
and before they are read, a dry run of the first reply's steps lists the launches it will make
(dscoder.model.triton_launch.recording: none runs), a pool of threads compiles the kernels
(Triton releases the GIL for most of a compile: 16 compiles took 2.8 s on one thread, 0.85 s
on eight, same H100 machine), and the prebuild's thread loads each into the GPU context and
builds its C launcher (a compiler run, outside the GIL). With a warm cache a compile is a
lookup on disk, also done while the weights load. The loader waits for the prebuild before the
first capture (KernelPrebuild.wait); a kernel it missed or failed to build is built by its
first launch, as before.

The dry run runs the step's torch operations on the unread weights (whatever their memory holds;
the outputs are thrown away) and only for a model resident on one GPU: an offloaded step reads
expert ids on the host, which the dry run leaves unwritten.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed

import torch

from dscoder.model.transformer import Transformer
from dscoder.model.triton_launch import Launch, recording
from dscoder.profile import StartupProfile
from dscoder.sampling import SamplingParams, sample

BUILD_THREADS = 8  # on a 16-core H100 machine: 0.85 s for 16 builds, 0.70 s on 16 threads


class KernelPrebuild:
    """The Triton kernels of `model`'s decode step at `rows` cache rows, building on a thread."""

    def __init__(self, model: Transformer, rows: int, profile: StartupProfile | None = None,
                 threads: int = BUILD_THREADS) -> None:
        self.errors: list[BaseException] = []
        self.built = 0
        self._profile = profile
        self._thread = threading.Thread(target=self._run, args=(model, rows, threads),
                                        name="dscoder-kernels", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        self._thread.join()

    def _run(self, model: Transformer, rows: int, threads: int) -> None:
        t = time.perf_counter()
        try:
            device = model.lm_head.weight.device
            workers = max(1, min(threads, os.cpu_count() or 1))  # compiles are CPU work
            with torch.cuda.device(device), ThreadPoolExecutor(workers) as pool:
                builds: list[Future] = []
                # each kernel compiles as soon as the dry run reaches its first launch
                dry_run(model, rows, lambda launch: builds.append(pool.submit(_compile, device, launch)))
                for build in as_completed(builds):
                    # loaded here, one at a time: Triton's C launchers are modules of one name,
                    # and loading two at once from two threads mixed them up (a kernel called
                    # through another kernel's launcher, H100, Triton 3.6)
                    try:
                        _load(build.result())
                        self.built += 1
                    except Exception as e:  # that kernel builds at its first launch
                        self.errors.append(e)
        except Exception as e:  # the capture builds what is missing, as without a prebuild
            self.errors.append(e)
        finally:
            if self._profile is not None:
                self._profile.add("kernel builds (background)", time.perf_counter() - t)
                self._profile.count("kernels built", self.built)


def dry_run(model: Transformer, rows: int,
            on_new: Callable[[Launch], None] | None = None) -> list[Launch]:
    """The Triton launches, one per specialization, of what a first reply runs: a decode step at
    `rows` cache rows (the first graph's) and a sampled step after it; a prompt's last token at
    a host position (a prompt whose other tokens are cached); a prompt of two tokens (whose
    experts are read by index, dscoder.model.moe.GATHER_PAIRS). Nothing of them runs; on_new
    sees each launch as it is first recorded."""
    device = model.lm_head.weight.device
    cache = model.new_cache(rows)
    with torch.inference_mode(), recording(on_new) as rec:
        ids = torch.zeros(1, dtype=torch.long, device=device)
        pos = torch.full((1,), rows - 1, dtype=torch.long, device=device)
        logits = model.decode_at(ids, pos, cache, rows)
        sample(logits, pos + 1, SamplingParams.on(device), greedy=False)
        model(ids, cache, rows - 2)  # rows - 1 rows visible: most lengths' specialization
        model(torch.zeros(2, dtype=torch.long, device=device), cache, 0)
    return rec.launches


def _compile(device: torch.device, launch: Launch):
    with torch.cuda.device(device):
        return launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.kwargs)


def _load(kernel) -> None:
    """Load a compiled kernel into the GPU context and build its launcher now, not at its first
    launch (Triton's private step; a Triton without it does both at the first launch)."""
    init = getattr(kernel, "_init_handles", None)
    if init is not None:
        init()
