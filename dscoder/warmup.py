"""Compile the decode step in the background; capture the first graph before the first reply.

torch.compile of the decode step took 10-15 s on a fresh machine and 3-5 s with a warm cache
(importing Dynamo and Inductor alone took 3-6 s of it), longer than loading the weights. So
nothing waits for it: the model decodes from CUDA graphs of the uncompiled step (the first one
captured at load) while a background thread imports the compiler, compiles the step through
the loaded layers (one compile per layer kind: the weights are inputs of the compiled graph)
and reports ready; the engine switches at its next decode round (Engine.use_compiled_step),
recapturing its graphs. The thread starts after the first reply, or once a reply runs long
(Engine.start_compile), not during the load or a short reply: its imports and tracing hold the
GIL, which slowed the reading threads (on an H100, 8.1 against 15-20 GB/s) and a short reply's
decoding (126 against 186 tokens/s). A one-shot command with a short answer never pays for it.
"""
from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from functools import partial

import torch

from dscoder import cuda_capture, fx_threads
from dscoder.kernel_prebuild import KernelPrebuild, offloaded_steps
from dscoder.model.transformer import Transformer, compile_decode_layer
from dscoder.profile import StartupProfile


def compile_count() -> int:
    """Graphs torch.compile has built in this process (a recompile adds one)."""
    if "torch._dynamo" not in sys.modules:
        return 0
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class Precompile:
    """The decode step of a loaded model, compiling on a background thread."""

    def __init__(self, model: Transformer, rows: int, profile: StartupProfile,
                 backend="inductor") -> None:
        self.compiled: Callable | None = None
        self.error: BaseException | None = None
        self.profile = profile
        self.done = threading.Event()
        self._args = (model, rows, backend)
        fx_threads.install()  # the compiler's traces must not catch the engine's module calls
        self._thread = threading.Thread(target=self._run, name="dscoder-compile", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        model, rows, backend = self._args
        t, before = time.perf_counter(), compile_count()
        # this thread holds the GIL for long stretches (imports, tracing): a shorter switch
        # interval gives it back to the decoding thread sooner (the default is 5 ms, longer
        # than a decode step)
        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, 0.0005))
        try:
            compiled = compile_decode_layer(backend)  # imports Dynamo and Inductor: seconds
            _first_step(model, compiled, rows)
            self.compiled = compiled
        except BaseException as e:  # decoding stays on the uncompiled step
            self.error = e
        finally:
            sys.setswitchinterval(interval)
            self.profile.add("compile (background)", time.perf_counter() - t)
            self.profile.count("compiles", compile_count() - before)
            self.done.set()

    def result(self, wait: bool = False) -> Callable | None:
        """The compiled step once ready (None while compiling, unless `wait`, or if it failed)."""
        if wait:
            self.done.wait()
        return self.compiled if self.done.is_set() else None


def _first_step(model: Transformer, compiled: Callable, rows: int) -> None:
    """One compiled decode step through the loaded layers (this compiles it), into a scratch
    cache (the real one may be in use) one row longer than `rows` (the two dynamic sizes must
    differ, or Dynamo would take them for one). Dynamo guards on whether each input is an
    inference tensor, so each is made as the graphs' are: the cache outside inference mode, as
    sessions make theirs, the ids and position inside it, as GraphedDecoder and its captures'
    warm-ups make theirs (a position made outside recompiled the step at its first capture)."""
    scratch = model.new_cache(rows + 1)
    with torch.inference_mode():  # no synchronize: a capture may be running on another thread
        ids = torch.zeros(1, dtype=torch.long, device=scratch.data.device)
        model.decode_at(ids, ids, scratch, rows, compiled=compiled)


def warm_up(engine, profile: StartupProfile) -> None:
    """Capture the first bucket's graph now rather than inside the first reply. Later buckets
    are captured ahead (dscoder.graphs). An offloaded model's decode kernels build first, on
    threads (a resident model's built while its weights were read, dscoder.loader): its decode
    segments read the expert cache, which exists only now."""
    if engine.model.offload is not None:
        decoder = engine.default_session().decoder(0)
        with profile.phase("kernel builds"):
            KernelPrebuild(partial(offloaded_steps, decoder, 0), engine.device, profile).wait()
    with profile.phase("graph capture", cuda_capture.synchronize):
        engine.prepare()
