"""Generation: prefill, then decode token by token, yielding events.

The engine works on token ids; prompts are built by dscoder.prompts. A Session keeps the KV
cache between calls, so a chat turn only computes the tokens its prompt does not share with
the previous one.
"""
from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dscoder import page_lock, shapes
from dscoder.config import ModelConfig
from dscoder.decode_loop import plan_request, run_generation, stepwise
from dscoder.errors import UsageError
from dscoder.events import Event, GenerationSettings
from dscoder.graphs import GraphedDecoder, swap_step
from dscoder.kv_cache import LatentKVCache
from dscoder.model.transformer import Transformer
from dscoder.profile import StartupProfile
from dscoder.sampling import Sampler
from dscoder.tokenizer import Tokenizer
from dscoder.warmup import Precompile

if TYPE_CHECKING:
    from dscoder.offload.decoder import OffloadedDecoder

# Until the engine decodes with the compiled step, a reply's decode rounds are at most this many
# steps (a round ends by draining the few steps queued ahead: about a step's time lost per
# round), so that a long reply starts the compile and switches to it soon after it is ready.
SWITCH_ROUND = 128
# The compile starts after the first reply, or once a reply has this many tokens: a one-shot
# command with a short answer never pays for it (its imports and tracing hold the GIL, which
# slowed that answer's decoding by a quarter), a long answer or a session soon gets the fused step.
LONG_REPLY = 256


@dataclass
class Engine:
    model: Transformer
    tokenizer: Tokenizer
    config: ModelConfig
    context_length: int
    defaults: GenerationSettings = field(default_factory=GenerationSettings)
    model_dir: Path | None = None
    use_graphs: bool = False  # decode from CUDA graphs (the model is resident on a GPU)
    budget_plan: object | None = None  # the --gpu-memory plan it was loaded under (None: no budget)
    startup_profile: StartupProfile | None = None  # where loading's time went (--verbose)
    capture_ahead: bool = True  # capture the next length bucket's graph in the background
    compile_step: Callable[[], Precompile] | None = None  # starts the compile (start_compile)
    precompile: Precompile | None = None  # the decode step compiling in the background
    compile_error: BaseException | None = None  # why the background compile failed, if it did
    _session: Session | None = None
    _sessions: weakref.WeakSet = field(default_factory=weakref.WeakSet, repr=False)
    closed: bool = False

    @property
    def under_budget(self) -> bool:
        """Loaded under --gpu-memory: the GPU has no room to spare (the server keeps its copies
        of other conversations' KV rows in host memory then)."""
        return self.budget_plan is not None

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    def new_session(self) -> Session:
        if self.closed:
            raise UsageError("The engine was closed; load a new one to generate.")
        return Session(self)

    def close(self) -> None:
        """Free what the engine holds on the GPU and in pinned host memory: weights, KV caches,
        CUDA graphs, the expert cache and the host copy of the experts (`del engine` alone leaves
        them to references held elsewhere). The engine cannot generate afterwards."""
        if self.closed:
            return
        self.closed = True
        self.compile_step = None
        if self.precompile is not None:  # its thread runs the model's layers: let it end first
            self.precompile.result(wait=True)
            self.precompile = None
        for session in list(self._sessions):
            session.close()
        self._session = None
        from dscoder.loader import release_model

        release_model(self.model, self.device, uncap=self.budget_plan is not None)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, prompt_ids: Sequence[int], settings: GenerationSettings | None = None, *,
                 stop_ids: Collection[int] | None = None,
                 cancel: threading.Event | None = None) -> Iterator[Event]:
        """One generation; consecutive calls share a cache, so a common prefix is reused."""
        return self.default_session().generate(prompt_ids, settings, stop_ids=stop_ids, cancel=cancel)

    @property
    def step_pending(self) -> bool:
        """Whether a compiled decode step is yet to be started or switched to."""
        return self.compile_step is not None or self.precompile is not None

    def start_compile(self) -> None:
        """Start compiling the decode step in the background, unless it started already."""
        if self.compile_step is not None:
            start, self.compile_step = self.compile_step, None
            self.precompile = start()

    def use_compiled_step(self, wait: bool = False) -> bool:
        """Decode with the compiled step from now on if it is ready (or start the compile and
        wait for it, with `wait`); whether the engine decodes with it. A failed compile leaves
        the uncompiled step."""
        if wait:
            self.start_compile()
        pre = self.precompile
        if pre is not None:
            compiled = pre.result(wait)
            if compiled is None and not pre.done.is_set():
                return False
            self.precompile = None
            if compiled is not None:
                swap_step(self.model, compiled)
            else:
                self.compile_error = pre.error
        return self.model._compiled_layer is not None

    def prepare(self) -> None:
        """Allocate the default session's cache and capture its first decode graph (at load)."""
        self.default_session().prepare_decode(0, wait=True)

    def default_session(self) -> Session:
        """The session generate() uses; the loader captured its first decode graph already."""
        if self._session is None or self.closed:
            self._session = self.new_session()
        return self._session


@dataclass(frozen=True)
class KVSnapshot:
    """Cached rows of a sequence, kept outside its session (the server's prefix cache)."""

    tokens: tuple[int, ...]
    rows: torch.Tensor  # (layers, len(tokens), kv dim)

    @property
    def nbytes(self) -> int:
        return self.rows.numel() * self.rows.element_size()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Session:
    """A conversation's KV cache and the token ids it holds."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.tokens: list[int] = []  # ids whose keys and values are in the cache, in order
        self._cache: LatentKVCache | None = None
        self._graphs: GraphedDecoder | OffloadedDecoder | None = None  # captured for self._cache
        engine._sessions.add(self)  # so that Engine.close() frees its cache and graphs

    def close(self) -> None:
        if self._graphs is not None and hasattr(self._graphs, "wait"):
            self._graphs.wait()  # a capture in the background must not outlive the weights
        self.tokens = []
        self._cache = None
        self._graphs = None

    def reset(self) -> None:
        self.tokens = []

    def snapshot(self, device: torch.device | str | None = None) -> KVSnapshot | None:
        """A copy of the cached rows and their ids (None when nothing is cached), so that another
        conversation can use this session and this one can come back without a prefill."""
        n = len(self.tokens)
        if self._cache is None or n == 0:
            return None
        rows = self._cache.data[:, :n].to(device or self._cache.data.device, copy=True)
        return KVSnapshot(tuple(self.tokens), rows)

    def restore(self, snap: KVSnapshot, n: int) -> None:
        """Make the cache hold the first n ids of `snap` (a copy of rows, no forward pass)."""
        n = min(n, len(snap.tokens))
        self.tokens = []  # the rows now cached are given up: growing the cache need not copy them
        cache = self._ensure_capacity(n)
        cache.data[:, :n].copy_(snap.rows[:, :n], non_blocking=True)
        self.tokens = list(snap.tokens[:n])

    def _ensure_capacity(self, n: int) -> LatentKVCache:
        cache = self._cache
        if cache is None or cache.capacity < n:
            size = shapes.cache_capacity(n, cache.capacity if cache else 0, self.engine.context_length)
            grown = self.engine.model.new_cache(size)
            if cache is not None:
                grown.data[:, : len(self.tokens)] = cache.data[:, : len(self.tokens)]
            self._cache = cache = grown
            self._graphs = make_decoder(self.engine, grown) if self.engine.use_graphs else None
        return cache

    def decoder(self, pos: int) -> GraphedDecoder | OffloadedDecoder | None:
        """The graph-replayed decoder of a step at `pos`, the cache grown to hold it (None
        without graphs)."""
        self._ensure_capacity(pos + 1)
        return self._graphs

    def prepare_decode(self, pos: int, wait: bool = False) -> None:
        """Make room for a decode step at `pos` and have its graph captured: now (`wait`), or
        on the background thread while the prompt is prefilled."""
        graphs = self.decoder(pos)
        if graphs is not None:
            visible = graphs.rows(pos)
            graphs.capture(visible) if wait else graphs.capture_ahead([visible])

    def _forward(self, ids: Sequence[int]) -> torch.Tensor:
        """Append ids to the cache; logits (1, V) of the last one. self.tokens moves only on success."""
        engine, start = self.engine, len(self.tokens)
        cache = self._ensure_capacity(start + len(ids))
        with torch.inference_mode():
            if len(ids) == 1 and self._graphs is not None and engine.use_graphs:
                logits = self._graphs(ids[0], start)
            else:
                x = torch.tensor(ids, dtype=torch.long, device=engine.device)
                logits = engine.model(x, cache, start)
        self.tokens.extend(ids)
        return logits

    def _prefill(self, ids: Sequence[int]) -> torch.Tensor:
        if self.engine.model.offload is not None and len(ids) > shapes.PREFILL_CHUNK:
            return self._prefill_by_layer(ids)
        logits = None
        chunk = shapes.PREFILL_CHUNK
        for i in range(0, len(ids), chunk):
            logits = self._forward(ids[i:i + chunk])
        assert logits is not None
        return logits

    def _prefill_by_layer(self, ids: Sequence[int]) -> torch.Tensor:
        # Offloaded experts cross PCIe once per layer per call: a long prompt goes layer by layer
        # over up to LAYER_MAJOR_TOKENS tokens at a time, not one pass over the experts per chunk.
        logits, span = None, shapes.LAYER_MAJOR_TOKENS
        for i in range(0, len(ids), span):
            part = ids[i:i + span]
            start = len(self.tokens)
            cache = self._ensure_capacity(start + len(part))
            x = torch.tensor(part, dtype=torch.long, device=self.engine.device)
            with torch.inference_mode():
                logits = self.engine.model.prefill_by_layer(x, cache, start, shapes.PREFILL_CHUNK)
            self.tokens.extend(part)
        assert logits is not None
        return logits

    def generate(self, prompt_ids: Sequence[int], settings: GenerationSettings | None = None, *,
                 stop_ids: Collection[int] | None = None,
                 cancel: threading.Event | None = None) -> Iterator[Event]:
        engine = self.engine
        if engine.closed:
            raise UsageError("The engine was closed; load a new one to generate.")
        settings = settings or engine.defaults
        prompt, stops, budget = plan_request(
            prompt_ids, settings, engine.context_length,
            stop_ids if stop_ids is not None else (engine.config.eos_token_id,))
        return self._run(prompt, settings, stops, budget, cancel)

    def _run(self, prompt: list[int], settings: GenerationSettings, stop_ids: frozenset[int],
             budget: int, cancel: threading.Event | None) -> Iterator[Event]:
        engine = self.engine
        reused = common_prefix(self.tokens, prompt)
        reused = min(reused, len(prompt) - 1)  # the last prompt token must run to give logits
        del self.tokens[reused:]
        if budget > 1:  # the first decode step's graph, captured while the prompt prefills
            self.prepare_decode(len(prompt))
        before = engine_stats(engine.model)
        profile = engine.startup_profile

        def first_prefill(seconds: float) -> None:
            if profile is not None and "first prefill" not in profile.seconds:
                profile.add("first prefill", seconds)

        try:
            yield from run_generation(
                lambda: self._prefill(prompt[reused:]), self._decode, tokenizer=engine.tokenizer,
                settings=settings, device=engine.device, stop_ids=stop_ids, budget=budget,
                cancel=cancel, prompt_tokens=len(prompt), cached_tokens=reused,
                stats=lambda: engine_stats(engine.model, before), on_prefill=first_prefill)
        finally:
            engine.start_compile()  # after the first reply (a no-op later)
            # the shards the load copied from, still page-locked (page_lock.close_later)
            page_lock.unlock_deferred(background=True)

    def _decode(self, logits: torch.Tensor, sampler: Sampler, pos: int, limit: int) -> Iterator[int]:
        """The generation's ids (decode_loop.Decode): sampled on the device a few steps ahead
        from CUDA graphs, else one step at a time."""
        if self.engine.use_graphs and isinstance(self._graphs, GraphedDecoder):
            return self._decode_ahead(logits, sampler, pos, limit)
        return stepwise(lambda token: self._forward([token]))(logits, sampler, pos, limit)

    def _decode_ahead(self, logits: torch.Tensor, sampler: Sampler, pos: int, limit: int) -> Iterator[int]:
        engine = self.engine
        token = int(sampler(logits, pos))
        made = 1
        while True:
            steps = min(limit - made, self._room(pos)) if made < limit else 0
            if engine.step_pending:
                if made >= LONG_REPLY:
                    engine.start_compile()
                if not engine.use_compiled_step():
                    steps = min(steps, SWITCH_ROUND)
            if steps <= 0:
                yield token
                return
            # queue the steps first, so the GPU works while the caller takes this token
            ids = self._graphs.run_ahead(token, pos, steps, sampler)
            yield token
            for i, nxt in enumerate(ids):
                self.tokens.append(token)  # its row is written: nxt was sampled after it
                token, pos, made = nxt, pos + 1, made + 1
                if i < steps - 1:
                    yield token
            # the cache is full (or the budget spent): this round's last id is yielded by the
            # next round, once the cache has grown and that round's steps are queued

    def _room(self, pos: int) -> int:
        """Rows the cache can take from `pos` on, growing it first when it is full."""
        return self._ensure_capacity(pos + 1).capacity - pos


def make_decoder(engine: Engine, cache: LatentKVCache):
    """Graph-replayed decode for a cache: whole steps, or per-MoE-layer segments when offloaded."""
    model, profile = engine.model, engine.startup_profile
    if model.offload is not None:
        return model.offload.decoder(model, cache)
    return GraphedDecoder(model, cache, ahead=engine.capture_ahead,
                          on_capture=profile.capture_reporter() if profile else None)


def engine_stats(model: Transformer, before: dict | None = None) -> dict:
    """Expert-offload counters (hit rate, bytes copied...), of this generation when given `before`."""
    if model.offload is None:
        return {}
    from dscoder.offload.setup import offload_stats
    from dscoder.offload.stats import delta

    now = offload_stats(model)
    return delta(now, before) if before is not None else now


from dscoder.loader import load_engine  # noqa: E402  (the public entry point lives beside Engine)

__all__ = ["Engine", "KVSnapshot", "Session", "load_engine"]
