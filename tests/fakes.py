"""A fake tokenizer, engine and backend with the real API, for fast UI tests without torch.

In process:    monkeypatch.setattr(dscoder.cli.backend, "BACKEND", FakeBackend(reply="..."))
In a subprocess or a pseudo-terminal:  python tests/fakes.py [dscoder args...]
    which installs FakeBackend.from_env() and runs the real CLI entry point. The reply and its
    pace come from DSCODER_FAKE_REPLY (\\n understood), DSCODER_FAKE_DELAY (seconds per chunk) and
    DSCODER_FAKE_CHUNK (characters per chunk); DSCODER_FAKE_LOAD_DELAY makes loading take that
    many seconds (and say "fake: loading" on stderr first). Only this test file reads them.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dscoder.errors import DscoderError  # noqa: E402
from dscoder.events import Finished, GenerationSettings, TextDelta  # noqa: E402

SPECIALS = {1_000_000: "<｜begin▁of▁sentence｜>", 1_000_001: "<｜end▁of▁sentence｜>",
            1_000_002: "<｜fim▁hole｜>", 1_000_003: "<｜fim▁begin｜>", 1_000_004: "<｜fim▁end｜>"}
DEFAULT_REPLY = "Hello! Here is some code:\n\n```python\nprint('hi')\n```\n\nDone."


class FakeTokenizer:
    """One id per character (its code point); special ids above the Unicode range."""

    bos_id, eos_id, fim_hole_id, fim_begin_id, fim_end_id = sorted(SPECIALS)
    max_token_chars = 1

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        return self.encode(text), [(i, i + 1) for i in range(len(text))]

    def decode(self, ids, *, skip_special: bool = True) -> str:
        return "".join(SPECIALS.get(i, "") if i in SPECIALS else chr(i) for i in ids
                       if not (skip_special and i in SPECIALS))

    def id_to_token(self, token_id: int) -> str | None:
        return SPECIALS.get(token_id) or chr(token_id)

    def token_to_id(self, token: str) -> int | None:
        return next((i for i, t in SPECIALS.items() if t == token), None)


Reply = str | Callable[[str], str]  # fixed text, or text computed from the decoded prompt


@dataclass
class FakeEngine:
    reply: Reply = DEFAULT_REPLY
    delay: float = 0.0
    chunk: int = 3
    context_length: int = 4096
    interrupt_after: int | None = None  # raise KeyboardInterrupt after this many chunks
    on_generate: Callable[[], None] | None = None  # e.g. change a file while "generating"
    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)
    defaults: GenerationSettings = field(default_factory=GenerationSettings)
    prompts: list[list[int]] = field(default_factory=list)
    calls: list[dict] = field(default_factory=list)

    def new_session(self) -> "FakeEngine":
        return self  # the same recording; a real Session reuses the KV cache

    def prompt_text(self, i: int = -1) -> str:
        return self.tokenizer.decode(self.prompts[i], skip_special=False)

    def generate(self, prompt_ids, settings: GenerationSettings, *, stop_ids=None,
                 cancel: threading.Event | None = None) -> Iterator[TextDelta | Finished]:
        self.prompts.append(list(prompt_ids))
        self.calls.append({"settings": settings, "stop_ids": stop_ids})
        if self.on_generate:
            self.on_generate()
        text = self.reply(self.prompt_text()) if callable(self.reply) else self.reply
        return self._events(text, len(prompt_ids), settings, cancel)

    def _events(self, text: str, n_prompt: int, settings: GenerationSettings,
                cancel: threading.Event | None) -> Iterator[TextDelta | Finished]:
        start, out, reason = time.monotonic(), "", "eos"
        cuts = [text.index(s) for s in settings.stop if s in text]
        if cuts:  # a real engine holds back text that may start a stop string; we know the future
            text, stop_at = text[: min(cuts)], True
        else:
            stop_at = False
        for n, i in enumerate(range(0, len(text), self.chunk)):
            if self.interrupt_after is not None and n >= self.interrupt_after:
                raise KeyboardInterrupt
            if cancel is not None and cancel.is_set():
                reason = "cancelled"
                break
            if n >= settings.max_tokens:
                reason = "length"
                break
            if self.delay:
                time.sleep(self.delay)
            piece = text[i:i + self.chunk]
            out += piece
            yield TextDelta(piece, tuple(ord(c) for c in piece))
        else:
            reason = "stop" if stop_at else "eos"
        took = time.monotonic() - start
        yield Finished(reason, out, tuple(ord(c) for c in out), n_prompt, 0, took / 4, took * 3 / 4)


@dataclass
class FakeBackend:
    reply: Reply = DEFAULT_REPLY
    delay: float = 0.0
    chunk: int = 3
    fail: Exception | None = None  # raised by load_engine
    load_delay: float = 0.0
    engine: FakeEngine | None = None
    loads: int = 0

    def __post_init__(self) -> None:
        self.engine = self.engine or FakeEngine(self.reply, self.delay, self.chunk)

    @classmethod
    def from_env(cls) -> "FakeBackend":
        from dscoder.settings import unescape

        return cls(reply=unescape(os.environ.get("DSCODER_FAKE_REPLY", DEFAULT_REPLY)),
                   delay=float(os.environ.get("DSCODER_FAKE_DELAY", "0")),
                   chunk=int(os.environ.get("DSCODER_FAKE_CHUNK", "3")),
                   load_delay=float(os.environ.get("DSCODER_FAKE_LOAD_DELAY", "0")))

    def model_name(self, settings) -> str:
        return settings.model or "fake/model"

    def load_tokenizer(self, settings) -> FakeTokenizer:
        return FakeTokenizer()

    def context_length(self, settings) -> int:
        return settings.context_length or 4096

    def load_engine(self, settings, warn, info=None, progress=None) -> FakeEngine:
        self.loads += 1
        if self.load_delay:
            print("fake: loading", file=sys.stderr, flush=True)
            time.sleep(self.load_delay)
        if self.fail is not None:
            raise self.fail
        if settings.context_length:
            self.engine.context_length = settings.context_length
        return self.engine

    def pull(self, name: str) -> Path:
        raise DscoderError(f"fake backend: cannot pull {name}")


def main() -> None:
    from dscoder.cli import backend
    from dscoder.cli.app import run

    backend.BACKEND = FakeBackend.from_env()
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
