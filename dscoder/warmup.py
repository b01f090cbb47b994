"""Compile and capture before the first reply, overlapped with loading where possible.

torch.compile of the decode step took 10-15 s on a fresh machine and 1-3 s with a warm cache,
and the first bucket's CUDA graph was captured inside the first reply (which then decoded at
half speed). Here the step is compiled while the weights load: on stand-in layers (one per
layer kind, zero weights of the real shapes and dtypes) on a background thread, with the same
compiled function the model then uses, so the real layers find it compiled (Dynamo guards on
shapes and dtypes, not on which tensors); the stand-ins also run a short prefill, which loads
the prefill's kernels. The first graph is captured at the end of loading.
"""
from __future__ import annotations

import sys
import threading
import time

import torch

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
    """The decode step compiling on a background thread while the weights load."""

    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, rows: int,
                 profile: StartupProfile, backend="inductor") -> None:
        self.compiled = compile_decode_layer(backend)
        self.error: BaseException | None = None
        self.profile = profile
        self._args = (cfg, device, dtype, rows)
        self._thread = threading.Thread(target=self._run, name="dscoder-compile", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        cfg, device, dtype, rows = self._args
        profile = self.profile
        t, before = time.perf_counter(), compile_count()
        try:
            for i in _one_layer_per_kind(cfg):
                # weights, cache and position made outside inference mode, as the real ones
                layer, args = _stand_in(cfg, i, device, dtype), decode_layer_args(cfg, device, dtype, rows)
                with torch.inference_mode():
                    self.compiled(layer, *args)
                    _prefill(layer, cfg, device, dtype)
                del layer, args
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except BaseException as e:  # the model then compiles at its first call, as without this
            self.error = e
        profile.add("compile (while loading)", time.perf_counter() - t)
        profile.count("compiles", compile_count() - before)

    def install(self, model: Transformer) -> None:
        """Wait for the compile, then let the model decode through the compiled function."""
        with self.profile.phase("compile (waited for)"):  # what loading did not hide
            self._thread.join()
        model.compile_decode(compiled=self.compiled)


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
    """Compile the decode step (unless a Precompile did) and capture the first bucket's graph
    now rather than inside the first reply. Later buckets are captured ahead (dscoder.graphs)."""
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

