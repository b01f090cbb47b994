"""Engine.close() and `with` free weights, KV caches, the expert cache and the host store, even
while the engine object itself is still referenced."""
from __future__ import annotations

import gc
import weakref

import pytest

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
