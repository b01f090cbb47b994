"""Expert offloading on the CPU: sizes, planner, policies, the slot cache, replay, and the
offloaded model computing the same function as the resident one (a simulated GPU budget)."""
from __future__ import annotations

import pytest
import torch

from dscoder.errors import OutOfMemory, UsageError
from dscoder.offload.planner import (
    CUDA_CONTEXT_BYTES,
    DEFAULT_OFFLOAD_CONTEXT,
    STREAM_CHUNK,
    budget_for_slots,
    kv_peak_bytes,
    plan_for_device,
    plan_memory,
    work_bytes,
)
from dscoder.offload.policy import LFU, LRU, LayerQuota, NoSlot, SlotTable
from dscoder.offload.sizes import parse_size

GiB = 1 << 30


@pytest.mark.parametrize("text,n", [("12GiB", 12 * GiB), ("24GB", 24 * 10**9), ("12G", 12 * GiB),
                                    ("512 MiB", 512 << 20), ("1.5gib", int(1.5 * GiB)), ("1000", 1000)])
def test_parse_size(text, n):
    assert parse_size(text) == n


def test_parse_size_rejects_nonsense():
    with pytest.raises(UsageError, match="12GiB"):
        parse_size("twelve gigs")


# --- planner ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lite_sizes():
    from dscoder.config import ModelConfig
    from dscoder.offload.setup import model_sizes
    from dscoder.random_checkpoint import LITE

    return model_sizes(ModelConfig.from_dict(LITE), torch.bfloat16)


def test_lite_sizes_match_the_design(lite_sizes):
    assert lite_sizes.expert_bytes == 3 * 2048 * 1408 * 2  # 17.3 MB
    assert lite_sizes.total_experts == 26 * 64
    assert 2.4e9 < lite_sizes.resident_bytes < 2.9e9  # "everything else 1.3 B params (2.6 GB)"
    assert lite_sizes.kv_bytes_per_token == 27 * 576 * 2


def test_whole_model_fits_large_budget(lite_sizes):
    plan = plan_for_device(lite_sizes, 80 * GiB, 163840, cuda=True)
    assert plan.resident and plan.slots == 0 and plan.context == 163840
    assert "nothing offloaded" in plan.describe()[0] and plan.window_notice() is None


def test_budgets_of_the_issue(lite_sizes):
    p24 = plan_for_device(lite_sizes, 24 * GiB, 163840, cuda=True)
    p12 = plan_for_device(lite_sizes, 12 * GiB, 163840, cuda=True)
    assert not p24.resident and not p12.resident
    # the window is the longest the budget allows (never below the old 8192), and said
    assert p24.context > p12.context > DEFAULT_OFFLOAD_CONTEXT
    assert f"Context window {p12.context} tokens" in p12.window_notice()
    assert "163840" in p12.window_notice()
    assert 0.55 < p24.slots / p24.total_experts < 0.85
    assert 0.15 < p12.slots / p12.total_experts < 0.35
    for p in (p24, p12):
        assert p.used_bytes <= p.budget and p.overhead_bytes == CUDA_CONTEXT_BYTES
        assert p.allocator_bytes == p.budget - CUDA_CONTEXT_BYTES
        assert p.host_bytes == lite_sizes.all_experts_bytes
    assert "expert cache" in p12.describe()[1] and "CUDA context" in p12.describe()[0]


def test_the_cuda_context_is_inside_the_budget(lite_sizes):
    without = plan_memory(lite_sizes, 12 * GiB, 8192, context_fixed=True, fused=True)
    within = plan_memory(lite_sizes, 12 * GiB, 8192, context_fixed=True, fused=True,
                         overhead=CUDA_CONTEXT_BYTES)
    assert within.used_bytes <= within.budget
    assert without.slots - within.slots == CUDA_CONTEXT_BYTES // lite_sizes.expert_bytes + (
        1 if CUDA_CONTEXT_BYTES % lite_sizes.expert_bytes > without.budget - without.used_bytes else 0)


def test_window_grows_with_the_budget_and_stops_at_the_model(lite_sizes):
    for budgets in ((12, 16, 24, 28), (34, 40, 48)):  # offloaded, then resident
        plans = [plan_for_device(lite_sizes, b * GiB, 163840, cuda=True) for b in budgets]
        assert len({p.resident for p in plans}) == 1
        windows = [p.context for p in plans]
        assert windows == sorted(windows) and len(set(windows)) == len(windows)
    assert windows[-1] == 163840
    # a budget that holds the model with a shorter window keeps it resident rather than offload
    p40 = plan_for_device(lite_sizes, 40 * GiB, 163840, cuda=True)
    assert p40.resident and DEFAULT_OFFLOAD_CONTEXT <= p40.context < 163840
    assert "offloading experts" in p40.window_notice()


def test_kv_peak_counts_the_last_growth_step():
    from dscoder.offload.planner import ModelSizes

    s = ModelSizes(0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2)  # one byte per token
    assert kv_peak_bytes(s, 4096, first_capacity=4096) == 4096  # never grows
    assert kv_peak_bytes(s, 8192, first_capacity=4096) == 8192 + 4096
    assert kv_peak_bytes(s, 40000, first_capacity=4096) == 40000 + 32768  # 4K, 8K, 16K, 32K, 40000
    assert kv_peak_bytes(s, 16384) == 16384  # the engine's first size: never grows
    assert kv_peak_bytes(s, 40000) == 40000 + 32768  # 16K, 32K, then 40000


def test_planner_shapes_are_the_engines():
    # one definition (dscoder.shapes): the engine and the decoders hold no copy of their own
    import dscoder.engine as engine
    import dscoder.graphs as graphs
    import dscoder.offload.decoder as decoder
    import dscoder.offload.planner as planner
    from dscoder import shapes

    assert planner.PREFILL_CHUNK == shapes.PREFILL_CHUNK
    assert planner.LAYER_MAJOR_TOKENS == shapes.LAYER_MAJOR_TOKENS
    assert planner.WINDOW_STEP == shapes.BUCKET
    assert "FIRST_CAPACITY" not in vars(planner)  # the growth rule is shapes.cache_capacity's
    for module in (engine, graphs, decoder):
        assert not {"PREFILL_CHUNK", "LAYER_MAJOR_TOKENS", "FIRST_CAPACITY", "BUCKET"} & set(vars(module))


@pytest.mark.parametrize("cuda", [False, True])
def test_budget_for_slots_inverts_the_plan(lite_sizes, cuda):
    budget = budget_for_slots(lite_sizes, 100, 8192, cuda=cuda)
    assert plan_for_device(lite_sizes, budget, 8192, cuda=cuda, context_fixed=True).slots == 100
    assert plan_for_device(lite_sizes, budget - 2 * lite_sizes.expert_bytes, 8192, cuda=cuda,
                           context_fixed=True).slots < 100


def test_plan_accounts_every_byte(lite_sizes):
    p = plan_memory(lite_sizes, 12 * GiB, 4096, context_fixed=True)
    assert p.kv_bytes == kv_peak_bytes(lite_sizes, 4096) == 4096 * 27 * 576 * 2
    assert p.work_bytes == work_bytes(lite_sizes, 4096, layer_major=True)
    assert p.staging_bytes == 2 * STREAM_CHUNK * lite_sizes.expert_bytes
    assert p.budget - p.used_bytes < lite_sizes.expert_bytes  # the rest is expert slots


def test_too_small_budget_says_what_fits(lite_sizes):
    with pytest.raises(OutOfMemory, match=r"too small.*use --gpu-memory \d+\.\d+ GiB or more"):
        plan_memory(lite_sizes, 2 * GiB, 163840)
    with pytest.raises(OutOfMemory, match="does not even hold the CUDA context"):
        plan_for_device(lite_sizes, 512 << 20, 163840, cuda=True)


def test_fixed_context_is_kept_or_refused(lite_sizes):
    p = plan_memory(lite_sizes, 24 * GiB, 32768, context_fixed=True)
    assert p.context == 32768
    with pytest.raises(OutOfMemory, match="shorter --context-length"):
        plan_memory(lite_sizes, 6 * GiB, 163840, context_fixed=True)


def test_too_little_host_memory(lite_sizes):
    with pytest.raises(OutOfMemory, match="host memory"):
        plan_memory(lite_sizes, 12 * GiB, 4096, host_available=16 * GiB)


# --- policies and the slot table -------------------------------------------------------------

def test_lru_evicts_least_recent_and_spares_protected():
    t = SlotTable(3, LRU())
    for e in (0, 1, 2):
        t.assign((1, e), set())
    assert t.get((1, 0)) == 0  # 0 is now the most recent
    slot, evicted = t.assign((1, 3), set())
    assert evicted == (1, 1) and slot == 1
    slot, evicted = t.assign((1, 4), {(1, 2)})  # 2 is oldest but protected
    assert evicted == (1, 0)
    with pytest.raises(NoSlot):
        t.assign((1, 5), {(1, 2), (1, 3), (1, 4)})


def test_lfu_keeps_the_popular_expert():
    t = SlotTable(2, LFU())
    t.assign((1, 0), set())
    for _ in range(5):
        t.get((1, 0))
    t.assign((1, 1), set())
    _, evicted = t.assign((1, 2), set())
    assert evicted == (1, 1)  # once-used loses to five-times-used, although more recent
    _, evicted = t.assign((1, 1), set())
    assert evicted == (1, 2)  # a tie in counts goes to the least recent


def test_layer_quota_evicts_within_the_layer():
    t = SlotTable(4, LayerQuota(4, [1, 2], LRU))
    for key in [(1, 0), (1, 1), (2, 0), (2, 1)]:
        t.assign(key, set())
    _, evicted = t.assign((2, 2), set())
    assert evicted == (2, 0)  # layer 1's older experts are safe from layer 2's misses


# --- the cache on the CPU --------------------------------------------------------------------

def small_cache(slots: int, policy=None):
    from dscoder.offload.device_cache import CopyEngine, ExpertCache
    from dscoder.offload.host_store import HostExpertStore
    from dscoder.offload.stats import OffloadStats

    g = torch.Generator().manual_seed(0)
    store = HostExpertStore({1: torch.randn(4, 6, 5, generator=g), 2: torch.randn(4, 6, 5, generator=g)},
                            {1: torch.randn(4, 5, 3, generator=g), 2: torch.randn(4, 5, 3, generator=g)})
    stats = OffloadStats()
    cache = ExpertCache(store, slots, torch.device("cpu"), policy or LRU(), stats,
                        CopyEngine(torch.device("cpu"), stats))
    return store, cache, stats


def test_cache_hits_misses_eviction_and_contents():
    store, cache, stats = small_cache(3)
    slots = cache.acquire(1, [0, 2])
    assert (stats.hits, stats.misses) == (0, 2)
    assert stats.bytes_copied == 2 * store.expert_bytes
    cache.acquire(1, [2, 3])
    assert (stats.hits, stats.misses) == (1, 3)
    cache.acquire(2, [1])  # evicts (1, 0), the least recent
    assert (1, 0) not in cache and (1, 2) in cache
    s = cache.table.slot_of[(2, 1)]
    assert s == slots[0]
    assert torch.equal(cache.w13[s], store.w13[2][1]) and torch.equal(cache.w2[s], store.w2[2][1])


def test_prefetch_fills_free_slots_and_counts_use():
    store, cache, stats = small_cache(4)
    cache.acquire(1, [0, 1])
    cache.prefetch(2, [0, 1, 2], {(1, 0), (1, 1)})  # room for two without evicting layer 1
    assert stats.prefetched == 2 and (2, 0) in cache and (2, 1) in cache and (2, 2) not in cache
    cache.acquire(2, [1, 3])
    assert stats.prefetch_used == 1


def test_warm_spreads_slots_over_layers():
    _, cache, stats = small_cache(4)
    cache.warm()
    assert set(cache.table.slot_of) == {(1, 0), (2, 0), (1, 1), (2, 1)}
    assert stats.bytes_copied == 0 and stats.misses == 0


# --- traces and offline replay ---------------------------------------------------------------

def test_uniform_routing_hits_the_cached_fraction():
    from dscoder.offload.trace import replay, synthetic_trace

    calls = synthetic_trace(layers=4, experts=16, top_k=2, tokens=600, seed=1)
    for policy in ("lru", "lfu", "lru-layer"):
        r = replay(calls, policy, slots=16)  # a quarter of 64 experts
        assert abs(r.hit_rate - 0.25) < 0.05, (policy, r.hit_rate)


def test_skewed_routing_favours_lfu():
    from dscoder.offload.trace import compare, synthetic_trace

    calls = synthetic_trace(layers=4, experts=16, top_k=2, tokens=600, skew=1.2, seed=2)
    rates = {r.policy: r.hit_rate for r in compare(calls, [16])}
    assert rates["lfu"] > rates["lru"] > 0.3


def test_trace_roundtrip_and_cli(tmp_path, capsys):
    from dscoder.offload.trace import TraceWriter, main, read_trace

    path = tmp_path / "t.jsonl"
    w = TraceWriter(path)
    w.add(1, [[0, 3], [2, 3]])
    w.add(2, [[1, 2]])
    w.close()
    assert read_trace(path) == [(1, [[0, 3], [2, 3]]), (2, [[1, 2]])]
    main([str(path), "--slots", "2", "4", "--experts", "4"])
    out = capsys.readouterr().out
    assert "lru" in out and out.strip().splitlines()[-1].startswith("[")


# --- page-locking the host store -------------------------------------------------------------

def test_failed_page_lock_is_counted_after_a_partial_success(monkeypatch):
    import dscoder.offload.host_store as hs
    from dscoder.offload.host_store import HostExpertStore, pin_warning

    w13 = {1: torch.zeros(4, 8, 8), 2: torch.zeros(4, 8, 8)}
    w2 = {1: torch.zeros(4, 8, 4), 2: torch.zeros(4, 8, 4)}
    store = HostExpertStore(w13, w2)
    refused = w13[2].data_ptr()
    calls = []

    def register(t):
        calls.append(t.data_ptr())
        return t.data_ptr() != refused  # every tensor but one is locked
    monkeypatch.setattr(hs, "_register", register)
    assert store.pin() == w13[2].nbytes
    assert store.pin() == w13[2].nbytes and len(calls) == 4  # once: no second try, same answer
    message = pin_warning(store.unpinned_bytes, store.total_bytes)
    assert "page-lock 1.00 KiB of the 3.00 KiB host copy" in message
    assert "3.6x slower" in message and "15.1" in message
    assert pin_warning(0, store.total_bytes) is None
    store._registered = []  # nothing was really registered with CUDA


def test_failed_page_lock_warns_once_whatever_the_verbosity(monkeypatch):
    import dscoder.offload.host_store as hs
    import dscoder.offload.setup as setup

    monkeypatch.setattr(hs, "_register", lambda t: False)
    warnings: list[str] = []
    model = _tiny_model()
    # the CPU stands in for CUDA: install_offload pins and warns only for a CUDA device
    monkeypatch.setattr(setup, "_pins", lambda device: True)
    setup.install_offload(model, 6, torch.device("cpu"), warn=warnings.append)
    assert len(warnings) == 1 and warnings[0].startswith("Could not page-lock the ")
    assert "slower" in warnings[0]


def _tiny_model():
    from dscoder.config import ModelConfig
    from dscoder.model.transformer import Transformer
    from dscoder.random_checkpoint import TINY

    model = Transformer(ModelConfig.from_dict(TINY))
    model.set_context(64)
    return model
