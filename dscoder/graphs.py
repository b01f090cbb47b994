"""Decode steps replayed from CUDA graphs, captured ahead of need.

A decode step of Lite launches about a thousand small kernels; at batch 1 launching them costs
more than running them. A graph captured once replays the whole step with one launch. Shapes
must not change between replays, so the position lives in device memory and attention reads a
fixed number of cache rows (the context rounded up to a bucket), masking those not yet written.

The host never waits between two steps: a small graph samples the next id on the device and
feeds it to the next step's graph, and the host reads each id a few steps behind the GPU
(GraphedDecoder.run_ahead), detokenizing and checking stop strings while the steps run.

Where the step's attention bounds itself by the device position (the MLA decode kernel, on
Hopper: Transformer.decode_bounded_by_position), one graph reading the whole cache serves every
length, so a new length never captures (a first 2K request after short ones took 1.62x its
steady time on an H100, the capture beside its prefill); only a grown cache does. Elsewhere
(the torch attention path, which masks every row it reads) each bucket has its own graph.

Capturing a bucket's graph takes tens of milliseconds (the compiled step has dynamic shapes, so
it never recompiles). So that no reply waits for it, graphs are captured ahead: the loader
captures the first buckets, and when decoding nears the end of a bucket the next one is
captured on a background thread (load_engine(capture_ahead=False), DSCODER_CAPTURE_AHEAD=0 in
the CLI, turns that thread off; a missing graph is then captured when first needed, as before).
A capture's warm-up has its own inputs and writes only its bucket's last row, which no decode
step has reached yet.
"""
from __future__ import annotations

import atexit
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, wait
from functools import partial

import torch

from dscoder import shapes
from dscoder.cuda_capture import CAPTURE_LOCK  # one capture at a time, in whichever thread
from dscoder.kv_cache import LatentKVCache
from dscoder.model.transformer import Transformer
from dscoder.sampling import Sampler, SamplingParams, sample

AHEAD_ROWS = 256  # start capturing bucket b+1 when decoding is this close to the end of bucket b
# decode steps queued on the GPU ahead of the one whose token the host reads: the host's
# per-token work (detokenizing, stop strings, the consumer) runs while they do; a reply that
# stops computes at most this many steps that nobody reads
AHEAD_STEPS = 4
Report = Callable[[float, bool], None]  # (seconds, on the background thread): the profile listens


class GraphedDecoder:
    """The decode graphs of one KV cache (one per bucket); a session owns one.

    Every graph reads the same input buffers (ids, pos) and writes the same logits, so that a
    small sampling graph can follow any of them: it samples the next id on the device, writes
    it into `ids` and advances `pos`, and the next step's graph reads them without the host in
    between (run_ahead). On the CPU (tests) the same steps run eagerly in place of replays."""

    def __init__(self, model: Transformer, cache: LatentKVCache, *,
                 on_capture: Report | None = None, ahead: bool = True) -> None:
        self.model, self.cache = model, cache
        self.graphs: dict[int, Callable[[], None]] = {}  # visible rows -> replay
        self.versions: dict[int, int] = {}  # visible rows -> the model.step_version it replays
        self._retired: list[Callable[[], None]] = []  # replaced graphs, until their replays ran
        self.pending: dict[int, Future] = {}
        self.on_capture = on_capture
        self.ahead = ahead
        self.whole = model.decode_bounded_by_position()  # one graph for every position: rows()
        w = model.lm_head.weight
        self.cuda = w.is_cuda
        with torch.inference_mode():  # as the graphs' warm-up inputs are (Dynamo guards on it)
            self.ids = torch.zeros(1, dtype=torch.long, device=w.device)
            self.pos = torch.zeros(1, dtype=torch.long, device=w.device)
            self.logits = torch.zeros(1, model.cfg.vocab_size, dtype=torch.float32, device=w.device)
            self.params = SamplingParams.on(w.device)
        self.samplers: dict[bool, Callable[[], None]] = {}  # greedy? -> replay
        self.host_ids = torch.zeros(AHEAD_STEPS, dtype=torch.long, pin_memory=self.cuda)
        self.done = [torch.cuda.Event() for _ in range(AHEAD_STEPS)] if self.cuda else []

    @torch.inference_mode()
    def __call__(self, token: int, pos: int) -> torch.Tensor:
        """Logits (1, V) for `token` at `pos`; the tensor is reused by the next call."""
        self._release_retired()
        self.ids.fill_(token)
        self.pos.fill_(pos)
        self._replay(pos)
        return self.logits

    @torch.inference_mode()
    def run_ahead(self, token: int, pos: int, steps: int, sampler: Sampler) -> Iterator[int]:
        """The ids of `steps` decode steps, the first feeding `token` at `pos` and each one the
        id sampled by the one before, sampled on the device. The first AHEAD_STEPS are queued
        now; each id the caller reads queues one more, so the GPU never waits for the host."""
        self._release_retired()
        sample_step = self._sampler(sampler.greedy)
        self.params.copy_(sampler.params)
        self.ids.fill_(token)
        self.pos.fill_(pos)
        queued = min(steps, AHEAD_STEPS)
        for i in range(queued):
            self._queue(pos + i, i, sample_step)
        return self._read(pos, steps, queued, sample_step)

    def _read(self, pos: int, steps: int, queued: int, sample_step: Callable[[], None]) -> Iterator[int]:
        for i in range(steps):
            slot = i % AHEAD_STEPS
            if self.cuda:
                self.done[slot].synchronize()
            token = int(self.host_ids[slot])
            if queued < steps:  # the slot just read is free for the next step
                self._queue(pos + queued, queued, sample_step)
                queued += 1
            yield token

    @torch.inference_mode()
    def _queue(self, pos: int, i: int, sample_step: Callable[[], None]) -> None:
        """Decode at `pos` (whose id and position the step before left in ids/pos), sample the
        next id into ids, and copy it to the host ring's slot for step i."""
        self._replay(pos)
        sample_step()
        slot = i % AHEAD_STEPS
        self.host_ids[slot:slot + 1].copy_(self.ids, non_blocking=True)
        if self.cuda:
            self.done[slot].record()

    def rows(self, pos: int) -> int:
        """The cache rows that the graph of a decode step at `pos` reads (shapes.decode_rows)."""
        return shapes.decode_rows(pos, self.cache.capacity, self.whole)

    def _replay(self, pos: int) -> None:
        self.graph(self.rows(pos))()
        bucket = shapes.BUCKET
        if self.ahead and not self.whole and pos % bucket >= bucket - AHEAD_ROWS:
            self.capture_ahead([self.rows(pos + bucket)])

    def graph(self, visible: int) -> Callable[[], None]:
        """The replay for `visible` rows of the model's current decode step: captured already,
        being captured (wait), or now (also when the step changed since: a recapture)."""
        if not self.fresh(visible):
            pending = self.pending.pop(visible, None)
            if pending is not None and _failed(pending):
                self.ahead = False  # it failed in the background: capture here from now on
            self.capture(visible)  # a no-op when the background capture succeeded
        return self.graphs[visible]

    def wait(self) -> None:
        """Until the captures asked of the background thread have ended."""
        wait(list(self.pending.values()))

    def fresh(self, visible: int) -> bool:
        """Whether the graph for `visible` rows exists and replays the model's current step."""
        return self.versions.get(visible) == self.model.step_version

    def capture(self, visible: int) -> None:
        """Capture the graph for `visible` rows in this thread (waiting for any other capture)."""
        if not self.fresh(visible):
            with CAPTURE_LOCK:
                if not self.fresh(visible):
                    self._capture(visible)

    def capture_ahead(self, visibles: list[int]) -> None:
        """Capture these buckets on the background thread (or now, with capture-ahead off)."""
        for visible in visibles:
            if self.fresh(visible) or visible in self.pending:
                continue
            if not self.ahead or not self.cuda:
                self.capture(visible)
                continue
            self.pending[visible] = _WORKER.submit(self.capture, visible)

    def _decode(self, visible: int) -> None:
        self.logits.copy_(self.model.decode_at(self.ids, self.pos, self.cache, visible))

    def _release_retired(self) -> None:
        """Free replaced graphs once nothing queued can still replay them."""
        if self._retired:
            if self.cuda:
                torch.cuda.current_stream(self.ids.device).synchronize()
            self._retired.clear()

    def _install(self, visible: int, replay: Callable[[], None], version: int) -> None:
        old = self.graphs.get(visible)
        if old is not None:
            self._retired.append(old)
        self.graphs[visible], self.versions[visible] = replay, version

    def _capture(self, visible: int) -> None:
        version = self.model.step_version  # the capture lock is held: it cannot change now
        if not self.cuda:
            self._install(visible, partial(self._decode, visible), version)
            return
        t = time.perf_counter()
        device = self.model.lm_head.weight.device

        def warm_up() -> None:
            # The warm-up decodes at the bucket's last row, on the real cache: the exact shapes
            # the graph will have, so any compile happens now and never inside the capture (a
            # dynamic shape's guards cannot be foreseen from another size). That row is at or
            # beyond every row written so far (a bucket is captured before decoding reaches its
            # end), so what it gets is masked until the real step there overwrites it. Its own
            # inputs: the shared ones may be in use by the steps being decoded meanwhile.
            ids = torch.zeros(1, dtype=torch.long, device=device)
            pos = torch.full((1,), visible - 1, dtype=torch.long, device=device)
            for _ in range(2):
                self.model.decode_at(ids, pos, self.cache, visible)

        graph = capture_graph(partial(self._decode, visible), device, warm_up=warm_up)
        self._install(visible, graph.replay, version)
        if self.on_capture is not None:
            self.on_capture(time.perf_counter() - t, threading.current_thread().name == _THREAD)

    def _sampler(self, greedy: bool) -> Callable[[], None]:
        """The sampling step's replay (captured at first use): the next id from the logits
        into ids, and the position one on."""

        def step() -> None:
            self.ids.copy_(sample(self.logits, self.pos + 1, self.params, greedy))
            self.pos.add_(1)

        if greedy not in self.samplers:
            if not self.cuda:
                self.samplers[greedy] = step
            else:
                # the warm-up writes ids and pos, which steps still queued may read: it waits
                # for them (once per decoder and mode); run_ahead sets both afterwards
                device = self.ids.device
                graph = capture_graph(step, device, warm_up=step, after=torch.cuda.current_stream(device))
                self.samplers[greedy] = graph.replay
        return self.samplers[greedy]


def swap_step(model: Transformer, compiled: Callable) -> None:
    """Make `compiled` the model's decode layer. Under the capture lock, so that no capture is
    half of the old step and half of the new; graphs of the old step are then stale, and each
    decoder recaptures them when next needed (GraphedDecoder.graph)."""
    with CAPTURE_LOCK:
        model.compile_decode(compiled=compiled)


def capture_graph(fn: Callable[[], object], device: torch.device, *,
                  warm_up: Callable[[], object] | None = None, pool=None,
                  after: torch.cuda.Stream | None = None) -> torch.cuda.CUDAGraph:
    """A CUDA graph of fn(), captured on a side stream after warm_up() ran there (kernels are
    chosen and compiled outside the capture), in inference mode as decoding runs (a capture
    that records autograd history keeps every activation and weight of the step alive).
    after: a stream whose queued work the warm-up must follow (it writes what that work reads
    or writes); pool: a graph memory pool to share with other graphs.

    capture_begin/end rather than torch.cuda.graph(), whose device-wide synchronize would wait
    for a prefill running on another thread; thread_local: that thread may keep decoding and
    allocating while this one captures."""
    with CAPTURE_LOCK:
        side = _capture_stream(device)
        if after is not None:
            side.wait_stream(after)
        with torch.inference_mode(), torch.cuda.stream(side):
            if warm_up is not None:
                warm_up()
            side.synchronize()
            graph = torch.cuda.CUDAGraph()
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                fn()
            finally:
                graph.capture_end()
    return graph


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every capture and warm-up. The caching allocator keeps
    blocks per stream: graphs that share a memory pool but were captured on streams of their
    own could not reuse each other's blocks (the offloaded decoder's 27 segment graphs then
    held 0.75 GiB more, measured at 12GiB on an H100, and its budget ran out)."""
    index = torch.device(device).index
    key = index if index is not None else torch.cuda.current_device()
    if key not in _STREAMS:
        _STREAMS[key] = torch.cuda.Stream(key)
    return _STREAMS[key]


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
        CAPTURE_LOCK.acquire()  # held for good: the capture in progress ends, no other starts


_STREAMS: dict[int, torch.cuda.Stream] = {}
_THREAD = "dscoder-capture"
_WORKER = _Worker()
atexit.register(_WORKER.stop)
