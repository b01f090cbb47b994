"""Loading under a --gpu-memory budget: plan, load, move experts to host, install the cache."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dscoder import cuda_capture, page_lock
from dscoder.config import ModelConfig
from dscoder.errors import UsageError
from dscoder.model.quant import quantizes
from dscoder.offload.device_cache import CopyEngine, ExpertCache
from dscoder.offload.experts import OffloadedExperts, OffloadRuntime
from dscoder.offload.host_store import HostExpertStore, pin_warning
from dscoder.offload.planner import STREAM_CHUNK, ModelSizes, Plan, plan_for_device
from dscoder.offload.policy import POLICIES, make_policy
from dscoder.offload.sizes import format_size, parse_size
from dscoder.offload.stats import OffloadStats
from dscoder.offload.trace import TraceWriter

if TYPE_CHECKING:
    from dscoder.offload.mapped import MappedExperts

DEFAULT_DEPTH = 1  # MoE layers ahead whose experts a decode step starts copying
DEFAULT_POLICY = "lru"  # random routing: all policies tie; see BENCHMARKS.md "Offloading"
Log = Callable[[str], None]


def model_sizes(cfg: ModelConfig, dtype: torch.dtype, expert_dtype: str | None = None) -> ModelSizes:
    """expert_dtype "int8": routed experts at one byte a weight plus their scales."""
    from dscoder.model.quant import expert_nbytes
    from dscoder.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    b = torch.finfo(dtype).bits // 8
    resident = experts = 0
    for name, p in model.named_parameters():
        if ".experts.w" in name:
            experts += p.numel()
        else:  # routers are kept in fp32
            resident += p.numel() * (4 if name.endswith(".mlp.gate.weight") else b)
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    return ModelSizes(
        resident_bytes=resident,
        expert_bytes=expert_nbytes(cfg.hidden_size, cfg.moe_intermediate_size, dtype, expert_dtype),
        moe_layers=moe_layers, experts_per_layer=cfg.n_routed_experts, top_k=cfg.num_experts_per_tok,
        kv_bytes_per_token=cfg.num_hidden_layers * cfg.kv_cache_dim * b, hidden=cfg.hidden_size,
        heads=cfg.num_attention_heads, qk_head_dim=cfg.qk_head_dim, v_head_dim=cfg.v_head_dim,
        dense_intermediate=cfg.intermediate_size, moe_intermediate=cfg.moe_intermediate_size,
        vocab=cfg.vocab_size, dtype_bytes=b)


def resolve_budget(text: str, device: torch.device) -> int:
    """Bytes from '12GiB' or 'auto' (free GPU memory minus a margin for other processes)."""
    if text.strip().lower() != "auto":
        return parse_size(text)
    if device.type != "cuda":
        raise UsageError("--gpu-memory auto needs a CUDA GPU; give a size such as 12GiB instead.")
    free, _ = torch.cuda.mem_get_info(device)
    return int(free - max(512 << 20, 0.05 * free))


def host_available() -> int | None:
    """MemAvailable from /proc/meminfo, or None where that cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def make_plan(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, gpu_memory: str,
              context: int, context_fixed: bool, expert_dtype: str | None = None) -> Plan:
    budget = resolve_budget(gpu_memory, device)
    cuda = device.type == "cuda"
    return plan_for_device(model_sizes(cfg, dtype, expert_dtype), budget, context, cuda=cuda,
                           context_fixed=context_fixed, host_available=host_available() if cuda else None)


def enforce_budget(plan: Plan, device: torch.device) -> None:
    """Make the caching allocator refuse to grow past its share of the budget (the budget less
    the CUDA context): an out-of-memory error instead of overuse."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, plan.allocator_bytes / total), index)


def lift_budget(device: torch.device) -> None:
    """Undo enforce_budget: the allocator may use the whole device again."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_per_process_memory_fraction(1.0, index)


def load_with_budget(model_dir: Path, cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
                     gpu_memory: str, context: int, context_fixed: bool, *, progress=None,
                     log: Log | None = None, warn: Log | None = None, policy: str = DEFAULT_POLICY,
                     prefetch_depth: int = DEFAULT_DEPTH, expert_dtype: str | None = None):
    """(model, context, plan): the model resident or offloaded as the budget allows. log gets
    the plan (--verbose); warn gets what the user must hear: a failed page-lock. expert_dtype
    "int8": the routed experts are quantized while they load, wherever they then live."""
    from dscoder.weights import load_model

    plan = make_plan(cfg, dtype, device, gpu_memory, context, context_fixed, expert_dtype)
    for line in plan.describe():
        if log:
            log(line)
    if log and expert_dtype == "int8":
        log(f"routed experts in int8 with per-channel scales: {format_size(plan.expert_bytes)} each")
    enforce_budget(plan, device)
    if plan.resident:
        model = load_model(model_dir, cfg, device=device, dtype=dtype, progress=progress,
                           expert_dtype=expert_dtype)
        return model, plan.context, plan
    mapped = None
    if _pins(device) and not quantizes(expert_dtype) and page_lock.ENABLED:
        from dscoder.offload.mapped import map_experts

        mapped = map_experts(model_dir, cfg, dtype, device.index or 0)
    try:
        model = load_model(model_dir, cfg, device=device, dtype=dtype, expert_dtype=expert_dtype,
                           expert_device=torch.device("meta" if mapped else "cpu"), progress=progress)
        install_offload(model, plan.slots, device, policy, prefetch_depth, warn=warn, mapped=mapped)
    except BaseException:
        if mapped is not None:  # nothing reads the shards: unlock them
            mapped.close()
        raise
    return model, plan.context, plan


def _pins(device: torch.device) -> bool:
    """Whether the host store is page-locked: only copies to a CUDA device gain from it."""
    return device.type == "cuda"


def install_offload(model: torch.nn.Module, slots: int, device: torch.device,
                    policy: str = DEFAULT_POLICY, prefetch_depth: int = DEFAULT_DEPTH, *,
                    warn: Log | None = None, mapped: MappedExperts | None = None) -> OffloadRuntime:
    """Move every MoE layer's routed experts into a host store behind a `slots`-expert cache;
    warn (once) if CUDA would not page-lock all of the host copy. mapped: the experts served
    from the page-locked shards (the model's own were not read)."""
    from dscoder.model.moe import MoE

    if policy not in POLICIES:
        raise UsageError(f"Unknown offload policy {policy!r}; choose from {', '.join(POLICIES)}.")
    layers = model.model.layers
    moe = [i for i, layer in enumerate(layers) if isinstance(layer.mlp, MoE)]
    experts = {i: layers[i].mlp.experts for i in moe}
    quantized = experts[moe[0]].s13 is not None
    if mapped is not None:
        store = HostExpertStore(mapped.w13, mapped.w2, owner=mapped)
    else:
        store = HostExpertStore({i: m.w13.data for i, m in experts.items()},
                                {i: m.w2.data for i, m in experts.items()},
                                {i: m.s13 for i, m in experts.items()} if quantized else None,
                                {i: m.s2 for i, m in experts.items()} if quantized else None)
    if _pins(device):
        message = pin_warning(store.pin(), store.total_bytes)
        if message and warn:
            warn(message)
    stats = OffloadStats()
    copier = CopyEngine(device, stats)
    cache = ExpertCache(store, slots, device, make_policy(policy, slots, moe), stats, copier)
    chunk = min(STREAM_CHUNK, store.experts_per_layer)

    def staging(part: dict[int, torch.Tensor]) -> torch.Tensor | None:
        """Two prefill buffers of `chunk` experts for one part of the store (None: no such part)."""
        if not part:
            return None
        t = part[moe[0]]
        return torch.empty((2, chunk, *t.shape[1:]), dtype=t.dtype, device=device)

    runtime = OffloadRuntime(
        store, cache, copier, stats, staging_w13=staging(store.w13), staging_w2=staging(store.w2),
        first_layer=moe[0], policy=policy, staging_s13=staging(store.s13), staging_s2=staging(store.s2))
    runtime.prefetch_depth = prefetch_depth
    for n, i in enumerate(moe):
        ahead = [(j, layers[j].mlp.gate) for j in moe[n + 1:n + 1 + prefetch_depth]]
        layers[i].mlp.experts = OffloadedExperts(runtime, i, ahead)
    cache.warm()
    model.offload = runtime
    return runtime


def release_offload(model: torch.nn.Module) -> None:
    """Empty the expert cache, the staging buffers and the host store (page-lock released
    first: CUDA must forget memory before it is freed), and detach the runtime from the model."""
    runtime = model.offload
    if runtime is None:
        return
    if runtime.copier.cuda:
        cuda_capture.synchronize(runtime.copier.device)  # no copy may still read the host store
    runtime.store.release()
    cache, empty = runtime.cache, torch.empty(0)
    cache.w13 = cache.w2 = runtime.staging_w13 = runtime.staging_w2 = empty
    cache.s13 = cache.s2 = runtime.staging_s13 = runtime.staging_s2 = None
    cache.ready = [None] * cache.slots
    cache.last_use = [None] * cache.slots
    runtime.staging_ready = [None, None]
    runtime.staging_free = [None, None]
    model.offload = None


def offload_stats(model: torch.nn.Module) -> dict:
    """The offload counters of a model ({} when nothing is offloaded)."""
    runtime = model.offload
    return runtime.stats.summary() if runtime is not None else {}


class TracingExperts(torch.nn.Module):
    """Wraps MoE.experts and writes each call's expert ids to a routing trace."""

    def __init__(self, inner: torch.nn.Module, layer: int, writer: TraceWriter) -> None:
        super().__init__()
        self.inner, self.layer, self.writer = inner, layer, writer

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        self.writer.add(self.layer, ids.tolist())
        return self.inner(x, ids, weights)


def install_trace(model: torch.nn.Module, path: str | Path) -> None:
    """Record which experts each MoE layer picks, to `path` (settings: routing_trace)."""
    from dscoder.model.moe import MoE

    try:
        writer = TraceWriter(Path(path))
    except OSError as e:
        raise UsageError(f"Cannot write the routing trace {path}: {e.strerror or e}.") from e
    for i, layer in enumerate(model.model.layers):
        if isinstance(layer.mlp, MoE):
            layer.mlp.experts = TracingExperts(layer.mlp.experts, i, writer)


def describe_budget(plan: Plan) -> str:
    return f"{format_size(plan.budget)} ({'resident' if plan.resident else f'{plan.slots} expert slots'})"
