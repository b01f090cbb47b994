"""Does --gpu-memory hold? What nvidia-smi shows for the process, at the longest context the plan allows.

    python benchmarks/bench_budget.py                                  # Lite: 12GiB, 16GiB, 24GiB
    python benchmarks/bench_budget.py --budgets 12GiB --context 8192   # a fixed window
    python benchmarks/bench_budget.py --shape tiny --dir /tmp/t --budgets 1GiB   # quick check

Each budget runs in a fresh Python process (its own CUDA context and allocator, nothing left from
an earlier row): load the engine under the budget, fill the planned context window with a prompt
(window - decode - 1 tokens), decode, then close the engine and load it again in the same process
(a second engine must fit once the first is closed). A thread samples the process's GPU memory
every 50 ms with `nvidia-smi --query-compute-apps` (the device's used memory from
torch.cuda.mem_get_info where nvidia-smi cannot see the process). The CUDA context is measured
as the process's memory less what PyTorch's allocator holds. Prints a table, then one JSON line;
exit status 1 if any budget was exceeded.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
MiB = 2**20
from common import Sampler, process_mib  # noqa: E402  (beside this script)


def one(args) -> dict:
    """One budget, in this (fresh) process."""
    import torch
    from common import random_prompt

    from dscoder.engine import load_engine
    from dscoder.events import GenerationSettings
    from dscoder.offload.sizes import parse_size

    torch.cuda.init()
    r: dict = {"budget": args.one, "budget_mib": parse_size(args.one) / MiB}
    notices: list[str] = []
    sampler = Sampler()
    sampler.start()
    t = time.perf_counter()
    engine = load_engine(args.dir, device="cuda", gpu_memory=args.one, context_length=args.context,
                         notice=notices.append, warn=notices.append)
    r["load_s"] = time.perf_counter() - t
    plan = engine.budget_plan
    r.update(context=engine.context_length, resident=plan.resident, slots=plan.slots,
             planned_overhead_mib=plan.overhead_bytes / MiB, notices=notices)
    n = engine.context_length - args.decode - 1
    f = list(engine.generate(random_prompt(n, 1), GenerationSettings(max_tokens=args.decode,
                                                                      temperature=0),
                             stop_ids=()))[-1]
    torch.cuda.synchronize()
    r.update(prompt_tokens=n, generated=len(f.token_ids), ttft_s=f.prefill_seconds,
             decode_tok_s=f.decode_tokens_per_second)
    r["peak_process_mib"] = sampler.stop()
    r["source"] = sampler.source
    r["peak_reserved_mib"] = torch.cuda.max_memory_reserved() / MiB
    r["peak_allocated_mib"] = torch.cuda.max_memory_allocated() / MiB
    now, _ = process_mib()
    r["cuda_context_mib"] = now - torch.cuda.memory_reserved() / MiB if now is not None else None
    engine.close()
    r["after_close_mib"] = process_mib()[0]
    r["after_close_allocated_mib"] = torch.cuda.memory_allocated() / MiB
    # a second engine in the same process, under the same budget, once the first is closed
    sampler = Sampler()
    sampler.start()
    with load_engine(args.dir, device="cuda", gpu_memory=args.one, context_length=args.context) as again:
        list(again.generate(random_prompt(64, 2), GenerationSettings(max_tokens=8, temperature=0),
                            stop_ids=()))
    r["second_peak_process_mib"] = sampler.stop()
    r["within_budget"] = max(r["peak_process_mib"], r["second_peak_process_mib"]) <= r["budget_mib"]
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("/tmp/dscoder-lite"))
    p.add_argument("--shape", default="lite", choices=["lite", "tiny"])
    p.add_argument("--budgets", default=None, help="comma-separated (default 12GiB,16GiB,24GiB)")
    p.add_argument("--context", type=int, default=None, help="a fixed window (default: the plan's)")
    p.add_argument("--decode", type=int, default=16)
    p.add_argument("--one", help=argparse.SUPPRESS)  # run one budget in this process, print JSON
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    from common import log

    if not (args.dir / "model.safetensors.index.json").is_file():  # written by a child: this
        log(f"writing a random {args.shape} checkpoint to {args.dir} ...")  # process stays off the GPU
        subprocess.run([sys.executable, "-m", "dscoder.random_checkpoint", "--shape", args.shape,
                        str(args.dir)], check=True, cwd=ROOT)
    rows = []
    for budget in (args.budgets or "12GiB,16GiB,24GiB").split(","):
        log(f"budget {budget} ...")
        cmd = [sys.executable, __file__, "--dir", str(args.dir), "--decode", str(args.decode),
               "--one", budget] + (["--context", str(args.context)] if args.context else [])
        run = subprocess.run(cmd, capture_output=True, text=True)
        sys.stderr.write(run.stderr[-4000:])
        try:
            rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
        except (IndexError, ValueError):
            rows.append({"budget": budget, "error": run.stderr.strip().splitlines()[-1:] or ["?"],
                         "within_budget": False})
        log(f"  {rows[-1]}")
    cols = ("budget", "context", "slots", "prompt_tokens", "peak_process_mib", "peak_reserved_mib",
            "cuda_context_mib", "after_close_mib", "second_peak_process_mib", "within_budget")
    print("  ".join(cols))
    for r in rows:
        print("  ".join(f"{r[c]:.0f}" if isinstance(r.get(c), float) else str(r.get(c, "-"))
                        for c in cols))
    import torch

    print(json.dumps({"bench": "budget", "card": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "date": time.strftime("%Y-%m-%d"), "rows": rows}, sort_keys=True, default=str))
    sys.exit(0 if all(r.get("within_budget") for r in rows) else 1)


if __name__ == "__main__":
    main()
