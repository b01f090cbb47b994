"""The engine's work shapes, in one place: the prefill chunk, the layer-major prefill span, the
KV cache's first size and the decode graphs' length bucket.

The engine works with these shapes and the --gpu-memory planner sizes its buffers for them, so
both read them from here. Pure Python (no torch): the planner imports it without a GPU stack.
Code that must see a test's monkeypatch reads them as `shapes.NAME` at call time.
"""
from __future__ import annotations

import math

PREFILL_CHUNK = 4096  # tokens per prefill forward: bounds activation memory on long prompts
# offloaded models prefill this many tokens layer by layer (bounds the extra activations: the
# hidden states of these tokens, about 0.3 GB for Lite, on top of one chunk's work)
LAYER_MAJOR_TOKENS = 16384
# the KV cache starts this long and doubles as a conversation grows. Each growth captures the
# grown cache's decode graph beside the prefill that needed it (1.17-1.30x that request's steady
# time at 8K on an H100 when the cache started at 4,096 rows); 16,384 rows (Lite: 0.5 GB) keep
# prompts up to 16K from growing it. The --gpu-memory planner counts the same doubling.
FIRST_CAPACITY = 16384
# cache rows per decode bucket: a decode step reads its context rounded up to this, so its
# graph's shapes stay fixed for BUCKET steps (planned context windows are multiples of it too)
BUCKET = 1024


def bucket_rows(pos: int, capacity: int) -> int:
    """The cache rows a decode step at `pos` reads: pos + 1 rounded up to a bucket."""
    return min(math.ceil((pos + 1) / BUCKET) * BUCKET, capacity)


def cache_capacity(needed: int, current: int, context: int, first: int | None = None) -> int:
    """The KV cache's size once it holds `needed` rows, from `current` rows (0: no cache yet):
    FIRST_CAPACITY (or `first`) to begin with, doubling, at most the context window."""
    size = max(first or FIRST_CAPACITY, current * 2)
    while size < needed:
        size *= 2
    return min(size, context)


def decode_rows(pos: int, capacity: int, whole: bool) -> int:
    """The cache rows a decode graph for `pos` reads: the whole cache when the step's attention
    stops at the device position itself (one graph for every length), else pos's bucket."""
    return capacity if whole else bucket_rows(pos, capacity)
