"""The fused MLA decode kernel (dscoder.model.mla_decode) against the torch path, on the CPU.

A CPU has no Triton backend, but Triton's interpreter runs the kernel on CPU tensors. It is
chosen when triton is imported (TRITON_INTERPRET=1 then makes every @triton.jit kernel an
interpreted one), so the cases run in one child process (this file run as a script): the
other tests of a pytest process keep their compiled kernels. Skipped without triton (CI).
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from triton_interpreter import run_under_interpreter

# (name, heads, rank, rope, rows S, position (None: every row valid), dtype, kernel options)
LITE = (16, 512, 64)
CASES = [
    *[(f"lite-S{s}-pos{p}-bf16", *LITE, s, p, "bfloat16", {})
      for s in (64, 200, 1024) for p in sorted({0, s // 2 - 3, s - 1})],
    ("lite-S200-all-bf16", *LITE, 200, None, "bfloat16", {}),
    ("lite-S200-pos77-fp32", *LITE, 200, 77, "float32", {}),
    ("lite-S1024-pos1023-fp32", *LITE, 1024, 1023, "float32", {}),
    ("lite-S1024-pos600-fp16", *LITE, 1024, 600, "float16", {}),
    # many small splits: 64 of 16 rows, combined 16 at a time
    ("lite-S1024-pos1023-64splits", *LITE, 1024, 1023, "bfloat16", {"block_t": 16, "min_rows": 16}),
    # few splits, each several blocks with a partial last one
    ("lite-S1000-pos900-3splits", *LITE, 1000, 900, "bfloat16", {"splits": 3, "block_t": 32, "min_rows": 32}),
    ("tiny-H2-S50-pos20-bf16", 2, 32, 16, 50, 20, "bfloat16", {}),
    ("tiny-H4-S130-pos129-bf16", 4, 32, 16, 130, 129, "bfloat16", {"block_t": 16, "min_rows": 16}),
    ("tiny-H4-S130-pos0-fp32", 4, 32, 16, 130, 0, "float32", {"block_t": 16, "min_rows": 16}),
    ("tiny-H3-rank40-rope8-fp32", 3, 40, 8, 70, 41, "float32", {"block_t": 16, "min_rows": 16}),
    ("H32-S300-pos150-bf16", 32, 512, 64, 300, 150, "bfloat16", {}),
    ("H32-S300-pos299-fp32", 32, 512, 64, 300, 299, "float32", {"block_t": 32, "min_rows": 32}),
    # the value projection folded into the combine kernel ("uv": W_uv's rows per head)
    ("uv-lite-S1024-pos700-bf16", *LITE, 1024, 700, "bfloat16", {"uv": 128}),
    ("uv-lite-S200-pos199-fp32", *LITE, 200, 199, "float32", {"uv": 128, "block_t": 16, "min_rows": 16}),
    ("uv-tiny-H3-v24-fp32", 3, 32, 16, 90, 60, "float32", {"uv": 24, "block_t": 16, "min_rows": 16}),
]
# Relative (Frobenius) errors. Against the torch path: both round the probabilities and the
# output to the input dtype, at different points (the kernel rounds unnormalised probabilities,
# then divides in fp32), each a relative error of at most 2^-9 (bf16) per element, uncorrelated:
# about 2e-3 in norm for either (measured: 1.5e-3 to 2.7e-3 against fp64 math), 2e-3 to 4e-3
# between them. 1e-2 still catches a wrong row, head or scale (an error of order 1). fp32: the
# same sums in another order.
TOLERANCE = {"bfloat16": 1e-2, "float16": 2e-3, "float32": 1e-5}
# And against the exact result (fp64 math on the same rounded inputs): the kernel no further
# from it than the torch path is, but for 30% (the two round at different points) or noise.
NO_WORSE, NOISE = 1.3, 1e-5


def run_case(heads: int, rank: int, rope: int, rows: int, pos: int | None, dtype: str,
             options: dict) -> dict[str, float]:
    """The kernel's out_lat (or, with options["uv"] = v, out_lat @ W_uv.T) on random inputs:
    its relative error against the torch path ("torch") and against fp64 math ("exact"), and
    the torch path's against fp64 math ("torch_exact")."""
    from dscoder.model.attention import latent_attention
    from dscoder.model.mla_decode import absorbed_decode

    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(rows * 131 + heads)
    q_lat = torch.randn(heads, 1, rank, generator=g).to(dt)
    q_pe = torch.randn(heads, 1, rope, generator=g).to(dt)
    # the rows are a view of a bigger cache (a row stride longer than the row), and the rows
    # past the position hold NaN: the kernel must neither read nor weigh them
    cache = torch.randn(rows + 5, rank + rope + 24, generator=g).to(dt)
    valid = rows if pos is None else pos + 1
    cache[valid:] = float("nan")
    cached = cache[:rows, : rank + rope]
    scale = (rank + rope) ** -0.5 * 2.0  # peaked enough that the softmax is not near uniform
    options = dict(options)
    vdim = options.pop("uv", None)
    w_uv = None
    if vdim is not None:  # W_uv as attention finds it: rows of kv_b_proj's weight, per head
        w_uv = (torch.randn(heads, 7 + vdim, rank, generator=g) * rank ** -0.5).to(dt)[:, 7:]
    got = absorbed_decode(q_lat, q_pe, cached, None if pos is None else torch.tensor([pos]), scale,
                          w_uv, **options)
    ref = latent_attention(q_lat, q_pe, cached[:valid], None, scale)
    rows64 = cached[:valid].double()
    scores = torch.matmul(torch.cat((q_lat, q_pe), dim=-1).double(), rows64.T) * scale
    exact = torch.matmul(scores.softmax(dim=-1), rows64[:, :rank])
    if w_uv is not None:
        ref = torch.matmul(ref, w_uv.transpose(1, 2))
        exact = torch.matmul(exact, w_uv.double().transpose(1, 2))
    assert got.shape == ref.shape and got.dtype == dt

    def err(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    return {"torch": err(got, ref), "exact": err(got, exact), "torch_exact": err(ref, exact)}


def tiny_attention(seed: int):
    """Tiny MLA (4 heads, rank 32, rope 8) with random weights, one query token and 40 cached rows."""
    from dscoder.config import ModelConfig
    from dscoder.model.attention import MLAttention
    from dscoder.random_checkpoint import TINY

    cfg = ModelConfig.from_dict(TINY)
    torch.manual_seed(seed)
    attn = MLAttention(cfg, 0)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    q_nope, q_pe = torch.randn(4, 1, cfg.qk_nope_head_dim), torch.randn(4, 1, cfg.qk_rope_head_dim)
    return attn, q_nope, q_pe, torch.randn(40, cfg.kv_cache_dim)


def run_hook() -> dict[str, float]:
    """MLAttention._attend_absorbed with the kernel taken (as on a GPU) against the torch path,
    for a device position (CUDA graphs) and an int start (eager decode)."""
    from unittest import mock

    from dscoder.model import mla_decode
    from dscoder.model.step import Step

    attn, q_nope, q_pe, cached = tiny_attention(0)
    errors = {}
    for name, step in (("hook-device-pos", Step.on_device(torch.tensor([17]), 40)),
                       ("hook-int-start", Step.at(39, 1, absorbed=True))):
        ref = attn._attend_absorbed(q_nope, q_pe, cached, step)
        for fuse_uv in (False, True):
            with mock.patch.object(mla_decode, "available", return_value=True), \
                    mock.patch.object(mla_decode, "FUSE_UV", fuse_uv), \
                    mock.patch.object(mla_decode, "absorbed_decode", wraps=mla_decode.absorbed_decode) as k:
                got = attn._attend_absorbed(q_nope, q_pe, cached, step)
            assert k.call_count == 1 and (k.call_args.args[5] is not None) == fuse_uv
            errors[name + ("-uv" if fuse_uv else "")] = ((got - ref).norm() / ref.norm()).item()
    return errors


def run_compiled() -> dict[str, float]:
    """The same attention under torch.compile (fullgraph): the kernel is one opaque operator
    (dscoder::mla_decode) that the compiled code calls, at two device positions."""
    from dscoder.model import mla_decode
    from dscoder.model.step import Step

    attn, q_nope, q_pe, cached = tiny_attention(1)

    def attend(pos: torch.Tensor) -> torch.Tensor:
        return attn._attend_absorbed(q_nope, q_pe, cached, Step.on_device(pos, 40))

    errors = {}
    with torch.no_grad():
        refs = {p: attend(torch.tensor([p])) for p in (17, 30)}
        mla_decode.available = lambda q, c: True  # as on a GPU (a plain function: Dynamo traces it)
        mla_decode.register_op()  # as compile_decode_layer does
        for fuse_uv in (False, True):
            mla_decode.FUSE_UV = fuse_uv
            torch._dynamo.reset()
            compiled = torch.compile(attend, fullgraph=True)
            for p, ref in refs.items():
                got = compiled(torch.tensor([p]))
                errors[f"compiled-{p}" + ("-uv" if fuse_uv else "")] = ((got - ref).norm() / ref.norm()).item()
    return errors


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_under_interpreter(__file__)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_torch_path(interpreted, case):
    name, *_, dtype, _ = case
    e = interpreted[name]
    assert e["torch"] < TOLERANCE[dtype]
    assert e["exact"] < NO_WORSE * e["torch_exact"] + NOISE


@pytest.mark.parametrize("name", ["hook-device-pos", "hook-int-start", "hook-device-pos-uv",
                                  "hook-int-start-uv"])
def test_decode_attention_goes_through_the_kernel(interpreted, name):
    assert interpreted[name] < 1e-5


@pytest.mark.parametrize("name", ["compiled-17", "compiled-30", "compiled-17-uv", "compiled-30-uv"])
def test_compiled_decode_attention_calls_the_kernel_as_one_operator(interpreted, name):
    assert interpreted[name] < 1e-5


def test_eager_decode_attention_leaves_dynamo_unimported(interpreted):
    """The uncompiled step (the first reply) calls the kernel without the custom operator,
    whose first call imports Dynamo: about 1 s on the way to the first token."""
    assert interpreted["eager-without-dynamo"] == 1.0


@pytest.mark.parametrize("props, forced, taken", [
    ({"shared_memory_per_block_optin": 227 << 10, "shared_memory_per_multiprocessor": 228 << 10}, False, True),
    ({"shared_memory_per_block_optin": 163 << 10, "shared_memory_per_multiprocessor": 164 << 10}, False, False),
    ({"shared_memory_per_block_optin": 99 << 10, "shared_memory_per_multiprocessor": 100 << 10}, False, False),
    ({"shared_memory_per_multiprocessor": 228 << 10}, False, True),  # a torch without the opt-in limit
    ({}, False, False),  # nor the SM's
    ({"shared_memory_per_block_optin": 99 << 10}, True, True)])
def test_kernel_only_where_its_tiles_fit_unless_forced(monkeypatch, props, forced, taken):
    """By default the kernel runs where a program may have the shared memory its tiles want (an
    H100's 227 kB), not on an A100 (163 kB) or a consumer card (99 kB), where it could not
    launch; DSCODER_TRITON_MLA=1 forces it."""
    from types import SimpleNamespace

    from dscoder.model import mla_decode

    monkeypatch.setattr(mla_decode, "_FITS", {})
    monkeypatch.setattr(mla_decode, "FORCED", forced)
    monkeypatch.setattr(mla_decode, "triton", mla_decode.triton or object())
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(**props))
    q = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device=torch.device("cuda", 0))
    assert mla_decode.available(q, SimpleNamespace(dtype=torch.bfloat16)) == taken


def test_kernel_is_not_taken_on_the_cpu():
    from dscoder.model import mla_decode

    x = torch.zeros(2, 1, 32, dtype=torch.bfloat16)
    assert not mla_decode.available(x, torch.zeros(8, 48, dtype=torch.bfloat16))


if __name__ == "__main__":  # the child process: TRITON_INTERPRET=1 is set already
    assert os.environ.get("TRITON_INTERPRET") == "1"
    results = {c[0]: run_case(*c[1:]) for c in CASES}
    results.update(run_hook())
    # the eager path calls the kernel directly: the operator's first call would import Dynamo
    results["eager-without-dynamo"] = float("torch._dynamo" not in sys.modules)
    results.update(run_compiled())
    print(json.dumps(results))
