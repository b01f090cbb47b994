"""What every command needs: the merged settings, the terminal, and the model loaded at most once."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

from dscoder.cli import backend
from dscoder.errors import UsageError
from dscoder.events import Finished, GenerationSettings, TextDelta
from dscoder.hub import NotDownloaded
from dscoder.settings import Settings
from dscoder.ui.console import Terminal
from dscoder.ui.render import Stream


@dataclass
class Runtime:
    settings: Settings
    term: Terminal
    _engine: Any = field(default=None, repr=False)
    _tokenizer: Any = field(default=None, repr=False)
    load_seconds: float | None = None
    _compile_failure_said: bool = field(default=False, repr=False)

    @property
    def backend(self) -> backend.Backend:
        return backend.get()

    @property
    def model_name(self) -> str:
        return self.backend.model_name(self.settings)

    def engine(self) -> Any:
        """The model: a server's when one is given or already running for this model (client
        mode), else loaded in this process."""
        if self._engine is None:
            start = time.monotonic()
            url = self.server_url()
            if url is not None:
                from dscoder.server.client import RemoteEngine

                self._engine = RemoteEngine(
                    url, self.model_name, api_key=self.settings.api_key,
                    tokenizer=lambda: self.backend.load_tokenizer(self.settings))
                self._tokenizer = self._engine.tokenizer
            else:
                try:
                    self._load()
                except NotDownloaded as e:
                    if not self._download(e):
                        raise
                    start = time.monotonic()  # the load, not the download
                    self._load()
            self.load_seconds = time.monotonic() - start
            profile = getattr(self._engine, "startup_profile", None)
            if self.settings.verbose and profile is not None:
                self.term.info(profile.summary())
            self._say_window()
        return self._engine

    def _say_window(self) -> None:
        """--context-length beyond the model's own window is clamped to it: say so. (A window
        that a GPU budget sets is said by the loader.)"""
        asked, window = self.settings.context_length, self._engine.context_length
        model_max = getattr(getattr(self._engine, "config", None), "max_position_embeddings", None)
        if asked is not None and model_max is not None and asked > model_max:
            self.term.warn(f"--context-length {asked} is more than this model's window of "
                           f"{model_max} tokens; the context window is {window} tokens.")

    def server_url(self) -> str | None:
        """--server (or DSCODER_SERVER); else the user's server on the default socket if it
        serves this model; else, with --keep-alive, one started now in the background."""
        server = self.settings.server
        if server == "off":
            return None
        if server:
            return server
        from dscoder.server.paths import default_socket

        if not self.settings.keep_alive and not default_socket().exists():
            return None  # no server, none to start: not even the HTTP client's import (0.1 s)
        from dscoder.server.client import default_server, start_background_server

        url = default_server(self.model_name)
        if url is None and self.settings.keep_alive:
            url = start_background_server(self.model_name, self.serve_args(),
                                          self.settings.keep_alive, self.term.info)
        return url

    def serve_args(self) -> list[str]:
        """The options that choose how a server loads the model, as this run has them."""
        s = self.settings
        given = {"--model": self.model_name, "--device": s.device, "--gpu-memory": s.gpu_memory,
                 "--expert-dtype": s.expert_dtype if s.expert_dtype != "bf16" else None,
                 "--dtype": s.dtype, "--context-length": s.context_length}
        return [a for k, v in given.items() if v is not None for a in (k, str(v))]

    def _load(self) -> None:
        with self.term.load_progress() as progress:
            self._engine = self.backend.load_engine(self.settings, self.term.warn, self.term.info,
                                                    progress)
        self._tokenizer = self._engine.tokenizer

    def _download(self, missing: NotDownloaded) -> bool:
        """On a terminal, offer to download a model that is not in the cache (as ollama does):
        its size, one confirmation, then the hub's own progress bars (an interrupted download
        resumes next time). True once it is there; False in a script or if the answer is no."""
        term, name = self.term, missing.repo_id
        if not (term.stdin_is_tty and term.stderr_is_tty):
            return False
        size = getattr(self.backend, "download_size", lambda name: None)(name)
        weight = f" ({size / 1e9:.1f} GB)" if size else ""
        if not term.confirm(f"{name} is not downloaded yet. Download it now{weight}? [Y/n] "):
            return False
        self.backend.pull(name)
        return True

    def tokenizer(self) -> Any:
        """The engine's tokenizer, or the tokenizer alone (for --show-prompt: no weights, no torch)."""
        if self._tokenizer is None:
            self._tokenizer = self.backend.load_tokenizer(self.settings)
        return self._tokenizer

    def generation(self) -> GenerationSettings:
        defaults = self._engine.defaults if self._engine is not None else GenerationSettings()
        return self.settings.generation(defaults)

    def max_prompt_tokens(self) -> int | None:
        """Room for the prompt: the context window less the room the reply may take."""
        if self._engine is not None:
            window = self._engine.context_length
        else:
            window = self.backend.context_length(self.settings)
        if window is None:
            return None
        return max(window - self.generation().max_tokens, window // 2)

    def prompt_to_run(self, build: Callable[[], Any], show_prompt: bool) -> Any | None:
        """The prompt to generate from, or None once --show-prompt has printed it (no weights
        loaded). Otherwise it is built after the engine loads: the engine's context window, not
        the config's, sets the prompt's budget."""
        if show_prompt:
            prompt = build()
            self.term.show_prompt(prompt.text, len(prompt.ids))
            return None
        self.engine()
        return build()

    def report(self, finished: Finished) -> None:
        """The stats line after a one-shot reply: on a terminal or with --verbose only, so that
        the logs of scripts stay clean."""
        if self.settings.verbose or self.term.stderr_is_tty:
            self.term.stats(finished, verbose=self.settings.verbose, load_seconds=self.load_seconds)
        self.say_compile_failure()

    def say_compile_failure(self) -> None:
        """With --verbose, once: the decode step's background compile failed (decoding goes on,
        uncompiled and slower; without this nothing would say why)."""
        error = getattr(self._engine, "compile_error", None)
        if self.settings.verbose and error is not None and not self._compile_failure_said:
            self._compile_failure_said = True
            self.term.info(f"compiling the decode step failed ({error!r}); decoding stays on the "
                           "uncompiled step (DSCODER_COMPILE=0 skips the attempt)")

    def fim_stop_ids(self) -> set[int]:
        tok = self.tokenizer()
        # plus the engine's own stops: a Coder V1 Instruct tokenizer's EOS is <|EOT|>, but a
        # middle ends with <｜end▁of▁sentence｜> (the transformers engine lists both)
        engine_stops = getattr(self._engine, "stop_ids", ())
        return {tok.eos_id, tok.fim_begin_id, tok.fim_hole_id, tok.fim_end_id, *engine_stops}


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a reply; carries what was generated so far (a 'cancelled' Finished)."""

    def __init__(self, finished: Finished) -> None:
        super().__init__()
        self.finished = finished


def stream_reply(events: Iterator[Any], stream: Stream, *, prompt_tokens: int,
                 max_lines: int | None = None, on_text: Callable[[str], None] | None = None,
                 cancel: threading.Event | None = None,
                 on_tokens: Callable[[int], None] | None = None) -> Finished:
    """Drive one generation into `stream` and return the engine's Finished event.

    Stopping early goes through the engine, so that the Finished it yields (cached tokens,
    engine counters, every generated id, those held back by the UTF-8 decoder or a stop string
    included) describes the reply: --max-lines sets `cancel` (the Event given to `generate`)
    and the text is cut at the line; a Ctrl-C inside the engine's step makes it yield a
    "cancelled" Finished, and one that lands here (while drawing) sets `cancel`. An interrupted
    reply raises `Interrupted` with that Finished. Only an engine without `cancel`, or one whose
    generator died of the interrupt, gets a Finished made here from what was streamed.
    `on_tokens` hears the number of tokens generated so far (for a progress display)."""
    acc = _Accumulator(prompt_tokens)
    interrupted = False
    it = iter(events)
    while True:
        try:
            event = next(it)
        except StopIteration:
            break
        except KeyboardInterrupt:  # the generator died of it (or a second Ctrl-C while draining)
            _close(events)
            stream.finish()
            raise Interrupted(acc.finished("cancelled")) from None
        if isinstance(event, Finished):
            stream.finish()
            return _final(event, acc, interrupted)
        try:
            if acc.full or interrupted:
                continue  # the engine is finishing after a cancel: nothing more to show
            text = acc.add(event, max_lines)
            stream.feed(text)
            if on_text:
                on_text(text)
            if on_tokens:
                on_tokens(len(acc.ids))
            if acc.full:
                if cancel is None:
                    break
                cancel.set()
        except KeyboardInterrupt:
            interrupted = True
            if cancel is None:
                _close(events)
                stream.finish()
                raise Interrupted(acc.finished("cancelled")) from None
            cancel.set()
    _close(events)
    stream.finish()
    if interrupted:
        raise Interrupted(acc.finished("cancelled"))
    return acc.finished("stop" if acc.full else "eos")


def _final(event: Finished, acc: "_Accumulator", interrupted: bool) -> Finished:
    """The engine's Finished as the CLI reports it: cut at --max-lines, or raised if interrupted,
    with the reply's wall time beside the engine's own seconds."""
    event = replace(event, wall_seconds=time.monotonic() - acc.start)
    if acc.full:  # our cancel for --max-lines: the text ends at the line, the numbers are real
        return replace(event, text=acc.text, reason="stop")
    if interrupted or event.reason == "cancelled":
        raise Interrupted(replace(event, reason="cancelled"))
    return event


def _close(events: Iterator[Any]) -> None:
    close = getattr(events, "close", None)
    if close is not None:
        try:
            close()
        except KeyboardInterrupt:  # a second Ctrl-C while the engine cleans up: it is closed anyway
            pass


class _Accumulator:
    def __init__(self, prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.start = time.monotonic()
        self.first: float | None = None
        self.parts: list[str] = []
        self.ids: list[int] = []
        self.lines = 0
        self.full = False

    def add(self, delta: TextDelta, max_lines: int | None) -> str:
        if self.first is None:
            self.first = time.monotonic()
        text = delta.text
        self.ids.extend(delta.token_ids)
        if max_lines is not None:
            for i, ch in enumerate(text):
                if ch == "\n":
                    self.lines += 1
                    if self.lines >= max_lines:  # the newline ending the last line is a stop
                        text, self.full = text[:i], True
                        break
        self.parts.append(text)
        return text

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def finished(self, reason: str) -> Finished:
        now = time.monotonic()
        first = self.first or now
        return Finished(reason=reason, text=self.text, token_ids=tuple(self.ids),
                        prompt_tokens=self.prompt_tokens, cached_tokens=0,
                        prefill_seconds=first - self.start, decode_seconds=now - first,
                        wall_seconds=now - self.start)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)
