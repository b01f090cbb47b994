"""How a --gpu-memory budget is spent: CUDA context, resident weights, KV cache, work buffers,
expert slots.

The budget is what nvidia-smi shows for the process, all included: the CUDA context (driver,
kernels, cuBLAS) lives outside PyTorch's allocator, so it is taken off the top, and the allocator
is capped at the rest. Pure Python on purpose: it is unit-tested without a GPU, and the numbers
it prints with --verbose are the ones the loader acts on.
"""
from __future__ import annotations

from dataclasses import dataclass

from dscoder.errors import OutOfMemory, UsageError
from dscoder.offload.sizes import format_size
from dscoder.shapes import BUCKET as WINDOW_STEP  # planned windows are whole decode buckets

# the engine's work shapes: the plan sizes its buffers for exactly these
from dscoder.shapes import LAYER_MAJOR_TOKENS, PREFILL_CHUNK, cache_capacity

MiB = 1 << 20
# What the CUDA context of a dscoder process holds outside the caching allocator (driver state,
# loaded kernels, cuBLAS/cuDNN handles): about 500 MiB in nvidia-smi on an H100 with torch 2.11,
# a little more once compiled kernels load; nvidia-smi showed 11,865 MiB under a 12 GiB
# allocator cap with a short prompt. Measured again by tests/gpu and benchmarks/bench_budget.py.
CUDA_CONTEXT_BYTES = 600 * MiB
# the caching allocator rounds blocks up and fragments: a fixed floor plus 1/32 of the budget
ALLOCATOR_MARGIN_BYTES = 256 * MiB
ALLOCATOR_MARGIN_SHARE = 1 / 32
# Without --context-length, an offloaded plan reserves at least this many tokens of context...
DEFAULT_OFFLOAD_CONTEXT = 8192
# ...and at most this share of the memory left for the KV cache and the expert slots: a longer
# window takes slots (speed) from every reply, short ones included; --context-length overrides.
CONTEXT_SHARE = 0.2
STREAM_CHUNK = 4  # experts per prefill staging buffer (two buffers: one copying, one computing)


@dataclass(frozen=True)
class ModelSizes:
    """What the planner needs to know about a model, in bytes and shapes."""

    resident_bytes: int  # every parameter except the routed experts
    expert_bytes: int  # one routed expert: w13 and w2
    moe_layers: int
    experts_per_layer: int
    top_k: int
    kv_bytes_per_token: int  # all layers
    hidden: int
    heads: int
    qk_head_dim: int
    v_head_dim: int
    dense_intermediate: int
    moe_intermediate: int
    vocab: int
    dtype_bytes: int

    @property
    def total_experts(self) -> int:
        return self.moe_layers * self.experts_per_layer

    @property
    def all_experts_bytes(self) -> int:
        return self.total_experts * self.expert_bytes


@dataclass(frozen=True)
class Plan:
    budget: int
    resident: bool  # True: the whole model sits on the GPU, nothing is offloaded
    context: int  # tokens of KV cache the plan reserves: the context window
    weights_bytes: int  # resident weights (all of them when resident)
    kv_bytes: int  # peak KV cache, growth included
    work_bytes: int  # activations of one prefill chunk, logits, allocator margin
    staging_bytes: int  # prefill double buffers
    slots: int  # GPU expert slots (0 when resident)
    expert_bytes: int
    total_experts: int
    host_bytes: int  # pinned host memory for the routed experts (0 when resident)
    overhead_bytes: int = 0  # the CUDA context, outside the allocator
    max_context: int = 0  # the model's own limit (0: not known)

    @property
    def slot_bytes(self) -> int:
        return self.slots * self.expert_bytes

    @property
    def allocator_bytes(self) -> int:
        """What PyTorch's caching allocator may hold: the budget less the CUDA context."""
        return self.budget - self.overhead_bytes

    @property
    def used_bytes(self) -> int:
        return (self.overhead_bytes + self.weights_bytes + self.kv_bytes + self.work_bytes
                + self.staging_bytes + self.slot_bytes)

    @property
    def window_limited(self) -> bool:
        """The budget, not the model, sets the context window."""
        return 0 < self.context < self.max_context

    def describe(self) -> list[str]:
        f = format_size
        head = (f"GPU budget {f(self.budget)} (CUDA context {f(self.overhead_bytes)}): "
                if self.overhead_bytes else f"GPU budget {f(self.budget)}: ")
        if self.resident:
            return [head + f"whole model resident ({f(self.weights_bytes)}), KV cache "
                    f"{f(self.kv_bytes)} for {self.context} tokens, work {f(self.work_bytes)}; "
                    "nothing offloaded"]
        share = self.slots / self.total_experts
        return [head + f"resident weights {f(self.weights_bytes)}, KV cache {f(self.kv_bytes)} for "
                f"{self.context} tokens, work {f(self.work_bytes)}, prefill buffers {f(self.staging_bytes)}",
                f"expert cache: {self.slots} of {self.total_experts} routed experts "
                f"({share:.0%}, {f(self.slot_bytes)}); all experts in pinned host memory "
                f"({f(self.host_bytes)})"]

    def window_notice(self) -> str | None:
        """One line saying that the budget sets the context window, and how to change it."""
        if not self.window_limited:
            return None
        trade = "fewer expert slots" if not self.resident else "offloading experts"
        return (f"Context window {self.context} tokens under a {format_size(self.budget)} GPU "
                f"budget (the model allows {self.max_context}); a longer --context-length costs "
                f"{trade}.")


def allocator_margin(budget: int) -> int:
    """Slack for the caching allocator's rounding and fragmentation on a CUDA budget."""
    return ALLOCATOR_MARGIN_BYTES + int(budget * ALLOCATOR_MARGIN_SHARE)


def kv_peak_bytes(sizes: ModelSizes, context: int, first_capacity: int | None = None) -> int:
    """The engine grows its cache up to the context (shapes.cache_capacity, from first_capacity
    or the engine's first size); while it grows, the old cache and the new one coexist, so the
    peak is the context plus the last size before it."""
    size = before = cache_capacity(1, 0, context, first_capacity)
    while size < context:
        before, size = size, cache_capacity(size + 1, size, context, first_capacity)
    return sizes.kv_bytes_per_token * (context + (before if before < context else 0))


def work_bytes(sizes: ModelSizes, context: int, chunk: int = PREFILL_CHUNK, *,
               fused: bool = False, layer_major: bool = False) -> int:
    """A generous estimate of activations for one prefill chunk attending over the context.

    fused: CUDA, where attention runs in a fused SDPA kernel that never materialises the
    (heads, T, S) scores, only a (T, S) mask; otherwise the math path's fp32 scores are counted.
    layer_major: an offloaded prefill also holds the hidden states of LAYER_MAJOR_TOKENS tokens
    (input, output and the fp32 sum of the routed experts) while it goes layer by layer."""
    b, t, s, h = sizes.dtype_bytes, min(chunk, context), context, sizes.heads
    expanded_kv = s * h * (sizes.qk_head_dim + 2 * max(sizes.v_head_dim, sizes.qk_head_dim)) * b
    scores = t * s * (1 + b) if fused else h * t * s * 4
    queries = t * h * (2 * sizes.qk_head_dim + sizes.v_head_dim) * b
    attention = expanded_kv + scores + queries
    dense = t * sizes.dense_intermediate * 3 * b
    moe = t * sizes.top_k * sizes.moe_intermediate * 3 * b + t * sizes.hidden * 4 * 2
    residual = t * sizes.hidden * b * 6
    logits = sizes.vocab * 4 * 4
    # (the engine goes layer by layer only for prompts longer than one chunk)
    held = (min(LAYER_MAJOR_TOKENS, context) * sizes.hidden * (2 * b + 4)
            if layer_major and context > chunk else 0)
    return max(attention, dense, moe) + residual + logits + held


def plan_memory(sizes: ModelSizes, budget: int, context: int, *, context_fixed: bool = False,
                margin: int = 0, host_available: int | None = None, overhead: int = 0,
                fused: bool = False) -> Plan:
    """The plan for a budget; raise a one-sentence error saying what fits when nothing works.

    context: the window asked for (context_fixed) or the model's maximum. Without a fixed
    window the plan picks the longest one the budget allows: the model's maximum if the whole
    model then fits, else the longest window with which it still fits resident (if at least
    DEFAULT_OFFLOAD_CONTEXT), else an offloaded plan whose KV cache takes at most CONTEXT_SHARE of
    what is left for the cache and the expert slots. overhead: the CUDA context."""
    if budget <= 0:
        raise UsageError("The GPU memory budget must be positive, for example --gpu-memory 12GiB.")
    if budget - overhead - margin <= 0:
        raise OutOfMemory(f"A GPU budget of {format_size(budget)} does not even hold the CUDA context "
                          f"({format_size(overhead)}) and the allocator's margin; use --gpu-memory "
                          f"{format_size(overhead + margin + sizes.resident_bytes)} or more.")
    max_context = context
    usable = budget - overhead

    def resident_need(w: int) -> int:
        return (sizes.resident_bytes + sizes.all_experts_bytes + kv_peak_bytes(sizes, w)
                + work_bytes(sizes, w, fused=fused) + margin)

    def resident_plan(w: int) -> Plan:
        return Plan(budget, True, w, sizes.resident_bytes + sizes.all_experts_bytes,
                    kv_peak_bytes(sizes, w), work_bytes(sizes, w, fused=fused) + margin, 0, 0,
                    sizes.expert_bytes, sizes.total_experts, 0, overhead,
                    0 if context_fixed else max_context)

    if resident_need(context) <= usable:
        return resident_plan(context)
    floor = min(DEFAULT_OFFLOAD_CONTEXT, context)
    if not context_fixed:
        w = _longest(floor, context, lambda w: resident_need(w) <= usable)
        if w is not None:
            return resident_plan(w)
    staging = 2 * STREAM_CHUNK * sizes.expert_bytes

    def kv_and_work(w: int) -> int:
        return kv_peak_bytes(sizes, w) + work_bytes(sizes, w, fused=fused, layer_major=True) + margin

    if not context_fixed:
        room = usable - sizes.resident_bytes - staging  # for the KV cache, work and expert slots
        cap = max(kv_and_work(floor), int(CONTEXT_SHARE * room))
        context = _longest(floor, context, lambda w: kv_and_work(w) <= cap) or floor
    kv = kv_peak_bytes(sizes, context)
    work = kv_and_work(context) - kv
    fixed = sizes.resident_bytes + kv + work + staging
    slots = min(sizes.total_experts, max(0, usable - fixed) // sizes.expert_bytes)
    need = min_slots(sizes)
    if slots < need:
        raise OutOfMemory(
            f"A GPU budget of {format_size(budget)} is too small: the CUDA context "
            f"({format_size(overhead)}), the resident weights "
            f"({format_size(sizes.resident_bytes)}), a KV cache for {context} tokens ({format_size(kv)}) and "
            f"work buffers ({format_size(work + staging)}) leave room for {slots} expert slots but at least "
            f"{need} are needed; use --gpu-memory {format_size(overhead + fixed + need * sizes.expert_bytes)}"
            f" or more{'' if context <= 4096 else ', or a shorter --context-length'}.")
    _check_host(sizes, host_available)
    return Plan(budget, False, context, sizes.resident_bytes, kv, work, staging, int(slots),
                sizes.expert_bytes, sizes.total_experts, sizes.all_experts_bytes, overhead,
                0 if context_fixed else max_context)


def _longest(low: int, high: int, fits) -> int | None:
    """The longest window in [low, high] that fits (high itself, or a multiple of WINDOW_STEP),
    or None when not even low fits. fits must be monotonic: a window fits if a longer one does."""
    if fits(high):
        return high
    if not fits(low):
        return None
    lo, hi = low // WINDOW_STEP, high // WINDOW_STEP  # lo * STEP <= low fits; find the last step
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid * WINDOW_STEP):
            lo = mid
        else:
            hi = mid - 1
    return max(low, lo * WINDOW_STEP)


def plan_for_device(sizes: ModelSizes, budget: int, context: int, *, cuda: bool,
                    context_fixed: bool = False, host_available: int | None = None) -> Plan:
    """plan_memory with what a device adds: on CUDA the context, the allocator's margin and the
    fused attention kernels; a CPU "budget" is a simulation and needs none of them."""
    return plan_memory(sizes, budget, context, context_fixed=context_fixed,
                       margin=allocator_margin(budget) if cuda else 0, host_available=host_available,
                       overhead=CUDA_CONTEXT_BYTES if cuda else 0, fused=cuda)


def budget_for_slots(sizes: ModelSizes, slots: int, context: int, *, cuda: bool = False) -> int:
    """The smallest budget whose plan_for_device for a fixed context has `slots` expert slots
    (tests and benchmarks ask for a number of slots)."""
    fixed = (sizes.resident_bytes + kv_peak_bytes(sizes, context)
             + work_bytes(sizes, context, fused=cuda, layer_major=True)
             + 2 * STREAM_CHUNK * sizes.expert_bytes + slots * sizes.expert_bytes)
    if not cuda:
        return fixed
    # budget = context + fixed + margin(budget), margin = floor + budget * share: solve for budget
    need = CUDA_CONTEXT_BYTES + fixed + ALLOCATOR_MARGIN_BYTES
    return int(need / (1 - ALLOCATOR_MARGIN_SHARE)) + 1


def min_slots(sizes: ModelSizes) -> int:
    # one decode step of a layer needs top_k slots, and the next layer's prefetch as many again
    return 2 * sizes.top_k


def _check_host(sizes: ModelSizes, host_available: int | None) -> None:
    need = sizes.all_experts_bytes
    if host_available is not None and need > host_available:
        raise OutOfMemory(
            f"The routed experts need {format_size(need)} of host memory but only "
            f"{format_size(host_available)} is available; close other programs, or use a machine "
            "with more RAM, or a GPU budget large enough to hold the whole model.")
