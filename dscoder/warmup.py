"""Compile the decode step in the background; capture the first graph before the first reply.

torch.compile of the decode step took 10-15 s on a fresh machine and 3-5 s with a warm cache
(importing Dynamo and Inductor alone took 3-6 s of it), more than loading the weights. So
nothing waits for it: a background thread imports the compiler and compiles the step on
stand-in layers (one per layer kind, zero weights of the real shapes and dtypes; Dynamo guards
on shapes and dtypes, not on which tensors, so the real layers find it compiled), runs it once
on the loaded model, and reports ready. Meanwhile the engine decodes from CUDA graphs of the
uncompiled step (captured at the end of loading); at its next decode round after the compile is
ready it switches to the compiled step (Engine.use_compiled_step), recapturing its graphs. A
one-shot command thus never pays for the compile, and a long session gets the fused step.
"""
from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

import torch

from dscoder.compile_cache import enable_compile_caches
from dscoder.config import ModelConfig
from dscoder.model.rope import rope_table
from dscoder.model.step import Step
from dscoder.model.transformer import DecoderLayer, Transformer, compile_decode_layer, decode_layer_args
from dscoder.profile import StartupProfile
from dscoder.weights import param_dtype


def compile_count() -> int:
    """Graphs torch.compile has built in this process (a recompile adds one)."""
    if "torch._dynamo" not in sys.modules:
        return 0
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class Precompile:
    """The decode step compiling on a background thread, from before the weights load."""

    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, rows: int,
                 profile: StartupProfile, backend="inductor") -> None:
        self.compiled: Callable | None = None
        self.error: BaseException | None = None
        self.profile = profile
        self.done = threading.Event()
        self._args = (cfg, device, dtype, rows, backend)
        self._model: Transformer | None = None
        self._attached = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dscoder-compile", daemon=True)
        self._thread.start()

    def attach(self, model: Transformer) -> None:
        """The loaded model: once the step is compiled, it runs once on the model's layers (their
        first calls cost about a second of guard building), so the switch is quick."""
        self._model = model
        self._attached.set()

    def _run(self) -> None:
        cfg, device, dtype, rows, backend = self._args
        profile = self.profile
        t, before = time.perf_counter(), compile_count()
        try:
            enable_compile_caches()  # imports Inductor: seconds, off the loading thread
            compiled = compile_decode_layer(backend)
            for i in _one_layer_per_kind(cfg):
                # weights, cache and position made outside inference mode, as the real ones
                layer, args = _stand_in(cfg, i, device, dtype), decode_layer_args(cfg, device, dtype, rows)
                with torch.inference_mode():
                    compiled(layer, *args)
                    _prefill(layer, cfg, device, dtype)
                del layer, args
            self._attached.wait()
            if self._model is not None:
                _first_calls(self._model, compiled, rows)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.compiled = compiled
        except BaseException as e:  # decoding stays on the uncompiled step
            self.error = e
        finally:
            profile.add("compile (background)", time.perf_counter() - t)
            profile.count("compiles", compile_count() - before)
            self.done.set()

    def result(self, wait: bool = False) -> Callable | None:
        """The compiled step once ready (None while compiling, unless `wait`, or if it failed)."""
        if wait:
            self._attached.set()  # nobody attached a model: nothing to warm
            self.done.wait()
        return self.compiled if self.done.is_set() else None


def _first_calls(model: Transformer, compiled: Callable, rows: int) -> None:
    """One compiled decode step through the loaded layers, into a scratch cache (the real one may
    be in use), made as sessions make theirs (outside inference mode: Dynamo guards on that)."""
    scratch = model.new_cache(rows + 1)
    ids = torch.zeros(1, dtype=torch.long, device=scratch.data.device)
    with torch.inference_mode():
        model.decode_at(ids, ids, scratch, rows, compiled=compiled)


def _prefill(layer: DecoderLayer, cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
             chunk: int = 64) -> None:
    """Two eager prefill chunks through a stand-in layer (the first causal, the second masked):
    the first prompt's kernels (attention, grouped experts) are then loaded and their libraries
    initialised before it comes; that took about 0.4 s of the first reply's prefill."""
    rope = rope_table(cfg, 2 * chunk, device)
    kv = torch.zeros(2 * chunk, cfg.kv_cache_dim, dtype=dtype, device=device)
    x = torch.zeros(2 * chunk, cfg.hidden_size, dtype=dtype, device=device)
    for start in (0, chunk):
        step = Step.at(start, chunk, device, absorbed=False)
        layer(x[start:start + chunk], rope[start:start + chunk], kv, step)


def _one_layer_per_kind(cfg: ModelConfig) -> list[int]:
    kinds: dict[bool, int] = {}
    for i in range(cfg.num_hidden_layers):
        kinds.setdefault(cfg.is_moe_layer(i), i)
    return sorted(kinds.values())


def _stand_in(cfg: ModelConfig, i: int, device: torch.device, dtype: torch.dtype) -> DecoderLayer:
    """Layer i with zero weights: what Dynamo sees of a real layer (types, shapes, dtypes,
    Parameters that require grad, as load_state_dict(assign=True) leaves them)."""
    with torch.device("meta"):
        layer = DecoderLayer(cfg, i)
    weights = {name: torch.zeros(p.shape, device=device,
                                 dtype=param_dtype(f"model.layers.{i}.{name}", dtype))
               for name, p in layer.named_parameters()}
    layer.load_state_dict(weights, assign=True, strict=True)
    return layer


def warm_up(engine, profile: StartupProfile) -> None:
    """Compile the decode step when it compiles in the foreground (int8 experts: the stand-ins
    hold bf16 ones) and capture the first bucket's graph now rather than inside the first reply.
    Later buckets are captured ahead (dscoder.graphs)."""
    from dscoder.shapes import BUCKET

    net = engine.model
    if net._compiled_layer is not None:
        with profile.phase("compile", torch.cuda.synchronize):
            before = compile_count()
            ids = torch.zeros(1, dtype=torch.long, device=engine.device)
            # a scratch cache: dynamic shapes, so the real cache's sizes compile nothing new
            # (made outside inference mode, as sessions make theirs: Dynamo guards on that)
            scratch = net.new_cache(BUCKET + 1)
            with torch.inference_mode():
                net.decode_at(ids, ids, scratch, BUCKET)
            profile.count("compiles", compile_count() - before)
    with profile.phase("graph capture", torch.cuda.synchronize):
        engine.prepare()

