"""The decode step's dense projections (Lite shapes, bf16, one row): cuBLAS (F.linear) against
the Triton GEMV of dscoder/model/gemv.py, per tile configuration. Microseconds and GB/s.

    python benchmarks/bench_gemv.py          # needs CUDA and triton
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # dscoder without installing it

SHAPES = {"q + kv-a (fused)": (3648, 2048), "o_proj": (2048, 2048), "shared gate + up (fused)": (5632, 2048),
          "shared down": (2048, 2816), "dense gate + up (layer 0)": (21888, 2048), "lm_head": (102400, 2048)}
CONFIGS = ((8, 512, 4), (16, 256, 4), (4, 512, 4), (8, 1024, 8), (16, 512, 8), (32, 256, 8), (2, 1024, 4))


def shape(name: str, n: int, k: int) -> None:
    import triton

    from dscoder.model.gemv import gemv

    # several copies, cycled, so that the weight is read from HBM and not from L2
    copies = max(1, (256 << 20) // (n * k * 2))
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    nbytes = n * k * 2
    turn = iter(range(1 << 60))

    def bench(fn) -> float:
        return triton.testing.do_bench(lambda: fn(ws[next(turn) % copies]), warmup=25, rep=100) * 1000

    us = bench(lambda w: F.linear(x, w))
    print(f"{name:28s} {n}x{k}: cuBLAS {us:7.1f} us {nbytes / us / 1e3:6.0f} GB/s", flush=True)
    for bn, bk, warps in CONFIGS:
        us = bench(lambda w, bn=bn, bk=bk, warps=warps: gemv(x, w, bn, bk, warps))
        print(f"{'':28s} triton BLOCK_N={bn:3d} BLOCK_K={bk:4d} warps={warps}: {us:7.1f} us "
              f"{nbytes / us / 1e3:6.0f} GB/s", flush=True)


def main() -> None:
    for name, (n, k) in SHAPES.items():
        shape(name, n, k)


if __name__ == "__main__":
    main()
