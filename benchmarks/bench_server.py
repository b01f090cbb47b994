"""The resident engine: one-shot commands with and without a warm `dscoder serve`, first-token
latency over HTTP, a repeated /infill, and memory over many requests. One run, as a user would.

    python benchmarks/bench_server.py --dir /tmp/lite            # on the GPU machine
    python benchmarks/bench_server.py --shape tiny --dir /tmp/t --device cpu --requests 50

Every command runs the real CLI in a subprocess (`python -m dscoder.cli.app`), so wall times
include Python's start, imports and the tokenizer. Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import card, emit_json, lite_checkpoint, log  # noqa: E402

CODE_LINE = "    total += compute_value(items[{i}], weight={i} * factor)  # step {i}\n"


def source_file(tokens: int, directory: Path, model_dir: Path) -> Path:
    """A Python file of about `tokens` tokens."""
    from dscoder.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    text, i = "def accumulate(items, factor):\n    total = 0\n", 0
    while len(tok.encode(text)) < tokens:
        text += CODE_LINE.format(i=i)
        i += 1
    path = directory / "example.py"
    path.write_text(text)
    return path


def cli(args: list[str], env: dict) -> float:
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "dscoder.cli.entry", *args], capture_output=True,
                       text=True, env=env)
    wall = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"dscoder {' '.join(args)} failed: {r.stderr[-2000:]}")
    return wall


def gpu_used_mib(pid: int) -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True).stdout
    except OSError:
        return None
    for line in out.splitlines():
        p, used = [x.strip() for x in line.split(",")]
        if int(p) == pid:
            return float(used)
    return None


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def first_token_seconds(url: str, route: str, body: dict) -> tuple[float, dict]:
    """Time to the first streamed text, and the last event (timings, usage)."""
    start, first, last = time.perf_counter(), None, {}
    with httpx.stream("POST", url + route, json={**body, "stream": True}, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            text = event.get("content") or "".join(c.get("text", "") for c in event.get("choices", []))
            if text and first is None:
                first = time.perf_counter() - start
            last = event
    return (first if first is not None else time.perf_counter() - start), last


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=Path("/tmp/lite"))
    ap.add_argument("--shape", default="lite")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tokens", type=int, default=500, help="size of the file to complete")
    ap.add_argument("--requests", type=int, default=1000, help="requests for the memory check")
    ap.add_argument("--port", type=int, default=18435)
    args = ap.parse_args()
    ckpt = lite_checkpoint(args.dir, args.shape)
    work = Path(tempfile.mkdtemp())
    env = {**os.environ, "XDG_RUNTIME_DIR": str(work / "run"), "NO_COLOR": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH")]))}
    (work / "run").mkdir()
    src = source_file(args.tokens, work, ckpt)
    common = ["--model", str(ckpt), "--device", args.device, "-t", "0", "-n", "64"]
    r: dict = {"card": card(), "tokens": args.tokens}

    log("in-process one-shots (no server)")
    r["inprocess_wall_s"] = [cli([*common, "--no-server", "complete", str(src)], env) for _ in range(2)]

    log("starting the server")
    t0 = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "dscoder.cli.entry", "--model", str(ckpt),
                               "--device", args.device, "serve", "--port", str(args.port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    line = server.stdout.readline()
    if not re.search(r"http://", line):
        raise SystemExit(f"server did not start: {line}{server.stdout.read()}")
    url = f"http://127.0.0.1:{args.port}"
    r["server_load_s"] = time.perf_counter() - t0
    try:
        # warm: the first request at each size compiles and captures (the start-up issue's work)
        t = time.perf_counter()
        cli([*common, "complete", str(src)], env)
        r["first_client_oneshot_s"] = time.perf_counter() - t
        r["client_wall_s"] = [cli([*common, "complete", str(src)], env) for _ in range(5)]
        log(f"client one-shot median {statistics.median(r['client_wall_s']):.3f} s")

        prefix = src.read_text()
        fresh = []
        for i in range(5):  # a new prompt each time: nothing cached
            body = {"prompt": f"# variant {i}\n" + prefix, "max_tokens": 16, "temperature": 0}
            fresh.append(first_token_seconds(url, "/v1/completions", body)[0])
        r["http_ttft_fresh_500_s"] = fresh

        extra = [{"filename": f"mod{i}.py", "text": prefix} for i in range(3)]
        infill = {"input_prefix": prefix, "input_suffix": "\n    return total\n", "n_predict": 16,
                  "temperature": 0, "input_extra": extra}
        ttft, last = first_token_seconds(url, "/infill", infill)
        r["infill_first_s"], r["infill_prompt_tokens"] = ttft, last.get("tokens_evaluated")
        repeated = [first_token_seconds(url, "/infill", infill) for _ in range(10)]
        r["infill_repeat_ttft_s"] = [t for t, _ in repeated]
        r["infill_repeat_cached"] = repeated[-1][1].get("tokens_cached")
        log(f"infill of {r['infill_prompt_tokens']} tokens: first {ttft * 1000:.0f} ms, repeated "
            f"median {statistics.median(r['infill_repeat_ttft_s']) * 1000:.1f} ms")

        mem0 = (gpu_used_mib(server.pid), rss_mib(server.pid))
        r["memory_trace_mib"] = []  # growth that stops is a bounded cache; growth that goes on is a leak
        with httpx.Client(base_url=url, timeout=600) as http:
            for i in range(args.requests):  # editors: a changing line over a fixed context
                if i % max(args.requests // 4, 1) == 0:
                    r["memory_trace_mib"].append((i, gpu_used_mib(server.pid), rss_mib(server.pid)))
                body = {**infill, "input_prefix": prefix + f"    x_{i % 97} = ", "n_predict": 4}
                assert http.post("/infill", json=body).status_code == 200
                if i % 7 == 0:
                    http.post("/v1/chat/completions", json={
                        "messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 4})
        mem1 = (gpu_used_mib(server.pid), rss_mib(server.pid))
        r["memory_before_mib"], r["memory_after_mib"] = mem0, mem1
        r["memory_requests"] = args.requests
        log(f"memory over {args.requests} requests: gpu {mem0[0]} -> {mem1[0]} MiB, "
            f"rss {mem0[1]:.0f} -> {mem1[1]:.0f} MiB")
    finally:
        server.terminate()
        r["server_exit"] = server.wait(timeout=60)

    med = statistics.median
    rows = [("one-shot complete -n 64, in-process (s)", r["inprocess_wall_s"]),
            ("one-shot complete -n 64, warm server (s)", r["client_wall_s"]),
            ("HTTP first token, new 500-token prompt (s)", r["http_ttft_fresh_500_s"]),
            ("/infill repeated, unchanged context (s)", r["infill_repeat_ttft_s"])]
    print(f"card: {r['card']}")
    for name, values in rows:
        print(f"{name:48s} median {med(values):8.3f}  all {', '.join(f'{v:.3f}' for v in values)}")
    print(f"memory over {args.requests} requests (GPU MiB, RSS MiB): {mem0} -> {mem1}")
    print("memory trace (request, GPU MiB, RSS MiB):", r["memory_trace_mib"])
    emit_json(r, os.environ.get("OUT"))


if __name__ == "__main__":
    main()
