"""The decode step's matrix-vector products (Lite shapes, bf16, one token) through the Triton
GEMV of dscoder/model/gemv.py, per tile configuration, as the step runs them: replayed from a
CUDA graph, each shape's weights in enough copies (or layers) that they come from HBM, not L2.
Dense projections also through cuBLAS (F.linear); the experts' two launches with the two shared
experts joined (gemv.Extra), 6 routed experts picked; gate + up also with the SwiGLU product
in the launch (glu: a tile's BLOCK_N counts outputs, each two weight rows). Prints GB/s and
microseconds a call for the default tiles (gemv.default_tiles) and the three best ones.

    python benchmarks/bench_gemv.py          # needs CUDA and triton; about a minute on an H100
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # dscoder without installing it
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import replay_us  # noqa: E402  (beside this script)

DENSE = {"q + kv-a (fused)": (3648, 2048), "o_proj": (2048, 2048), "lm_head": (102400, 2048),
         "dense gate + up (layer 0)": (21888, 2048), "dense down (layer 0)": (2048, 10944)}
EXPERTS, INTER, HIDDEN, ROUTED, SHARED = 64, 1408, 2048, 6, 2
CONFIGS = [(bn, bk, w) for bn in (1, 2, 4, 8) for bk in (256, 512, 1024, 2048) for w in (4, 8)
           if bn * bk <= 8192]
BF16 = torch.bfloat16
REPS = 20


def report(name: str, cols: int, nbytes: int, calls: int, run: Callable[[tuple[int, int, int]], object],
           cublas: Callable[[], object] | None = None) -> None:
    from dscoder.model import gemv

    # replay_us: microseconds a call; the bytes are those of all `calls` calls of one replay
    rows = sorted(((nbytes / calls / us / 1e3, us, c) for c in CONFIGS
                   for us in [replay_us(lambda c=c: run(c), REPS, calls)]), reverse=True)
    default = next(r for r in rows if r[2] == gemv.default_tiles(cols))
    line = f"{name:26s} default {default[0]:5.0f} GB/s {default[1]:6.1f} us | best " + ", ".join(
        f"{gbs:5.0f} GB/s {us:6.1f} us ({bn}x{bk} w{w})" for gbs, us, (bn, bk, w) in rows[:3])
    if cublas is not None:
        us = replay_us(cublas, REPS, calls)
        line += f" | cuBLAS {nbytes / calls / us / 1e3:5.0f} GB/s {us:6.1f} us"
    print(line, flush=True)


def main() -> None:
    from dscoder.model.gemv import expert_gemv, gemv
    from dscoder.model.moe_kernels import shared_as_experts

    with torch.inference_mode():
        for name, (n, k) in DENSE.items():
            copies = max(1, (256 << 20) // (n * k * 2))
            ws = [torch.randn(n, k, device="cuda", dtype=BF16) for _ in range(copies)]
            x = torch.randn(1, k, device="cuda", dtype=BF16)
            report(name, k, n * k * 2 * copies, copies,
                   lambda c, ws=ws, x=x: [gemv(x, w, *c) for w in ws],
                   lambda ws=ws, x=x: [F.linear(x, w) for w in ws])
        ids = torch.randperm(EXPERTS, device="cuda")[:ROUTED]
        pairs = ROUTED + SHARED
        for name, gate_up, glu in (("experts gate + up", True, False), ("experts gate+up, SwiGLU", True, True),
                                   ("experts down", False, False)):
            layers = []
            for _ in range(3):  # three layers' stacks: 3.3 GB, far past L2
                shape = (EXPERTS, 2 * INTER, HIDDEN) if gate_up else (EXPERTS, HIDDEN, INTER)
                shared = shared_as_experts(torch.randn(2 * SHARED * INTER, HIDDEN, device="cuda", dtype=BF16),
                                           torch.randn(HIDDEN, SHARED * INTER, device="cuda", dtype=BF16), INTER)
                layers.append((torch.randn(shape, device="cuda", dtype=BF16), shared[0 if gate_up else 1]))
            x = torch.randn(1 if gate_up else pairs, HIDDEN if gate_up else INTER, device="cuda", dtype=BF16)
            per_layer = pairs * (2 * INTER * HIDDEN if gate_up else HIDDEN * INTER) * 2
            report(name, HIDDEN if gate_up else INTER, per_layer * len(layers), len(layers),
                   lambda c, layers=layers, x=x, gate_up=gate_up, glu=glu: [
                       expert_gemv(x, w, ids, pairs if gate_up else 1, extra=extra, block_n=c[0],
                                   block_k=c[1], warps=c[2], glu=glu) for w, extra in layers])


if __name__ == "__main__":
    main()
