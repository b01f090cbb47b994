"""Markdown to terminal lines with rich (code blocks without rich's padding). Apart from
dscoder.ui.render so that plain output (a pipe, --no-color) never imports rich's Markdown
parser and pygments: 0.06 s of a one-shot command's start on a desktop, more on slow disks."""
from __future__ import annotations

import io

from rich.console import Console, ConsoleOptions, RenderResult
from rich.markdown import CodeBlock, Markdown
from rich.syntax import Syntax


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
