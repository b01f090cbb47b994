"""How a --gpu-memory budget is spent: resident weights, KV cache, work buffers, expert slots.

Pure Python on purpose: it is unit-tested without a GPU, and the numbers it prints with
--verbose are the ones the loader acts on.
"""
from __future__ import annotations

from dataclasses import dataclass

from dscoder.errors import OutOfMemory, UsageError
from dscoder.offload.sizes import format_size

DEFAULT_OFFLOAD_CONTEXT = 8192  # the full 160K context's KV cache would eat most of a 12 GiB budget
STREAM_CHUNK = 4  # experts per prefill staging buffer (two buffers: one copying, one computing)
# tokens of prefill activations the work estimate is sized for. The engine runs 4096-token chunks
# (dscoder.engine.PREFILL_CHUNK), which measured 0.61 GiB against the 1.26 GiB this estimate
# reserves (see work_bytes); it stays at 2048 so the plan matches the one measured in BENCHMARKS.md.
PREFILL_CHUNK = 2048
FIRST_CAPACITY = 4096  # the engine's first KV cache size; it doubles up to the context


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
    context: int  # tokens of KV cache the plan reserves
    weights_bytes: int  # resident weights (all of them when resident)
    kv_bytes: int  # peak KV cache, growth included
    work_bytes: int  # activations of one prefill chunk, logits, allocator slack
    staging_bytes: int  # prefill double buffers
    slots: int  # GPU expert slots (0 when resident)
    expert_bytes: int
    total_experts: int
    host_bytes: int  # pinned host memory for the routed experts (0 when resident)

    @property
    def slot_bytes(self) -> int:
        return self.slots * self.expert_bytes

    @property
    def used_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.work_bytes + self.staging_bytes + self.slot_bytes

    def describe(self) -> list[str]:
        f = format_size
        head = f"GPU budget {f(self.budget)}: "
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


def kv_peak_bytes(sizes: ModelSizes, context: int, first_capacity: int = FIRST_CAPACITY) -> int:
    """The engine doubles its cache up to the context; while it grows, old and new coexist."""
    full = sizes.kv_bytes_per_token * context
    half = sizes.kv_bytes_per_token * (context // 2) if context > first_capacity else 0
    return full + half


def work_bytes(sizes: ModelSizes, context: int, chunk: int = PREFILL_CHUNK) -> int:
    """A generous estimate of activations for one prefill chunk attending over the context.

    It assumes the unfused attention path (fp32 scores). On an H100 with fused SDPA and
    4096-token chunks the measured work at 12GiB was 0.61 GiB against 1.26 GiB reserved here:
    tightening this would buy about 50 more expert slots at 12GiB, once measured on the GPU."""
    b, t, s, h = sizes.dtype_bytes, min(chunk, context), context, sizes.heads
    expanded_kv = s * h * (sizes.qk_head_dim + 2 * sizes.v_head_dim) * b
    scores = h * t * s * 4  # the math attention path materialises (heads, T, S) scores
    queries = t * h * (2 * sizes.qk_head_dim + sizes.v_head_dim) * b
    attention = expanded_kv + scores + queries
    dense = t * sizes.dense_intermediate * 3 * b
    moe = t * sizes.top_k * sizes.moe_intermediate * 3 * b + t * sizes.hidden * 4 * 2
    residual = t * sizes.hidden * b * 6
    logits = sizes.vocab * 4 * 4
    return max(attention, dense, moe) + residual + logits


def plan_memory(sizes: ModelSizes, budget: int, context: int, *, context_fixed: bool = False,
                margin: int = 0, host_available: int | None = None) -> Plan:
    """The plan for a budget; raise a one-sentence error saying what fits when nothing works."""
    if budget <= 0:
        raise UsageError("The GPU memory budget must be positive, for example --gpu-memory 12GiB.")
    work = work_bytes(sizes, context) + margin
    full = sizes.resident_bytes + sizes.all_experts_bytes + kv_peak_bytes(sizes, context) + work
    if full <= budget:
        return Plan(budget, True, context, sizes.resident_bytes + sizes.all_experts_bytes,
                    kv_peak_bytes(sizes, context), work, 0, 0, sizes.expert_bytes,
                    sizes.total_experts, 0)
    if not context_fixed:
        context = min(context, DEFAULT_OFFLOAD_CONTEXT)
        work = work_bytes(sizes, context) + margin
    kv = kv_peak_bytes(sizes, context)
    staging = 2 * STREAM_CHUNK * sizes.expert_bytes
    fixed = sizes.resident_bytes + kv + work + staging
    slots = min(sizes.total_experts, max(0, budget - fixed) // sizes.expert_bytes)
    need = min_slots(sizes)
    if slots < need:
        raise OutOfMemory(
            f"A GPU budget of {format_size(budget)} is too small: the resident weights "
            f"({format_size(sizes.resident_bytes)}), a KV cache for {context} tokens ({format_size(kv)}) and "
            f"work buffers ({format_size(work + staging)}) leave room for {slots} expert slots but at least "
            f"{need} are needed; use --gpu-memory {format_size(fixed + need * sizes.expert_bytes)} or more"
            f"{'' if context <= 4096 else ', or a shorter --context-length'}.")
    _check_host(sizes, host_available)
    return Plan(budget, False, context, sizes.resident_bytes, kv, work, staging, int(slots),
                sizes.expert_bytes, sizes.total_experts, sizes.all_experts_bytes)


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
