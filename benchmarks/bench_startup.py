"""Start-up and the first reply: the CLI as a user runs it, cold and warm; then lengths in one process.

    python benchmarks/bench_startup.py                                 # GPU: writes /tmp/dscoder-lite once
    python benchmarks/bench_startup.py --shape tiny --device cpu --dir /tmp/t --sweep 64,128  # dry run

Part 1, `dscoder complete -n 64` on a ~500-token Python file, each run a new process (as a user
starts it), at full GPU and with --gpu-memory 12GiB: "cold" has an empty compile cache (a fresh
$XDG_CACHE_HOME: the first run after install), "warm" reuses it. Per run: wall time, time to the
first byte on stdout, the --verbose start-up profile (import, config, tokenizer, load weights and
its GB/s, pin experts, compile, graph capture) and the reply's decode tok/s.
Part 2, in this process at full GPU: the decode speed of the first reply after load against the
second, then a prompt-length sweep (512, 2K, 8K, 32K): the first request at each length against
the same request again, with the compiles and graph captures each one caused.
The checkpoint is written first if missing (about 35 s for Lite). Prints a table, then one JSON
line (also written to $OUT/result.json when OUT is set).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import card, emit_json, lite_checkpoint, log, random_prompt  # noqa: E402

from dscoder.events import GenerationSettings  # noqa: E402

STATS = re.compile(r"reply (\d+) tokens, ([\d.]+) tok/s.*prefill ([\d.]+)s, decode ([\d.]+)s, load ([\d.]+)s")
PHASE = re.compile(r"([a-z][a-z ()-]*?) ([\d.]+) s\b")


def source_file(path: Path, tokens: int = 500) -> Path:
    """A Python file of about `tokens` tokens (about 4 characters a token for code)."""
    body, i = [], 0
    while sum(len(line) for line in body) < tokens * 4:
        body.append(f"def handler_{i}(request, limit={i}):\n    items = request.get('items', [])[:limit]\n"
                    f"    return {{'count': len(items), 'total': sum(x * {i} for x in items)}}\n\n")
        i += 1
    path.write_text("".join(body) + "def main():\n")
    return path


def cli_run(args, extra: list[str], cache_home: Path, prompt_file: Path) -> dict:
    """One `dscoder complete` process: wall time, first stdout byte, its stderr profile."""
    # the console script's module (dscoder.cli.entry): what the `dscoder` command runs
    cmd = [sys.executable, "-m", "dscoder.cli.entry", "--model", str(args.dir), "--device", args.device,
           "--verbose", "--max-tokens", str(args.tokens), *extra, "complete"]
    env = dict(os.environ, XDG_CACHE_HOME=str(cache_home), NO_COLOR="1", **args.bytecode_env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        env.pop(var, None)  # the cold/warm split is our cache under XDG_CACHE_HOME
    t = time.perf_counter()
    with open(prompt_file, "rb") as stdin:  # run from ROOT: `-m` puts the working directory first
        p = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                             cwd=ROOT)
        first = p.stdout.read(1)
        t_first = time.perf_counter() - t
        p.stdout.read()
        err = p.stderr.read().decode(errors="replace")
        p.wait()
    r = {"wall_s": time.perf_counter() - t, "first_byte_s": t_first if first else None, "rc": p.returncode}
    if p.returncode != 0:
        r["error"] = err[-2000:]
        return r
    for line in err.splitlines():
        if line.startswith("start-up:"):
            r["profile"] = {m.group(1).strip(): float(m.group(2)) for m in PHASE.finditer(line[9:])}
            r["profile_line"] = line
        m = STATS.search(line)
        if m:
            r.update(reply_tokens=int(m.group(1)), decode_tok_s=float(m.group(2)),
                     prefill_s=float(m.group(3)), decode_s=float(m.group(4)), load_s=float(m.group(5)))
    return r


def bytecode_like_an_install(work: Path) -> dict[str, str]:
    """pip writes .pyc files when it installs a package, so a user's `import torch` reads
    bytecode. Where this interpreter's packages have none and cannot get them (a read-only
    image with PYTHONDONTWRITEBYTECODE, as on our GPU machine, where compiling torch's sources
    cost 7.5 s of every start), compile them once into a PYTHONPYCACHEPREFIX for the runs."""
    import importlib.util

    origin = importlib.util.find_spec("torch").origin
    if (Path(origin).parent / "__pycache__").is_dir() and not sys.flags.dont_write_bytecode:
        return {}
    prefix = work / "pycache"
    env = dict(os.environ, PYTHONPYCACHEPREFIX=str(prefix))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    dirs = []
    for name in ("torch", "triton", "sympy", "mpmath", "numpy", "networkx", "jinja2", "typer", "click",
                 "rich", "pygments", "tokenizers", "safetensors", "filelock", "fsspec", "dscoder",
                 "huggingface_hub", "starlette", "uvicorn", "pydantic", "prompt_toolkit"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            dirs.append(str(Path(spec.origin).parent))
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", *dirs], env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log(f"compiled the packages' bytecode into {prefix} ({time.perf_counter() - t:.0f} s), as pip does at install")
    return {"PYTHONPYCACHEPREFIX": str(prefix)}


def cli_part(args) -> dict:
    runs = {}
    work = args.work
    args.bytecode_env = bytecode_like_an_install(work)
    prompt = source_file(work / "app.py")
    for name, extra in (("full", []), ("12GiB", ["--gpu-memory", args.budget]),
                        ("12GiB-int8", ["--gpu-memory", args.budget, "--expert-dtype", "int8"])):
        if name not in args.configs:
            continue
        cache = work / f"cache-{name}"  # empty: the cold run compiles, the warm ones reuse it
        # one process's start-up varies by a few tenths of a second run to run: several warm
        # runs show the spread
        for kind in ["cold", "warm", *(f"warm{i}" for i in range(2, args.warm_runs + 1))]:
            log(f"CLI {name} {kind}")
            runs[f"{name}_{kind}"] = r = cli_run(args, extra, cache, prompt)
            log(f"  wall {r['wall_s']:.1f} s, first byte {r.get('first_byte_s') or 0:.1f} s, "
                f"{r.get('profile_line', r.get('error', ''))}")
    return runs


def generate(engine, prompt: list[int], n: int):
    events = list(engine.generate(prompt, GenerationSettings(max_tokens=n, temperature=0), stop_ids=()))
    return events[-1]


def counts(engine) -> tuple[int, int]:
    from dscoder.warmup import compile_count

    return compile_count(), engine.startup_profile.counts.get("graphs captured", 0)


def api_part(args) -> dict:
    """In one process: the first reply against the second, then the prompt-length sweep."""
    from dscoder.engine import load_engine

    lengths = [int(x) for x in args.sweep.split(",")]
    # the compile cache the warm CLI runs used (a bare machine's ~/.cache would make this cold)
    os.environ.setdefault("XDG_CACHE_HOME", str(args.work / "cache-full"))
    t = time.perf_counter()
    window = max(*lengths, 512) + max(args.tokens, args.decode) + 64
    engine = load_engine(args.dir, device=args.device, context_length=window)
    loaded = time.perf_counter()
    r: dict = {"load_s": loaded - t, "profile": engine.startup_profile.as_dict()}
    # the first reply right after loading, as a user's first message (the compiled step may
    # still be building in the background: then this reply decodes with the uncompiled one)
    first = generate(engine, random_prompt(512, 1), args.decode)
    r["first_reply_compiled"] = engine.model._compiled_layer is not None
    second = generate(engine, random_prompt(512, 2), args.decode)
    r["second_reply_compiled"] = engine.model._compiled_layer is not None
    compiles = engine.use_compiled_step(wait=True)  # False where nothing compiles (the CPU)
    r["compiled_ready_after_load_s"] = time.perf_counter() - loaded if compiles else None
    third = generate(engine, random_prompt(512, 3), args.decode)
    r["first_reply_decode_tok_s"] = first.decode_tokens_per_second
    r["second_reply_decode_tok_s"] = second.decode_tokens_per_second
    r["compiled_reply_decode_tok_s"] = third.decode_tokens_per_second
    r["first_over_second"] = first.decode_tokens_per_second / second.decode_tokens_per_second
    r["first_over_compiled"] = first.decode_tokens_per_second / third.decode_tokens_per_second
    log(f"first reply {r['first_reply_decode_tok_s']:.1f} tok/s (compiled: {r['first_reply_compiled']}), "
        f"second {r['second_reply_decode_tok_s']:.1f} ({r['second_reply_compiled']}), compiled step "
        f"{r['compiled_reply_decode_tok_s']:.1f} (ready {r['compiled_ready_after_load_s'] or 0:.1f} s after load)")
    sweep = []
    for n in lengths:
        row: dict = {"prompt": n}
        for kind, seed in (("first", 10 + n), ("steady", 20 + n)):
            c0, g0 = counts(engine)
            t = time.perf_counter()
            f = generate(engine, random_prompt(n, seed), args.tokens)
            row[f"{kind}_s"] = time.perf_counter() - t
            row[f"{kind}_prefill_s"], row[f"{kind}_decode_tok_s"] = f.prefill_seconds, f.decode_tokens_per_second
            c1, g1 = counts(engine)
            row[f"{kind}_compiles"], row[f"{kind}_captures"] = c1 - c0, g1 - g0
        row["first_over_steady"] = row["first_s"] / row["steady_s"]
        log(f"{n} tokens: first {row['first_s']:.2f} s, steady {row['steady_s']:.2f} s "
            f"({row['first_compiles']} compiles, {row['first_captures']} captures)")
        sweep.append(row)
    r["sweep"] = sweep
    r["profile_after"] = engine.startup_profile.as_dict()
    return r


def table(result: dict) -> None:
    print(f"{'CLI run':<12} {'wall s':>7} {'1st byte s':>10} {'load s':>7} {'decode tok/s':>12}  profile")
    for name, r in result["cli"].items():
        if r.get("rc"):
            print(f"{name:<12} failed (rc {r['rc']}): {r.get('error', '').splitlines()[-1:]}")
            continue
        print(f"{name:<12} {r['wall_s']:>7.2f} {r.get('first_byte_s') or 0:>10.2f} {r.get('load_s', 0):>7.2f} "
              f"{r.get('decode_tok_s', 0):>12.1f}  {r.get('profile_line', '')[10:]}")
    api = result.get("api")
    if api:
        print(f"\nfirst reply {api['first_reply_decode_tok_s']:.1f} tok/s, second "
              f"{api['second_reply_decode_tok_s']:.1f} tok/s (ratio {api['first_over_second']:.2f}); "
              f"compiled step {api['compiled_reply_decode_tok_s']:.1f} tok/s, ready "
              f"{api['compiled_ready_after_load_s'] or 0:.1f} s after load")
        print(f"{'prompt':>7} {'first s':>8} {'steady s':>9} {'ratio':>6} {'prefill s first/steady':>23} "
              f"{'decode tok/s first/steady':>26} {'compiles':>9} {'captures':>9}")
        for row in api["sweep"]:
            prefill = f"{row['first_prefill_s']:.3f} / {row['steady_prefill_s']:.3f}"
            decode = f"{row['first_decode_tok_s']:.1f} / {row['steady_decode_tok_s']:.1f}"
            print(f"{row['prompt']:>7} {row['first_s']:>8.3f} {row['steady_s']:>9.3f} "
                  f"{row['first_over_steady']:>6.2f} {prefill:>23} {decode:>26} "
                  f"{row['first_compiles']:>9} {row['first_captures']:>9}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("/tmp/dscoder-lite"))
    p.add_argument("--shape", default="lite", choices=["lite", "tiny"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--configs", default="full,12GiB",
                   help="CLI configurations: full, 12GiB, 12GiB-int8 (the budget with int8 experts)")
    p.add_argument("--budget", default="12GiB")
    p.add_argument("--tokens", type=int, default=64, help="tokens per CLI reply and sweep request")
    p.add_argument("--decode", type=int, default=128, help="tokens of the first and second reply")
    p.add_argument("--sweep", default="512,2048,8192,32768")
    p.add_argument("--warm-runs", type=int, default=1, help="warm CLI runs per configuration")
    p.add_argument("--skip-cli", action="store_true")
    p.add_argument("--skip-api", action="store_true")
    args = p.parse_args()
    args.configs = args.configs.split(",")
    args.work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    lite_checkpoint(args.dir, args.shape, device=None if args.device == "cuda" else "cpu")
    result = {"card": card(), "torch": torch.__version__, "shape": args.shape, "tokens": args.tokens,
              "commit": _commit(), "date": time.strftime("%Y-%m-%d")}
    result["cli"] = {} if args.skip_cli else cli_part(args)
    if not args.skip_api:
        result["api"] = api_part(args)
    table(result)
    emit_json(result, os.environ.get("OUT"))


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    main()
