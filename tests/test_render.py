"""Streaming Markdown: closed blocks settle, what is shown equals the whole reply rendered once,
and the work per render does not grow with the reply."""
from __future__ import annotations

import io
import sys
import types
from itertools import pairwise
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sample_markdown import markdown_reply  # noqa: E402

from dscoder.ui import render  # noqa: E402
from dscoder.ui.blocks import settled_length  # noqa: E402
from dscoder.ui.console import Terminal  # noqa: E402


@pytest.mark.parametrize("text, cut_before", [
    ("para one\n\npara two\n", "para two"),
    ("para one\n\npara two", None),  # the next line is still being written
    ("```python\nx = 1\n\ny = 2\n", None),  # a blank line inside an open code block
    ("```python\nx = 1\n\ny = 2\n```\n\nafter\n", "after"),
    ("~~~\n```\n\n~~~\n\nafter\n", "after"),  # a ``` inside a ~~~ block does not close it
    ("- one\n\n- two\n", None),  # a loose list goes on
    ("1. one\n\n2. two\n\nnext\n", "next"),
    ("- item\n\n  more of the item\n", None),  # an indented line continues the item
    ("\n\nfirst\n", None),  # leading blank lines close nothing
    ("# Title\n\ntext\n\n> quote\n", "> quote"),
])
def test_settled_length(text, cut_before):
    cut = settled_length(text)
    assert cut == (text.rindex(cut_before) if cut_before else 0)


def _stream(text: str, chunk: int, monkeypatch) -> tuple[list[str], list[int]]:
    """Feed `text` in chunks, rendering on every feed; the lines printed to the scrollback and
    the length of every piece of Markdown rendered."""
    monkeypatch.setattr(render, "MIN_REFRESH_SECONDS", 0.0)
    monkeypatch.setattr(render, "RENDER_SHARE", 1e9)
    sizes: list[int] = []
    real = render.render_lines

    def counting(markdown: str, **kw):
        sizes.append(len(markdown))
        return real(markdown, **kw)

    monkeypatch.setattr(render, "render_lines", counting)
    out = io.StringIO()
    stream = render.MarkdownStream(Terminal(io.StringIO(), out, io.StringIO(), pretty=True,
                                            err_color=False))
    printed: list[str] = []
    stream._print = lambda lines: printed.extend(lines)  # what goes to the scrollback, in order
    for i in range(0, len(text), chunk):
        stream.feed(text[i:i + chunk])
    stream.finish()
    return printed, sizes


@pytest.mark.parametrize("tokens, chunk", [(60, 7), (400, 13), (400, 40), (1200, 29)])
def test_streamed_reply_shows_exactly_the_whole_rendering(tokens, chunk, monkeypatch):
    text = markdown_reply(tokens)
    printed, _ = _stream(text, chunk, monkeypatch)
    width = render.MarkdownStream(Terminal(io.StringIO(), io.StringIO(), io.StringIO(), pretty=True,
                                           err_color=False)).console.width
    whole = render.render_lines(text, width=width, code_theme="monokai", color_system="truecolor")
    while whole and whole[0] == "\n":
        whole.pop(0)
    while whole and whole[-1] == "\n":
        whole.pop()
    assert printed == whole


def test_render_work_does_not_grow_with_the_reply(monkeypatch):
    _, short = _stream(markdown_reply(300), 16, monkeypatch)
    _, long = _stream(markdown_reply(3000), 16, monkeypatch)
    # each render covers only the open tail: the largest piece is about one block either way
    assert max(long) < 1000 and max(long) <= max(short) * 1.5
    assert len(markdown_reply(3000)) > 10 * max(long)


def test_slow_renders_are_spaced_out(monkeypatch):
    """A render that takes long pushes the next one further away (at most MAX_REFRESH_SECONDS)."""
    clock = {"now": 100.0}
    monkeypatch.setattr(render, "time", types.SimpleNamespace(monotonic=lambda: clock["now"]))
    stream = render.MarkdownStream(Terminal(io.StringIO(), io.StringIO(), io.StringIO(),
                                            pretty=True, err_color=False))
    renders = []

    def slow_render(*, final: bool) -> None:
        renders.append(clock["now"])
        clock["now"] += 0.01  # each render takes 10 ms

    stream._render = slow_render
    for _ in range(2000):  # a token every millisecond for two seconds
        stream.feed("x")
        clock["now"] += 0.001
    gaps = [b - a for a, b in pairwise(renders)]
    assert min(gaps) >= 0.01 / render.RENDER_SHARE - 1e-9
    assert sum(0.01 for _ in renders) <= render.RENDER_SHARE * (clock["now"] - 100.0) + 0.01


def test_warm_up_runs_beside_the_load_and_only_for_markdown(monkeypatch):
    import threading

    calls: list[str] = []
    monkeypatch.setattr(render, "warm_up", lambda theme: calls.append(threading.current_thread().name))
    pretty = Terminal(io.StringIO(), io.StringIO(), io.StringIO(), pretty=True, err_color=False)
    with render.warmed(pretty, "monokai"):
        pass
    assert calls == ["dscoder-render-warm-up"]  # on its own thread, finished by the end
    with render.warmed(Terminal(io.StringIO(), io.StringIO(), io.StringIO(), pretty=False,
                                err_color=False)):
        pass
    assert len(calls) == 1


def test_warm_up_itself_renders_without_error():
    render.warm_up("monokai")
    render.warm_up("no-such-theme")  # a bad theme is the reply's to report, not the warm-up's
