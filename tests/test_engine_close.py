"""Engine.close() and `with` free weights, KV caches, the expert cache and the host store, even
while the engine object itself is still referenced."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from dscoder.errors import UsageError
from dscoder.events import GenerationSettings

SETTINGS = GenerationSettings(max_tokens=4, temperature=0)


def generate(engine, session=None) -> tuple[int, ...]:
    events = list((session or engine).generate([100000, 5, 6, 7] * 8, SETTINGS, stop_ids=()))
    return events[-1].token_ids


def held(engine) -> list[weakref.ref]:
    """Weak references to the big tensors an engine holds, to see them freed."""
    model = engine.model
    refs = [weakref.ref(model.lm_head.weight), weakref.ref(model.model.embed_tokens.weight),
            weakref.ref(model.model.layers[0].self_attn.kv_b_proj.weight), weakref.ref(model.rope)]
    for session in engine._sessions:
        refs.append(weakref.ref(session._cache.data))
    if model.offload is not None:
        rt = model.offload
        refs += [weakref.ref(rt.cache.w13), weakref.ref(rt.cache.w2), weakref.ref(rt.staging_w13)]
        refs += [weakref.ref(t) for t in rt.store.tensors()]
    else:
        refs.append(weakref.ref(model.model.layers[1].mlp.experts.w13))
    return refs


@pytest.mark.parametrize("budget", [None, "offloaded"])
def test_close_frees_everything_while_the_engine_is_still_referenced(tiny_checkpoint, budget):
    from test_offload_model import budget_for

    from dscoder.engine import load_engine

    gpu_memory = budget_for(tiny_checkpoint, 7) if budget else None
    engine = load_engine(tiny_checkpoint, device="cpu", dtype="float32", context_length=512,
                         gpu_memory=gpu_memory)
    assert (engine.model.offload is not None) == bool(budget)
    other = engine.new_session()  # a second conversation: its cache must go too
    first = generate(engine)
    generate(engine, other)
    refs = held(engine)
    runtime = engine.model.offload
    gc.collect()
    assert all(r() is not None for r in refs)
    engine.close()
    gc.collect()
    alive = [i for i, r in enumerate(refs) if r() is not None]
    assert alive == [], f"still alive after close: {alive} of {len(refs)}"
    if runtime is not None:
        assert runtime.store.tensors() == [] and runtime.store._registered == []
    assert engine.closed and other._cache is None
    with pytest.raises(UsageError, match="closed"):
        generate(engine)
    with pytest.raises(UsageError, match="closed"):
        generate(engine, other)
    engine.close()  # twice is harmless
    again = load_engine(tiny_checkpoint, device="cpu", dtype="float32", context_length=512,
                        gpu_memory=gpu_memory)
    assert generate(again) == first  # a second engine in the same process is unaffected
    again.close()


def test_with_closes(tiny_checkpoint):
    from dscoder.engine import load_engine

    with load_engine(tiny_checkpoint, device="cpu", dtype="float32", context_length=64) as engine:
        generate(engine)
        ref = weakref.ref(engine.model.lm_head.weight)
    gc.collect()
    assert engine.closed and ref() is None


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError, RuntimeError])
def test_a_failed_load_lifts_the_budget_it_set(tiny_checkpoint, monkeypatch, error):
    """A budget caps the whole process's allocator: a load that fails after setting it (out of
    memory while loading or capturing) lifts it again, so the next engine is not capped."""
    from test_offload_model import budget_for

    from dscoder.engine import load_engine
    from dscoder.errors import OutOfMemory
    from dscoder.offload import setup

    lifted = []
    monkeypatch.setattr(setup, "lift_budget", lambda device: lifted.append(device))

    def fail(*args, **kwargs):
        raise error("no room")

    monkeypatch.setattr(setup, "load_with_budget", fail)
    expected = OutOfMemory if error is torch.cuda.OutOfMemoryError else RuntimeError
    with pytest.raises(expected):
        load_engine(tiny_checkpoint, device="cpu", dtype="float32", context_length=512,
                    gpu_memory=budget_for(tiny_checkpoint, 7))
    assert lifted == [torch.device("cpu")]
    lifted.clear()
    load_engine(tiny_checkpoint, device="cpu", dtype="float32", context_length=512).close()
    assert lifted == []  # no budget, nothing to lift
