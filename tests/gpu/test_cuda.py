"""The CUDA paths (Triton expert kernel, CUDA-graph decode, bf16) against the reference.

Skipped without a GPU; run on the GPU machine with `python -m pytest tests/gpu -q`.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def greedy_ids(engine, text: str, n: int = 48) -> tuple[int, ...]:
    from dscoder.events import GenerationSettings

    ids = [engine.tokenizer.bos_id] + engine.tokenizer.encode(text)
    events = list(engine.new_session().generate(ids, GenerationSettings(max_tokens=n, temperature=0),
                                                stop_ids=()))
    return events[-1].token_ids


def test_triton_expert_kernel_matches_torch():
    from dscoder.model import moe_kernels
    from dscoder.model.moe import expert_mlp

    g = torch.Generator(device="cuda").manual_seed(0)
    e, h, i, t, k = 64, 2048, 1408, 2, 6
    w13 = torch.randn(e, 2 * i, h, device="cuda", generator=g).bfloat16() * 0.02
    w2 = torch.randn(e, h, i, device="cuda", generator=g).bfloat16() * 0.02
    x = torch.randn(t, h, device="cuda", generator=g).bfloat16()
    ids = torch.randint(0, e, (t, k), device="cuda", generator=g)
    w = torch.rand(t, k, device="cuda", generator=g)
    got = moe_kernels.routed_experts_decode(x, ids, w, w13, w2)
    ref = torch.stack([sum(expert_mlp(x[r:r + 1].float(), w13[ids[r, j]].float(), w2[ids[r, j]].float())[0]
                           * w[r, j] for j in range(k)) for r in range(t)])
    assert rel_err(got, ref) < 1e-2


def test_shared_experts_join_the_routed_launches_in_lite_shapes():
    """One decode token's routed and shared experts in the expert kernel's two launches (as the
    compiled step runs them) against the routed kernel plus the shared SwiGLU, and both against
    fp64 math: no further from it than the separate path, but for rounding noise."""
    from dscoder.config import ModelConfig
    from dscoder.model.moe import MoE
    from dscoder.random_checkpoint import LITE

    cfg = ModelConfig.from_dict(LITE)
    torch.manual_seed(0)
    moe = MoE(cfg)
    for prm in moe.parameters():
        torch.nn.init.normal_(prm, std=0.02)
    exact64 = MoE(cfg).double()  # on the CPU: torch's fp64 products, no kernel
    moe = moe.bfloat16().cuda()
    exact64.load_state_dict({k: v.double().cpu() for k, v in moe.state_dict().items()})
    for seed in range(3):
        h = torch.randn(1, cfg.hidden_size, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
        h = h.bfloat16()
        ids, weights = moe.gate(h)
        both = moe.decode_both(h, ids, weights)
        separate = moe.experts(h, ids, weights) + moe.shared_experts(h)
        h64, ids64, w64 = h.double().cpu(), ids.cpu(), weights.double().cpu()
        exact = (exact64.experts(h64, ids64, w64) + exact64.shared_experts(h64)).cuda()
        assert both is not None and rel_err(both, separate) < 1e-2
        assert rel_err(both, exact) < 1.3 * rel_err(separate, exact) + 1e-6


def test_cuda_fp32_logits_match_transformers(tiny_checkpoint):
    transformers = pytest.importorskip("transformers")
    from dscoder.config import ModelConfig
    from dscoder.weights import load_model

    cfg = ModelConfig.from_file(tiny_checkpoint / "config.json")
    ours = load_model(tiny_checkpoint, cfg, device=torch.device("cuda"), dtype=torch.float32)
    ours.set_context(256)
    ref = transformers.DeepseekV2ForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    ids = torch.randint(0, 100000, (96,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = ref(ids[None]).logits[0]
        got = ours(ids.cuda(), ours.new_cache(256), 0, all_logits=True).cpu()
    assert rel_err(got, expected) < 1e-4


def test_cuda_graph_decode_gives_the_same_ids(tiny_checkpoint, monkeypatch):
    from dscoder.engine import load_engine

    graphed = load_engine(tiny_checkpoint, device="cuda", dtype="float32")
    assert graphed.use_graphs
    eager = load_engine(tiny_checkpoint, device="cuda", dtype="float32", cuda_graphs=False)
    assert not eager.use_graphs
    for text in ("def main():", "User: hi\n\nAssistant:"):
        assert greedy_ids(graphed, text) == greedy_ids(eager, text)


def test_cuda_graph_decode_across_buckets_and_cache_growth(tiny_checkpoint, monkeypatch):
    from dscoder import shapes
    from dscoder.engine import load_engine

    # small buckets and a small first cache, so that one generation crosses both boundaries
    monkeypatch.setattr(shapes, "BUCKET", 16)
    monkeypatch.setattr(shapes, "FIRST_CAPACITY", 32)
    graphed = load_engine(tiny_checkpoint, device="cuda", dtype="float32")
    eager = load_engine(tiny_checkpoint, device="cuda", dtype="float32", cuda_graphs=False)
    assert greedy_ids(graphed, "x = 1", n=80) == greedy_ids(eager, "x = 1", n=80)


def test_bf16_engine_close_to_fp32_reference(tiny_checkpoint):
    from dscoder.config import ModelConfig
    from dscoder.weights import load_model

    cfg = ModelConfig.from_file(tiny_checkpoint / "config.json")
    ids = torch.randint(0, 100000, (64,), generator=torch.Generator().manual_seed(1)).cuda()
    out = {}
    for dt in (torch.float32, torch.bfloat16):
        m = load_model(tiny_checkpoint, cfg, device=torch.device("cuda"), dtype=dt)
        m.set_context(128)
        with torch.inference_mode():
            out[dt] = m(ids, m.new_cache(128), 0, all_logits=True)
    assert rel_err(out[torch.bfloat16], out[torch.float32]) < 5e-2


def test_grouped_prefill_matches_per_expert_in_bf16(tiny_checkpoint, monkeypatch):
    import dscoder.model.moe as moe
    from dscoder.config import ModelConfig
    from dscoder.weights import load_model

    cfg = ModelConfig.from_file(tiny_checkpoint / "config.json")
    m = load_model(tiny_checkpoint, cfg, device=torch.device("cuda"), dtype=torch.bfloat16)
    m.set_context(256)
    ids = torch.randint(0, 100000, (200,), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.inference_mode():
        assert moe.grouped_mm_supported(m.lm_head.weight)
        grouped = m(ids, m.new_cache(256), 0, all_logits=True)
        monkeypatch.setattr(moe, "grouped_mm_supported", lambda x: False)
        looped = m(ids, m.new_cache(256), 0, all_logits=True)
    assert rel_err(grouped, looped) < 2e-2


@pytest.mark.parametrize("dtype, tolerance, flash", [(torch.float32, 1e-4, False), (torch.bfloat16, 2e-2, True)])
def test_chunked_prefill_on_cuda_matches_one_pass(tiny_checkpoint, monkeypatch, dtype, tolerance, flash):
    """Later prefill chunks see the cache and themselves causally (aligned to the lower right):
    in half precision through flash attention's causal flag, in fp32 through a spelled-out mask."""
    from dscoder.config import ModelConfig
    from dscoder.model import attention
    from dscoder.weights import load_model

    asked = []
    real = attention.can_use_flash_attention
    monkeypatch.setattr(attention, "can_use_flash_attention", lambda p: asked.append(real(p)) or asked[-1])
    cfg = ModelConfig.from_file(tiny_checkpoint / "config.json")
    m = load_model(tiny_checkpoint, cfg, device=torch.device("cuda"), dtype=dtype)
    m.set_context(512)
    ids = torch.randint(0, 100000, (300,), generator=torch.Generator().manual_seed(3)).cuda()
    with torch.inference_mode():
        whole = m(ids, m.new_cache(512), 0, all_logits=True)
        cache = m.new_cache(512)
        parts = [m(ids[a:b], cache, a, all_logits=True) for a, b in ((0, 100), (100, 230), (230, 300))]
    assert asked and set(asked) == {flash}
    assert rel_err(torch.cat(parts), whole) < tolerance


def test_ids_sampled_on_the_device_are_the_host_samplers(tiny_checkpoint, monkeypatch):
    """Decoding ahead (the sampling graph after each step's graph, ids read a few steps behind)
    draws what eager decode, sampling on the host, draws from the same seed; a stop leaves the
    same cache behind (the next turn reuses the same rows)."""
    from dscoder import shapes
    from dscoder.engine import load_engine
    from dscoder.events import GenerationSettings

    monkeypatch.setattr(shapes, "BUCKET", 16)
    monkeypatch.setattr(shapes, "FIRST_CAPACITY", 32)
    graphed = load_engine(tiny_checkpoint, device="cuda", dtype="float32")
    eager = load_engine(tiny_checkpoint, device="cuda", dtype="float32", cuda_graphs=False)
    prompt = [graphed.tokenizer.bos_id] + graphed.tokenizer.encode("import os")
    settings = GenerationSettings(max_tokens=70, temperature=0.8, top_p=0.9, top_k=30, seed=3)
    runs, ahead = [], []
    for engine in (graphed, eager):
        s = engine.new_session()
        first = list(s.generate(prompt, settings, stop_ids=()))[-1]
        stop = first.token_ids[20]
        cut = list(s.generate(prompt, settings, stop_ids={stop}))[-1]
        follow = prompt + list(cut.token_ids) + [5, 6]
        again = list(s.generate(follow, settings, stop_ids=()))[-1]
        runs.append((first.token_ids, cut.token_ids, len(s.tokens), again.cached_tokens, again.token_ids))
        ahead.append(bool(getattr(s._graphs, "samplers", None)))
    assert runs[0] == runs[1]
    assert ahead == [True, False]  # the graphed engine sampled in its sampling graph


def test_sampling_noise_kernel_on_the_gpu():
    """The noise kernel computes the torch hash (up to the log's last bit)."""
    from dscoder import sampling

    ids = torch.randperm(102400, device="cuda")
    for seed, pos in ((3, 17), (2**32 - 1, 123456)):
        s = torch.tensor([seed], device="cuda")
        p = torch.tensor([pos], device="cuda")
        got = sampling.exponential_noise(s, p, ids)  # the kernel
        want = sampling.exponential_noise(s.cpu(), p.cpu(), ids.cpu())  # torch's arithmetic
        assert ((got.cpu() - want).abs() / want).max() < 3e-7


@pytest.mark.parametrize("n,k", [(3648, 2048), (2048, 2816), (1000, 700), (7, 64)])
def test_triton_gemv_matches_cublas(n, k):
    from dscoder.model.gemv import gemv

    g = torch.Generator(device="cuda").manual_seed(n)
    w = torch.randn(n + 5, k, device="cuda", generator=g).bfloat16()[5:]  # rows of a bigger weight
    x = torch.randn(1, k, device="cuda", generator=g).bfloat16()
    ref = torch.nn.functional.linear(x.float(), w.float())
    assert rel_err(gemv(x, w), ref) < 1e-2


def _mla_inputs(rows: int, heads: int = 16, rank: int = 512, rope: int = 64):
    """Lite's decode attention inputs in bf16: q_lat, q_pe and one layer's rows of a longer cache."""
    g = torch.Generator(device="cuda").manual_seed(rows)
    q_lat = torch.randn(heads, 1, rank, device="cuda", generator=g).bfloat16()
    q_pe = torch.randn(heads, 1, rope, device="cuda", generator=g).bfloat16()
    cache = torch.randn(rows + 64, rank + rope, device="cuda", generator=g).bfloat16()
    return q_lat, q_pe, cache[:rows]


MLA_SCALE = 576 ** -0.5 * 2.0  # peaked enough that the softmax is not near uniform


@pytest.mark.parametrize("rows", [2048, 32768])
@pytest.mark.parametrize("pos", [100, 1500, -1])
def test_mla_decode_kernel_matches_torch_path(rows, pos):
    from dscoder.model.attention import latent_attention
    from dscoder.model.mla_decode import absorbed_decode
    from dscoder.model.step import Step

    q_lat, q_pe, cached = _mla_inputs(rows)
    at = torch.tensor([pos % rows], device="cuda")
    ref = latent_attention(q_lat, q_pe, cached, Step.on_device(at, rows).mask, MLA_SCALE)
    assert rel_err(absorbed_decode(q_lat, q_pe, cached, at, MLA_SCALE), ref) < 1e-2
    w_uv = (torch.randn(16, 256, 512, device="cuda") * 512 ** -0.5).bfloat16()[:, 128:]  # kv_b_proj's v rows
    fused = absorbed_decode(q_lat, q_pe, cached, at, MLA_SCALE, w_uv)
    assert rel_err(fused, torch.matmul(ref, w_uv.transpose(1, 2))) < 1e-2
    if pos == -1:  # every row valid: the same without a position
        assert rel_err(absorbed_decode(q_lat, q_pe, cached, None, MLA_SCALE), ref) < 1e-2


def test_mla_decode_kernel_in_a_cuda_graph_follows_the_position():
    """Captured once at 32K rows, replayed at other positions: as eager, to the bit."""
    from dscoder.graphs import capture_graph
    from dscoder.model.mla_decode import absorbed_decode

    rows = 32768
    q_lat, q_pe, cached = _mla_inputs(rows)
    pos = torch.zeros(1, dtype=torch.long, device="cuda")
    out = {}

    def step() -> None:
        out["lat"] = absorbed_decode(q_lat, q_pe, cached, pos, MLA_SCALE)

    graph = capture_graph(step, torch.device("cuda"), warm_up=step)
    for p in (100, 1500, rows - 1, 0, 2047):
        pos.fill_(p)
        graph.replay()
        assert torch.equal(out["lat"], absorbed_decode(q_lat, q_pe, cached, pos, MLA_SCALE)), p


def test_compiled_graphed_decode_with_the_mla_kernel_matches_torch_path(tiny_checkpoint, monkeypatch):
    """The kernel inside the torch.compile'd decode layer and a CUDA graph (as the engine runs
    it), with and without W_uv folded in, against the same compiled graph with the torch
    attention path (DSCODER_TRITON_MLA=0)."""
    from dscoder.config import ModelConfig
    from dscoder.graphs import capture_graph
    from dscoder.model import mla_decode
    from dscoder.weights import load_model

    cfg = ModelConfig.from_file(tiny_checkpoint / "config.json")
    m = load_model(tiny_checkpoint, cfg, device=torch.device("cuda"), dtype=torch.bfloat16)
    m.set_context(256)
    m.compile_decode()
    ids = torch.randint(0, 100000, (40,), generator=torch.Generator().manual_seed(4)).cuda()
    cache = m.new_cache(256)
    with torch.inference_mode():
        m(ids[:-1], cache, 0)
    cache.data[:, 40:].normal_(0, 4)  # rows past the position: garbage that only a bad mask would read
    token, pos = ids[-1:].clone(), torch.tensor([39], device="cuda")
    logits = {}
    for mode, enabled, fuse_uv in (("torch", False, False), ("kernel", True, False), ("uv", True, True)):
        monkeypatch.setattr(mla_decode, "ENABLED", enabled)
        monkeypatch.setattr(mla_decode, "FUSE_UV", fuse_uv)

        def step(mode=mode) -> None:
            logits[mode] = m.decode_at(token, pos, cache, 128)  # a bucket of 128 rows, 40 valid

        capture_graph(step, torch.device("cuda"), warm_up=step).replay()
    assert rel_err(logits["kernel"], logits["torch"]) < 2e-2
    assert rel_err(logits["uv"], logits["torch"]) < 2e-2


def test_programmatic_dependent_launch_changes_when_kernels_start_not_what_they_compute(
        tiny_checkpoint, monkeypatch):
    """The compiled, graphed decode step with PDL (dscoder.model.pdl) on Hopper: replays of one
    graph give bit-identical logits (a kernel reading a buffer before the kernel that writes it
    had finished would make them vary), close to the same step without PDL."""
    from dscoder.config import ModelConfig
    from dscoder.graphs import capture_graph
    from dscoder.model import pdl
    from dscoder.weights import load_model

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs compute capability 9.0")
    cfg = ModelConfig.from_file(tiny_checkpoint / "config.json")
    m = load_model(tiny_checkpoint, cfg, device=torch.device("cuda"), dtype=torch.bfloat16)
    m.set_context(256)
    ids = torch.randint(0, 100000, (40,), generator=torch.Generator().manual_seed(5)).cuda()
    cache = m.new_cache(256)
    with torch.inference_mode():
        m(ids[:-1], cache, 0)
    token, pos = ids[-1:].clone(), torch.tensor([39], device="cuda")
    replays = {}
    for on in (True, False):
        monkeypatch.setattr(pdl, "SWITCH", on)
        assert pdl.enabled(torch.device("cuda")) == on
        m.compile_decode()  # Inductor's kernels with or without PDL; ours decide at capture
        held = {}

        def step(held=held) -> None:
            held["logits"] = m.decode_at(token, pos, cache, 128)

        graph = capture_graph(step, torch.device("cuda"), warm_up=step)
        logits = held["logits"]  # written by the capture: each replay rewrites it
        results = []
        for _ in range(20):
            graph.replay()
            results.append(logits.clone())
        replays[on] = results
    first = replays[True][0]
    assert all(torch.equal(r, first) for r in replays[True])
    assert rel_err(first, replays[False][0]) < 1e-2
