"""Decode attention over the latent cache (Lite shapes, bf16, one token): the torch path of
MLAttention._attend_absorbed (dscoder.model.attention.latent_attention: scores product, masked
softmax, probs x latents) against the fused Triton kernel of dscoder/model/mla_decode.py, per
configuration (splits, BLOCK_T, MIN_ROWS, warps, stages); then, with the W_uv product after it,
torch's bmm against the kernel's combine step doing it (the default; DSCODER_TRITON_MLA=nouv: bmm).

As in the decode step, 27 calls (one per layer, each on its own layer's cache, so short caches
are not served from L2) are captured in one CUDA graph and replayed; the time is per call, and
GB/s counts the cache rows a call must read (the valid ones: `valid` x 576 x 2 bytes). The
position is a device tensor (valid = pos + 1), as under the engine's graphs. Scenarios: S = 2K,
8K, 32K rows with every row valid, and a 32K-row graph bucket holding a 2K conversation. The
W_uk product before attention is not included (torch in every path). Every path is checked
against the torch path (WRONG: a relative error over 1e-2).

    python benchmarks/bench_mla.py            # needs CUDA and triton; about 3 minutes
    python benchmarks/bench_mla.py --full     # a wider sweep
    python benchmarks/bench_mla.py --eager-torch   # the torch path without torch.compile too
"""
from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # dscoder without installing it
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import replay_us  # noqa: E402  (beside this script)

HEADS, RANK, ROPE, VDIM, LAYERS = 16, 512, 64, 128, 27
SCENARIOS = ((2048, 2048), (8192, 8192), (32768, 32768), (32768, 2048))  # (rows S, valid)


def timed(calls: list[Callable[[], object]], reps: int = 20) -> float:
    """Microseconds per call: the calls captured in one CUDA graph, replayed `reps` times."""
    def all_calls() -> None:
        for fn in calls:
            fn()

    return replay_us(all_calls, reps, len(calls))


def configs(full: bool) -> list[dict]:
    splits = (33, 66, 132, 264) if full else (66, 132, 264)
    # (BLOCK_T, stages): stages - 1 blocks in flight; 64 rows x 4 stages does not fit in shared memory
    tiles = ((32, 3), (32, 4), (64, 2), (64, 3)) if full else ((32, 4), (64, 3))
    min_rows = (32, 64, 128, 256, 512) if full else (64, 256)
    warps = (4, 8)
    return [dict(splits=s, block_t=b, min_rows=m, warps=w, stages=st)
            for s, (b, st), m, w in itertools.product(splits, tiles, min_rows, warps)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="sweep more configurations")
    ap.add_argument("--eager-torch", action="store_true", help="also time the torch path uncompiled")
    args = ap.parse_args()

    from dscoder.config import ModelConfig
    from dscoder.model import mla_decode
    from dscoder.model.attention import latent_attention
    from dscoder.random_checkpoint import LITE

    torch.manual_seed(0)
    q_lat = torch.randn(HEADS, 1, RANK, device="cuda").bfloat16()
    q_pe = torch.randn(HEADS, 1, ROPE, device="cuda").bfloat16()
    scale = ModelConfig.from_dict(LITE).softmax_scale
    paths = {"torch path, compiled": torch.compile(latent_attention, dynamic=True)}
    if args.eager_torch:
        paths["torch path, eager"] = latent_attention
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; defaults: splits "
          f"{mla_decode.SPLITS} BLOCK_T {mla_decode.BLOCK_T} MIN_ROWS {mla_decode.MIN_ROWS} "
          f"warps {mla_decode.WARPS} stages {mla_decode.STAGES}", flush=True)
    for rows, valid in SCENARIOS:
        scenario(rows, valid, q_lat, q_pe, scale, paths, configs(args.full))


def scenario(rows: int, valid: int, q_lat: torch.Tensor, q_pe: torch.Tensor, scale: float,
             paths: dict[str, Callable], sweep: list[dict]) -> None:
    from dscoder.model import mla_decode
    from dscoder.model.step import Step

    cache = torch.randn(LAYERS, rows, RANK + ROPE, device="cuda").bfloat16()
    # W_uv of each layer as attention finds it: the value rows of kv_b_proj's weight (H, v, rank)
    kv_b = torch.randn(LAYERS, HEADS, 2 * VDIM, RANK, device="cuda").bfloat16() * RANK ** -0.5
    w_uv = kv_b[:, :, VDIM:]
    pos = torch.tensor([valid - 1], device="cuda")
    mask = Step.on_device(pos, rows).mask
    nbytes = valid * (RANK + ROPE) * 2
    refs = {}
    print(f"\nS={rows} valid={valid} ({nbytes / 1e6:.1f} MB a call)", flush=True)

    def report(name: str, fn: Callable[[int], torch.Tensor], uv: bool = False) -> float:
        """fn(layer): one call; timed over the 27 layers; checked against the torch path."""
        try:
            got = fn(0).float()
            ref = refs.setdefault(uv, got)  # the first path reported (torch) is the reference
            err = ((got - ref).norm() / ref.norm()).item()
            us = timed([lambda i=i: fn(i) for i in range(LAYERS)])
        except Exception as e:  # a configuration that does not fit (shared memory): say so
            print(f"  {name:58s} failed: {type(e).__name__}: {str(e)[:80]}", flush=True)
            return float("inf")
        flag = "" if err < 1e-2 else f"  WRONG (rel err {err:.1e})"
        print(f"  {name:58s} {us:7.1f} us {nbytes / us / 1e3:6.0f} GB/s{flag}", flush=True)
        return us

    for name, path in paths.items():
        report(name, lambda i, path=path: path(q_lat, q_pe, cache[i], mask, scale))
    report("triton, defaults", lambda i: mla_decode.absorbed_decode(q_lat, q_pe, cache[i], pos, scale))
    best = (float("inf"), "")
    for c in sweep:
        name = "triton " + " ".join(f"{k}={v}" for k, v in c.items())
        us = report(name, lambda i, c=c: mla_decode.absorbed_decode(q_lat, q_pe, cache[i], pos, scale, **c))
        best = min(best, (us, name))
    print(f"  best: {best[1]} {best[0]:.1f} us", flush=True)

    print("  with the W_uv product (out_lat @ W_uv.T), default kernel configuration:")
    for name, path in paths.items():
        report(name + " + W_uv", lambda i, path=path: torch.matmul(
            path(q_lat, q_pe, cache[i], mask, scale), w_uv[i].transpose(1, 2)), uv=True)
    report("triton + torch W_uv (DSCODER_TRITON_MLA=nouv)", lambda i: torch.matmul(
        mla_decode.absorbed_decode(q_lat, q_pe, cache[i], pos, scale), w_uv[i].transpose(1, 2)), uv=True)
    report("triton, W_uv in the combine kernel (the default)",
           lambda i: mla_decode.absorbed_decode(q_lat, q_pe, cache[i], pos, scale, w_uv[i]), uv=True)


if __name__ == "__main__":
    main()
