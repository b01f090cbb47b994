"""Offloaded decode in CUDA-graph segments: one graph replay per MoE layer, the host in between.

Eager decode of Lite is bound by kernel launches (a thousand per token), and the expert cache
needs the host at every MoE layer (to look the routed ids up). So the step is cut at the
routers: segment j computes MoE layer j's experts from cache slots whose indices sit in a
device buffer, then everything up to and including the next MoE layer's router, and copies the
routed ids (and the guesses for later layers) into pinned host memory. Between segments the
host reads those ids, copies misses, writes the slot indices and starts prefetches.

Every tensor that crosses a segment lives in a static buffer, so the segments' graphs can share
one memory pool and be captured per attention bucket, like dscoder.graphs. On the CPU (tests)
the same segments run eagerly.
"""
from __future__ import annotations

from functools import partial

import torch

from dscoder import shapes
from dscoder.graphs import capture_graph
from dscoder.kv_cache import LatentKVCache
from dscoder.model.moe import gathered_experts
from dscoder.model.step import Step
from dscoder.model.transformer import Route


class OffloadedDecoder:
    """Decode steps of one KV cache for an offloaded model: __call__(token, pos) -> logits (1, V)."""

    def __init__(self, model, runtime, cache: LatentKVCache, ahead: int, graphs: bool) -> None:
        self.model, self.rt, self.cache = model, runtime, cache
        layers = model.model.layers
        self.moe = [i for i, layer in enumerate(layers) if hasattr(layer.mlp, "gate")]
        self.ahead = ahead
        dev = model.lm_head.weight.device
        cfg = model.cfg
        k, n = cfg.num_experts_per_tok, len(self.moe)
        self.k = k
        self.use_graphs = graphs and dev.type == "cuda"
        pin = dev.type == "cuda"
        self.ids = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.h = torch.zeros(1, cfg.hidden_size, dtype=model.lm_head.weight.dtype, device=dev)
        self.moe_in = torch.zeros_like(self.h)
        self.route_w = torch.zeros(n, k, dtype=torch.float32, device=dev)
        self.slot_ids = torch.zeros(n, k, dtype=torch.long, device=dev)
        self.slot_host = torch.zeros(n, k, dtype=torch.long, pin_memory=pin)
        self.ids_host = torch.zeros(n, k * (1 + ahead), dtype=torch.long, pin_memory=pin)
        self.logits = torch.zeros(1, cfg.vocab_size, dtype=torch.float32, device=dev)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.whole = model.decode_bounded_by_position()
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    # --- the segments: device work only, no host synchronisation --------------------------------

    @property
    def segments(self) -> int:
        """Graphs per step: one before the first MoE layer's experts, then one per MoE layer."""
        return len(self.moe) + 1

    def segment(self, j: int, visible: int) -> None:
        """j == 0: embedding up to the first MoE router; j >= 1: MoE layer moe[j-1]'s experts up
        to the next router (or the logits)."""
        layers = self.model.model.layers
        rope = self.model.rope.index_select(0, self.pos)
        step = Step.on_device(self.pos, visible)
        if j == 0:
            self.h.copy_(self.model.model.embed_tokens(self.ids))
            first = 0
        else:
            self._experts(j - 1)
            first = self.moe[j - 1] + 1
        last = self.moe[j] if j < len(self.moe) else len(layers)
        for i in range(first, last):  # dense layers between MoE layers run whole
            self.h.copy_(layers[i](self.h, rope, self.cache.layer(i), step))
        if j < len(self.moe):
            self._attend_and_route(j, rope, step)
        else:
            self.logits.copy_(self.model.lm_head(self.model.model.norm(self.h)).float())

    def _attend_and_route(self, n: int, rope: torch.Tensor, step: Step) -> None:
        layer = self.model.model.layers[self.moe[n]]
        x = layer.attend(self.h, rope, self.cache.layer(self.moe[n]), step)
        route = layer.route(x)
        self.h.copy_(x)
        self.moe_in.copy_(route.h)
        self.route_w[n].copy_(route.weights[0])
        # the later layers' routers on this layer's input: a guess at their experts, to prefetch
        later = [self.model.model.layers[m].mlp.gate(route.h)[0].reshape(-1)
                 for m in self.moe[n + 1:n + 1 + self.ahead]]
        row = torch.cat((route.ids.reshape(-1), *later))
        self.ids_host[n, : row.numel()].copy_(row, non_blocking=True)

    def _experts(self, n: int) -> None:
        layer, pool = self.model.model.layers[self.moe[n]], self.rt.cache
        route = Route(self.moe_in, self.slot_ids[n].view(1, -1), self.route_w[n].view(1, -1))
        by_slot = partial(gathered_experts, w13=pool.w13, w2=pool.w2,  # the cache's stacks
                          s13=pool.s13, s2=pool.s2)
        self.h.copy_(layer.feed_forward(self.h, route, experts=by_slot))

    # --- the host loop --------------------------------------------------------------------------

    def rows(self, pos: int) -> int:
        """The cache rows that the graphs of a decode step at `pos` read (shapes.decode_rows):
        with the MLA decode kernel one set of graphs serves every length, so a new length never
        captures the 27 segments inside a reply (they cannot be captured ahead)."""
        return shapes.decode_rows(pos, self.cache.capacity, self.whole)

    def __call__(self, token: int, pos: int) -> torch.Tensor:
        visible = self.rows(pos)
        self.ids.fill_(token)
        self.pos.fill_(pos)
        run = self._runner(visible)
        cache, k = self.rt.cache, self.k
        run(0)
        for n, layer in enumerate(self.moe):
            _sync(self.h)  # the routed ids of this layer are in ids_host now
            row = self.ids_host[n].tolist()
            flat = row[:k]
            needed = sorted(set(flat))
            slots = cache.acquire(layer, needed)
            slot_of = dict(zip(needed, slots, strict=True))
            self.slot_host[n] = torch.tensor([slot_of[e] for e in flat], dtype=torch.long)
            self.slot_ids[n].copy_(self.slot_host[n], non_blocking=True)
            cache.wait(slots)
            run(n + 1)
            cache.release(slots)
            protected = {(layer, e) for e in needed}
            for m, later in enumerate(self.moe[n + 1:n + 1 + self.ahead]):
                guess = sorted(set(row[k * (m + 1):k * (m + 2)]))
                cache.prefetch(later, guess, protected)
                protected |= {(later, e) for e in guess}
        self.rt.stats.tokens += 1
        return self.logits

    def capture(self, visible: int) -> None:
        """Capture the graphs of `visible` rows now (the loader does the first bucket's).
        In inference mode, as decoding is: the loader calls this outside it, and a capture that
        records autograd history keeps every activation and weight of the step alive through
        the static buffers' grad_fn (close() then freed nothing of it: 2.3 GiB at 24GiB)."""
        if self.use_graphs and visible not in self.graphs:
            with torch.inference_mode():  # the warm-up too, not only the capture
                self.graphs[visible] = self._capture(visible)

    def capture_ahead(self, visibles: list[int]) -> None:
        """Nothing: the segments share static buffers with the step being decoded, so they cannot
        be captured while it runs; a new bucket is captured when first needed."""

    def _runner(self, visible: int):
        if not self.use_graphs:
            return lambda j: self.segment(j, visible)
        if visible not in self.graphs:
            self.graphs[visible] = self._capture(visible)
        graphs = self.graphs[visible]
        return lambda j: graphs[j].replay()

    def _capture(self, visible: int) -> list[torch.cuda.CUDAGraph]:
        # one warm-up of every segment first (Triton compiles, cuBLAS picks kernels), after the
        # work queued so far: it writes KV row `pos` and the static buffers, which the real step
        # rewrites; then a graph per segment, all in one memory pool
        dev = self.h.device

        def warm_up() -> None:
            for _ in range(2):
                for j in range(self.segments):
                    self.segment(j, visible)

        return [capture_graph(partial(self.segment, j, visible), dev, pool=self.pool,
                              warm_up=warm_up if j == 0 else None,
                              after=torch.cuda.current_stream(dev) if j == 0 else None)
                for j in range(self.segments)]


def _sync(t: torch.Tensor) -> None:
    if t.is_cuda:
        torch.cuda.current_stream(t.device).synchronize()
