"""Routed experts in host memory, a GPU cache of expert slots, and the planner that sizes it.

planner.py   sizes and the memory plan for a --gpu-memory budget (pure Python)
policy.py    eviction policies and the slot table they drive (pure Python, shared with replay)
host_store.py  one pinned host copy of every routed expert
device_cache.py  the GPU pool of expert slots, copy stream and events
experts.py   the drop-in for MoE.experts: cached decode, streamed prefill, next-layer prefetch
decoder.py   decode as CUDA-graph segments, one per MoE layer, cache lookups in between
trace.py     routing traces: record, replay through policies, compare hit rates
setup.py     load a checkpoint under a budget and install all of the above
"""
