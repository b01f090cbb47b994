"""Loading under a --gpu-memory budget: plan, load, move experts to host, install the cache."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from dscoder.config import ModelConfig
from dscoder.errors import UsageError
from dscoder.offload.device_cache import CopyEngine, ExpertCache
from dscoder.offload.experts import OffloadedExperts, OffloadRuntime
from dscoder.offload.host_store import HostExpertStore
from dscoder.offload.planner import STREAM_CHUNK, ModelSizes, Plan, plan_memory
from dscoder.offload.policy import POLICIES, make_policy
from dscoder.offload.sizes import format_size, parse_size
from dscoder.offload.stats import OffloadStats
from dscoder.offload.trace import TRACE_ENV, TraceWriter

POLICY_ENV = "DSCODER_OFFLOAD_POLICY"
DEPTH_ENV = "DSCODER_PREFETCH_DEPTH"
DEFAULT_DEPTH = 1  # MoE layers ahead whose experts a decode step starts copying
DEFAULT_POLICY = "lru"  # random routing: all policies tie; see BENCHMARKS.md "Offloading"
Log = Callable[[str], None]


def model_sizes(cfg: ModelConfig, dtype: torch.dtype) -> ModelSizes:
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
        resident_bytes=resident, expert_bytes=3 * cfg.hidden_size * cfg.moe_intermediate_size * b,
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
              context: int, context_fixed: bool) -> Plan:
    budget = resolve_budget(gpu_memory, device)
    # the CUDA allocator rounds and fragments; CPU "budgets" are simulations and need no slack
    margin = (256 << 20) + budget // 32 if device.type == "cuda" else 0
    host = host_available() if device.type == "cuda" else None
    return plan_memory(model_sizes(cfg, dtype), budget, context, context_fixed=context_fixed,
                       margin=margin, host_available=host)


def enforce_budget(budget: int, device: torch.device) -> None:
    """Make the caching allocator refuse to grow past the budget (an OOM instead of overuse)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), index)


def load_with_budget(model_dir: Path, cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
                     gpu_memory: str, context: int, context_fixed: bool, *, progress=None,
                     log: Log | None = None, policy: str | None = None):
    """(model, context, plan): the model resident or offloaded as the budget allows."""
    from dscoder.weights import load_model

    plan = make_plan(cfg, dtype, device, gpu_memory, context, context_fixed)
    for line in plan.describe():
        if log:
            log(line)
    enforce_budget(plan.budget, device)
    if plan.resident:
        model = load_model(model_dir, cfg, device=device, dtype=dtype, progress=progress)
        return model, plan.context, plan
    model = load_model(model_dir, cfg, device=device, dtype=dtype,
                       expert_device=torch.device("cpu"), progress=progress)
    runtime = install_offload(model, plan.slots, device, policy or os.environ.get(POLICY_ENV, DEFAULT_POLICY))
    if log and device.type == "cuda" and not runtime.store.pin():
        log("warning: could not page-lock the host copy of the experts; copies will be slower")
    return model, plan.context, plan


def install_offload(model: torch.nn.Module, slots: int, device: torch.device,
                    policy: str = DEFAULT_POLICY, prefetch_depth: int | None = None) -> OffloadRuntime:
    """Move every MoE layer's routed experts into a host store behind a `slots`-expert cache."""
    from dscoder.model.moe import MoE

    if policy not in POLICIES:
        raise UsageError(f"Unknown offload policy {policy!r}; choose from {', '.join(POLICIES)}.")
    layers = model.model.layers
    moe = [i for i, layer in enumerate(layers) if isinstance(layer.mlp, MoE)]
    store = HostExpertStore({i: layers[i].mlp.experts.w13.data for i in moe},
                            {i: layers[i].mlp.experts.w2.data for i in moe})
    if device.type == "cuda":
        store.pin()
    stats = OffloadStats()
    copier = CopyEngine(device, stats)
    cache = ExpertCache(store, slots, device, make_policy(policy, slots, moe), stats, copier)
    w13, w2 = store.w13[moe[0]], store.w2[moe[0]]
    chunk = min(STREAM_CHUNK, store.experts_per_layer)
    runtime = OffloadRuntime(
        store, cache, copier, stats,
        staging_w13=torch.empty((2, chunk, *w13.shape[1:]), dtype=w13.dtype, device=device),
        staging_w2=torch.empty((2, chunk, *w2.shape[1:]), dtype=w2.dtype, device=device),
        first_layer=moe[0], policy=policy)
    depth = prefetch_depth if prefetch_depth is not None else int(os.environ.get(DEPTH_ENV, DEFAULT_DEPTH))
    runtime.prefetch_depth = depth
    for n, i in enumerate(moe):
        ahead = [(j, layers[j].mlp.gate) for j in moe[n + 1:n + 1 + depth]]
        layers[i].mlp.experts = OffloadedExperts(runtime, i, ahead)
    cache.warm()
    model.offload = runtime
    return runtime


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


def install_trace(model: torch.nn.Module, path: str | Path | None = None) -> bool:
    """Record routing to `path` (or $DSCODER_ROUTING_TRACE); False when neither is set."""
    from dscoder.model.moe import MoE

    path = path or os.environ.get(TRACE_ENV)
    if not path:
        return False
    writer = TraceWriter(Path(path))
    for i, layer in enumerate(model.model.layers):
        if isinstance(layer.mlp, MoE):
            layer.mlp.experts = TracingExperts(layer.mlp.experts, i, writer)
    return True


def describe_budget(plan: Plan) -> str:
    return f"{format_size(plan.budget)} ({'resident' if plan.resident else f'{plan.slots} expert slots'})"
