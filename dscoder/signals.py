"""SIGINT and SIGTERM: an interrupt at any moment ends the command, and it is never lost.

Both signals raise KeyboardInterrupt (SIGTERM raises its subclass `Terminated`), so every cleanup
path written for Ctrl-C (the REPL keeping a partial reply, `write_atomic` removing its temporary
file) also runs for `timeout`, an editor closing its job, or systemd stopping a unit. Each signal
is also recorded, because a KeyboardInterrupt can be swallowed by code we do not control (torch's
start-up catches it during its numpy import and carries on): `check()` re-raises a recorded
interrupt before anything irreversible, such as writing a file. `deferred()` holds signals back
over a stretch that must not be split (importing torch, rewriting a file in place) and delivers
them when it ends.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from dscoder.errors import ExitCode


class Terminated(KeyboardInterrupt):
    """SIGTERM, delivered like Ctrl-C; the command ends with exit code 143 (128 + 15)."""


_state: dict[str, Any] = {"received": None, "deferring": 0, "pending": None}


def _handler(signum: int, frame: Any) -> None:
    _state["received"] = signum
    if _state["deferring"]:
        _state["pending"] = signum
        return
    _raise(signum)


def _raise(signum: int) -> None:
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextmanager
def handled() -> Iterator[None]:
    """SIGINT and SIGTERM go through our handler while the body runs (the previous handlers
    come back after it, so that running the CLI in-process, as tests do, leaves no trace).
    Only the main thread can set handlers; elsewhere this changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    reset()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        reset()


def install_for_process() -> None:
    """Our handlers for the rest of the process (the console script, before its imports)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _handler)
        signal.signal(signal.SIGTERM, _handler)


def reset() -> None:
    _state.update(received=None, deferring=0, pending=None)


def received() -> int | None:
    """The last SIGINT/SIGTERM received, or None."""
    return _state["received"]


def forget() -> None:
    """The REPL handled a Ctrl-C (a reply stopped) and goes on: the next command starts clean."""
    if _state["received"] == signal.SIGINT:
        _state["received"] = None


def check() -> None:
    """Raise the interrupt if one arrived, even if something swallowed its KeyboardInterrupt."""
    if _state["received"] is not None:
        _raise(_state["received"])


def exit_code(exc: BaseException | None = None) -> int:
    """130 for Ctrl-C, 143 for SIGTERM."""
    if isinstance(exc, Terminated) or _state["received"] == signal.SIGTERM:
        return ExitCode.TERMINATED
    return ExitCode.INTERRUPTED


@contextmanager
def deferred(deliver: bool = True) -> Iterator[None]:
    """Hold SIGINT/SIGTERM back while the body runs; deliver one that came when it ends.
    deliver=False is for a commit (the rename that makes an edit): an interrupt that arrives
    while it happens is too late to stop it, so the command finishes and says what it did,
    rather than exit 130 over a file that was written after all."""
    _state["deferring"] += 1
    try:
        yield
    finally:
        _state["deferring"] -= 1
        pending = _state["pending"]
        if not _state["deferring"] and pending is not None:
            _state["pending"] = None
            if deliver:
                _raise(pending)
            _state["received"] = None
