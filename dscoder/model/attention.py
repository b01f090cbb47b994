"""Multi-head latent attention (MLA) over the latent KV cache.

Two paths compute the same function:
- expanded (prefill): kv_b_proj turns the cached latents into per-head keys and values, then
  scaled-dot-product attention runs as usual;
- absorbed (decode): kv_b_proj's key half is folded into the query and its value half into the
  output, so attention runs directly over the 576-dim cached rows and reads far fewer bytes;
  one decode token on a GPU goes through dscoder.model.mla_decode's Triton kernel, and its cache
  row through dscoder.model.latent_row's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.backends.cuda import SDPAParams, can_use_flash_attention
from torch.nn.attention import SDPBackend, sdpa_kernel

from dscoder.config import ModelConfig
from dscoder.kv_cache import write_cache
from dscoder.model import latent_row, mla_decode
from dscoder.model.layers import FusedLinear, Linear, RMSNorm
from dscoder.model.rope import apply_rope
from dscoder.model.step import Step

# Prefill attention never goes to cuDNN's: it builds an execution plan for each new pair of
# query and key lengths, which cost about 1 s per new prompt length on an H100 (torch 2.11: a
# first 8K prompt prefilled in 2.44 s, the next one in 0.29 s). Flash attention (every chunk:
# causal, aligned to the lower right after the first) needs no set-up.
PREFILL_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.heads = cfg.num_attention_heads
        self.nope, self.rope, self.vdim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        qdim = self.heads * cfg.qk_head_dim
        # the query's first projection (q_proj, or q_a_proj of a low-rank query) and the latent
        # KV projection read the same input: one weight, one product
        self.lora = cfg.q_lora_rank is not None
        first = {"q_a_proj": cfg.q_lora_rank} if self.lora else {"q_proj": qdim}
        self.q_kv_a_proj = FusedLinear(cfg.hidden_size, {**first, "kv_a_proj_with_mqa": self.rank + self.rope})
        if self.lora:
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = Linear(cfg.q_lora_rank, qdim)
        self.kv_a_layernorm = RMSNorm(self.rank, cfg.rms_norm_eps)
        self.kv_b_proj = Linear(self.rank, self.heads * (self.nope + self.vdim))
        self.o_proj = Linear(self.heads * self.vdim, cfg.hidden_size)

    def _query(self, q: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: the first projection's output (T, .) -> q_nope (H, T, nope), q_pe (H, T, rope)."""
        if self.lora:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.view(q.shape[0], self.heads, self.nope + self.rope).transpose(0, 1)  # (H, T, D)
        return q[..., : self.nope], apply_rope(q[..., self.nope:], rope)

    def _latent(self, c: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """c: kv_a_proj_with_mqa's output (T, rank + rope) -> the rows to cache."""
        kv, k_pe = c[:, : self.rank], c[:, self.rank:]
        return torch.cat((self.kv_a_layernorm(kv), apply_rope(k_pe, rope)), dim=-1)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, kv: torch.Tensor, step: Step) -> torch.Tensor:
        """x: (T, hidden) at positions step.start...; rope: their (T, rope/2, 2) table;
        kv: this layer's cache rows (capacity, rank + rope)."""
        q, c = self.q_kv_a_proj(x)
        q_nope, q_pe = self._query(q, rope)
        if isinstance(step.start, torch.Tensor) and latent_row.available(c, kv, self.rank):
            # one decode token at a device position: the row in one kernel
            norm = self.kv_a_layernorm
            latent_row.write(c, norm.weight, norm.eps, rope, step.start, kv)
            cached = kv[:step.visible]
        else:
            cached = write_cache(kv, step.start, self._latent(c, rope), step.visible)
        attend = self._attend_absorbed if step.absorbed else self._attend_expanded
        out = attend(q_nope, q_pe, cached, step)
        return self.o_proj(out.transpose(0, 1).reshape(x.shape[0], self.heads * self.vdim))

    def _attend_expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cached: torch.Tensor,
                         step: Step) -> torch.Tensor:
        total = cached.shape[0]
        kv = self.kv_b_proj(cached[:, : self.rank]).view(total, self.heads, self.nope + self.vdim)
        kv = kv.transpose(0, 1)  # (H, S, nope+v)
        k_pe = cached[:, self.rank:].expand(self.heads, total, self.rope)
        k = torch.cat((kv[..., : self.nope], k_pe), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        v = kv[..., self.nope:]
        if q.is_cuda and v.shape[-1] < q.shape[-1]:
            # the fused kernels want one head size for q, k and v: pad v with zeros, then cut
            v = F.pad(v, (0, q.shape[-1] - v.shape[-1]))
        # a batch dimension of one: the fused kernels take only 4-D inputs (3-D falls back to
        # the unfused math path, which materialises every score in fp32)
        q, k, v = q[None], k[None], v[None]
        if step.causal and step.start > 0:  # a later prefill chunk: the last queries of the keys
            out = _causal_lower_right(q, k, v, self.scale)
        else:
            with sdpa_kernel(PREFILL_ATTENTION):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=step.mask, is_causal=step.causal,
                                                     scale=self.scale)
        return out[0, ..., : self.vdim]

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head: W_uk (H, nope, rank) and W_uv (H, v, rank)."""
        w = self.kv_b_proj.weight.view(self.heads, self.nope + self.vdim, self.rank)
        return w[:, : self.nope], w[:, self.nope:]

    def _attend_absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cached: torch.Tensor,
                         step: Step) -> torch.Tensor:
        w_uk, w_uv = self.absorbed_weights()
        q_lat = absorb_query(q_nope, w_uk)  # (H, T, rank): the key projection moved onto the query
        if q_nope.shape[1] == 1 and mla_decode.available(q_lat, cached) and (
                isinstance(step.start, torch.Tensor) or (step.mask is None and not step.causal)):
            # one decode token: rows <= the device position are visible (Step.on_device), or all
            # of them (Step.at's one token)
            pos = step.start if isinstance(step.start, torch.Tensor) else None
            if mla_decode.FUSE_UV:
                return mla_decode.decode(q_lat, q_pe, cached, pos, self.scale, w_uv)
            out_lat = mla_decode.decode(q_lat, q_pe, cached, pos, self.scale)
        else:
            out_lat = latent_attention(q_lat, q_pe, cached, step.causal_mask(cached.device), self.scale)
        return torch.matmul(out_lat, w_uv.transpose(1, 2))  # (H, T, v)


def absorb_query(q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
    """q_nope (H, T, nope) @ w_uk (H, nope, rank). One token in the compiled decode step: as a
    sum over nope in fp32, which Inductor turns into one reduction kernel reading W_uk once; a
    batched cuBLAS product of this size took 3.4 us a layer on an H100 (eager, the same ops
    would materialise every product)."""
    if q_nope.shape[1] == 1 and torch.compiler.is_compiling():
        q = q_nope.transpose(1, 2).float()  # (H, nope, 1)
        return (q * w_uk.float()).sum(dim=1, keepdim=True).to(q_nope.dtype)
    return torch.matmul(q_nope, w_uk)


def _causal_lower_right(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of T queries that are the last T of the S keys, each seeing the keys up to its
    own: the causal mask aligned to the lower right. Flash attention's causal flag means exactly
    that when S > T, so where it runs it takes the flag, not a mask tensor, which only slower
    kernels read (a 32K prefill: 23,722 against 12,522 tok/s on an H100). This is what
    torch.nn.attention.bias.causal_lower_right dispatches to, but importing that module imports
    all of Dynamo (1 s of every start)."""
    # asked as a call without the flag (with it, and more keys than queries, the check says no:
    # the public flag means a mask aligned to the upper left), as causal_lower_right asks
    if q.is_cuda and can_use_flash_attention(SDPAParams(q, k, v, None, 0.0, False, False)):
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)[0]
    t, s = q.shape[-2], k.shape[-2]
    mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
    with sdpa_kernel(PREFILL_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def latent_attention(q_lat: torch.Tensor, q_pe: torch.Tensor, cached: torch.Tensor,
                     mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Attention of q_lat (H, T, rank) and q_pe (H, T, rope) over the cached [latent | k_pe] rows
    (S, rank + rope), mask (T, S) True where visible: out_lat (H, T, rank). The torch path, and
    the reference of dscoder.model.mla_decode's kernel."""
    # [q_lat | q_pe] against the cached [latent | k_pe] rows: one product, fp32 scores (as
    # the prefill's fused attention keeps them), not two bf16 products added in bf16
    scores = fp32_scores(torch.cat((q_lat, q_pe), dim=-1), cached) * scale
    latent = cached[:, : q_lat.shape[-1]]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1).to(latent.dtype)
    return torch.matmul(probs, latent)  # (H, T, rank)


def fp32_scores(q: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """q (H, T, D) against rows (S, D): (H, T, S) in fp32. On CUDA a half-precision product
    accumulates in fp32 and writes fp32 (out_dtype), reading the cache once; elsewhere the
    operands are upcast (free in the fp32 the CPU runs in)."""
    h, t, d = q.shape
    if q.is_cuda and q.dtype != torch.float32:
        return torch.mm(q.reshape(h * t, d), rows.T, out_dtype=torch.float32).view(h, t, -1)
    return torch.matmul(q.float(), rows.float().T)
