"""Decode steps replayed from CUDA graphs, captured ahead of need.

A decode step of Lite launches about a thousand small kernels; at batch 1 launching them costs
more than running them. A graph captured once replays the whole step with one launch. Shapes
must not change between replays, so the position lives in device memory and attention reads a
fixed number of cache rows (the context rounded up to a bucket), masking those not yet written.

Capturing a bucket's graph takes tens of milliseconds (the compiled step has dynamic shapes, so
it never recompiles). So that no reply waits for it, graphs are captured ahead: the loader
captures the first buckets, and when decoding nears the end of a bucket the next one is
captured on a background thread (load_engine(capture_ahead=False), DSCODER_CAPTURE_AHEAD=0 in
the CLI, turns that thread off; a missing graph is then captured when first needed, as before).
Each graph has its own input buffers, and its warm-up writes only its bucket's last row, which
no decode step has reached yet.
"""
from __future__ import annotations

import atexit
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, wait
from dataclasses import dataclass

import torch

from dscoder import shapes
from dscoder.kv_cache import LatentKVCache
from dscoder.model.transformer import Transformer

AHEAD_ROWS = 256  # start capturing bucket b+1 when decoding is this close to the end of bucket b
Report = Callable[[float, bool], None]  # (seconds, on the background thread): the profile listens


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor
    pos: torch.Tensor
    out: torch.Tensor


class GraphedDecoder:
    """The decode graphs of one KV cache (one per bucket); a session owns one."""

    def __init__(self, model: Transformer, cache: LatentKVCache, *,
                 on_capture: Report | None = None, ahead: bool = True) -> None:
        self.model, self.cache = model, cache
        self.graphs: dict[int, _Graph] = {}
        self.pending: dict[int, Future] = {}
        self.on_capture = on_capture
        self.ahead = ahead

    def __call__(self, token: int, pos: int) -> torch.Tensor:
        """Logits (1, V) for `token` at `pos`; the tensor is reused by the next call."""
        visible = shapes.bucket_rows(pos, self.cache.capacity)
        g = self.graph(visible)
        g.ids.fill_(token)
        g.pos.fill_(pos)
        g.graph.replay()
        bucket = shapes.BUCKET
        if self.ahead and pos % bucket >= bucket - AHEAD_ROWS:
            self.capture_ahead([shapes.bucket_rows(pos + bucket, self.cache.capacity)])
        return g.out

    def graph(self, visible: int) -> _Graph:
        """The graph for `visible` rows: captured already, being captured (wait), or now."""
        if visible not in self.graphs:
            pending = self.pending.pop(visible, None)
            if pending is not None and _failed(pending):
                self.ahead = False  # it failed in the background: capture here from now on
            self.capture(visible)  # a no-op when the background capture succeeded
        return self.graphs[visible]

    def wait(self) -> None:
        """Until the captures asked of the background thread have ended."""
        wait(list(self.pending.values()))

    def capture(self, visible: int) -> None:
        """Capture the graph for `visible` rows in this thread (waiting for any other capture)."""
        if visible not in self.graphs:
            with _CAPTURE_LOCK:
                if visible not in self.graphs:
                    self._capture(visible)

    def capture_ahead(self, visibles: list[int]) -> None:
        """Capture these buckets on the background thread (or now, with capture-ahead off)."""
        for visible in visibles:
            if visible in self.graphs or visible in self.pending:
                continue
            if not self.ahead:
                self.capture(visible)
                continue
            self.pending[visible] = _WORKER.submit(self.capture, visible)

    def _capture(self, visible: int) -> None:
        t = time.perf_counter()
        device = self.model.lm_head.weight.device
        side = torch.cuda.Stream(device)
        with torch.inference_mode(), torch.cuda.stream(side):
            # the inputs are written on the side stream that reads them (it does not wait for
            # the current stream, which may be busy with a prefill)
            ids = torch.zeros(1, dtype=torch.long, device=device)
            # The warm-up decodes at the bucket's last row, on the real cache: the exact shapes
            # the graph will have, so any compile happens now and never inside the capture (a
            # dynamic shape's guards cannot be foreseen from another size). That row is at or
            # beyond every row written so far (a bucket is captured before decoding reaches its
            # end), so what it gets is masked until the real step there overwrites it.
            pos = torch.full((1,), visible - 1, dtype=torch.long, device=device)
            for _ in range(2):
                self.model.decode_at(ids, pos, self.cache, visible)
            side.synchronize()
            graph = torch.cuda.CUDAGraph()
            # capture_begin/end rather than torch.cuda.graph(), whose device-wide synchronize
            # would wait for the main thread's prefill; thread_local: that thread may keep
            # decoding and allocating while we capture
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                out = self.model.decode_at(ids, pos, self.cache, visible)
            finally:
                graph.capture_end()
        self.graphs[visible] = _Graph(graph, ids, pos, out)
        if self.on_capture is not None:
            self.on_capture(time.perf_counter() - t, threading.current_thread().name == _THREAD)


def _failed(future: Future) -> bool:
    wait([future])
    return future.cancelled() or future.exception() is not None


class _Worker:
    """One background thread for captures, in submission order. A daemon, so that a pending
    capture never delays exit; at exit we wait for the capture in progress (killing a thread
    inside a CUDA capture could crash the process) and start no other."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[Future, Callable, tuple]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.stopping = False

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        self._queue.put((future, fn, args))
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=_THREAD, daemon=True)
                self._thread.start()
        return future

    def _run(self) -> None:
        while True:
            self._do(*self._queue.get())  # its locals (the decoder, its cache) end with the call

    def _do(self, future: Future, fn: Callable, args: tuple) -> None:
        if self.stopping:
            future.cancel()
        if not future.set_running_or_notify_cancel():  # cancelled: this tells those who wait
            return
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # the waiting decode step re-raises it
            future.set_exception(e)

    def stop(self) -> None:
        self.stopping = True
        _CAPTURE_LOCK.acquire()  # held for good: the capture in progress ends, no other starts


_CAPTURE_LOCK = threading.Lock()  # one capture at a time, in whichever thread
_THREAD = "dscoder-capture"
_WORKER = _Worker()
atexit.register(_WORKER.stop)
