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

    def write(self, layer: int, start: int | torch.Tensor, latent: torch.Tensor,
              visible: int) -> torch.Tensor:
        """Store latent (T, dim) at positions start.. and return the first `visible` rows."""
        if isinstance(start, torch.Tensor):  # one token, its position on the device (CUDA graphs)
            self.data[layer].index_copy_(0, start, latent)
        else:
            self.data[layer, start:start + latent.shape[0]] = latent
        return self.data[layer, :visible]
