"""One host copy of every routed expert, page-locked so copies to the GPU run at full PCIe speed.

The stacked per-layer tensors that dscoder.weights fills from the mmap'd shards are kept as
they are (no second copy) and registered with CUDA in place, one tensor at a time and on a few
threads: page-locking 29 GiB in one allocation took 20 s on the H100 host.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

PIN_THREADS = 8


class HostExpertStore:
    """w13[layer] (E, 2I, H) and w2[layer] (E, H, I) in host memory, keyed by MoE layer index."""

    def __init__(self, w13: dict[int, torch.Tensor], w2: dict[int, torch.Tensor]) -> None:
        self.w13, self.w2 = w13, w2
        self.layers = sorted(w13)
        first = w13[self.layers[0]]
        self.experts_per_layer = first.shape[0]
        self.dtype = first.dtype
        self.expert_bytes = (w13[self.layers[0]][0].nbytes + w2[self.layers[0]][0].nbytes)
        self._registered: list[int] = []

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in (*self.w13.values(), *self.w2.values()))

    def tensors(self) -> list[torch.Tensor]:
        return [t for layer in self.layers for t in (self.w13[layer], self.w2[layer])]

    def pin(self) -> bool:
        """Page-lock every tensor in place; False (copies still work, slower) if CUDA refuses."""
        if self._registered or not torch.cuda.is_available():
            return bool(self._registered)
        tensors = [t for t in self.tensors() if not t.is_pinned()]
        with ThreadPoolExecutor(PIN_THREADS) as pool:
            results = list(pool.map(_register, tensors))
        self._registered = [t.data_ptr() for t, ok in zip(tensors, results) if ok]
        return all(results)

    def unpin(self) -> None:
        for ptr in self._registered:
            torch.cuda.cudart().cudaHostUnregister(ptr)
        self._registered = []

    def __del__(self) -> None:
        try:
            self.unpin()  # the memory must be unregistered before it is freed
        except Exception:
            pass


def _register(t: torch.Tensor) -> bool:
    if t.numel() == 0:
        return True
    err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.nbytes, 0)
    return int(err) == 0
