"""The engine behind the server: one generation at a time, in arrival order, on one thread.

Requests queue on a single-thread executor, so the engine (its KV cache, CUDA graphs and the
non-thread-safe parts of torch) is only ever touched by one thread, and a request whose client
left before its turn costs nothing. A disconnect sets the request's cancel event, which the
engine checks after every token.

The prefix cache: the engine keeps one live session (one KV cache, whose decode graphs are
captured once). The KV rows of other recent sequences are kept as snapshots, a copy of rows
(on the GPU, or in host memory when the model runs under a --gpu-memory budget), so that an
editor and a chat, or two chats, can take turns and each still only prefills what is new.
Switching costs a device copy of the shared rows (about 0.1 ms per 1,000 tokens of Lite on the
GPU), never a forward pass.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from dscoder.engine import common_prefix
from dscoder.events import Event, GenerationSettings

SNAPSHOTS = 4  # recent sequences kept besides the live one
SNAPSHOT_BYTES = 2 << 30  # and at most this much memory for them
MIN_SNAPSHOT_TOKENS = 16  # shorter sequences are cheaper to prefill than to keep


class PrefixCache:
    """The live session plus snapshots of recent sequences; `session_for(prompt)` makes the live
    session hold the longest cached prefix of `prompt` it can."""

    def __init__(self, engine: Any, slots: int = SNAPSHOTS, max_bytes: int = SNAPSHOT_BYTES) -> None:
        # the engine's own session when it has one: its first decode graph is captured at load
        default = getattr(engine, "default_session", None)
        self.session = default() if default is not None else engine.new_session()
        self.slots, self.max_bytes = slots, max_bytes
        self.saved: list[Any] = []  # KVSnapshot, oldest first
        # under a budget the GPU has no room to spare: snapshots go to host memory
        self.device = "cpu" if getattr(engine, "under_budget", False) else None
        self.enabled = slots > 0 and hasattr(self.session, "snapshot")

    def session_for(self, prompt: Sequence[int]) -> Any:
        session = self.session
        if not self.enabled:
            return session
        live = common_prefix(session.tokens, prompt)
        best = max(self.saved, key=lambda s: common_prefix(s.tokens, prompt), default=None)
        shared = common_prefix(best.tokens, prompt) if best is not None else 0
        if shared > live:  # a saved sequence shares more: swap it in, keep the live one
            self.saved.remove(best)
            self._keep(session.snapshot(self.device))
            session.restore(best, shared)
            if shared < len(best.tokens):  # its tail may still be wanted by its owner
                self._keep(best)
        elif live < len(session.tokens) // 2:  # the live sequence is about to be overwritten
            self._keep(session.snapshot(self.device))
        return session

    def _keep(self, snap: Any) -> None:
        if snap is None or len(snap.tokens) < MIN_SNAPSHOT_TOKENS:
            return
        self.saved.append(snap)
        while self.saved and (len(self.saved) > self.slots
                              or sum(s.nbytes for s in self.saved) > self.max_bytes):
            self.saved.pop(0)


@dataclass
class Job:
    prompt: list[int]
    settings: GenerationSettings
    stop_ids: Collection[int] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_DONE = object()


class Worker:
    """Runs jobs one at a time; `stream(job)` yields the engine's events as they come."""

    def __init__(self, engine: Any, slots: int = SNAPSHOTS) -> None:
        self.engine = engine
        self.cache = PrefixCache(engine, slots)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dscoder-engine")
        self.active = 0  # jobs queued or running (the keep-alive timer waits for zero)

    def _generate(self, job: Job, emit) -> None:
        try:
            if job.cancel.is_set():  # the client left while waiting for its turn
                return
            session = self.cache.session_for(job.prompt)
            for event in session.generate(job.prompt, job.settings, stop_ids=job.stop_ids,
                                          cancel=job.cancel):
                emit(event)
        except BaseException as e:  # noqa: BLE001  (handed to the request, which answers it)
            emit(_Failed(e))
        finally:
            emit(_DONE)

    async def stream(self, job: Job) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        self.active += 1
        # jobs run in submission order; this one starts when the one before it has finished
        self._executor.submit(self._generate, job, emit)
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, _Failed):
                    raise item.error
                yield item
        finally:
            job.cancel.set()  # a disconnect or an error: the engine stops within one token
            self.active -= 1

    def warm_up(self, prompt: list[int]) -> None:
        """One short generation on the engine's thread before the first request: the decode step
        compiles and its first graphs are captured now, not inside a client's reply."""
        def run() -> None:
            session = self.cache.session
            for _ in session.generate(prompt, GenerationSettings(max_tokens=4, temperature=0.0),
                                      stop_ids=()):
                pass
            session.reset()

        self._executor.submit(run).result()

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
