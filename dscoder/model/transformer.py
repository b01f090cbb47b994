"""The whole DeepSeek-V2 decoder: embedding, decoder layers, final norm, lm_head."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dscoder.compile_cache import enable_compile_caches
from dscoder.config import ModelConfig
from dscoder.kv_cache import LatentKVCache
from dscoder.model import gemv, latent_row, mla_decode, pdl, route_kernel
from dscoder.model.attention import MLAttention
from dscoder.model.layers import Linear, RMSNorm, SwiGLU
from dscoder.model.moe import MoE
from dscoder.model.rope import rope_table
from dscoder.model.step import Step
from dscoder.torch_import import load_deferred


class Route(NamedTuple):
    """A feed-forward's input and, in a MoE layer, its routing: what route() decides and
    feed_forward() computes (the offloaded decoder does the two in different graph segments)."""

    h: torch.Tensor  # the normalised input (T, H)
    ids: torch.Tensor | None  # (T, k) routed expert ids, or an expert provider's index (slots)
    weights: torch.Tensor | None  # (T, k) fp32


class DecoderLayer(nn.Module):
    """Attention, then the feed-forward. The parts are public so that layer-by-layer prefill
    and the offloaded decoder compose them rather than repeat them."""

    def __init__(self, cfg: ModelConfig, i: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg, i)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(i) else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, kv: torch.Tensor, step: Step) -> torch.Tensor:
        x = self.attend(x, rope, kv, step)
        return self.feed_forward(x, self.route(x))

    def attend(self, x: torch.Tensor, rope: torch.Tensor, kv: torch.Tensor, step: Step) -> torch.Tensor:
        """x plus attention over the cache (which gets this step's rows)."""
        return x + self.self_attn(self.input_layernorm(x), rope, kv, step)

    def route(self, x: torch.Tensor) -> Route:
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            return Route(h, *self.mlp.gate(h))
        return Route(h, None, None)

    def feed_forward(self, x: torch.Tensor, route: Route, experts: Callable | None = None,
                     chunk: int | None = None) -> torch.Tensor:
        """x plus the feed-forward of route.h. experts(h, index, weights): the routed experts
        (this layer's own unless given: the offloaded decoder passes its cache, by slot).
        chunk: the dense parts (shared experts, a dense MLP) go this many tokens at a time, so
        their activations stay as small as in chunked prefill; routed experts see every token
        in one call (an offloaded layer then streams its experts once)."""
        if isinstance(self.mlp, MoE):
            if experts is None and chunk is None:  # a resident layer: maybe one decode token
                both = self.mlp.decode_both(route.h, route.ids, route.weights)
                if both is not None:
                    return x + both
            out = (experts or self.mlp.experts)(route.h, route.ids, route.weights)
            dense = self.mlp.shared_experts
        else:
            out, dense = None, self.mlp
        if dense is not None:
            out = _plus_dense(out, dense, route.h, chunk)
        return x + out


def _plus_dense(out: torch.Tensor | None, dense: nn.Module, h: torch.Tensor,
                chunk: int | None) -> torch.Tensor:
    """out + dense(h) (just dense(h) without out), `chunk` tokens at a time when given."""
    if chunk is None:
        y = dense(h)
        return y if out is None else out + y
    if out is None:
        out = torch.zeros_like(h)
    for c0 in range(0, h.shape[0], chunk):
        out[c0:c0 + chunk] += dense(h[c0:c0 + chunk])
    return out


class Embedding(nn.Module):
    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class Backbone(nn.Module):
    """`model.*` in the checkpoint."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        self.rope: torch.Tensor | None = None  # (positions, rope/2, 2) fp32, built by set_context
        self._compiled_layer = None  # torch.compile'd decode layer, see compile_decode
        self.step_version = 0  # changes when the decode step does (graphs of the old one are stale)
        self.offload = None  # dscoder.offload's runtime when routed experts live in host memory

    def set_context(self, length: int) -> None:
        """Precompute the rotary table for positions [0, length), and on a GPU whether the MLA
        decode kernel fits it (asked now, eagerly: compiled code then only reads the answer)."""
        device = self.lm_head.weight.device
        self.rope = rope_table(self.cfg, length, device)
        if device.type == "cuda":
            mla_decode.fits(device)

    def forward(self, ids: torch.Tensor, cache: LatentKVCache, start: int, *,
                all_logits: bool = False, absorbed: bool | None = None,
                layers: Sequence[int] | None = None) -> torch.Tensor:
        """Run ids (T,) at positions [start, start+T); return fp32 logits of the last (or all) rows.
        layers: only these layers (a dry run's, dscoder.kernel_prebuild), not all."""
        assert self.rope is not None, "call set_context first"
        t = ids.shape[0]
        if absorbed is None:
            absorbed = t == 1  # decode reads the latent cache directly; prefill expands it
        step = Step.at(start, t, absorbed)
        return self.run(ids, self.rope[start:start + t], cache, step, all_logits, layers=layers)

    def prefill_by_layer(self, ids: torch.Tensor, cache: LatentKVCache, start: int,
                         chunk: int) -> torch.Tensor:
        """A long prompt layer by layer rather than chunk by chunk: the same function, but each
        layer's experts are needed once for the whole prompt. Attention still runs a chunk at a
        time (a chunk sees this layer's cache rows of the chunks before it). Logits of the last token."""
        assert self.rope is not None, "call set_context first"
        t = ids.shape[0]
        x = self.model.embed_tokens(ids)
        for i, layer in enumerate(self.model.layers):
            kv = cache.layer(i)
            for c0 in range(0, t, chunk):
                c1 = min(c0 + chunk, t)
                step = Step.at(start + c0, c1 - c0, absorbed=False)
                x[c0:c1] = layer.attend(x[c0:c1], self.rope[start + c0:start + c1], kv, step)
            x = layer.feed_forward(x, layer.route(x), chunk=chunk)
        return self.lm_head(self.model.norm(x[-1:])).float()

    def decode_at(self, ids: torch.Tensor, pos: torch.Tensor, cache: LatentKVCache,
                  visible: int, compiled: Callable | None = None,
                  layers: Sequence[int] | None = None) -> torch.Tensor:
        """One token whose position is a device tensor: fixed shapes, so it can be graph-captured.
        compiled: a compiled decode layer to use instead of the model's own (dscoder.warmup)."""
        assert self.rope is not None, "call set_context first"
        return self.run(ids, self.rope.index_select(0, pos), cache, Step.on_device(pos, visible),
                        compiled=compiled, layers=layers)

    def run(self, ids: torch.Tensor, rope: torch.Tensor, cache: LatentKVCache, step: Step,
            all_logits: bool = False, compiled: Callable | None = None,
            layers: Sequence[int] | None = None) -> torch.Tensor:
        x = self.model.embed_tokens(ids)
        compiled = compiled or self._compiled_layer
        stack = self.model.layers
        which = enumerate(stack) if layers is None else ((i, stack[i]) for i in layers)
        if compiled is not None and isinstance(step.start, torch.Tensor):
            mask = _dynamic(step.mask, 1)
            for i, layer in which:
                x = compiled(layer, x, rope, _dynamic(cache.layer(i), 0), step.start, mask)
        else:
            for i, layer in which:
                x = layer(x, rope, cache.layer(i), step)
        if not all_logits:
            x = x[-1:]
        return self.lm_head(self.model.norm(x)).float()

    def compile_decode(self, backend: str | Callable = "inductor", compiled: Callable | None = None) -> None:
        """Fuse the decode step's small kernels with torch.compile (one graph per layer kind:
        the layers differ only in their weights, which are inputs of the compiled graph).
        The compile happens at the first call, or already happened in `compiled`'s first
        calls (dscoder.warmup compiles it in the background). Graphs captured before are stale
        from now on (step_version); use graphs.swap_step while graphs may be capturing."""
        self._compiled_layer = compiled if compiled is not None else compile_decode_layer(backend)
        self.step_version += 1

    def decode_bounded_by_position(self) -> bool:
        """Whether a decode step at a device position (decode_at) reads only the cache rows up to
        that position however many rows it is given: the MLA decode kernel computes its split
        of the rows from the position (dscoder.model.mla_decode), so one CUDA graph at the
        cache's capacity serves every position. The torch path masks every row it is given."""
        w = self.lm_head.weight
        return mla_decode.available(w, w)  # the cache's dtype and device are the weights'

    def new_cache(self, capacity: int) -> LatentKVCache:
        w = self.lm_head.weight
        return LatentKVCache(self.cfg.num_hidden_layers, self.cfg.kv_cache_dim, capacity,
                             device=w.device, dtype=w.dtype)


def compile_decode_layer(backend: str | Callable = "inductor") -> Callable:
    """The compiled decode layer. The cache rows attention reads (the bucket) and the cache's
    capacity are dynamic from the first compile (see _dynamic and _decode_layer), so a new
    length bucket or a grown cache never recompiles: a recompile there stalled a reply 10 s."""
    import warnings

    # before the compiler imports: tracing runs fake tensors through torch's Python meta kernels
    # (dscoder.torch_import), and its kernels are cached on disk
    load_deferred()
    enable_compile_caches()
    import torch._dynamo

    # Inductor's performance hints are addressed to PyTorch's developers ("Online softmax is
    # disabled on the fly..."); they reached our users' terminals in the middle of a chat
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\._inductor")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    mla_decode.register_op()  # the operators the compiled step calls
    gemv.register_op()
    latent_row.register_op()
    route_kernel.register_op()
    options = pdl.inductor_options() if backend == "inductor" else None  # Inductor's own options
    return torch.compile(_decode_layer, backend=backend, dynamic=None, options=options)


def _decode_layer(layer: DecoderLayer, x: torch.Tensor, rope: torch.Tensor, kv: torch.Tensor,
                  pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One layer of a decode step at a device position: the compiled unit. The number of
    visible rows is read from the mask's shape (a symbolic size under torch.compile), not
    passed as an int, which Dynamo would specialise on."""
    return layer(x, rope, kv, Step(pos, mask.shape[-1], mask, absorbed=True))


def _dynamic(t: torch.Tensor | None, dim: int) -> torch.Tensor:
    """t with dimension `dim` marked dynamic for torch.compile, so that caches of any capacity
    and masks of any bucket share one compiled graph."""
    import torch._dynamo  # loaded already: only compiled decode gets here

    assert t is not None
    torch._dynamo.maybe_mark_dynamic(t, dim)
    return t
