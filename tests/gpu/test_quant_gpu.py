"""--expert-dtype int8 on CUDA: the Triton kernel's in-kernel dequantization against the torch
path, and the int8 engines (offloaded and resident) against bf16 and each other.

Skipped without a GPU; run with `python -m pytest tests/gpu/test_quant_gpu.py -q`.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def stacks(e: int, hidden: int, inter: int, seed: int = 0):
    from dscoder.model.quant import quantize

    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(e, 2 * inter, hidden, generator=g) * 0.02
    w2 = torch.randn(e, hidden, inter, generator=g) * 0.02
    (q13, s13), (q2, s2) = quantize(w13), quantize(w2)
    return [t.to(CUDA) for t in (q13, q2, s13, s2)]


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("tokens", [1, 2])
def test_triton_int8_kernel_matches_the_torch_dequant_path(dtype, bound, tokens):
    from dscoder.model import moe_kernels
    from dscoder.model.moe import gathered_experts
    from dscoder.model.quant import dequantize

    q13, q2, s13, s2 = stacks(8, 2048, 1408)  # Lite's expert shape
    x = (torch.randn(tokens, 2048, generator=torch.Generator().manual_seed(1)) * 0.5).to(CUDA, dtype)
    ids = torch.randint(0, 8, (tokens, 6), generator=torch.Generator().manual_seed(2)).to(CUDA)
    weights = torch.rand(tokens, 6, generator=torch.Generator().manual_seed(3)).to(CUDA)
    got = moe_kernels.routed_experts_decode(x, ids, weights, q13, q2, s13, s2)
    # the torch path on the CPU (the one helper that dequantizes), in fp32
    want = gathered_experts(x.float().cpu(), ids.cpu(), weights.cpu(), q13.cpu(), q2.cpu(),
                            s13.cpu(), s2.cpu())
    assert got.dtype == dtype and rel_err(got.cpu(), want) < bound
    # and the bf16/fp32 kernel on the dequantized stacks computes the same
    plain = moe_kernels.routed_experts_decode(x, ids, weights, dequantize(q13, s13, dtype),
                                              dequantize(q2, s2, dtype))
    assert rel_err(got, plain) < bound


def load(path, slots: int | None, dtype, expert_dtype: str | None):
    from dscoder.config import ModelConfig
    from dscoder.offload.setup import install_offload
    from dscoder.weights import load_model

    cfg = ModelConfig.from_file(path / "config.json")
    if slots is None:
        model = load_model(path, cfg, device=CUDA, dtype=dtype, expert_dtype=expert_dtype)
    else:
        model = load_model(path, cfg, device=CUDA, dtype=dtype, expert_dtype=expert_dtype,
                           expert_device=torch.device("cpu"))
        install_offload(model, slots, CUDA)
    model.set_context(512)
    return model


@torch.inference_mode()
def test_int8_offloaded_logits_against_bf16_offloaded(tiny_checkpoint):
    bf16 = load(tiny_checkpoint, 7, torch.bfloat16, None)
    int8 = load(tiny_checkpoint, 7, torch.bfloat16, "int8")
    assert all(t.is_pinned() for t in int8.offload.store.tensors())
    assert int8.offload.cache.w13.dtype == torch.int8 and int8.offload.cache.s13.is_cuda
    ids = torch.randint(0, 100000, (48,), generator=torch.Generator().manual_seed(0)).to(CUDA)
    logits = []
    for model in (bf16, int8):
        cache = model.new_cache(512)
        model(ids[:32], cache, 0)
        decoder = model.offload.decoder(model, cache)  # CUDA-graph segments, Triton kernel
        logits.append(torch.cat([decoder(int(ids[i]), i).clone() for i in range(32, 48)]))
    assert rel_err(logits[1], logits[0]) < 2e-2  # tiny model on the CPU: 3.7e-3
    assert int8.offload.stats.bytes_copied > 0


@torch.inference_mode()
def test_int8_offloaded_matches_int8_resident_on_cuda(tiny_checkpoint):
    resident = load(tiny_checkpoint, None, torch.float32, "int8")
    model = load(tiny_checkpoint, 6, torch.float32, "int8")
    ids = torch.randint(0, 100000, (80,), generator=torch.Generator().manual_seed(4)).to(CUDA)
    full = resident(ids, resident.new_cache(512), 0, all_logits=True)
    assert rel_err(model(ids, model.new_cache(512), 0, all_logits=True), full) < 1e-4  # streamed
    cache = model.new_cache(512)
    parts = [model(ids[:40], cache, 0, all_logits=True)]
    parts += [model(ids[i:i + 1], cache, i) for i in range(40, 80)]  # Triton kernel by slot
    assert rel_err(torch.cat(parts), full) < 1e-4


def test_int8_engines_generate_alike(tiny_checkpoint):
    """The resident int8 engine (compiled step, CUDA graphs) and the offloaded one, greedy."""
    import gc

    from dscoder.config import ModelConfig
    from dscoder.engine import load_engine
    from dscoder.events import GenerationSettings
    from dscoder.offload.planner import budget_for_slots
    from dscoder.offload.setup import model_sizes

    s = GenerationSettings(max_tokens=24, temperature=0)
    resident = load_engine(tiny_checkpoint, device="cuda", dtype="float32", expert_dtype="int8",
                           context_length=512)
    assert resident.model.model.layers[1].mlp.experts.w13.dtype == torch.int8
    ids = [100000] + resident.tokenizer.encode("def quicksort(xs):\n    ")
    a = list(resident.new_session().generate(ids, s, stop_ids=()))[-1].token_ids
    # a budget caps the whole process: the resident engine and what the allocator kept go first
    resident.close()
    del resident
    gc.collect()
    torch.cuda.empty_cache()
    sizes = model_sizes(ModelConfig.from_file(tiny_checkpoint / "config.json"), torch.float32, "int8")
    budget = str(budget_for_slots(sizes, 7, 512, cuda=True))
    offloaded = load_engine(tiny_checkpoint, device="cuda", dtype="float32", expert_dtype="int8",
                            context_length=512, gpu_memory=budget)
    assert offloaded.model.offload.cache.slots == 7
    b = list(offloaded.new_session().generate(ids, s, stop_ids=()))[-1].token_ids
    assert sum(x == y for x, y in zip(a, b, strict=True)) >= 20
    offloaded.close()
