"""Offload counters: hits, misses, bytes copied, copy time (busy and exposed)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class OffloadStats:
    hits: int = 0  # needed experts that were in a GPU slot and needed no copy
    misses: int = 0  # needed experts copied on demand (cache path) or streamed (prefill path)
    prefetched: int = 0  # copies started for a later layer before it ran
    prefetch_used: int = 0  # needed experts that a prefetch had copied (or was copying)
    bytes_copied: int = 0
    copy_seconds: float = 0.0  # time the copy engine was busy
    exposed_seconds: float = 0.0  # time compute waited for copies
    tokens: int = 0  # tokens that went through the model (prefill and decode)
    _pending: list = field(default_factory=list, repr=False)  # unresolved CUDA timing events

    def as_dict(self) -> dict:
        self.resolve()
        d = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        return d

    def resolve(self) -> None:
        """Fold in finished CUDA event timings (synchronises on them; called when reporting)."""
        for kind, start, end in self._pending:
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000.0
            if kind == "copy":
                self.copy_seconds += seconds
            else:
                self.exposed_seconds += seconds
        self._pending.clear()

    def summary(self) -> dict:
        """The counters people read: hit rate, bytes per token, copy time."""
        return _rates(self.as_dict())


def delta(after: dict, before: dict) -> dict:
    """Counters of one generation: after minus before, rates recomputed."""
    keys = ("hits", "misses", "prefetched", "prefetch_used", "bytes_copied", "copy_seconds",
            "exposed_seconds", "tokens")
    return _rates({k: after.get(k, 0) - before.get(k, 0) for k in keys})


def _rates(d: dict) -> dict:
    """hit_rate: needed experts already cached; ready_rate: cached or prefetched in time."""
    needed = d["hits"] + d["misses"] + d["prefetch_used"]
    d["hit_rate"] = d["hits"] / needed if needed else 0.0
    d["ready_rate"] = (d["hits"] + d["prefetch_used"]) / needed if needed else 0.0
    d["bytes_per_token"] = d["bytes_copied"] / d["tokens"] if d["tokens"] else 0.0
    d["wasted_prefetches"] = d["prefetched"] - d["prefetch_used"]
    return d
