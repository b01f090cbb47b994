"""Routing traces: record which experts each MoE layer picks, replay them through eviction policies.

    DSCODER_ROUTING_TRACE=trace.jsonl dscoder chat ...      # record (any engine, offloaded or not)
    python -m dscoder.offload.trace trace.jsonl --slots 400 800    # compare policies offline

A trace line is one MoE layer call: {"layer": 3, "ids": [[e, e, ...] per token]}.
"""
from __future__ import annotations

import argparse
import atexit
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dscoder.offload.policy import POLICIES, SlotTable, make_policy, should_stream

Call = tuple[int, list[list[int]]]  # (layer, expert ids per token)


class TraceWriter:
    def __init__(self, path: Path) -> None:
        self._f = open(path, "a", encoding="utf-8")
        atexit.register(self.close)

    def add(self, layer: int, ids: list[list[int]]) -> None:
        self._f.write(json.dumps({"layer": layer, "ids": ids}, separators=(",", ":")) + "\n")

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def read_trace(path: Path) -> list[Call]:
    calls = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                calls.append((int(d["layer"]), [list(map(int, row)) for row in d["ids"]]))
    return calls


@dataclass(frozen=True)
class ReplayResult:
    policy: str
    slots: int
    hits: int
    misses: int

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


def replay(calls: Iterable[Call], policy: str, slots: int) -> ReplayResult:
    """Hits and misses the engine's cache would see, with the engine's rules (streamed prefill
    calls don't fill the cache; a call's own experts are never evicted while it runs)."""
    calls = list(calls)
    layers = sorted({layer for layer, _ in calls})
    table = SlotTable(slots, make_policy(policy, slots, layers))
    hits = misses = 0
    for layer, ids in calls:
        needed = sorted({e for row in ids for e in row})
        keys = [(layer, e) for e in needed]
        if should_stream(len(ids), len(needed), slots):
            present = sum(table.get(k) is not None for k in keys)
            hits, misses = hits + present, misses + len(keys) - present
            continue
        protected = set(keys)
        for key in keys:
            if table.get(key) is not None:
                hits += 1
            else:
                misses += 1
                table.assign(key, protected)
    return ReplayResult(policy, slots, hits, misses)


def compare(calls: Sequence[Call], slots: Sequence[int],
            policies: Sequence[str] = POLICIES) -> list[ReplayResult]:
    return [replay(calls, p, s) for s in slots for p in policies]


def synthetic_trace(layers: int, experts: int, top_k: int, tokens: int, *, skew: float = 0.0,
                    seed: int = 0) -> list[Call]:
    """Decode-like calls, one token per layer per step; skew > 0 makes a few experts popular
    (weights 1/rank**skew, a different ranking per layer); skew 0 is the uniform routing of
    random weights."""
    rng = random.Random(seed)
    ranks = [rng.sample(range(experts), experts) for _ in range(layers)]
    w = [1.0 / (r + 1) ** skew for r in range(experts)]
    calls: list[Call] = []
    for _ in range(tokens):
        for layer in range(layers):
            chosen: set[int] = set()
            while len(chosen) < top_k:
                chosen.add(ranks[layer][rng.choices(range(experts), w)[0]])
            calls.append((layer + 1, [sorted(chosen)]))
    return calls


def format_table(results: Sequence[ReplayResult], total_experts: int | None) -> str:
    lines = [f"{'policy':<10} {'slots':>6} {'hits':>9} {'misses':>9} {'hit rate':>9}"
             + ("  uniform" if total_experts else "")]
    for r in results:
        base = f"  {min(1.0, r.slots / total_experts):8.1%}" if total_experts else ""
        lines.append(f"{r.policy:<10} {r.slots:>6} {r.hits:>9} {r.misses:>9} {r.hit_rate:>9.1%}{base}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Replay a routing trace through eviction policies.")
    p.add_argument("trace", type=Path)
    p.add_argument("--slots", type=int, nargs="+", required=True, help="GPU expert slots to try")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--experts", type=int, default=None,
                   help="routed experts per layer, to print the uniform-routing baseline")
    a = p.parse_args(argv)
    calls = read_trace(a.trace)
    layers = len({layer for layer, _ in calls})
    total = a.experts * layers if a.experts else None
    results = compare(calls, a.slots, a.policies)
    print(format_table(results, total))
    print(json.dumps([{"policy": r.policy, "slots": r.slots, "hit_rate": r.hit_rate} for r in results]))


if __name__ == "__main__":
    main()
