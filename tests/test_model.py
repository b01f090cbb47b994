"""Our forward pass against transformers' DeepseekV2ForCausalLM on the same random weights."""
from __future__ import annotations

import pytest
import torch

from dscoder.config import ModelConfig
from dscoder.weights import load_model

transformers = pytest.importorskip("transformers")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def load_pair(path):
    cfg = ModelConfig.from_file(path / "config.json")
    ours = load_model(path, cfg, device=torch.device("cpu"), dtype=torch.float32)
    ours.set_context(512)
    ref = transformers.DeepseekV2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ours, ref


@pytest.fixture(scope="module", params=["tiny", "tiny236"])
def pair(request, tiny_checkpoint, tiny236_checkpoint):
    path = tiny_checkpoint if request.param == "tiny" else tiny236_checkpoint
    return load_pair(path)


def prompt(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 100000, (n,), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def test_full_forward_matches_reference(pair):
    ours, ref = pair
    ids = prompt(96)  # beyond the tiny config's 32 original positions: YaRN's ramp matters
    expected = ref(ids[None]).logits[0]
    got = ours(ids, ours.new_cache(512), 0, all_logits=True)
    assert rel_err(got, expected) < 1e-4


@torch.inference_mode()
def test_incremental_decode_matches_full_forward(pair):
    ours, _ = pair
    ids = prompt(48, seed=1)
    full = ours(ids, ours.new_cache(512), 0, all_logits=True)
    cache = ours.new_cache(512)
    head = ours(ids[:20], cache, 0, all_logits=True)
    steps = [ours(ids[i:i + 1], cache, i) for i in range(20, 48)]
    assert rel_err(torch.cat([head, *steps]), full) < 1e-5


@torch.inference_mode()
@pytest.mark.parametrize("absorbed", [False, True])
def test_prefill_in_chunks_matches_full_forward(pair, absorbed):
    """Later chunks see the cache and themselves causally (aligned to the lower right)."""
    ours, _ = pair
    ids = prompt(40, seed=3)
    full = ours(ids, ours.new_cache(512), 0, all_logits=True)
    cache = ours.new_cache(512)
    parts = [ours(ids[a:b], cache, a, all_logits=True, absorbed=absorbed) for a, b in ((0, 9), (9, 25), (25, 40))]
    assert rel_err(torch.cat(parts), full) < 1e-5


@torch.inference_mode()
def test_absorbed_and_expanded_attention_agree(pair):
    ours, _ = pair
    ids = prompt(40, seed=2)
    a = ours(ids, ours.new_cache(512), 0, all_logits=True, absorbed=True)
    b = ours(ids, ours.new_cache(512), 0, all_logits=True, absorbed=False)
    assert rel_err(a, b) < 1e-5


def test_greedy_generation_matches_reference(tiny_engine):
    from dscoder.events import Finished, GenerationSettings

    ref = transformers.DeepseekV2ForCausalLM.from_pretrained(tiny_engine.model_dir,
                                                              dtype=torch.float32).eval()
    ids = [100000] + tiny_engine.tokenizer.encode("def fibonacci(n):\n    ")
    with torch.inference_mode():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    expected = out[0, len(ids):].tolist()
    events = list(tiny_engine.new_session().generate(
        ids, GenerationSettings(max_tokens=64, temperature=0), stop_ids=()))
    final = events[-1]
    assert isinstance(final, Finished) and final.reason == "length"
    assert list(final.token_ids) == expected


@torch.inference_mode()
def test_decode_with_device_position_matches_decode(pair):
    # the graph-capturable step: position in a tensor, a fixed number of (masked) cache rows
    ours, _ = pair
    ids = prompt(30, seed=3)
    cache_a, cache_b = ours.new_cache(64), ours.new_cache(64)
    ours(ids[:29], cache_a, 0)
    ours(ids[:29], cache_b, 0)
    expected = ours(ids[29:], cache_a, 29)
    got = ours.decode_at(ids[29:], torch.tensor([29]), cache_b, visible=64)
    assert rel_err(got, expected) < 1e-5


@torch.inference_mode()
def test_grouped_and_per_expert_prefill_agree(pair, monkeypatch):
    import dscoder.model.moe as moe

    ours, _ = pair
    ids = prompt(64, seed=4)
    grouped = ours(ids, ours.new_cache(128), 0, all_logits=True)
    monkeypatch.setattr(moe, "grouped_mm_supported", lambda x: False)
    looped = ours(ids, ours.new_cache(128), 0, all_logits=True)
    assert rel_err(grouped, looped) < 1e-5


def test_routed_experts_by_slot_equal_by_id():
    # an expert provider only changes which stack and which index: the same arithmetic, bit for bit
    from dscoder.model.moe import ExpertGroups, gathered_experts

    g = torch.Generator().manual_seed(0)
    e, h, i, t, k = 8, 16, 12, 3, 2
    w13, w2 = torch.randn(e, 2 * i, h, generator=g), torch.randn(e, h, i, generator=g)
    x, w = torch.randn(t, h, generator=g), torch.rand(t, k, generator=g)
    ids = torch.tensor([[1, 6], [6, 3], [0, 1]])
    slot_of = torch.tensor([5, 2, 7, 0, 4, 1, 6, 3])  # expert e sits in slot slot_of[e]
    pool13, pool2 = torch.empty_like(w13), torch.empty_like(w2)
    pool13[slot_of], pool2[slot_of] = w13, w2
    want = gathered_experts(x, ids, w, w13, w2)
    assert torch.equal(gathered_experts(x, slot_of[ids], w, pool13, pool2), want)
    by_id, by_slot = (ExpertGroups(x, ids, w, ids.reshape(-1).tolist()) for _ in range(2))
    for ex in by_id.experts:
        by_id.apply(ex, w13[ex], w2[ex])
    for ex in reversed(by_slot.experts):  # another order (hits first): two addends, same sum
        by_slot.apply(ex, pool13[slot_of[ex]], pool2[slot_of[ex]])
    assert torch.equal(by_slot.result(), by_id.result())
    assert (by_id.result() - want).abs().max() < 1e-4  # gathered vs grouped: same sums, other order


def test_prefill_attention_never_takes_cudnn(pair, monkeypatch):
    """Prefill attention runs with cuDNN's backend off (it plans each new shape: 0.7 s a new
    prompt length on an H100), flash and memory-efficient attention on; afterwards the
    process's settings are as they were."""
    from dscoder.model import attention

    ours = pair[0]
    before = torch.backends.cuda.cudnn_sdp_enabled()
    seen = []
    real = attention.F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
                     torch.backends.cuda.mem_efficient_sdp_enabled()))
        return real(*args, **kwargs)

    class Functional:  # torch.nn.functional with the spy in place, for the attention module only
        scaled_dot_product_attention = staticmethod(spy)

        def __getattr__(self, name):
            return getattr(torch.nn.functional, name)

    monkeypatch.setattr(attention, "F", Functional())
    ids = prompt(12)
    with torch.no_grad():
        ours(ids[:8], ours.new_cache(32), 0)  # the first chunk: causal
        cache = ours.new_cache(32)
        ours(ids[:5], cache, 0)
        ours(ids[5:12], cache, 5)  # a later chunk: causal to the lower right
    assert seen and set(seen) == {(False, True, True)}
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_compiled_decode_router_picks_the_eager_experts():
    """Under torch.compile one token's router sums and sorts (fused by Inductor) instead of
    F.linear and torch.topk; the same experts, the same weights."""
    from dscoder.config import ModelConfig
    from dscoder.model.moe import Router
    from dscoder.random_checkpoint import LITE

    router = Router(ModelConfig.from_dict(LITE))
    torch.nn.init.normal_(router.weight, std=0.02)
    compiled = torch.compile(router.forward, fullgraph=True)
    for seed in range(3):
        x = torch.randn(1, router.weight.shape[1], generator=torch.Generator().manual_seed(seed))
        ids, weights = router(x)
        got_ids, got_weights = compiled(x)
        order, got_order = ids[0].argsort(), got_ids[0].argsort()
        assert torch.equal(ids[0][order], got_ids[0][got_order])
        assert torch.allclose(weights[0][order], got_weights[0][got_order], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 4e-3)])
def test_compiled_query_absorption_is_the_product(dtype, tolerance):
    """Under torch.compile one token's q_nope @ W_uk is a sum in fp32 (one Inductor reduction)
    instead of a batched product: the same values (in bf16 both sum in fp32 and round once, so
    they differ by at most one rounding, from the order of the sum)."""
    from dscoder.model.attention import absorb_query

    g = torch.Generator().manual_seed(0)
    q = torch.randn(16, 1, 128, generator=g).to(dtype)
    w = (torch.randn(16, 128, 512, generator=g) * 0.05).to(dtype)
    compiled = torch.compile(absorb_query, fullgraph=True)(q, w)
    eager = absorb_query(q, w)
    assert compiled.shape == eager.shape == (16, 1, 512) and compiled.dtype == dtype
    assert torch.allclose(compiled.float(), eager.float(), rtol=tolerance, atol=tolerance)
