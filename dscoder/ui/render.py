"""Showing a reply as it streams.

On a terminal the reply is Markdown with highlighted code, drawn the way aider's mdstream does it:
lines that can no longer change are printed once into the scrollback, and only the last few lines
live in a small redrawn window, so long replies do not flicker and the terminal's scrollback keeps
everything. Only the open tail of the reply is ever re-rendered (see MarkdownStream). Code blocks
have no left padding so they copy cleanly. Anywhere else the text is written as it comes, with no escape codes.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, Protocol

from rich.text import Text

from dscoder.ui.blocks import settled_length
from dscoder.ui.console import Terminal

if TYPE_CHECKING:
    from rich.live import Live

LIVE_LINES = 6  # the window that is redrawn; everything above it is settled
MIN_REFRESH_SECONDS = 1 / 20  # at most 20 renders a second
MAX_REFRESH_SECONDS = 0.5  # at least 2 a second, however slow one render is
RENDER_SHARE = 0.02  # the most of the reply's time that rendering may take


class Stream(Protocol):
    def feed(self, text: str) -> None: ...
    def finish(self) -> None: ...


def render_lines(markdown: str, *, width: int, code_theme: str, color_system: str | None) -> list[str]:
    """The Markdown rendered to terminal lines (with their escape codes and newlines)."""
    from dscoder.ui.markdown_lines import render_lines as render

    return render(markdown, width=width, code_theme=code_theme, color_system=color_system)


class PlainStream:
    """Text as it comes; `newline` ends the answer with a newline (chat) or leaves it raw (complete)."""

    def __init__(self, term: Terminal, *, newline: bool = True) -> None:
        self.term, self.newline, self.last = term, newline, "\n"

    def feed(self, text: str) -> None:
        if text:
            self.term.write(text)
            self.last = text[-1]

    def finish(self) -> None:
        if self.newline and self.last != "\n":
            self.term.write("\n")


class MarkdownStream:
    """Markdown on a terminal at a cost that does not grow with the reply.

    Two things keep rendering from slowing the model down (it runs on the thread that pulls the
    tokens): closed blocks are rendered one last time, printed and dropped, so each render only
    covers the open tail of the reply (`settled_length`); and renders are spaced so that they
    take at most RENDER_SHARE of the time, however long one takes (aider's mdstream does this)."""

    def __init__(self, term: Terminal, *, code_theme: str = "monokai") -> None:
        self.console = term.out
        self.code_theme = code_theme
        self.text = ""  # the tail of the reply that may still change
        self.shown = 0  # lines of the tail's rendering already printed to the scrollback
        self.gap = False  # blocks were settled: the tail's rendering starts with a blank line
        self.next_render = 0.0  # time.monotonic() of the next render
        self.live: Live | None = None

    def feed(self, text: str) -> None:
        self.text += text
        start = time.monotonic()
        if start >= self.next_render:
            self._render(final=False)
            took = time.monotonic() - start
            self.next_render = start + min(max(took / RENDER_SHARE, MIN_REFRESH_SECONDS),
                                           MAX_REFRESH_SECONDS)

    def finish(self) -> None:
        self._render(final=True)

    def _lines(self, markdown: str) -> list[str]:
        """The rendering of a part of the reply, as it continues what was settled before it:
        rich puts one blank line between blocks (and some blocks, rendered first, begin with
        one of their own)."""
        lines = render_lines(markdown, width=self.console.width, code_theme=self.code_theme,
                             color_system=self.console.color_system)
        first = next((i for i, line in enumerate(lines) if line != "\n"), len(lines))
        last = next((i for i in range(len(lines), 0, -1) if lines[i - 1] != "\n"), 0)
        lines = lines[first:last]
        return ["\n", *lines] if lines and self.gap else lines

    def _settle_closed_blocks(self) -> None:
        cut = settled_length(self.text)
        if not cut:
            return
        closed = self._lines(self.text[:cut])
        self._print(closed[self.shown:])
        # the tail's rendering began with `closed`; whatever of it was printed beyond stays printed
        self.shown = max(self.shown - len(closed), 0)
        self.text = self.text[cut:]
        self.gap = self.gap or bool(closed)

    def _render(self, *, final: bool) -> None:
        if not final:
            self._settle_closed_blocks()
        lines = self._lines(self.text)
        stable = len(lines) if final else max(len(lines) - LIVE_LINES, 0)
        if self.live is None and not final:
            from rich.live import Live

            self.live = Live(Text(""), console=self.console, auto_refresh=False, transient=False,
                             redirect_stdout=False, redirect_stderr=False, vertical_overflow="visible")
            self.live.start()
        if stable > self.shown:
            self._print(lines[self.shown:stable])
            self.shown = stable
        if self.live is not None:
            self.live.update(_ansi(lines[self.shown:]), refresh=True)
            if final:
                self.live.stop()
                self.live = None

    def _print(self, lines: list[str]) -> None:
        # printing through the live console puts these lines above the live window, for good
        if lines:
            self.console.print(_ansi(lines))


def _ansi(lines: list[str]) -> Text:
    """Rendered lines (each ending in a newline) as one Text; print() adds the last newline."""
    return Text.from_ansi("".join(lines)[:-1])


# Code fences seen most often in a coding assistant's replies: their lexers are built up front.
WARM_LANGUAGES = ("python", "bash", "javascript", "typescript", "rust", "go", "c", "cpp", "java",
                  "json", "yaml", "diff")


def warm_up(code_theme: str = "monokai") -> None:
    """Pay rich's and pygments' one-time costs (the Markdown parser, the code theme, each lexer's
    regular expressions: about 0.1-0.2 s) before a reply instead of in its first blocks."""
    sample = "# a\n\n- b\n\n" + "\n\n".join(f"```{lang}\nx = 1\n```" for lang in WARM_LANGUAGES)
    try:
        render_lines(sample, width=80, code_theme=code_theme, color_system="truecolor")
    except Exception:  # noqa: BLE001 -- only a head start; the reply will say what is wrong
        pass


@contextmanager
def warmed(term: Terminal, code_theme: str = "monokai") -> Iterator[None]:
    """Warm the renderer up on a background thread while the body runs (the model loads, which
    mostly waits on the disk and on torch's C code), and wait for it at the end. Plain output
    needs none of it."""
    if not term.pretty:
        yield
        return
    thread = threading.Thread(target=warm_up, args=(code_theme,), daemon=True,
                              name="dscoder-render-warm-up")
    thread.start()
    try:
        yield
    finally:
        thread.join()


def answer_stream(term: Terminal, *, markdown: bool = True, newline: bool = True,
                  code_theme: str = "monokai") -> Stream:
    if term.pretty and markdown:
        return MarkdownStream(term, code_theme=code_theme)
    return PlainStream(term, newline=newline)
