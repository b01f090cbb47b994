"""The offloaded experts served straight from the checkpoint's page cache.

Under a GPU budget the routed experts (28 of Lite's 31 GB) lived in a host copy: read from the
shards into pageable memory (1.7-2.0 s on an H100 machine), then page-locked (0.9 s). Here the
shards themselves are page-locked where they lie (dscoder.page_lock; the CLI starts that while
torch imports) and each expert is a pair of views into them: safetensors lays a checkpoint's
tensors out sorted by name, so an expert's gate_proj and up_proj are adjacent, which is exactly
its stacked w13 (gate rows, then up rows), and its down_proj is its w2. An expert whose two
halves a shard boundary splits gets a host copy of its w13 alone. A checkpoint in another
dtype than the model's, or too large to lock, keeps the whole host copy.
"""
from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path

import torch

from dscoder import page_lock
from dscoder.config import ModelConfig
from dscoder.errors import DscoderError
from dscoder.shard_reader import read_header
from dscoder.weights import shard_index


class ExpertViews:
    """One MoE layer's experts as views into locked shards; indexed and shaped like the
    stacked tensor (E, *shape) it stands in for (dscoder.offload.host_store)."""

    def __init__(self, views: list[torch.Tensor]) -> None:
        self.views = views
        self.shape = torch.Size((len(views), *views[0].shape))
        self.dtype = views[0].dtype
        self.nbytes = sum(v.nbytes for v in views)

    def __getitem__(self, e: int) -> torch.Tensor:
        return self.views[e]

    def __len__(self) -> int:
        return len(self.views)

    def is_pinned(self) -> bool:
        return True  # the shards are page-locked as a whole


class MappedExperts:
    """w13[layer], w2[layer]: ExpertViews into the locked shards `files`, kept locked until
    close() (once no copy reads them)."""

    def __init__(self, w13: dict[int, ExpertViews], w2: dict[int, ExpertViews],
                 files: list[page_lock.LockedFile]) -> None:
        self.w13, self.w2, self.files = w13, w2, files

    def close(self) -> None:
        self.w13, self.w2 = {}, {}
        for locked in self.files:
            page_lock.unkeep(locked)
            locked.close()
        self.files = []


def map_experts(model_dir: Path, cfg: ModelConfig, dtype: torch.dtype, ordinal: int) -> MappedExperts | None:
    """The routed experts of every MoE layer as views into the page-locked shards, or None
    where that cannot be (the caller reads them into a host copy instead, which also reports
    any problem with the checkpoint)."""
    try:
        index = shard_index(model_dir)
        keys = list(_expert_keys(cfg))
        paths = sorted({model_dir / index[key] for _, _, *trio in keys for key in trio})
        headers = {path: read_header(path) for path in paths}
        entries = [(layer, e, *(headers[model_dir / index[k]][k] for k in trio)) for layer, e, *trio in keys]
    except (DscoderError, KeyError):
        return None
    i, h = cfg.moe_intermediate_size, cfg.hidden_size
    for _, _, gate, up, down in entries:
        if not (gate.shape == up.shape == (i, h) and down.shape == (h, i)
                and gate.dtype == up.dtype == down.dtype == dtype):
            return None
    if not page_lock.fits(sum(p.stat().st_size for p in paths)):
        return None
    files: list[page_lock.LockedFile] = []
    try:
        for path in paths:
            # its own lock, never a loan: another model's experts may be released before these
            files.append(page_lock.lock(path, ordinal, borrow=False))
    except OSError:
        for locked in files:
            locked.close()
        return None
    for locked in files:
        page_lock.keep(locked)
    bytes_of = {locked.path: _bytes(locked) for locked in files}
    w13: dict[int, list[torch.Tensor]] = {}
    w2: dict[int, list[torch.Tensor]] = {}
    for layer, _, gate, up, down in entries:
        if gate.path == up.path and gate.end == up.begin:
            both = _view(bytes_of[gate.path], gate.begin, up.end, dtype, (2 * i, h))
        else:  # split between two shards (or not adjacent): this expert's w13 gets a host copy
            both = torch.empty((2 * i, h), dtype=dtype, pin_memory=torch.cuda.is_available())
            both[:i].copy_(_view(bytes_of[gate.path], gate.begin, gate.end, dtype, (i, h)))
            both[i:].copy_(_view(bytes_of[up.path], up.begin, up.end, dtype, (i, h)))
        w13.setdefault(layer, []).append(both)
        w2.setdefault(layer, []).append(_view(bytes_of[down.path], down.begin, down.end, dtype, (h, i)))
    return MappedExperts({k: ExpertViews(v) for k, v in w13.items()},
                         {k: ExpertViews(v) for k, v in w2.items()}, files)


def _expert_keys(cfg: ModelConfig) -> Iterator[tuple[int, int, str, str, str]]:
    """(layer, expert, gate key, up key, down key) of every routed expert, in layer order."""
    for layer in range(cfg.num_hidden_layers):
        if cfg.is_moe_layer(layer):
            for e in range(cfg.n_routed_experts):
                prefix = f"model.layers.{layer}.mlp.experts.{e}"
                yield layer, e, f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight", f"{prefix}.down_proj.weight"


def _bytes(locked: page_lock.LockedFile) -> torch.Tensor:
    """A locked file's mapping as a flat uint8 tensor (no copy)."""
    return torch.frombuffer((ctypes.c_uint8 * locked.size).from_address(locked.address), dtype=torch.uint8)


def _view(data: torch.Tensor, begin: int, end: int, dtype: torch.dtype, shape: tuple[int, int]) -> torch.Tensor:
    return data[begin:end].view(dtype).view(shape)
