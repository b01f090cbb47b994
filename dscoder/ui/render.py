"""Showing a reply as it streams.

On a terminal the reply is Markdown with highlighted code, drawn the way aider's mdstream does it:
the whole text is re-rendered, lines that can no longer change are printed once into the
scrollback, and only the last few lines live in a small redrawn window, so long replies do not
flicker and the terminal's scrollback keeps everything. Code blocks have no left padding so they
copy cleanly. Anywhere else the text is written as it comes, with no escape codes.
"""
from __future__ import annotations

import io
import time
from typing import Protocol

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.markdown import CodeBlock, Markdown
from rich.syntax import Syntax
from rich.text import Text

from dscoder.ui.console import Terminal

LIVE_LINES = 6  # the window that is redrawn; everything above it is settled
MIN_REFRESH_SECONDS = 1 / 20  # re-rendering Markdown is O(text): do it at most 20 times a second


class Stream(Protocol):
    def feed(self, text: str) -> None: ...
    def finish(self) -> None: ...


class _FlushCodeBlock(CodeBlock):
    """rich's code block pads with a space on every side; copied code would carry it."""

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        code = str(self.text).rstrip()
        yield Syntax(code, self.lexer_name, theme=self.theme, word_wrap=True, padding=0,
                     background_color="default")


class _Markdown(Markdown):
    elements = {**Markdown.elements, "fence": _FlushCodeBlock, "code_block": _FlushCodeBlock}


def render_lines(markdown: str, *, width: int, code_theme: str, color_system: str | None) -> list[str]:
    """The Markdown rendered to terminal lines (with their escape codes and newlines)."""
    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=True, color_system=color_system or "truecolor",
                      highlight=False, emoji=False)
    console.print(_Markdown(markdown, code_theme=code_theme))
    # rich pads paragraphs to the full width; trailing blanks would end up in copied text
    return [line.rstrip("\n").rstrip(" ") + "\n" for line in buf.getvalue().splitlines()]


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
    def __init__(self, term: Terminal, *, code_theme: str = "monokai") -> None:
        self.console = term.out
        self.code_theme = code_theme
        self.text = ""
        self.settled = 0  # lines already printed to the scrollback
        self.last_render = 0.0
        self.live: Live | None = None

    def feed(self, text: str) -> None:
        self.text += text
        if time.monotonic() - self.last_render >= MIN_REFRESH_SECONDS:
            self._render(final=False)

    def finish(self) -> None:
        self._render(final=True)

    def _render(self, *, final: bool) -> None:
        self.last_render = time.monotonic()
        lines = render_lines(self.text, width=self.console.width, code_theme=self.code_theme,
                             color_system=self.console.color_system)
        stable = len(lines) if final else max(len(lines) - LIVE_LINES, 0)
        if self.live is None and not final:
            self.live = Live(Text(""), console=self.console, auto_refresh=False, transient=False,
                             redirect_stdout=False, redirect_stderr=False, vertical_overflow="visible")
            self.live.start()
        if stable > self.settled:
            # printing through the live console puts these lines above the live window, for good
            self.console.print(Text.from_ansi("".join(lines[self.settled:stable]).rstrip("\n")))
            self.settled = stable
        if self.live is not None:
            self.live.update(Text.from_ansi("".join(lines[self.settled:]).rstrip("\n")), refresh=True)
            if final:
                self.live.stop()
                self.live = None


def answer_stream(term: Terminal, *, markdown: bool = True, newline: bool = True,
                  code_theme: str = "monokai") -> Stream:
    if term.pretty and markdown:
        return MarkdownStream(term, code_theme=code_theme)
    return PlainStream(term, newline=newline)
