"""Standard streams that fail with one sentence: closed (`<&-`, `>&-`), full (`>/dev/full`).

A broken pipe (`dscoder chat hi | head -c 1`) is not a failure: the reader has what it wanted,
so the CLI ends with exit 0 and says nothing, as git does (see `app.run`).
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator, TextIO

from dscoder.errors import DscoderError

_NAMES = {0: "input", 1: "output", 2: "error"}


class StreamError(DscoderError):
    """Standard output or error cannot be written (closed, or the device is full)."""


class GuardedStream:
    """A text stream whose write errors become StreamError (BrokenPipeError passes through).
    Wraps None (a stream closed when the process started) as a stream that cannot be written.
    quiet=True (stderr): diagnostics that cannot be written are dropped, since the answer on
    stdout or the edit to a file matters more than the warnings about it."""

    def __init__(self, stream: TextIO | None, fd: int, quiet: bool = False) -> None:
        self._stream = stream
        self._fd = fd
        self._quiet = quiet

    def _fail(self, reason: str) -> StreamError:
        return StreamError(f"cannot write to standard {_NAMES[self._fd]}: {reason}.")

    def write(self, text: str) -> int:
        if self._stream is None:
            if self._quiet:
                return len(text)
            raise self._fail("it is closed")
        try:
            return self._stream.write(text)
        except (OSError, ValueError) as e:  # ValueError: "I/O operation on closed file"
            return self._failed(e, len(text))

    def flush(self) -> None:
        if self._stream is None:
            return
        try:
            self._stream.flush()
        except (OSError, ValueError) as e:
            self._failed(e, 0)

    def _failed(self, error: Exception, n: int) -> int:
        if self._quiet:
            self._stream = None  # stop trying; nothing more will reach it
            return n
        if isinstance(error, BrokenPipeError):
            raise error
        raise self._fail(getattr(error, "strerror", None) or str(error)) from None

    def isatty(self) -> bool:
        try:
            return self._stream is not None and self._stream.isatty()
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        if self._stream is None:
            raise OSError(f"standard {_NAMES[self._fd]} is closed")
        return self._stream.fileno()

    def __getattr__(self, name: str) -> Any:
        if self._stream is None:
            raise AttributeError(name)
        return getattr(self._stream, name)


def _occupy_closed_fds() -> None:
    """A descriptor 0-2 closed at start-up would be handed to the next file we open (a temporary
    file, the model's weights), and a library writing to "stderr" would write into it. Park
    /dev/null there; Python's sys.std* stay None, so `guarded` still knows they were closed."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            try:
                null = os.open(os.devnull, os.O_RDWR)
                if null != fd:
                    os.dup2(null, fd)
                    os.close(null)
            except OSError:
                pass


@contextmanager
def guarded() -> Iterator[None]:
    """sys.stdout/stderr wrapped in GuardedStream, and a closed stdin read as empty, while the
    body runs; the originals come back afterwards."""
    _occupy_closed_fds()
    saved = sys.stdin, sys.stdout, sys.stderr
    null_in = None
    if sys.stdin is None:
        null_in = open(os.devnull, encoding="utf-8")  # noqa: SIM115  (closed below)
        sys.stdin = null_in
    sys.stdout = GuardedStream(saved[1], 1)  # type: ignore[assignment]
    sys.stderr = GuardedStream(saved[2], 2, quiet=True)  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved
        if null_in is not None:
            null_in.close()


def flush_at_exit() -> None:
    """Flush stdout before the interpreter does: a failure then (a full disk, a reader gone)
    would print "Exception ignored ..." after we have already chosen the exit code."""
    for stream in (sys.stdout, sys.stderr):
        if stream is None:
            continue
        try:
            stream.flush()
        except (OSError, ValueError):
            try:
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, stream.fileno())
            except (OSError, ValueError):
                pass
