"""Model text made safe to show on a terminal: control characters become visible escapes.

Generated text can hold escape sequences (an OSC that retitles the window or writes the
clipboard, a clear-screen, a cursor move that hides a line), and text in a file can steer a model
into writing them. Whatever reaches a terminal shows them as `\\x1b`-style escapes instead; a
file, a pipe or --json still get exactly what the model wrote. Newlines and tabs stay as they
are; so does "\\r\\n", while a lone "\\r" (which would overwrite the line) is escaped.
"""
from __future__ import annotations

import re
from typing import Protocol

# C0 controls but \t and \n, DEL, C1 controls (U+0080-U+009F: 8-bit CSI and OSC), and the
# Unicode bidi overrides that reorder what a line appears to say.
_CONTROL = re.compile(r"\r(?!\n)|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escape(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """`text` with every control character spelled out (\\x1b, \\x07, \\u202e...)."""
    return _CONTROL.sub(_escape, text)


class Stream(Protocol):
    def feed(self, text: str) -> None: ...
    def finish(self) -> None: ...


class EscapingStream:
    """A Stream that escapes control characters before passing text on. A "\\r" at the end of a
    piece waits for the next one, to see whether a "\\n" follows it."""

    def __init__(self, inner: Stream) -> None:
        self.inner = inner
        self._held = ""

    def feed(self, text: str) -> None:
        text = self._held + text
        self._held = "\r" if text.endswith("\r") else ""
        if self._held:
            text = text[:-1]
        if text:
            self.inner.feed(escape_controls(text))

    def finish(self) -> None:
        if self._held:
            self.inner.feed(escape_controls(self._held))
            self._held = ""
        self.inner.finish()
