"""The offloaded model computes the same function as the resident one (CPU, fp32, simulated budget)."""
from __future__ import annotations

import pytest
import torch

from dscoder.config import ModelConfig
from dscoder.events import Finished, GenerationSettings
from dscoder.weights import load_model

CPU = torch.device("cpu")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def load(path, slots: int | None):
    from dscoder.offload.setup import install_offload

    cfg = ModelConfig.from_file(path / "config.json")
    model = load_model(path, cfg, device=CPU, dtype=torch.float32)
    if slots is not None:
        install_offload(model, slots, CPU)
    model.set_context(512)
    return model


@pytest.fixture(scope="module")
def resident(tiny_checkpoint):
    return load(tiny_checkpoint, None)


def prompt(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 100000, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("slots", [6, 12, 16])  # the tiny model has 2 MoE layers x 8 experts
@torch.inference_mode()
def test_prefill_and_decode_match_resident(tiny_checkpoint, resident, slots):
    model = load(tiny_checkpoint, slots)
    ids = prompt(80, seed=slots)
    full = resident(ids, resident.new_cache(512), 0, all_logits=True)
    assert rel_err(model(ids, model.new_cache(512), 0, all_logits=True), full) < 1e-5  # streamed
    cache = model.new_cache(512)
    parts = [model(ids[:40], cache, 0, all_logits=True)]
    parts += [model(ids[i:i + 6], cache, i, all_logits=True) for i in range(40, 52, 6)]  # small calls
    parts += [model(ids[i:i + 1], cache, i) for i in range(52, 80)]  # decode: cache + prefetch
    assert rel_err(torch.cat(parts), full) < 1e-5
    stats = model.offload.stats
    assert stats.hits > 0 and stats.tokens == 160
    assert (stats.misses > 0 and stats.bytes_copied > 0) == (slots < 16)  # 16: all warm


def budget_for_cuda(path, slots: int, context: int = 512) -> str:
    """The --gpu-memory that gives `slots` expert slots on CUDA (context and margins included)."""
    from dscoder.offload.planner import budget_for_slots
    from dscoder.offload.setup import model_sizes

    s = model_sizes(ModelConfig.from_file(path / "config.json"), torch.float32)
    return str(budget_for_slots(s, slots, context, cuda=True))


def budget_for(path, slots: int, context: int = 512) -> str:
    from dscoder.offload.planner import budget_for_slots
    from dscoder.offload.setup import model_sizes

    s = model_sizes(ModelConfig.from_file(path / "config.json"), torch.float32)
    return str(budget_for_slots(s, slots, context))


def test_offloaded_engine_generates_the_same_ids(tiny_checkpoint, tiny_engine):
    from dscoder.engine import load_engine

    logs: list[str] = []
    engine = load_engine(tiny_checkpoint, device="cpu", dtype="float32", context_length=512,
                         gpu_memory=budget_for(tiny_checkpoint, 7), log=logs.append)
    assert engine.model.offload.cache.slots == 7
    assert any("expert cache: 7 of 16" in line for line in logs)
    ids = [100000] + tiny_engine.tokenizer.encode("def quicksort(xs):\n    ")
    settings = GenerationSettings(max_tokens=24, temperature=0)
    want = list(tiny_engine.new_session().generate(ids, settings, stop_ids=()))[-1]
    got = list(engine.new_session().generate(ids, settings, stop_ids=()))[-1]
    assert isinstance(got, Finished) and got.token_ids == want.token_ids
    assert got.stats["misses"] > 0 and 0 < got.stats["hit_rate"] < 1
    assert got.stats["bytes_per_token"] > 0 and want.stats == {}


def test_large_budget_keeps_everything_resident(tiny_checkpoint):
    from dscoder.engine import load_engine

    logs: list[str] = []
    engine = load_engine(tiny_checkpoint, device="cpu", dtype="float32", gpu_memory="1GiB",
                         log=logs.append)
    assert getattr(engine.model, "offload", None) is None
    assert "nothing offloaded" in logs[0]


def test_routing_trace_is_recorded(tiny_checkpoint, tmp_path, monkeypatch):
    from dscoder.engine import load_engine
    from dscoder.offload.trace import read_trace, replay

    path = tmp_path / "routing.jsonl"
    engine = load_engine(tiny_checkpoint, device="cpu", dtype="float32", context_length=512,
                         routing_trace=path)
    list(engine.new_session().generate([100000, 5, 6, 7], GenerationSettings(max_tokens=5, temperature=0),
                                       stop_ids=()))
    for f in [engine.model.model.layers[1].mlp.experts.writer]:
        f.close()
    calls = read_trace(path)
    assert {layer for layer, _ in calls} == {1, 2} and len(calls) == 2 * 5
    assert len(calls[0][1]) == 4 and len(calls[0][1][0]) == 3  # 4 prompt tokens, top-3
    assert replay(calls, "lru", 6).hits + replay(calls, "lru", 6).misses == sum(
        len({e for row in ids for e in row}) for _, ids in calls)


@pytest.mark.parametrize("slots,ahead", [(6, 1), (8, 2)])
@torch.inference_mode()
def test_segmented_decoder_matches_resident(tiny_checkpoint, resident, slots, ahead):
    """The per-MoE-layer segments that CUDA graphs replay, run eagerly on the CPU."""
    from dscoder.offload.decoder import OffloadedDecoder

    model = load(tiny_checkpoint, slots)
    ids = prompt(64, seed=3)
    full = resident(ids, resident.new_cache(512), 0, all_logits=True)
    cache = model.new_cache(512)
    parts = [model(ids[:40], cache, 0, all_logits=True)]
    decoder = OffloadedDecoder(model, model.offload, cache, ahead=ahead, graphs=False)
    parts += [decoder(int(ids[i]), i).clone() for i in range(40, 64)]
    assert rel_err(torch.cat(parts), full) < 1e-5
    s = model.offload.stats
    assert s.tokens == 40 + 24 and s.prefetched > 0 and s.misses > 0


@torch.inference_mode()
def test_group_limited_routing_offloaded(tiny236_checkpoint):
    """The 236B model's features (q low-rank, group-limited routing, scaling 16) offloaded."""
    from dscoder.offload.decoder import OffloadedDecoder

    ref, model = load(tiny236_checkpoint, None), load(tiny236_checkpoint, 9)
    ids = prompt(60, seed=4)
    full = ref(ids, ref.new_cache(512), 0, all_logits=True)
    cache = model.new_cache(512)
    parts = [model(ids[:40], cache, 0, all_logits=True)]
    parts += [model(ids[i:i + 1], cache, i) for i in range(40, 50)]
    decoder = OffloadedDecoder(model, model.offload, cache, ahead=1, graphs=False)
    parts += [decoder(int(ids[i]), i).clone() for i in range(50, 60)]
    assert rel_err(torch.cat(parts), full) < 1e-5


@torch.inference_mode()
def test_long_prefill_by_layer_streams_each_expert_once(tiny_checkpoint, resident):
    # 4 chunks of 32 tokens: chunk by chunk, every chunk streams the experts it misses again;
    # layer by layer, the whole prompt needs each layer's experts once
    ids = prompt(128, seed=5)
    want = resident(ids, resident.new_cache(512), 0)
    by_chunk = load(tiny_checkpoint, 6)
    cache = by_chunk.new_cache(512)
    for c in range(0, 128, 32):
        by_chunk(ids[c:c + 32], cache, c)
    by_layer = load(tiny_checkpoint, 6)
    got = by_layer.prefill_by_layer(ids, by_layer.new_cache(512), 0, chunk=32)
    assert rel_err(got, want) < 1e-5
    one_pass = 2 * 8  # MoE layers x experts: an upper bound on the misses of a single pass
    assert by_layer.offload.stats.misses <= one_pass < by_chunk.offload.stats.misses


def test_engine_prefills_long_prompts_by_layer_when_offloaded(tiny_checkpoint, tiny_engine, monkeypatch):
    from dscoder import shapes
    from dscoder.engine import load_engine

    monkeypatch.setattr(shapes, "PREFILL_CHUNK", 16)
    monkeypatch.setattr(shapes, "LAYER_MAJOR_TOKENS", 64)  # two layer-major passes
    engine = load_engine(tiny_checkpoint, device="cpu", dtype="float32", context_length=512,
                         gpu_memory=budget_for(tiny_checkpoint, 7))
    ids = [100000] + prompt(100, seed=6).tolist()
    settings = GenerationSettings(max_tokens=8, temperature=0)
    want = list(tiny_engine.new_session().generate(ids, settings, stop_ids=()))[-1]
    got = list(engine.new_session().generate(ids, settings, stop_ids=()))[-1]
    assert got.token_ids == want.token_ids


@pytest.mark.parametrize("where", ["copy", "second_assign"])
@torch.inference_mode()
def test_interrupt_between_slot_assignment_and_copy_keeps_weights_right(tiny_checkpoint, resident,
                                                                        where):
    """A Ctrl-C after a slot was given to an expert but before its copy was queued must not
    leave the slot marked as holding that expert: later tokens would use the wrong weights."""
    model = load(tiny_checkpoint, 6)
    cache = model.offload.cache
    ids = prompt(60, seed=7)
    full = resident(ids, resident.new_cache(512), 0, all_logits=True)
    kv = model.new_cache(512)
    parts = [model(ids[:40], kv, 0, all_logits=True)]
    armed = {"on": True}
    if where == "copy":
        real = cache.copier.copy

        def copy(pairs, after=()):
            if armed["on"]:
                armed["on"] = False
                raise KeyboardInterrupt  # the slots are assigned, the copy never queued
            return real(pairs, after)
        cache.copier.copy = copy
    else:
        real_assign, real_copy = cache.table.assign, cache.copier.copy
        calls = {"n": 0}  # slots assigned since the last copy was queued

        def assign(key, protected):
            calls["n"] += 1
            if armed["on"] and calls["n"] == 2:  # one slot already assigned in this batch
                armed["on"] = False
                raise KeyboardInterrupt
            return real_assign(key, protected)

        def copy(pairs, after=()):
            calls["n"] = 0
            return real_copy(pairs, after)
        cache.table.assign, cache.copier.copy = assign, copy
    pos = 40
    while armed["on"]:  # decode until the interrupt has fired (on the first miss batch)
        try:
            parts.append(model(ids[pos:pos + 1], kv, pos))
            pos += 1
        except KeyboardInterrupt:
            break  # the step is lost; the session goes on from the same position
    assert not armed["on"], "the interrupt never fired"
    assert all(cache.table.key_of[s] == k for k, s in cache.table.slot_of.items())
    parts += [model(ids[i:i + 1], kv, i) for i in range(pos, 60)]
    assert rel_err(torch.cat(parts), full) < 1e-5


def test_budget_sets_the_longest_window_and_says_so(tiny_checkpoint, tmp_path):
    """Without --context-length a budget gets the longest window it allows, not a fixed 8192,
    and the user hears what it is."""
    import json
    import shutil

    from dscoder.engine import load_engine
    from dscoder.offload.planner import kv_peak_bytes, work_bytes
    from dscoder.offload.setup import model_sizes

    ckpt = tmp_path / "long"
    shutil.copytree(tiny_checkpoint, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["max_position_embeddings"] = 65536
    (ckpt / "config.json").write_text(json.dumps(cfg))
    s = model_sizes(ModelConfig.from_file(ckpt / "config.json"), torch.float32)
    # what the whole model needs with a 20000-token window (a CPU budget has no CUDA context)
    budget = s.resident_bytes + s.all_experts_bytes + kv_peak_bytes(s, 20000) + work_bytes(s, 20000)
    notices: list[str] = []
    engine = load_engine(ckpt, device="cpu", dtype="float32", gpu_memory=str(budget),
                         notice=notices.append)
    assert 19456 <= engine.context_length <= 20000  # a multiple of 1024 below what fits
    assert notices == [f"Context window {engine.context_length} tokens under a "
                       f"{budget / 2**30:.2f} GiB GPU budget (the model allows 65536); a longer "
                       "--context-length costs offloading experts."]
    fixed = load_engine(ckpt, device="cpu", dtype="float32", gpu_memory=str(budget),
                        context_length=4096, notice=notices.append)
    assert fixed.context_length == 4096 and len(notices) == 1  # the user chose: nothing to say


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_offloaded_logits_equal_resident_to_the_bit(tiny_checkpoint, dtype):
    """Routed experts have one arithmetic (dscoder.model.moe): the offloaded paths only index
    other stacks (cache slots, staging buffers), so on the CPU their logits are the resident
    model's exactly: streamed prefill, cached small calls, and the decoder's segments."""
    from dscoder.offload.decoder import OffloadedDecoder

    def model(slots: int | None):
        m = load_model(tiny_checkpoint, ModelConfig.from_file(tiny_checkpoint / "config.json"),
                       device=CPU, dtype=dtype)
        if slots is not None:
            from dscoder.offload.setup import install_offload

            install_offload(m, slots, CPU)
        m.set_context(512)
        return m

    def run(m) -> list[torch.Tensor]:
        cache = m.new_cache(512)
        out = [m(ids, m.new_cache(512), 0, all_logits=True), m(ids[:40], cache, 0, all_logits=True)]
        out += [m(ids[i:i + 6], cache, i, all_logits=True) for i in range(40, 52, 6)]  # grouped
        out += [m(ids[i:i + 1], cache, i) for i in range(52, 56)]  # gathered: expert ids vs slots
        if m.offload is None:
            pos = torch.zeros(1, dtype=torch.long)
            return out + [m.decode_at(ids[i:i + 1], pos.fill_(i), cache, 512) for i in range(56, 64)]
        decoder = OffloadedDecoder(m, m.offload, cache, ahead=1, graphs=False)
        return out + [decoder(int(ids[i]), i).clone() for i in range(56, 64)]

    ids = prompt(64, seed=8)
    want = run(model(None))
    got = run(model(6))
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
