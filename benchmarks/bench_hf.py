"""The transformers engine on a DeepSeek-Coder 6.7B-shaped random Llama checkpoint (bf16).

    python benchmarks/bench_hf.py --dir /tmp/coder-6.7b        # on the GPU machine
    python benchmarks/bench_hf.py --shape tiny --dir /tmp/t    # a dry run anywhere

The checkpoint (32 layers, hidden 4096, intermediate 11008, 32 heads, vocab 32256) is written
on first use. Measures time to first token for a 2,048-token prompt and decode tokens/s:
- dscoder's loop (our own forward loop over a DynamicCache), full GPU;
- the baseline in the same process: transformers' model.generate, greedy, on the same model
  (time to first token = generate(max_new_tokens=1); decode from the difference with N+1);
- generate() in a thread with a streamer (the usual way to stream it), timed per token;
- a chat's second turn: our session reuses the cache of the first turn, generate recomputes;
- dscoder with a 6 GiB GPU budget (accelerate keeps the rest of the layers in host memory).
Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # dscoder without installing it
from common import card, emit_json, gpu_memory, log, timed  # noqa: E402

from dscoder.events import GenerationSettings  # noqa: E402


def checkpoint(path: Path, shape: str, device: str) -> Path:
    from dscoder.llama_checkpoint import write_checkpoint

    if (path / "config.json").is_file():
        log(f"reusing checkpoint {path}")
        return path
    t = time.perf_counter()
    write_checkpoint(path, shape, dtype="bfloat16", device=device)
    log(f"wrote {shape} checkpoint to {path} in {time.perf_counter() - t:.1f} s")
    return path


def prompt_ids(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [32013] + torch.randint(100, 31000, (n - 1,), generator=g).tolist()


def ours(session, prompt: list[int], n: int):
    events = list(session.generate(prompt, GenerationSettings(max_tokens=n, temperature=0),
                                   stop_ids=()))
    return events[-1]


def run_ours(engine, prompt: list[int], n: int, r: dict, key: str) -> tuple[int, ...]:
    # warm-up at the measured size: the first prompt of a size pays kernel selection (about
    # 0.9 s at 2K on an H200), which generate() below would otherwise inherit for free
    ours(engine.new_session(), prompt, 4)
    session = engine.new_session()
    f = ours(session, prompt, n)
    r[f"{key}_ttft_s"] = f.prefill_seconds
    r[f"{key}_decode_tok_s"] = f.decode_tokens_per_second
    turn2 = prompt + list(f.token_ids) + prompt_ids(32, seed=1)[1:]  # a reply and a new message
    f2 = ours(session, turn2, 1)
    r[f"{key}_turn2_ttft_s"], r[f"{key}_turn2_cached"] = f2.prefill_seconds, f2.cached_tokens
    r[f"{key}_turn2_len"] = len(turn2)
    return f.token_ids


def run_generate(model, prompt: list[int], n: int, r: dict, turn2_len: int) -> list[int]:
    device = next(model.parameters()).device
    x = torch.tensor([prompt], device=device)
    config = copy.deepcopy(model.generation_config)  # greedy, and no EOS: always n tokens
    config.do_sample, config.eos_token_id, config.pad_token_id = False, None, 0
    config.temperature = config.top_p = None
    kw = dict(generation_config=config)
    with torch.inference_mode():
        model.generate(x, max_new_tokens=4, **kw)  # warm-up at the measured size, as ours
        with timed(r, "base_ttft_s"):
            model.generate(x, max_new_tokens=1, **kw)
        with timed(r, "base_total_s"):
            out = model.generate(x, max_new_tokens=n + 1, **kw)
        y = torch.tensor([prompt_ids(turn2_len)], device=device)
        with timed(r, "base_turn2_ttft_s"):  # generate keeps no cache between calls
            model.generate(y, max_new_tokens=1, **kw)
    r["base_decode_tok_s"] = n / max(r["base_total_s"] - r["base_ttft_s"], 1e-9)
    return out[0, len(prompt):len(prompt) + n].tolist()


def run_streamer(model, prompt: list[int], n: int, r: dict) -> None:
    """The other way to stream: generate() in a thread with a streamer. This one records when
    each token reaches it (a TextIteratorStreamer adds detokenizing and word buffering on top)."""
    import threading

    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value) -> None:  # the prompt first, then one call per new token
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    clock = Clock()
    config = copy.deepcopy(model.generation_config)
    config.do_sample, config.eos_token_id, config.pad_token_id = False, None, 0
    config.temperature = config.top_p = None
    x = torch.tensor([prompt], device=next(model.parameters()).device)
    t0 = time.perf_counter()
    worker = threading.Thread(target=lambda: model.generate(
        x, generation_config=config, max_new_tokens=n, streamer=clock))
    worker.start()
    worker.join()
    new = clock.times[1:]
    r["streamer_ttft_s"] = new[0] - t0
    r["streamer_decode_tok_s"] = (len(new) - 1) / max(new[-1] - new[0], 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=Path("/tmp/coder-6.7b"))
    ap.add_argument("--shape", default="6.7b", choices=["6.7b", "tiny"])
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--offload-decode", type=int, default=16)
    ap.add_argument("--budget", default="6GiB")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from dscoder.loader import load_engine

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    path = checkpoint(args.dir, args.shape, device)
    prompt = prompt_ids(args.prompt)
    r: dict = {"card": card(), "shape": args.shape, "prompt_tokens": args.prompt,
               "decode_tokens": args.decode, "torch": torch.__version__}
    with timed(r, "load_s"):
        engine = load_engine(path, device=device, context_length=args.prompt + args.decode + 1024)
    ids = run_ours(engine, prompt, args.decode, r, "ours")
    base = run_generate(engine.model, prompt, args.decode, r, r["ours_turn2_len"])
    run_streamer(engine.model, prompt, args.decode, r)
    r["same_greedy_ids"] = list(ids) == base  # bf16: may part late on near-ties
    r["same_first_16"] = list(ids[:16]) == base[:16]
    r.update({f"full_{k}": v for k, v in gpu_memory().items()})
    engine.close()
    del engine
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        with timed(r, "offload_load_s"):
            engine = load_engine(path, device=device, gpu_memory=args.budget,
                                 context_length=args.prompt + args.offload_decode + 1024,
                                 log=log)
        r["offload_budget"] = args.budget
        r["offload_gpu_layers"] = sum(1 for v in engine.model.hf_device_map.values()
                                      if v not in ("cpu", "disk"))
        run_ours(engine, prompt, args.offload_decode, r, "offload")
        r.update({f"offload_{k}": v for k, v in gpu_memory().items()})
    rows = [(f"time to first token, {args.prompt}-token prompt (s)", r["ours_ttft_s"],
             r["base_ttft_s"], r["streamer_ttft_s"]),
            ("decode (tok/s)", r["ours_decode_tok_s"], r["base_decode_tok_s"],
             r["streamer_decode_tok_s"]),
            ("2nd turn, first token (s)", r["ours_turn2_ttft_s"], r["base_turn2_ttft_s"], None)]
    if cuda:
        rows += [(f"{args.budget}: time to first token (s)", r["offload_ttft_s"], None, None),
                 (f"{args.budget}: decode (tok/s)", r["offload_decode_tok_s"], None, None)]
    width = max(len(row[0]) for row in rows)
    print(f"{card()}, {args.shape}, bf16")
    print(f"{'metric'.ljust(width)}  {'dscoder loop':>14}  {'generate()':>14}  {'+ streamer':>14}")
    for name, *values in rows:
        cells = "  ".join(f"{'' if v is None else f'{v:.3f}':>14}" for v in values)
        print(f"{name.ljust(width)}  {cells}")
    emit_json(r, args.out)


if __name__ == "__main__":
    main()
