"""Full-GPU Lite: our engine against transformers' DeepseekV2ForCausalLM, same weights, one run.

    python benchmarks/bench_fullgpu.py --dir /tmp/lite          # on an 80 GB GPU
    python benchmarks/bench_fullgpu.py --shape tiny --dir /tmp/t  # a dry run anywhere

Measures, for both engines: logits agreement on a 512-token prompt (relative error), prefill
tokens/s on a 4,096-token prompt, decode tokens/s at a 2,048-token context, and for ours also
decode at a 32K context, with and without CUDA graphs. With --fp32-reference, both bf16
engines against transformers in fp32, on the whole prompt and on its last 32 rows computed by
our decode step (absorbed attention) one token at a time. Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # dscoder without installing it
from common import card, emit_json, gpu_memory, lite_checkpoint, log, print_table, random_prompt, timed  # noqa: E402

from dscoder.events import GenerationSettings  # noqa: E402

SAMPLED = dict(temperature=0.7, top_p=0.95, top_k=50, seed=1)  # the "sampled" rows' settings


def generate(engine, prompt: list[int], n: int, **sampling):
    settings = GenerationSettings(max_tokens=n, **(sampling or dict(temperature=0)))
    events = list(engine.new_session().generate(prompt, settings, stop_ids=()))
    return events[-1]


@contextmanager
def host_steps():
    """Decode as before issue 12: each step's graph replayed alone, the id sampled on the host
    between replays (a sync per token), not sampled on the device ahead of the host."""
    from dscoder.decode_loop import stepwise
    from dscoder.engine import Session

    ahead = Session._decode
    Session._decode = lambda self, logits, sampler, pos, limit: stepwise(
        lambda token: self._forward([token]))(logits, sampler, pos, limit)
    try:
        yield
    finally:
        Session._decode = ahead


def decode_rows(engine, r: dict, context: int, n: int, suffix: str = "") -> None:
    """Decode tok/s at `context`: ids sampled on the device ahead of the host (greedy and
    sampled), and the same with the host sampling between steps (the baseline)."""
    for name, sampling, host in (("decode", {}, False), ("decode_sampled", SAMPLED, False),
                                 ("decode_host_steps", {}, True), ("decode_host_steps_sampled", SAMPLED, True)):
        with host_steps() if host else nullcontext():
            f = generate(engine, random_prompt(context, 2), n + 1, **sampling)
        r[f"{name}{suffix}_tok_s"] = f.decode_tokens_per_second
        log(f"ours {name} {f.decode_tokens_per_second:.1f} tok/s at {context} context")


DECODED = 32  # the logits prompt's last rows, computed by decode steps (absorbed attention)


def decoded_logits(engine, prompt: list[int]) -> torch.Tensor:
    """Logits at positions len-1-DECODED .. len-2 of `prompt`, the first from prefilling the
    tokens before, the others as decoding computes them: one token at a time (the graphed,
    absorbed-attention step on a GPU), fed the prompt's own next token (teacher forcing)."""
    session = engine.new_session()
    start = len(prompt) - DECODED
    rows = [session._prefill(prompt[:start]).float().cpu()]
    for token in prompt[start:-1]:
        rows.append(session._forward([token]).float().cpu())
    return torch.cat(rows)


def ours(args, r: dict, logits_prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    from dscoder.engine import load_engine

    with timed(r, "load_s"):
        engine = load_engine(args.dir, device=args.device,
                             context_length=max(args.long_context, args.prefill, args.context) + 1024)
        engine.use_compiled_step(wait=True)  # measure the compiled step, not the warm-up one
    with torch.inference_mode():
        m = engine.model
        logits = m(torch.tensor(logits_prompt, device=engine.device), m.new_cache(1024), 0,
                   all_logits=True).cpu()
    decoded = decoded_logits(engine, logits_prompt)
    generate(engine, random_prompt(args.prefill, 9), 1)  # warm-up: kernels, allocator
    f = generate(engine, random_prompt(args.prefill, 1), 1)
    r["prefill_tok_s"] = args.prefill / f.prefill_seconds
    log(f"ours prefill {r['prefill_tok_s']:.0f} tok/s")
    with timed(r, "first_decode_call_s"):  # compiles the decode step and captures its graphs
        generate(engine, random_prompt(args.context, 8), 8)
    decode_rows(engine, r, args.context, args.decode)
    r["ttft_s"] = generate(engine, random_prompt(args.context, 2), 1).prefill_seconds
    use, engine.use_graphs = engine.use_graphs, False
    f = generate(engine, random_prompt(args.context, 2), 65)
    r["decode_eager_tok_s"] = f.decode_tokens_per_second
    engine.use_graphs = use
    log(f"ours eager decode {r['decode_eager_tok_s']:.1f} tok/s")
    if args.long_context:
        with timed(r, "long_first_call_s"):  # a new length: one recompile of the decode step
            generate(engine, random_prompt(args.long_context, 6), 8)
        f = generate(engine, random_prompt(args.long_context, 3), 1)
        r["long_prefill_tok_s"] = args.long_context / f.prefill_seconds
        log(f"ours at {args.long_context}: prefill {r['long_prefill_tok_s']:.0f} tok/s")
        decode_rows(engine, r, args.long_context, args.decode // 2, "_long")
    if args.profile:
        profile(engine, args)
    compiled, m._compiled_layer = m._compiled_layer, None
    if compiled is not None:
        f = generate(engine, random_prompt(args.context, 2), 65)
        r["decode_uncompiled_tok_s"] = f.decode_tokens_per_second
        m._compiled_layer = compiled
        log(f"ours decode without torch.compile {r['decode_uncompiled_tok_s']:.1f} tok/s")
    r["kv_bytes_per_token"] = engine.model.new_cache(1).bytes_per_token
    r.update(gpu_memory())
    chat = [engine.tokenizer.bos_id] + engine.tokenizer.encode("User: write quicksort in python\n\nAssistant:")
    r["sample_text"] = generate(engine, chat, 24).text
    del engine, m
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return logits, decoded


def profile(engine, args) -> None:
    """Kernel time tables for one prefill and a few eager decode steps, into $OUT."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    out = Path(os.environ.get("OUT", "."))
    use = engine.use_graphs
    for name, n_prompt, n_gen, graphs in (("prefill", args.prefill, 1, False),
                                          ("decode_eager", args.context, 9, False),
                                          ("decode_graph", args.context, 9, True)):
        engine.use_graphs = graphs and engine.device.type == "cuda"
        prompt = random_prompt(n_prompt, 5)
        generate(engine, prompt, n_gen)
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            generate(engine, prompt, n_gen)
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
        (out / f"profile_{name}.txt").write_text(table)
    engine.use_graphs = use


def reference(args, r: dict, logits_prompt: list[int]) -> torch.Tensor:
    from transformers import DeepseekV2ForCausalLM

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    with timed(r, "load_s"):
        model = DeepseekV2ForCausalLM.from_pretrained(args.dir, dtype=dtype, device_map=args.device).eval()
    dev = model.device
    with torch.inference_mode():
        logits = model(torch.tensor([logits_prompt], device=dev)).logits[0].float().cpu()
        p = torch.tensor([random_prompt(args.prefill, 1)], device=dev)
        model(p[:, :64])  # warm-up
        with timed(r, "prefill_s"):
            model(p)
        r["prefill_tok_s"] = args.prefill / r["prefill_s"]
        log(f"transformers prefill {r['prefill_tok_s']:.0f} tok/s")
        c = torch.tensor([random_prompt(args.context, 2)], device=dev)
        kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
        with timed(r, "first_s"):
            model.generate(c, max_new_tokens=1, **kw)
        n = args.ref_decode
        with timed(r, "gen_s"):
            model.generate(c, max_new_tokens=n + 1, min_new_tokens=n + 1, **kw)
        r["decode_tok_s"] = n / (r["gen_s"] - r["first_s"])
        log(f"transformers decode {r['decode_tok_s']:.2f} tok/s")
    del model
    gc.collect()
    return logits


def fp32_reference(args, logits_prompt: list[int]) -> torch.Tensor:
    """transformers in fp32: the yardstick for how far each bf16 engine is from exact."""
    from transformers import DeepseekV2ForCausalLM

    model = DeepseekV2ForCausalLM.from_pretrained(args.dir, dtype=torch.float32, device_map=args.device).eval()
    with torch.inference_mode():
        logits = model(torch.tensor([logits_prompt], device=model.device)).logits[0].float().cpu()
    del model
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return logits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("/tmp/dscoder-lite"))
    p.add_argument("--shape", default="lite")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prefill", type=int, default=4096)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--decode", type=int, default=256)
    p.add_argument("--long-context", type=int, default=32768)
    p.add_argument("--ref-decode", type=int, default=32)
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--fp32-reference", action="store_true",
                   help="also compare both bf16 engines to transformers in fp32")
    p.add_argument("--profile", action="store_true", help="write kernel tables to $OUT")
    args = p.parse_args()
    lite_checkpoint(args.dir, args.shape)
    prompt = random_prompt(512, 7)
    r = {"card": card(), "shape": args.shape, "ours": {}, "transformers": {}}
    ours_logits, ours_decoded = ours(args, r["ours"], prompt)
    rows = slice(len(prompt) - 1 - DECODED, len(prompt) - 1)  # the positions decoded one by one
    if not args.skip_reference:
        ref_logits = reference(args, r["transformers"], prompt)
        r["logits_rel_err"] = ((ours_logits - ref_logits).norm() / ref_logits.norm()).item()
        r["argmax_agreement"] = (ours_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
        if args.fp32_reference:
            exact = fp32_reference(args, prompt)
            for name, lg in (("ours", ours_logits), ("transformers", ref_logits)):
                r[f"{name}_bf16_rel_err_vs_fp32"] = ((lg - exact).norm() / exact.norm()).item()
                r[f"{name}_bf16_argmax_vs_fp32"] = (lg.argmax(-1) == exact.argmax(-1)).float().mean().item()
            # the same rows as decode steps (ours) against transformers' bf16 forward there
            for name, lg in (("ours_decode", ours_decoded), ("transformers_rows", ref_logits[rows])):
                ex = exact[rows]
                r[f"{name}_bf16_rel_err_vs_fp32"] = ((lg - ex).norm() / ex.norm()).item()
            log(f"vs fp32: ours {r['ours_bf16_rel_err_vs_fp32']:.2e}, "
                f"transformers {r['transformers_bf16_rel_err_vs_fp32']:.2e}; the last {DECODED} rows "
                f"decoded by ours {r['ours_decode_bf16_rel_err_vs_fp32']:.2e}, transformers "
                f"{r['transformers_rows_bf16_rel_err_vs_fp32']:.2e}")
    o, t = r["ours"], r["transformers"]

    def f(d: dict, k: str, fmt: str = "{:.1f}") -> str:
        return fmt.format(d[k]) if k in d else "-"
    print_table([
        ("load s", f(o, "load_s"), f(t, "load_s")),
        (f"prefill tok/s ({args.prefill})", f(o, "prefill_tok_s", "{:.0f}"), f(t, "prefill_tok_s", "{:.0f}")),
        (f"decode tok/s (ctx {args.context})", f(o, "decode_tok_s"), f(t, "decode_tok_s", "{:.2f}")),
        ("  sampled on the device", f(o, "decode_sampled_tok_s"), "-"),
        ("  host samples between steps (before)", f(o, "decode_host_steps_tok_s"), "-"),
        ("  host samples between steps, sampled", f(o, "decode_host_steps_sampled_tok_s"), "-"),
        ("decode tok/s, no CUDA graph", f(o, "decode_eager_tok_s"), "-"),
        ("decode tok/s, graphs without compile", f(o, "decode_uncompiled_tok_s"), "-"),
        (f"prefill tok/s ({args.long_context})", f(o, "long_prefill_tok_s", "{:.0f}"), "-"),
        (f"decode tok/s (ctx {args.long_context})", f(o, "decode_long_tok_s"), "-"),
        ("  sampled on the device", f(o, "decode_sampled_long_tok_s"), "-"),
        ("  host samples between steps (before)", f(o, "decode_host_steps_long_tok_s"), "-"),
        ("peak GPU GiB allocated", f(o, "peak_allocated_gib"), "-"),
        ("logits rel err vs reference", f(r, "logits_rel_err", "{:.2e}"), ""),
        ("bf16 logits rel err vs fp32", f(r, "ours_bf16_rel_err_vs_fp32", "{:.2e}"),
         f(r, "transformers_bf16_rel_err_vs_fp32", "{:.2e}")),
        (f"  last {DECODED} rows, ours by decode steps", f(r, "ours_decode_bf16_rel_err_vs_fp32", "{:.2e}"),
         f(r, "transformers_rows_bf16_rel_err_vs_fp32", "{:.2e}")),
    ])
    emit_json(r, os.environ.get("OUT"))


if __name__ == "__main__":
    main()
