"""What generation takes and yields. Torch-free, so the CLI and tests can use it cheaply."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

FinishReason = Literal["eos", "stop", "length", "cancelled"]


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling and stopping. temperature 0 means greedy."""

    max_tokens: int = 1024
    temperature: float = 0.3
    top_p: float = 0.95
    top_k: int = 0  # 0: no top-k filter
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings; the stop string itself is not emitted


@dataclass(frozen=True)
class TextDelta:
    """New text since the last delta (never half a UTF-8 character) and the ids that produced it."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Finished:
    """The last event of every generation."""

    reason: FinishReason
    text: str  # the whole generated text (stop string excluded)
    token_ids: tuple[int, ...]  # every generated id (EOS excluded)
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV cache was reused from the previous turn
    prefill_seconds: float
    decode_seconds: float
    stats: dict = field(default_factory=dict)  # engine counters (offload hit rate, bytes copied...)
    # the reply's wall time as the user saw it (set by the CLI; the engine's own seconds above
    # count only its work, so a slow terminal never reads as a slow model)
    wall_seconds: float | None = None
    # the count when the ids are not known (a server that sends only text and usage)
    generated_count: int | None = None

    @property
    def generated_tokens(self) -> int:
        return self.generated_count if self.generated_count is not None else len(self.token_ids)

    @property
    def prefill_tokens_per_second(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        # the first token comes out of prefill; decode produced the rest
        n = max(self.generated_tokens - 1, 0)
        return n / self.decode_seconds if self.decode_seconds > 0 else 0.0


Event = Union[TextDelta, Finished]
