"""One host copy of every routed expert, page-locked so copies to the GPU run at full PCIe speed.

The stacked per-layer tensors that dscoder.weights fills from the mmap'd shards are kept as
they are (no second copy) and registered with CUDA in place, one tensor at a time and on a few
threads: page-locking 29 GiB in one allocation took 20 s on the H100 host.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

PIN_THREADS = 8
# host-to-device copy speeds measured on the H100 host (DESIGN.md "Sizes and ceilings"): what a
# failed page-lock costs the copies of the experts it did not lock
PINNED_GB_S = 53.8
PAGEABLE_GB_S = 15.1


class HostExpertStore:
    """w13[layer] (E, 2I, H) and w2[layer] (E, H, I) in host memory, keyed by MoE layer index;
    with --expert-dtype int8 they are int8 and s13[layer] (E, 2I), s2[layer] (E, H) hold their
    per-row scales (empty dicts otherwise)."""

    def __init__(self, w13: dict[int, torch.Tensor], w2: dict[int, torch.Tensor],
                 s13: dict[int, torch.Tensor] | None = None,
                 s2: dict[int, torch.Tensor] | None = None, owner=None) -> None:
        # owner: what keeps w13 and w2 alive, closed on release() (dscoder.offload.mapped:
        # views into the page-locked shards, whose ExpertViews index and shape like tensors)
        self.owner = owner
        self.w13, self.w2 = w13, w2
        self.s13, self.s2 = s13 or {}, s2 or {}
        self.layers = sorted(w13)
        first = self.layers[0]
        self.experts_per_layer = w13[first].shape[0]
        self.dtype = w13[first].dtype
        self.expert_bytes = sum(t.nbytes for t in self.expert(first, 0))
        self._registered: list[int] = []
        self._pin_tried = False
        self.unpinned_bytes = 0  # bytes that CUDA refused to page-lock (copies from them are slower)

    @property
    def quantized(self) -> bool:
        return bool(self.s13)

    def _parts(self) -> list[dict[int, torch.Tensor]]:
        return [t for t in (self.w13, self.w2, self.s13, self.s2) if t]

    def expert(self, layer: int, e: int) -> list[torch.Tensor]:
        """The tensors that make up one expert, in the order of ExpertCache.parts: w13, w2 and,
        when quantized, their scales."""
        return [t[layer][e] for t in self._parts()]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        return [t[layer] for layer in self.layers for t in self._parts()]

    def pin(self) -> int:
        """Page-lock every tensor in place, once; the bytes CUDA refused to lock (0: all locked).
        Copies from refused tensors still work, from pageable memory and slower."""
        if self._pin_tried:
            return self.unpinned_bytes
        self._pin_tried = True
        tensors = [t for t in self.tensors() if not t.is_pinned()]
        with ThreadPoolExecutor(PIN_THREADS) as pool:
            results = list(pool.map(_register, tensors))
        self._registered = [t.data_ptr() for t, ok in zip(tensors, results, strict=True) if ok]
        self.unpinned_bytes = sum(t.nbytes for t, ok in zip(tensors, results, strict=True) if not ok)
        return self.unpinned_bytes

    def unpin(self) -> None:
        """Unregister what pin() locked (before the memory is freed, or to give it back early)."""
        registered, self._registered = self._registered, []
        for ptr in registered:
            torch.cuda.cudart().cudaHostUnregister(ptr)

    def release(self) -> None:
        """Unlock and drop every tensor (the engine is closing); the store is empty afterwards."""
        self.unpin()
        self.w13, self.w2, self.s13, self.s2, self.layers = {}, {}, {}, {}, []
        if self.owner is not None:
            self.owner.close()
            self.owner = None

    def __del__(self) -> None:
        try:
            self.unpin()  # the memory must be unregistered before it is freed
        except Exception:
            pass


def pin_warning(unpinned: int, total: int) -> str | None:
    """The one warning for a failed page-lock, with what it costs; None when all was locked."""
    if unpinned <= 0:
        return None
    from dscoder.offload.sizes import format_size

    share = "" if unpinned >= total else f"{format_size(unpinned)} of "
    return (f"Could not page-lock {share}the {format_size(total)} host copy of the experts "
            f"(cudaHostRegister failed; check `ulimit -l` and free RAM): expert copies from it run "
            f"from pageable memory, about {PINNED_GB_S / PAGEABLE_GB_S:.1f}x slower "
            f"({PAGEABLE_GB_S:g} against {PINNED_GB_S:g} GB/s measured on an H100 host), so "
            "generation will be slower.")


def _register(t: torch.Tensor) -> bool:
    if t.numel() == 0:
        return True
    err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.nbytes, 0)
    return int(err) == 0
