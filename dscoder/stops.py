"""Stop strings over streamed text: emit what can no longer start a stop string, cut at a hit."""
from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text = ""  # everything emitted so far (never includes a stop string)
        self._pending = ""  # received but held back: it may be the start of a stop string

    def feed(self, new: str) -> tuple[str, bool]:
        """Add streamed text; return (text safe to emit now, whether a stop string was hit)."""
        buf = self._pending + new
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._pending = ""
            return self._emit(buf[:cut]), True
        hold = self._holdback(buf)
        self._pending = buf[len(buf) - hold:] if hold else ""
        return self._emit(buf[: len(buf) - hold]), False

    def finish(self, new: str = "") -> str:
        """End of generation: whatever is held back is plain text after all."""
        out, hit = self.feed(new)
        if not hit:
            out += self._emit(self._pending)
            self._pending = ""
        return out

    def _holdback(self, buf: str) -> int:
        # the longest end of buf that is a proper beginning of some stop string
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best

    def _emit(self, s: str) -> str:
        self.text += s
        return s
