"""Decode steps replayed from CUDA graphs.

A decode step of Lite launches about a thousand small kernels; at batch 1 launching them costs
more than running them. A graph captured once replays the whole step with one launch. Shapes
must not change between replays, so the position lives in device memory and attention reads a
fixed number of cache rows (the context rounded up to a bucket), masking those not yet written.
"""
from __future__ import annotations

import math

import torch

from dscoder.kv_cache import LatentKVCache
from dscoder.model.transformer import Transformer

BUCKET = 1024  # cache rows per bucket: at most this many rows read beyond the context per step


class GraphedDecoder:
    """The decode graphs of one KV cache (one per bucket); a session owns one."""

    def __init__(self, model: Transformer, cache: LatentKVCache) -> None:
        device = model.lm_head.weight.device
        self.model, self.cache = model, cache
        self.ids = torch.zeros(1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def __call__(self, token: int, pos: int) -> torch.Tensor:
        """Logits (1, V) for `token` at `pos`; the tensor is reused by the next call."""
        visible = min(math.ceil((pos + 1) / BUCKET) * BUCKET, self.cache.capacity)
        self.ids.fill_(token)
        self.pos.fill_(pos)
        if visible not in self.graphs:
            self.graphs[visible] = self._capture(self.cache, visible)
        graph, out = self.graphs[visible]
        graph.replay()
        return out

    def _capture(self, cache: LatentKVCache, visible: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm up on a side stream first (Triton compiles, cuBLAS picks kernels), as capture
        # requires. Warm-up writes cache row `pos`, which the real step overwrites anyway.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.model.decode_at(self.ids, self.pos, cache, visible)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.model.decode_at(self.ids, self.pos, cache, visible)
        return graph, out
