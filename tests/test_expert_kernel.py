"""The decode GEMV kernel (dscoder.model.gemv) with the routed experts, and the shared experts
joining the same launches, on the CPU under Triton's interpreter.

As in test_mla_decode.py, TRITON_INTERPRET=1 must be set before triton is imported, so the cases
run in one child process (this file run as a script). Skipped without triton.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import run_under_interpreter

E, H, INTER, N_SHARED = 8, 64, 48, 2  # experts, hidden, expert intermediate, shared experts


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tiny_moe(dtype: torch.dtype):
    """A MoE layer of random weights (E routed experts, N_SHARED shared) and one token routed."""
    from dscoder.config import ModelConfig
    from dscoder.model.moe import MoE
    from dscoder.random_checkpoint import TINY

    cfg = ModelConfig.from_dict({**TINY, "hidden_size": H, "moe_intermediate_size": INTER,
                                 "n_routed_experts": E, "n_shared_experts": N_SHARED,
                                 "num_experts_per_tok": 3})
    torch.manual_seed(0)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    moe = moe.to(dtype)
    h = torch.randn(1, H).to(dtype)
    ids, weights = moe.gate(h)
    return moe, h, ids, weights


def run_cases() -> dict[str, float]:
    from unittest import mock

    from dscoder.model import gemv as gemv_module
    from dscoder.model import moe_kernels
    from dscoder.model.gemv import expert_gemv, gemv
    from dscoder.model.quant import dequantize, quantize

    out: dict[str, float] = {}
    with torch.no_grad():
        # the dense GEMV on a strided weight (rows of a fused one): the extra-matrix branch idle
        w = torch.randn(3 * H, 40)[H:2 * H + 5]
        x = torch.randn(1, 40)
        out["dense"] = _rel(gemv(x, w), x @ w.T)
        # tiles narrower than a row: the first read before the loop (the PDL preload), the rest
        # in it, the last one partly masked
        out["dense-tiles"] = _rel(gemv(x, w, block_k=16), x @ w.T)

        # under torch.compile the launches are the dscoder::gemv operator: the same numbers
        gemv_module.register_op()
        out["compiled-dense"] = (torch.compile(gemv, backend="eager", fullgraph=True)(x, w)
                                 - gemv(x, w)).abs().max().item()
        # glu: silu(gate) * up of a gate-over-up weight in the launch; 37 outputs, so two rows a
        # program leave a partial last tile
        wg = torch.randn(2 * 37, 40)
        glu_ref = F.silu(x @ wg[:37].T) * (x @ wg[37:].T)
        out["glu-dense"] = _rel(gemv(x, wg, glu=True), glu_ref)
        out["glu-dense-tiles"] = _rel(gemv(x, wg, block_n=2, block_k=16, glu=True), glu_ref)
        out["compiled-glu"] = (torch.compile(lambda x, w: gemv(x, w, glu=True), backend="eager",
                                             fullgraph=True)(x, wg) - gemv(x, wg, glu=True)).abs().max().item()
        # bf16: the halves rounded as the unfused step stores them, the product in fp32
        xb, wb = x.bfloat16(), wg.bfloat16()
        gate, up = gemv(xb, wb).float().chunk(2, dim=-1)
        out["glu-bf16"] = _rel(gemv(xb, wb, glu=True), (F.silu(gate) * up).bfloat16())
        # int8 experts: each half's sums scaled before the product
        q, scale = quantize(torch.randn(E, 2 * INTER, H))
        xe, pick = torch.randn(1, H), torch.tensor([3, 5])
        gate, up = torch.einsum("jnk,k->jn", dequantize(q, scale, torch.float32)[pick], xe[0]).chunk(2, dim=-1)
        out["glu-int8"] = _rel(expert_gemv(xe, q, pick, 2, scale, glu=True), F.silu(gate) * up)

        moe, h, ids, weights = tiny_moe(torch.float32)
        extra = moe_kernels.shared_as_experts(moe.shared_experts.gate_up_proj.weight,
                                              moe.shared_experts.down_proj.weight, INTER)
        args = (h, ids, weights, moe.experts.w13, moe.experts.w2)
        compiled = torch.compile(moe_kernels.routed_experts_decode, backend="eager", fullgraph=True)
        out["compiled-experts"] = (compiled(*args, shared=extra)
                                   - moe_kernels.routed_experts_decode(*args, shared=extra)).abs().max().item()

        for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            moe, h, ids, weights = tiny_moe(dt)
            separate = moe.experts(h, ids, weights) + moe.shared_experts(h)  # the torch paths
            extra = moe_kernels.shared_as_experts(moe.shared_experts.gate_up_proj.weight,
                                                  moe.shared_experts.down_proj.weight, INTER)
            both = moe_kernels.routed_experts_decode(h, ids, weights, moe.experts.w13, moe.experts.w2,
                                                     shared=extra)
            # fp64 math on the same weights: how far each path is from the exact result
            m64 = tiny_moe(torch.float64)[0]
            m64.load_state_dict({k: v.double() for k, v in moe.state_dict().items()})
            exact = m64.experts(h.double(), ids, weights.double()) + m64.shared_experts(h.double())
            out[f"both-{name}"] = _rel(both, separate)
            out[f"both-{name}-exact"] = _rel(both, exact)
            out[f"separate-{name}-exact"] = _rel(separate, exact)
            # routed only, two tokens: the path as it was
            h2 = torch.randn(2, H).to(dt)
            ids2, w2 = moe.gate(h2)
            out[f"routed-{name}"] = _rel(moe_kernels.routed_experts_decode(h2, ids2, w2, moe.experts.w13,
                                                                           moe.experts.w2),
                                         moe.experts._grouped(h2, ids2, w2))
            # the layer takes the fused path for one token where the kernel runs (a GPU)
            with mock.patch.object(moe_kernels, "available", return_value=True):
                got = moe.decode_both(h, ids, weights)
                out[f"decode_both-{name}"] = _rel(got, both)
                out[f"decode_both-{name}-two-tokens-is-none"] = float(moe.decode_both(h2, ids2, w2) is None)
    return out


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_under_interpreter(__file__)


def test_dense_gemv_on_a_strided_weight(interpreted):
    assert interpreted["dense"] < 1e-5
    assert interpreted["dense-tiles"] < 1e-5


def test_glu_launch_applies_the_swiglu_product_to_its_sums(interpreted):
    """One launch gives silu(gate . x) * (up . x) for a gate-over-up weight: dense (whole and
    in partial tiles), int8 experts (scaled before the product), and in bf16 as the unfused
    step rounds it (the halves stored in bf16, the product in fp32) but for the interpreter's
    rounding toward zero."""
    assert interpreted["glu-dense"] < 1e-5
    assert interpreted["glu-dense-tiles"] < 1e-5
    assert interpreted["glu-int8"] < 1e-5
    assert interpreted["glu-bf16"] < 1e-2


@pytest.mark.parametrize("case", ["compiled-dense", "compiled-experts", "compiled-glu"])
def test_compiled_code_calls_the_kernel_as_an_operator_with_the_same_result(interpreted, case):
    """torch.compile traces dscoder::gemv (its fake gives the shapes), which launches the same
    kernel: the results are bit-identical to the plain call's."""
    assert interpreted[case] == 0.0


@pytest.mark.parametrize("dtype, tolerance", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_shared_experts_as_extra_experts_match_the_shared_mlp(interpreted, dtype, tolerance):
    """Routed and shared experts in one pair of launches equal the routed kernel plus SwiGLU.
    In fp32 also no further from fp64 math than the separate path, but for noise; not in bf16
    here: the interpreter rounds fp32 to bf16 toward zero (see test_mla_decode.py), which
    doubles the kernel's rounding error (tests/gpu/test_cuda.py checks bf16 on a GPU)."""
    assert interpreted[f"both-{dtype}"] < tolerance
    if dtype == "fp32":
        assert interpreted[f"both-{dtype}-exact"] < 1.3 * interpreted[f"separate-{dtype}-exact"] + 1e-6


@pytest.mark.parametrize("dtype, tolerance", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_routed_experts_of_two_tokens_unchanged(interpreted, dtype, tolerance):
    assert interpreted[f"routed-{dtype}"] < tolerance


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_moe_layer_takes_the_fused_path_for_one_token_only(interpreted, dtype):
    assert interpreted[f"decode_both-{dtype}"] == 0.0
    assert interpreted[f"decode_both-{dtype}-two-tokens-is-none"] == 1.0


def test_no_fused_path_on_the_cpu_or_with_int8_experts():
    from dscoder.model import moe_kernels

    moe, h, ids, weights = tiny_moe(torch.float32)
    assert moe.decode_both(h, ids, weights) is None  # no GPU kernel here
    moe.experts.s13 = torch.ones(E, 2 * INTER)  # as set_quantized leaves an int8 layer
    from unittest import mock

    with mock.patch.object(moe_kernels, "available", return_value=True):
        assert moe.decode_both(h, ids, weights) is None


if __name__ == "__main__":  # the child process
    assert os.environ.get("TRITON_INTERPRET") == "1"
    print(json.dumps(run_cases()))
