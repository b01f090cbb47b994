"""Single-GPU Lite under a GPU memory budget: our offloading engine against transformers + accelerate.

    python benchmarks/bench_offload.py                                # H100: full, 24GiB, 12GiB
    python benchmarks/bench_offload.py --budgets 12GiB --decode 64    # one row, shorter
    python benchmarks/bench_offload.py --device cpu --shape tiny --dir /tmp/t   # dry run, no GPU
    python benchmarks/bench_offload.py --budgets 24GiB,12GiB --no-baseline   # bf16 and int8 experts

For each budget and each --expert-dtype (bf16 and int8 by default, bf16 first): load time, time
to first token for a 2,048-token prompt, prefill tok/s, decode tok/s over 256 tokens, peak GPU
memory (allocated, reserved), expert slots, hit rate and bytes copied per token, host memory; for
int8, against bf16 at the same budget, the relative error of the logits of a 128-token prompt
(every position) and the greedy agreement over the decoded tokens (tokens equal before the first
difference, and the share of equal positions); and once, the weight error of per-output-channel
int8 and fp8 e4m3 on the same routed experts, and (CUDA) the expert kernel's time and bandwidth
on one token with bf16 and int8 stacks. Then the baseline a user would try first,
transformers' DeepseekV2ForCausalLM with accelerate's device_map="auto" and the same max_memory
(kept short: it runs at <1 tok/s).
Progress goes to stderr; a failing row is reported and the others still run. Prints a table, then
one JSON line (the last line of stdout).
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import Sampler, lite_checkpoint, log, random_prompt, replay_us  # noqa: E402  (beside this script)

GiB = 2**30


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def reset_gpu(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.reset_peak_memory_stats()


def gpu_peaks(device: str) -> dict:
    if device != "cuda":
        return {}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated() / GiB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB}


def small_budget(path: Path, context: int, device: str, expert_dtype: str = "bf16") -> str:
    """A simulated budget for the dry run: one expert slot more than the minimum, in that expert
    dtype (the tiny model's int8 experts would all fit the bf16 budget: nothing to offload)."""
    from dscoder.config import ModelConfig
    from dscoder.offload.planner import budget_for_slots, min_slots
    from dscoder.offload.setup import model_sizes

    s = model_sizes(ModelConfig.from_file(path / "config.json"), torch.float32, expert_dtype)
    return str(budget_for_slots(s, min_slots(s) + 1, context, cuda=device == "cuda"))


def budget_arg(args, budget: str, expert_dtype: str = "bf16") -> str | None:
    if budget == "full":
        return None
    if budget == "small":
        return small_budget(args.dir, args.context, args.device, expert_dtype)
    return budget


QUALITY_PROMPT = 128  # tokens whose logits int8 is compared on (all positions: 128 x vocab fp32)


def run_ours(args, budget: str, expert_dtype: str = "bf16") -> dict:
    from dscoder.engine import load_engine
    from dscoder.events import GenerationSettings

    r: dict = {"engine": "dscoder", "budget": budget, "experts": expert_dtype}
    reset_gpu(args.device)
    sampler = Sampler() if args.device == "cuda" else None  # the process in nvidia-smi
    if sampler:
        sampler.start()
    t = time.perf_counter()
    engine = load_engine(args.dir, device=args.device, dtype=args.dtype, context_length=args.context,
                         gpu_memory=budget_arg(args, budget, expert_dtype), log=lambda m: log(f"  {m}"),
                         warn=lambda m: log(f"  warning: {m}"), offload_policy=args.policy,
                         prefetch_depth=args.prefetch_depth, expert_dtype=expert_dtype)
    r["load_s"] = time.perf_counter() - t
    r["host_rss_gib"] = rss_gib()
    log(f"  loaded in {r['load_s']:.1f} s, host RSS {r['host_rss_gib']:.1f} GiB")
    off = getattr(engine.model, "offload", None)
    r["slots"] = off.cache.slots if off else None

    def generate(prompt: list[int], n: int):
        """The Finished event, and the offload counters of the decode part alone."""
        from dscoder.engine import engine_stats

        s = GenerationSettings(max_tokens=n, temperature=0)
        snap = None
        for ev in engine.new_session().generate(prompt, s, stop_ids=()):  # noqa: B007  (ev after the loop: the last event)
            if snap is None:  # the first event comes right after prefill
                snap = engine_stats(engine.model)
        return ev, engine_stats(engine.model, snap) if snap else {}

    generate(random_prompt(16, 7), 4)  # warm-up: kernels, cuBLAS, allocator
    f, dec = generate(random_prompt(args.prompt, 1), args.decode + 1)
    r["ttft_s"] = f.prefill_seconds
    r["prefill_tok_s"] = f.prefill_tokens_per_second
    r["decode_tok_s"] = f.decode_tokens_per_second
    r.update({k: f.stats[k] for k in ("hit_rate", "ready_rate", "bytes_per_token", "hits", "misses",
                                      "prefetched", "prefetch_used", "copy_seconds",
                                      "exposed_seconds") if k in f.stats})
    r.update({f"decode_{k}": dec[k] for k in ("hit_rate", "ready_rate", "bytes_per_token",
                                               "wasted_prefetches", "copy_seconds",
                                               "exposed_seconds") if k in dec})
    r.update(gpu_peaks(args.device))
    if sampler:
        r["peak_process_gib"] = sampler.stop() / 1024  # CUDA context included: the budget's measure
        r["process_source"] = sampler.source
    r["_tokens"] = list(f.token_ids)  # for the int8 rows' agreement (not printed)
    r["_logits"] = prompt_logits(engine.model, random_prompt(QUALITY_PROMPT, 2))
    engine.close()  # frees the GPU and the pinned host memory before the next row
    return r


@torch.inference_mode()
def prompt_logits(model, prompt: list[int]) -> torch.Tensor:
    """The logits of every position of a prompt, fp32 on the CPU."""
    dev = model.lm_head.weight.device
    ids = torch.tensor(prompt, device=dev)
    return model(ids, model.new_cache(len(prompt)), 0, all_logits=True).float().cpu()


def compare_to_bf16(r: dict, bf16: dict) -> None:
    """The int8 row's logits error and greedy agreement against the bf16 row of its budget."""
    if "_logits" not in r or "_logits" not in bf16:
        return
    a, b = r["_logits"], bf16["_logits"]
    r["logits_rel_err"] = ((a - b).norm() / b.norm()).item()
    r["top1_agree"] = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    x, y = r["_tokens"], bf16["_tokens"]
    n = min(len(x), len(y))
    r["greedy_same_prefix"] = next((i for i in range(n) if x[i] != y[i]), n)
    r["greedy_agree"] = sum(x[i] == y[i] for i in range(n)) / n if n else 0.0
    r["greedy_tokens"] = n


def weight_errors(path: Path, device: str) -> dict:
    """Relative error (Frobenius) of per-output-channel int8 and fp8 e4m3 on the routed experts of
    the first MoE layer of the checkpoint, as stored (the --expert-dtype choice, measured)."""
    from safetensors import safe_open

    from dscoder.model.quant import fp8_relative_error, int8_relative_error
    from dscoder.weights import EXPERT_KEY, shard_index

    index = shard_index(path)
    keys = sorted(k for k in index if EXPERT_KEY.match(k))
    layer = min(int(k.split(".")[2]) for k in keys)
    keys = [k for k in keys if int(k.split(".")[2]) == layer]
    out: dict = {"bench": "weight error", "layer": layer, "tensors": len(keys)}
    errs: dict = {"int8": [], "fp8_e4m3": []}
    for shard in sorted({index[k] for k in keys}):
        with safe_open(str(path / shard), framework="pt") as f:
            for k in (k for k in keys if index[k] == shard):
                w = f.get_tensor(k).to(device)
                errs["int8"].append(int8_relative_error(w))
                errs["fp8_e4m3"].append(fp8_relative_error(w))
    for name, values in errs.items():
        out[f"{name}_rel_err"] = sum(values) / len(values)
    return out


def kernel_rows(path: Path, iters: int = 200) -> list[dict]:
    """The routed-expert decode kernel (Triton) on one token with bf16 and int8 stacks of the
    checkpoint's expert shape: microseconds per call and the bandwidth of the bytes it must read
    (the chosen experts' weights, and scales). CUDA only."""
    from dscoder.config import ModelConfig
    from dscoder.model import moe_kernels
    from dscoder.model.quant import expert_nbytes, quantize

    cfg = ModelConfig.from_file(path / "config.json")
    e, h, i, k = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = (0.02 * torch.randn(e, 2 * i, h, generator=g, device="cuda")).to(torch.bfloat16)
    w2 = (0.02 * torch.randn(e, h, i, generator=g, device="cuda")).to(torch.bfloat16)
    (q13, s13), (q2, s2) = quantize(w13), quantize(w2)
    x = torch.randn(1, h, generator=g, device="cuda").to(torch.bfloat16)
    # several calls with different experts per replay: the int8 experts of one call (52 MB for
    # Lite) would otherwise sit in an H100's 50 MB L2 cache from one replay to the next
    calls = 8
    ids = [torch.randperm(e, generator=g, device="cuda")[:k].view(1, k) for _ in range(calls)]
    weights = torch.rand(1, k, generator=g, device="cuda")
    rows = []
    for name, stacks in (("bf16", (w13, w2)), ("int8", (q13, q2, s13, s2))):
        def call(stacks=stacks):
            for chosen in ids:
                moe_kernels.routed_experts_decode(x, chosen, weights, *stacks)
        us = replay_us(call, iters, calls)
        nbytes = k * expert_nbytes(h, i, torch.bfloat16, name)
        rows.append({"bench": "expert kernel", "experts": name, "us_per_call": us,
                     "gb_s": nbytes / us / 1e3, "mb_read": nbytes / 1e6})
    return rows


class _TokenClock:
    """A stopping criterion that never stops, only notes when each token came out."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def run_baseline(args, budget: str) -> dict:
    import transformers
    from transformers import StoppingCriteriaList

    r: dict = {"engine": "transformers+accelerate", "budget": budget}
    reset_gpu(args.device)
    dtype = getattr(torch, args.dtype)
    kw: dict = {"dtype": dtype}
    if args.device == "cuda":
        kw["device_map"] = "auto"
        if budget != "full":
            kw["max_memory"] = {0: int(budget_bytes(args, budget)), "cpu": f"{args.host_gib}GiB"}
    t = time.perf_counter()
    model = transformers.DeepseekV2ForCausalLM.from_pretrained(args.dir, **kw).eval()
    r["load_s"] = time.perf_counter() - t
    log(f"  baseline loaded in {r['load_s']:.1f} s")
    first = "cuda" if args.device == "cuda" else "cpu"
    ids = torch.tensor([random_prompt(args.baseline_prompt, 1)], device=first)
    clock = _TokenClock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=args.baseline_decode, min_new_tokens=args.baseline_decode,
                       do_sample=False, pad_token_id=0, eos_token_id=None,
                       stopping_criteria=StoppingCriteriaList([clock]))
    times = clock.times
    r["ttft_s"] = times[0] - t0
    r["prefill_tok_s"] = args.baseline_prompt / r["ttft_s"]
    if len(times) > 1:
        r["decode_tok_s"] = (len(times) - 1) / (times[-1] - times[0])
    r["prompt_tokens"], r["decode_tokens"] = args.baseline_prompt, len(times)
    r.update(gpu_peaks(args.device))
    del model
    return r


def budget_bytes(args, budget: str) -> int:
    from dscoder.offload.sizes import parse_size

    return parse_size(budget_arg(args, budget) or "0")


def guarded(fn, args, budget: str, *extra) -> dict:
    log(f"{fn.__name__.removeprefix('run_')} at budget {budget} {' '.join(extra)}...")
    try:
        r = fn(args, budget, *extra)
        log(f"  {_summary(r)}")
        return r
    except Exception as e:  # one failing row must not lose the others
        log(f"  FAILED: {type(e).__name__}: {e}")
        traceback.print_exc(file=sys.stderr)
        return {"engine": fn.__name__, "budget": budget, "experts": " ".join(extra) or None,
                "error": f"{type(e).__name__}: {e}"[:300]}
    finally:
        reset_gpu(args.device)


def _summary(r: dict) -> str:
    keys = ("ttft_s", "prefill_tok_s", "decode_tok_s", "decode_hit_rate", "decode_ready_rate",
            "decode_bytes_per_token", "decode_copy_seconds", "decode_exposed_seconds", "peak_reserved_gib",
            "logits_rel_err", "greedy_same_prefix", "greedy_agree")
    return ", ".join(f"{k} {r[k]:.3g}" for k in keys if isinstance(r.get(k), (int, float)))


COLUMNS = [("engine", "engine", "{}"), ("budget", "budget", "{}"), ("experts", "experts", "{}"),
           ("slots", "slots", "{}"), ("load s", "load_s", "{:.1f}"),
           ("TTFT s", "ttft_s", "{:.2f}"), ("prefill tok/s", "prefill_tok_s", "{:.0f}"),
           ("decode tok/s", "decode_tok_s", "{:.2f}"), ("hit rate", "decode_hit_rate", "{:.1%}"),
           ("ready", "decode_ready_rate", "{:.1%}"), ("MB/token", "decode_bytes_per_token", "{:.4g}"),
           ("peak alloc GiB", "peak_allocated_gib", "{:.2f}"),
           ("peak resv GiB", "peak_reserved_gib", "{:.2f}"),
           ("nvidia-smi GiB", "peak_process_gib", "{:.2f}"), ("host GiB", "host_rss_gib", "{:.1f}"),
           ("logits err", "logits_rel_err", "{:.2e}"), ("same prefix", "greedy_same_prefix", "{}"),
           ("greedy agree", "greedy_agree", "{:.1%}")]


def print_table(rows: list[dict]) -> None:
    def cell(r: dict, key: str, fmt: str) -> str:
        v = r.get(key)
        if v is None:
            return "error" if key == "ttft_s" and "error" in r else "-"
        return fmt.format(v / 1e6 if key.endswith("bytes_per_token") else v)

    table = [[h for h, _, _ in COLUMNS]] + [[cell(r, k, f) for _, k, f in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    for row in table:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    for r in rows:
        if "error" in r:
            print(f"{r['engine']} at {r['budget']}: {r['error']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("/tmp/dscoder-lite"))
    p.add_argument("--shape", default="lite", choices=["lite", "tiny"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--budgets", default=None, help="comma-separated: full,24GiB,12GiB (tiny: full,small)")
    p.add_argument("--baseline-budgets", default=None, help="default: the budgets other than full")
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--decode", type=int, default=256)
    p.add_argument("--context", type=int, default=4096, help="KV cache the budget must hold")
    p.add_argument("--baseline-prompt", type=int, default=64)
    p.add_argument("--baseline-decode", type=int, default=8)
    p.add_argument("--host-gib", type=int, default=100, help="accelerate's max_memory for the CPU")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--prefetch-depth", type=int, default=1,
                   help="MoE layers ahead to prefetch (DSCODER_PREFETCH_DEPTH)")
    p.add_argument("--policy", default="lru",
                   help="eviction policy (DSCODER_OFFLOAD_POLICY): lru, lfu, lru-layer, lfu-layer")
    p.add_argument("--expert-dtype", default="bf16,int8",
                   help="comma-separated routed-expert dtypes to run per budget (bf16 first: the "
                        "int8 rows are compared with it)")
    args = p.parse_args()
    dtypes = args.expert_dtype.split(",")
    if not set(dtypes) <= {"bf16", "int8"}:
        p.error(f"--expert-dtype takes bf16 and int8, not {args.expert_dtype!r}")
    dtypes.sort(key=lambda d: d != "bf16")
    args.dtype = "bfloat16" if args.shape == "lite" else "float32"
    budgets = (args.budgets or ("full,24GiB,12GiB" if args.shape == "lite" else "full,small")).split(",")
    base = [] if args.no_baseline else (args.baseline_budgets.split(",") if args.baseline_budgets
                                        else [b for b in budgets if b != "full"])
    t0 = time.perf_counter()
    lite_checkpoint(args.dir, args.shape, args.device)
    rows = []
    for b in budgets:
        mine = {d: guarded(run_ours, args, b, d) for d in dtypes}
        if "bf16" in mine and "int8" in mine:
            compare_to_bf16(mine["int8"], mine["bf16"])
        rows += mine.values()
    for r in rows:
        r.pop("_logits", None), r.pop("_tokens", None)
    rows += [guarded(run_baseline, args, b) for b in base]
    errors = None
    if "int8" in dtypes:
        try:
            errors = weight_errors(args.dir, args.device)
        except Exception as e:  # the table above must not be lost
            log(f"weight error FAILED: {type(e).__name__}: {e}")
    if errors:
        log(f"weight error on layer {errors['layer']}'s experts: int8 {errors['int8_rel_err']:.2e}, "
            f"fp8 e4m3 {errors['fp8_e4m3_rel_err']:.2e}")
    kernels = []
    if args.device == "cuda" and len(dtypes) > 1:
        try:
            kernels = kernel_rows(args.dir)
        except Exception as e:
            log(f"kernel timing FAILED: {type(e).__name__}: {e}")
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result = {"bench": "offload", "card": card, "shape": args.shape, "prompt": args.prompt,
              "decode": args.decode, "torch": torch.__version__, "commit": _commit(),
              "date": time.strftime("%Y-%m-%d"), "peak_host_rss_gib": resource.getrusage(
                  resource.RUSAGE_SELF).ru_maxrss / 2**20, "seconds": time.perf_counter() - t0,
              "rows": rows, "weight_error": errors, "expert_kernel": kernels}
    print_table(rows)
    if errors:
        print(f"routed-expert weight error (relative, per-output-channel scales, layer "
              f"{errors['layer']}): int8 {errors['int8_rel_err']:.2e}, fp8 e4m3 "
              f"{errors['fp8_e4m3_rel_err']:.2e}")
    for k in kernels:
        print(f"expert kernel, one token, {k['experts']}: {k['us_per_call']:.1f} us, "
              f"{k['mb_read']:.1f} MB read, {k['gb_s']:.0f} GB/s")
    print(json.dumps(result, sort_keys=True, default=str))


def _commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=5).stdout.strip()
    except Exception:
        return "unknown"


if __name__ == "__main__":
    main()
