"""Does rendering slow the model down? The real CLI in a 100x40 pseudo-terminal, pretty vs plain.

`dscoder chat "..."` runs on the fake engine (tests/fakes.py), which streams a realistic Markdown
reply (headings, lists, fenced code, a quote, a table; tests/sample_markdown.py) at a fixed pace,
4 characters (about one token) per chunk at --rate tokens a second. The renderer runs on the
thread that pulls the tokens, so any time it takes shows up as a longer reply. For each length,
the wall time of the reply (from its first byte on the terminal to the end of the process) and of
the whole process, with Markdown rendering and with --no-pretty, interleaved, the median of
--repeat runs.
No GPU and no torch needed:

    python benchmarks/bench_render.py                       # 500, 2000, 8000 tokens, 3 runs each
    python benchmarks/bench_render.py --tokens 2000 --repeat 1

Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pexpect

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from sample_markdown import CHARS_PER_TOKEN, markdown_reply  # noqa: E402

STATS = re.compile(r"reply (\d+) tokens, ([\d.]+) tok/s \| ([\d.]+) s")


def run_once(reply: str, rate: float, pretty: bool, limit: float) -> dict:
    """One reply in a fresh pty; the times and what the stats line said. A reply still going
    after `limit` seconds is stopped and reported as taking at least that long."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSCODER_") and k != "NO_COLOR"}
    env.update(TERM="xterm-256color", DSCODER_NOHISTORY="1",
               DSCODER_FAKE_REPLY=reply.replace("\\", "\\\\"),
               DSCODER_FAKE_CHUNK=str(CHARS_PER_TOKEN), DSCODER_FAKE_DELAY=str(1 / rate))
    args = [str(ROOT / "tests" / "fakes.py"), "chat", "--max-tokens", "100000",
            *([] if pretty else ["--no-pretty"]),
            "explain the loader"]
    start = time.perf_counter()
    child = pexpect.spawn(sys.executable, args, env=env, dimensions=(40, 100), timeout=limit)
    first, received, chunks = None, 0, []
    while True:
        try:
            data = child.read_nonblocking(1 << 16, timeout=max(limit - (time.perf_counter() - start), 0.1))
        except pexpect.EOF:
            break
        except pexpect.TIMEOUT:
            data = b""
        if time.perf_counter() - start > limit:
            child.close(force=True)
            return {"reply_s": limit, "process_s": limit, "bytes": received, "stats_wall_s": None,
                    "stopped": True}
        if first is None:
            first = time.perf_counter()
        received += len(data)
        chunks.append(data)
    end = time.perf_counter()
    child.close()
    if child.exitstatus != 0:
        raise SystemExit(f"the CLI failed ({child.exitstatus}): {b''.join(chunks)[-500:]!r}")
    tail = re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", b"".join(chunks)[-2000:]).decode(errors="replace")
    stats = STATS.search(tail)
    return {"reply_s": end - (first or start), "process_s": end - start, "bytes": received,
            "stats_wall_s": float(stats.group(3)) if stats else None, "stopped": False}


def bench(tokens: int, rate: float, repeat: int, limit: float) -> dict:
    reply = markdown_reply(tokens)
    runs: dict[str, list[dict]] = {"pretty": [], "plain": []}
    for _ in range(repeat):  # interleaved, so that a busy neighbour hurts both alike
        for mode in runs:
            runs[mode].append(run_once(reply, rate, pretty=mode == "pretty", limit=limit))
    med = {mode: statistics.median(r["reply_s"] for r in rs) for mode, rs in runs.items()}
    proc = {mode: statistics.median(r["process_s"] for r in rs) for mode, rs in runs.items()}
    return {"tokens": tokens, "chars": len(reply), "ideal_s": tokens / rate,
            "pretty_process_s": proc["pretty"], "plain_process_s": proc["plain"],
            "process_overhead_pct": 100 * (proc["pretty"] / proc["plain"] - 1),
            "pretty_s": med["pretty"], "plain_s": med["plain"],
            "overhead_pct": 100 * (med["pretty"] / med["plain"] - 1),
            "pretty_runs_s": [round(r["reply_s"], 3) for r in runs["pretty"]],
            "plain_runs_s": [round(r["reply_s"], 3) for r in runs["plain"]],
            "pretty_bytes": runs["pretty"][0]["bytes"], "plain_bytes": runs["plain"][0]["bytes"],
            "stopped": any(r["stopped"] for rs in runs.values() for r in rs)}


def commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[500, 2000, 8000])
    ap.add_argument("--rate", type=float, default=300.0, help="tokens a second from the fake engine")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--limit", type=float, default=300.0,
                    help="stop a reply after this many seconds (reported as at least that)")
    opts = ap.parse_args()
    rows = []
    for n in opts.tokens:
        rows.append(bench(n, opts.rate, opts.repeat, opts.limit))
        print(f"[{time.strftime('%H:%M:%S')}] {n} tokens: plain {rows[-1]['plain_s']:.2f} s, "
              f"pretty {rows[-1]['pretty_s']:.2f} s", file=sys.stderr, flush=True)
    print("reply: first byte to exit; process: start to exit (Python start-up, loading)")
    print(f"{'tokens':>7} {'ideal s':>8} {'plain s':>8} {'pretty s':>9} {'pretty vs plain':>16}"
          f" {'process: plain s':>17} {'pretty s':>9} {'pretty vs plain':>16}")
    for r in rows:
        more = ">" if r["stopped"] else " "
        print(f"{r['tokens']:>7} {r['ideal_s']:>8.2f} {r['plain_s']:>8.2f} {more}{r['pretty_s']:>8.2f}"
              f" {more}{r['overhead_pct']:>+14.1f}% {r['plain_process_s']:>17.2f}"
              f" {r['pretty_process_s']:>9.2f} {r['process_overhead_pct']:>+15.1f}%")
    print(json.dumps({"benchmark": "render", "rate_tok_s": opts.rate, "repeat": opts.repeat,
                      "terminal": "100x40", "machine": platform.processor() or platform.machine(),
                      "cpus": os.cpu_count(), "python": platform.python_version(),
                      "date": time.strftime("%Y-%m-%d"), "commit": commit(), "rows": rows}))


if __name__ == "__main__":
    main()
