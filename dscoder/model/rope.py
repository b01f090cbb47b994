"""Rotary position embeddings with YaRN scaling, as DeepSeek-V2 uses them.

Pairs are interleaved (dims 2i and 2i+1 rotate together), which is what the released
weights expect. Tables are kept in fp32 and applied in fp32, as the reference does.
"""
from __future__ import annotations

import math

import torch

from dscoder.config import ModelConfig, YarnScaling, yarn_mscale


def _correction_dim(rotations: float, dim: int, base: float, max_pos: int) -> float:
    return (dim * math.log(max_pos / (rotations * 2 * math.pi))) / (2 * math.log(base))


def inv_freq_and_scale(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for the rope dims and the factor applied to cos/sin."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    y: YarnScaling | None = cfg.rope_scaling
    if y is None:
        return 1.0 / pos_freqs, 1.0
    low = max(math.floor(_correction_dim(y.beta_fast, dim, base, y.original_max_position_embeddings)), 0)
    high = min(math.ceil(_correction_dim(y.beta_slow, dim, base, y.original_max_position_embeddings)),
               dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero in the ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (y.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    if y.mscale and y.mscale_all_dim:
        scale = yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim)
    else:
        scale = yarn_mscale(y.factor)
    return inv_freq, float(scale)


def rope_table(cfg: ModelConfig, length: int, device: torch.device) -> torch.Tensor:
    """cos and sin for positions [0, length): shape (length, dim/2, 2), fp32."""
    inv_freq, scale = inv_freq_and_scale(cfg)
    t = torch.arange(length, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    return (torch.stack((freqs.cos(), freqs.sin()), dim=-1) * scale).to(device)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim. x: (..., T, dim); table: (T, dim/2, 2)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = table[..., 0], table[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)
