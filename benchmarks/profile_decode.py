"""Where a resident decode step spends its time (H100, Lite shapes), and how fast the expert
kernel reads weights with other tile sizes.

    python benchmarks/profile_decode.py --dir /tmp/lite

Writes the kernel table of 32 graph-replayed, compiled decode steps at a 2,048-token context to
$OUT/profile_decode_step.txt and prints the expert kernel's bandwidth per tile configuration.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # dscoder without installing it
from common import lite_checkpoint, log, random_prompt  # noqa: E402

from dscoder.events import GenerationSettings  # noqa: E402


def kernel_bandwidth() -> None:
    import triton

    from dscoder.model.gemv import expert_gemv

    e, h, i = 64, 2048, 1408
    w13 = torch.randn(e, 2 * i, h, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, h, device="cuda", dtype=torch.bfloat16)
    ids = torch.randperm(e, device="cuda")[:6]
    nbytes = 6 * 2 * i * h * 2
    for bn, bk, warps in ((2, 1024, 4), (16, 256, 4), (8, 512, 4), (4, 512, 4), (8, 1024, 8),
                          (16, 512, 8), (4, 1024, 4), (2, 2048, 8)):
        def run(bn=bn, bk=bk, warps=warps):  # this iteration's values
            expert_gemv(x, w13, ids, 6, block_n=bn, block_k=bk, warps=warps)
        ms = triton.testing.do_bench(run, warmup=50, rep=200)
        print(f"expert_gemv w13 BLOCK_N={bn:3d} BLOCK_K={bk:4d} warps={warps}: "
              f"{ms * 1000:7.1f} us, {nbytes / ms / 1e6:7.0f} GB/s", flush=True)


def main() -> None:
    from torch.profiler import ProfilerActivity, profile

    from dscoder.engine import load_engine

    p = argparse.ArgumentParser()
    p.add_argument("--dir", type=Path, default=Path("/tmp/dscoder-lite"))
    a = p.parse_args()
    kernel_bandwidth()
    lite_checkpoint(a.dir)
    engine = load_engine(a.dir, context_length=8192)
    engine.use_compiled_step(wait=True)  # measure the compiled step, not the warm-up one
    session = engine.new_session()
    greedy = GenerationSettings(max_tokens=16, temperature=0)
    prompt = random_prompt(2048, 1)
    first = list(session.generate(prompt, greedy, stop_ids=()))[-1]  # compile, capture
    prompt = prompt + list(first.token_ids)
    log(f"first call {first.prefill_seconds + first.decode_seconds:.1f} s")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        f = list(session.generate(prompt, GenerationSettings(max_tokens=33, temperature=0),
                                  stop_ids=()))[-1]
    log(f"profiled: {f.decode_tokens_per_second:.1f} tok/s, {f.cached_tokens} prompt tokens reused")
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
    Path(os.environ.get("OUT", "."), "profile_decode_step.txt").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
