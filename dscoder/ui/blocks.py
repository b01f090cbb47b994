"""Where a streaming Markdown text can be cut: the end of its last closed top-level block.

Rendering a growing reply again and again costs time in proportion to its length; once a block
is closed, nothing typed after it can change how it looks, so it can be rendered once, printed
into the scrollback and forgotten. A block is closed at a blank line outside any fenced code
block, once the next line has begun and does not continue the block (it is not indented, and it
does not add an item to a list that the block began).
"""
from __future__ import annotations

import re

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_LIST_ITEM = re.compile(r"^ {0,3}([-*+]|\d{1,9}[.)])(\s|$)")


def _closes(line: str, fence: str) -> bool:
    """True if `line` closes a code block opened by `fence` (same character, at least as long,
    nothing after it but blanks)."""
    stripped = line.strip()
    indent = len(line) - len(line.lstrip(" "))
    return indent <= 3 and len(stripped) >= len(fence) and set(stripped) == {fence[0]}


def settled_length(text: str) -> int:
    """Length of the longest prefix of `text` made of closed blocks (0 if none is closed yet).

    The prefix ends after the blank lines that end a block, so that `text[:n]` and `text[n:]`
    render as the whole would (rich puts one blank line between top-level blocks)."""
    cut = 0
    fence: str | None = None  # the opening fence while inside a code block
    seen = False  # a block has begun (leading blank lines close nothing)
    block_is_list = False  # the current block began with a list item
    after_blank = False  # a blank line (outside code) ended the previous block
    pos = 0
    *complete, _unfinished = text.split("\n")  # a line still being written may yet continue a block
    for line in complete:
        start, pos = pos, pos + len(line) + 1
        if fence is not None:
            if _closes(line, fence):
                fence = None
            continue
        if not line.strip():
            after_blank = seen
            continue
        item = bool(_LIST_ITEM.match(line))
        if after_blank and not line[0].isspace() and not (block_is_list and item):
            cut = start  # the block before this line is closed: this line starts a new one
        if not seen or cut == start:
            block_is_list = item
        seen, after_blank = True, False
        opening = _FENCE.match(line)
        if opening:
            fence = opening.group(1)
    return cut
