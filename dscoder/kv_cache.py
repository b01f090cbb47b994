"""The latent KV cache: per layer and token, the normalised kv latent and the rotated rope key.

For Lite that is 512 + 64 = 576 numbers per token per layer; the per-head keys and values are
never stored (they are re-derived through kv_b_proj or absorbed into the query at decode).
"""
from __future__ import annotations

import torch


class LatentKVCache:
    def __init__(self, num_layers: int, dim: int, capacity: int, *, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.data = torch.zeros(num_layers, capacity, dim, device=device, dtype=dtype)
        self.length = 0  # positions [0, length) hold valid entries

    @property
    def capacity(self) -> int:
        return self.data.shape[1]

    @property
    def bytes_per_token(self) -> int:
        return self.data[:, 0].numel() * self.data.element_size()

    def layer(self, i: int) -> torch.Tensor:
        return self.data[i]


def write_cache(kv: torch.Tensor, start: int | torch.Tensor, latent: torch.Tensor,
                visible: int) -> torch.Tensor:
    """Store latent (T, dim) in one layer's rows kv at positions start..; return the first
    `visible` rows. A tensor start is one token's position in device memory (CUDA graphs)."""
    if isinstance(start, torch.Tensor):
        kv.index_copy_(0, start, latent)
    else:
        kv[start:start + latent.shape[0]] = latent
    return kv[:visible]
