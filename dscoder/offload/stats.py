"""Offload counters: hits, misses, bytes copied, copy time (busy and exposed)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class OffloadStats:
    hits: int = 0  # needed experts already in (or on their way to) a GPU slot
    misses: int = 0  # needed experts copied on demand (cache path) or streamed (prefill path)
    prefetched: int = 0  # copies started for the next layer before it ran
    prefetch_used: int = 0  # of those, the ones that layer then needed
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
        d = self.as_dict()
        looked_up = self.hits + self.misses
        d["hit_rate"] = self.hits / looked_up if looked_up else 0.0
        d["bytes_per_token"] = self.bytes_copied / self.tokens if self.tokens else 0.0
        return d


def delta(after: dict, before: dict) -> dict:
    """Counters of one generation: after minus before, rates recomputed."""
    out = {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], (int, float))}
    looked_up = out.get("hits", 0) + out.get("misses", 0)
    out["hit_rate"] = out.get("hits", 0) / looked_up if looked_up else 0.0
    out["bytes_per_token"] = out.get("bytes_copied", 0) / out["tokens"] if out.get("tokens") else 0.0
    return out
