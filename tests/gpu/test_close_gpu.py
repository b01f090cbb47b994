"""Engine.close() on CUDA: GPU memory, cached blocks, the page-lock and the allocator cap go back.

Its own module, so that no module-scoped CUDA fixture of another test is alive while it runs.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_close_frees_the_gpu(tiny_checkpoint):
    import gc

    from test_offload_model import budget_for_cuda

    from dscoder.engine import load_engine
    from dscoder.events import GenerationSettings

    gc.collect()
    torch.cuda.empty_cache()
    base, base_reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    settings = GenerationSettings(max_tokens=8, temperature=0)
    for budget in (None, budget_for_cuda(tiny_checkpoint, 7)):
        engine = load_engine(tiny_checkpoint, device="cuda", dtype="float32", context_length=512,
                             gpu_memory=budget, compile=False)
        list(engine.generate([100000, 5, 6, 7] * 20, settings, stop_ids=()))
        store = engine.model.offload.store if budget else None
        cap = engine.budget_plan.allocator_bytes if budget else None
        assert torch.cuda.memory_allocated() > base
        engine.close()
        assert torch.cuda.memory_allocated() <= base, "close() left GPU memory allocated"
        assert torch.cuda.memory_reserved() <= base_reserved + (64 << 20)  # cached blocks went back
        if store is not None:
            assert store._registered == [] and store.tensors() == []  # page-lock released
        if cap is not None:  # the budget's allocator cap is lifted: more than it fits now
            big = torch.empty(cap + (256 << 20), dtype=torch.uint8, device="cuda")
            del big
            torch.cuda.empty_cache()
    with load_engine(tiny_checkpoint, device="cuda", dtype="float32", compile=False) as engine:
        list(engine.generate([100000, 5, 6], settings, stop_ids=()))
