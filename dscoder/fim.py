"""Clean what the model wrote for a fill-in-the-middle hole before it goes into a file.

The rules follow what FIM clients do (llama.vim, Continue, Tabby; anchors/cli-anchors.md §5), kept
conservative: when in doubt, leave the model's text alone rather than damage correct code.
Torch-free and typer-free.
"""
from __future__ import annotations

import re

# A fence line: ``` or ~~~, optionally with a language tag (```python, ```c++, ```objective-c).
_FENCE_OPEN = re.compile(r"^\s*(```|~~~)[\w+#.\-]*\s*$")
_FENCE_CLOSE = re.compile(r"^\s*(```|~~~)\s*$")
_OPENERS = (":", "{", "(", "[")
_COMMENTS = ("#", "//", "/*", "*", "--", ";")
# A line that closes or continues the block above it: code before it belongs inside that block.
_CONTINUES = re.compile(r"[)\]}]|(else|elif|except|finally|catch|case|default|end|fi|done|esac)\b")
_MAX_SUFFIX_LINES = 50  # enough to recognise a re-written suffix; bounds the work
# The rules look at the text around the hole, never the whole file: a 50 MB file costs no more.
_NEAR_CHARS = 100_000


def clean_insertion(generated: str, prefix: str, suffix: str) -> str:
    """The text to put in the hole between prefix and suffix; "" when nothing useful was generated."""
    text = generated.replace("\r\n", "\n")
    if not text.strip():
        return ""
    prefix, suffix = prefix[-_NEAR_CHARS:], suffix[:_NEAR_CHARS]
    at_line_start = prefix == "" or prefix.endswith("\n")
    if not _markdown_context(prefix, suffix):  # in Markdown, fences are content
        text = strip_fences(text)
    if at_line_start:
        text = reindent(text, prefix, suffix)
    text = cut_suffix_repeat(text, suffix, at_line_start)
    if not text.strip():
        return ""
    if at_line_start and not text.endswith("\n"):
        text += "\n"  # so the suffix's first line stays on its own line
    elif not at_line_start and suffix.startswith("\n") and text.endswith("\n"):
        text = text[:-1]  # the current line already ends in the suffix
    return text


def _markdown_context(prefix: str, suffix: str) -> bool:
    return any(_FENCE_OPEN.match(ln) for ln in (prefix + "\n" + suffix).split("\n"))


def strip_fences(text: str) -> str:
    """Remove a Markdown code fence the model wrapped around its code (and prose after it)."""
    lines = text.split("\n")
    first = next(i for i, ln in enumerate(lines) if ln.strip())
    if _FENCE_OPEN.match(lines[first]):
        close = next((j for j in range(first + 1, len(lines)) if _FENCE_CLOSE.match(lines[j])), None)
        if close is None:  # generation stopped inside the block
            return "\n".join(lines[first + 1 :])
        body = lines[first + 1 : close]
        return "\n".join(body) + "\n" if body else ""
    last = max(i for i, ln in enumerate(lines) if ln.strip())
    if _FENCE_CLOSE.match(lines[last]):  # a closing fence alone ends the code
        return "\n".join(lines[:last]) + "\n" if last else ""
    return text


def _indent_of(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def _opens_block(line: str) -> bool:
    s = line.strip()
    return s.endswith(_OPENERS) and not s.startswith(_COMMENTS)


def _indent_unit(text: str) -> str:
    """The file's indentation step: a tab if it indents with tabs, else its smallest indent (>= 2)."""
    widths = []
    for ln in text.split("\n"):
        ind = _indent_of(ln) if ln.strip() else ""
        if ind.startswith("\t"):
            return "\t"
        if len(ind) >= 2:  # 1-space indents are alignment (" * " in C comments), not a level
            widths.append(len(ind))
    return " " * min(widths) if widths else "    "


def block_indent(prefix: str, suffix: str) -> str:
    """The level that unindented output in the hole belongs at ("" to leave it at column 0).

    After a line that opens a block: one level deeper (the suffix's level if it is deeper). Else
    the shallowest level that fits: code may end the prefix's block and continue at the first
    suffix line's level (column 0 included, or at the end of the file, so nothing changes),
    unless that line closes or continues the block (}, else:, except:...), which keeps the
    code inside. With no prefix line, the first suffix line decides.
    """
    before = [ln for ln in prefix.split("\n") if ln.strip()]
    after = [ln for ln in suffix.split("\n") if ln.strip()]
    s_ind = _indent_of(after[0]) if after else None
    if not before:
        return s_ind or ""
    p_ind = _indent_of(before[-1])
    if _opens_block(before[-1]):
        if s_ind is not None and len(s_ind) > len(p_ind):
            return s_ind
        return p_ind + _indent_unit(prefix + suffix)
    if s_ind is None:
        return ""
    if _continues_block(after[0]):
        return p_ind
    return s_ind if len(s_ind) < len(p_ind) else p_ind


def _continues_block(line: str) -> bool:
    return bool(_CONTINUES.match(line.strip()))


def reindent(text: str, prefix: str, suffix: str) -> str:
    """Shift output that starts at column 0 to the surrounding block's level; keep its own nesting."""
    lines = text.split("\n")
    first = next((ln for ln in lines if ln.strip()), None)
    if first is None or _indent_of(first):
        return text  # already indented: trust the model
    target = block_indent(prefix, suffix)
    if not target:
        return text
    return "\n".join(target + ln if ln.strip() else ln for ln in lines)


def cut_suffix_repeat(text: str, suffix: str, at_line_start: bool = True) -> str:
    """Cut the generated text where it starts re-writing the suffix's first non-blank lines.

    Lines compare with their indentation (trailing blanks ignored), so a "}" closing an inner
    block never matches the outer "}". A cut at line i needs: every later non-blank line repeats
    the suffix (the output *ends with* the suffix's start), or two or more lines in a row repeat
    it, or the whole suffix is repeated; one matching line in the middle of new code is not enough.
    """
    suffix_lines = suffix.split("\n")
    if not at_line_start:
        suffix_lines = suffix_lines[1:]  # the rest of the current line is not a whole line
    want = [ln.rstrip() for ln in suffix_lines if ln.strip()][:_MAX_SUFFIX_LINES]
    if not want:
        return text
    lines = text.split("\n")
    for i in range(0 if at_line_start else 1, len(lines)):
        if lines[i].strip() and _repeats(lines[i:], want):
            kept = lines[:i]
            # Blank lines just before the repeat copy the suffix's own leading blank lines.
            for _ in range(_leading_blank_lines(suffix_lines)):
                if kept and not kept[-1].strip():
                    kept.pop()
            return "\n".join(kept) + "\n" if kept else ""
    return text


def _repeats(tail: list[str], want: list[str]) -> bool:
    got = [ln.rstrip() for ln in tail if ln.strip()]
    m = 0
    while m < min(len(got), len(want)) and got[m] == want[m]:
        m += 1
    return m > 0 and (m == len(got) or m >= 2 or m == len(want))


def _leading_blank_lines(lines: list[str]) -> int:
    n = 0
    while n < len(lines) - 1 and not lines[n].strip():  # the last piece is after the final "\n"
        n += 1
    return n
