"""The offloaded stand-in for MoE.experts: same forward(x, ids, weights), experts from the cache.

Decode-sized calls look their experts up in the GPU cache (copying misses on the copy stream)
and, before computing, start copies for the next layer's likely experts: that layer's router
applied to this layer's input predicts most of them. Prefill-sized calls stream the missing
experts through two staging buffers, so a long prompt costs one pass over the experts.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dscoder.model.moe import GATHER_PAIRS, ExpertGroups, gathered_experts
from dscoder.offload.decoder import OffloadedDecoder
from dscoder.offload.device_cache import CopyEngine, ExpertCache
from dscoder.offload.host_store import HostExpertStore
from dscoder.offload.policy import should_stream
from dscoder.offload.stats import OffloadStats

PREDICT_TOKENS = 4  # predict the next layer's experts only for decode-sized calls


@dataclass
class OffloadRuntime:
    store: HostExpertStore
    cache: ExpertCache
    copier: CopyEngine
    stats: OffloadStats
    staging_w13: torch.Tensor  # (2, chunk, 2I, H): two prefill buffers
    staging_w2: torch.Tensor  # (2, chunk, H, I)
    first_layer: int
    policy: str = "lru"
    prefetch_depth: int = 1
    staging_s13: torch.Tensor | None = None  # (2, chunk, 2I): scales of int8 experts
    staging_s2: torch.Tensor | None = None  # (2, chunk, H)

    def decoder(self, model: nn.Module, cache) -> OffloadedDecoder:
        """Graph-replayed decode segments for one KV cache (see dscoder.offload.decoder)."""
        return OffloadedDecoder(model, self, cache, self.prefetch_depth, graphs=True)

    def __post_init__(self) -> None:
        self.staging_ready: list = [None, None]
        self.staging_free: list = [None, None]

    @property
    def stream_chunk(self) -> int:
        return self.staging_w13.shape[1]

    def staged(self, buf: int, n: int) -> list[torch.Tensor]:
        """Staging buffer `buf`'s n-th expert, in the order of HostExpertStore.expert."""
        parts = (self.staging_w13, self.staging_w2, self.staging_s13, self.staging_s2)
        return [t[buf, n] for t in parts if t is not None]


class OffloadedExperts(nn.Module):
    def __init__(self, runtime: OffloadRuntime, layer: int,
                 ahead: Sequence[tuple[int, nn.Module]] = ()) -> None:
        """ahead: (layer, router) of the next MoE layers whose experts this layer prefetches."""
        super().__init__()
        self.runtime, self.layer = runtime, layer
        self._ahead = tuple(ahead)  # a tuple: the routers are not registered a second time

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        rt, t = self.runtime, x.shape[0]
        if self.layer == rt.first_layer:
            rt.stats.tokens += t
        flat, predicted = self._route_on_host(x, ids)
        needed = sorted(set(flat))
        if should_stream(t, len(needed), rt.cache.slots):
            return self._streamed(x, ids, weights, flat, needed)
        cache = rt.cache
        slots = cache.acquire(self.layer, needed)
        cache.wait(slots)
        out = self._cached(x, ids, weights, flat, dict(zip(needed, slots, strict=True)))
        cache.release(slots)
        # queue this layer's compute first, then the Python work of prefetching runs beside it
        protected = {(self.layer, e) for e in needed}
        for layer, experts in predicted:  # nearest layer first: its copies are needed soonest
            cache.prefetch(layer, experts, protected)
            protected |= {(layer, e) for e in experts}
        return out

    def _route_on_host(self, x: torch.Tensor,
                       ids: torch.Tensor) -> tuple[list[int], list[tuple[int, list[int]]]]:
        """This layer's expert ids and later layers' predicted ones, in one device sync: their
        routers applied to this layer's input guess most of what they will pick."""
        n = ids.numel()
        if not self._ahead or x.shape[0] > PREDICT_TOKENS:
            return ids.reshape(-1).tolist(), []
        guesses = [router(x)[0].reshape(-1) for _, router in self._ahead]
        both = torch.cat((ids.reshape(-1), *guesses)).tolist()
        m = guesses[0].numel()
        predicted = [(layer, sorted(set(both[n + j * m:n + (j + 1) * m])))
                     for j, (layer, _) in enumerate(self._ahead)]
        return both[:n], predicted

    def _cached(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, flat: list[int],
                slot_of: dict[int, int]) -> torch.Tensor:
        cache = self.runtime.cache
        t, k = ids.shape
        if t * k <= GATHER_PAIRS:  # the cache's stacks, indexed by slot instead of expert id
            sl = torch.tensor([slot_of[e] for e in flat], dtype=torch.long).to(x.device, non_blocking=True)
            return gathered_experts(x, sl.view(t, k), weights, cache.w13, cache.w2, cache.s13, cache.s2)
        groups = ExpertGroups(x, ids, weights, flat)
        for e in sorted(slot_of):
            s = slot_of[e]
            groups.apply(e, *cache.parts(s))
        return groups.result()

    def _streamed(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, flat: list[int],
                  needed: list[int]) -> torch.Tensor:
        rt, cache = self.runtime, self.runtime.cache
        groups = ExpertGroups(x, ids, weights, flat)
        hits = [e for e in needed if (self.layer, e) in cache]
        misses = [e for e in needed if (self.layer, e) not in cache]
        rt.stats.hits += len(hits)
        rt.stats.misses += len(misses)
        b = rt.stream_chunk
        chunks = [misses[i:i + b] for i in range(0, len(misses), b)]
        for j in range(min(2, len(chunks))):
            self._stage(j, chunks[j])
        slots = [cache.table.get((self.layer, e)) for e in hits]
        cache.wait(slots)  # type: ignore[arg-type]
        for e, s in zip(hits, slots, strict=True):
            groups.apply(e, *cache.parts(s))
        cache.release(slots)  # type: ignore[arg-type]
        for j, chunk in enumerate(chunks):
            buf = j % 2
            rt.copier.wait([rt.staging_ready[buf]])
            for n, e in enumerate(chunk):
                groups.apply(e, *rt.staged(buf, n))
            rt.staging_free[buf] = rt.copier.mark()
            if j + 2 < len(chunks):
                self._stage(j + 2, chunks[j + 2])
        return groups.result()

    def _stage(self, j: int, chunk: Sequence[int]) -> None:
        """Copy a chunk of experts into staging buffer j % 2 once its previous chunk is computed."""
        rt, buf = self.runtime, j % 2
        store = rt.store
        pairs = []
        for n, e in enumerate(chunk):
            pairs += list(zip(rt.staged(buf, n), store.expert(self.layer, e), strict=True))
        rt.staging_ready[buf] = rt.copier.copy(pairs, after=[rt.staging_free[buf]])

