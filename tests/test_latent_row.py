"""The decode token's cache row in one kernel (dscoder.model.latent_row) against the torch path
(RMSNorm, apply_rope, write_cache), on the CPU under Triton's interpreter (a child process, see
tests/triton_interpreter.py). Skipped without triton."""
from __future__ import annotations

import json
import os

import pytest
import torch
from triton_interpreter import run_under_interpreter

RANK, ROPE, ROWS, POS = 64, 16, 10, 3


def run_cases() -> dict[str, float]:
    from dscoder.kv_cache import write_cache
    from dscoder.model import latent_row
    from dscoder.model.layers import RMSNorm
    from dscoder.model.rope import apply_rope

    out: dict[str, float] = {}
    torch.manual_seed(0)
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        norm = RMSNorm(RANK, 1e-6)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(RANK))
        norm = norm.to(dt)
        c = (torch.randn(1, RANK + ROPE) * 3).to(dt)
        rope = torch.randn(1, ROPE // 2, 2)
        pos = torch.tensor([POS])
        with torch.no_grad():
            want = torch.zeros(ROWS, RANK + ROPE, dtype=dt)
            write_cache(want, pos, torch.cat((norm(c[:, :RANK]), apply_rope(c[:, RANK:], rope)), dim=-1), ROWS)
            got = torch.zeros(ROWS, RANK + ROPE, dtype=dt)
            latent_row.write(c, norm.weight, norm.eps, rope, pos, got)
            out[f"{name}-row"] = ((got[POS].double() - want[POS].double()).norm() / want[POS].double().norm()).item()
            out[f"{name}-others-untouched"] = float(got[torch.arange(ROWS) != POS].abs().max())

            # under torch.compile (aot_eager: functionalized as Inductor sees it) the operator
            # mutates the cache it is given, and what reads the cache after it sees the row
            latent_row.register_op()

            def step(c, w, rope, pos, kv):
                latent_row.write(c, w, 1e-6, rope, pos, kv)
                return kv[: POS + 1].float().sum(dim=-1)

            compiled_kv = torch.zeros(ROWS, RANK + ROPE, dtype=dt)
            sums = torch.compile(step, backend="aot_eager", fullgraph=True)(c, norm.weight, rope, pos, compiled_kv)
            out[f"{name}-compiled-row"] = float((compiled_kv - got).abs().max())
            out[f"{name}-compiled-reads-the-row"] = float((sums - got[: POS + 1].float().sum(dim=-1)).abs().max())
    return out


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_under_interpreter(__file__)


@pytest.mark.parametrize("dtype, tolerance", [("fp32", 1e-6), ("bf16", 1e-2)])
def test_the_row_is_the_torch_paths(interpreted, dtype, tolerance):
    """fp32: the same arithmetic; bf16: within a rounding (the interpreter rounds fp32 to bf16
    toward zero, see test_mla_decode.py)."""
    assert interpreted[f"{dtype}-row"] < tolerance
    assert interpreted[f"{dtype}-others-untouched"] == 0.0


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_compiled_code_mutates_the_cache_in_place(interpreted, dtype):
    assert interpreted[f"{dtype}-compiled-row"] == 0.0
    assert interpreted[f"{dtype}-compiled-reads-the-row"] == 0.0


def test_not_taken_on_the_cpu_or_for_sizes_that_are_not_powers_of_two():
    from dscoder.model import latent_row

    kv = torch.zeros(4, RANK + ROPE, dtype=torch.bfloat16)
    assert not latent_row.available(torch.zeros(1, RANK + ROPE, dtype=torch.bfloat16), kv, RANK)
    assert not latent_row._pow2(48) and latent_row._pow2(512)


if __name__ == "__main__":  # the child process
    assert os.environ.get("TRITON_INTERPRET") == "1"
    print(json.dumps(run_cases()))
