"""fim.clean_insertion: each cleanup rule, and the cases where nothing may change."""
from __future__ import annotations

import pytest

from dscoder.fim import block_indent, clean_insertion, strip_fences

# --- whitespace-only ---------------------------------------------------------------------------------


@pytest.mark.parametrize("gen", ["", "   ", "\n\n", " \t\n  \r\n"])
def test_whitespace_only_is_empty(gen: str) -> None:
    assert clean_insertion(gen, "a = 1\n", "b = 2\n") == ""


# --- fences ----------------------------------------------------------------------------------------


def test_fence_with_language_stripped() -> None:
    gen = "```python\nx = 1\ny = 2\n```\n"
    assert clean_insertion(gen, "a = 1\n", "b = 2\n") == "x = 1\ny = 2\n"


def test_fence_with_prose_after_stripped() -> None:
    gen = "\n```c++\nint x = 1;\n```\nThis declares x.\n"
    assert clean_insertion(gen, "int a;\n", "int b;\n") == "int x = 1;\n"


def test_fence_never_closed() -> None:
    assert clean_insertion("```js\nlet x = 1;\n", "", "let y;\n") == "let x = 1;\n"


def test_lone_closing_fence_at_end() -> None:
    assert clean_insertion("x = 1\n```\n", "a = 1\n", "") == "x = 1\n"


def test_empty_fenced_block_is_empty() -> None:
    assert clean_insertion("```python\n```\n", "a = 1\n", "b = 2\n") == ""


def test_fences_kept_in_markdown() -> None:
    prefix = "# Usage\n\n```sh\ndscoder chat\n```\n\n"
    gen = "```sh\ndscoder complete < f.py\n```\n"
    assert clean_insertion(gen, prefix, "## More\n") == gen


def test_fence_inside_code_kept() -> None:
    # a docstring that contains Markdown: only a fence on the first/last line is a wrapper
    gen = '    """Example:\n\n    ```\n    f()\n    ```\n    """\n    return 1\n'
    assert clean_insertion(gen, "def f():\n", "") == gen
    assert strip_fences("x = 1\n") == "x = 1\n"


# --- suffix repetition -------------------------------------------------------------------------------


def test_tail_repeats_suffix() -> None:
    prefix = "def f(x):\n    y = x + 1\n"
    suffix = "    return y\n\n\ndef g():\n    pass\n"
    gen = "    y *= 2\n    return y\n"
    assert clean_insertion(gen, prefix, suffix) == "    y *= 2\n"


def test_repeat_then_more_is_cut() -> None:
    prefix = "def f(x):\n    y = x + 1\n"
    suffix = "    return y\n\n\ndef g():\n    pass\n"
    gen = "    y *= 2\n    return y\n\n\ndef g():\n    return 3\n"
    assert clean_insertion(gen, prefix, suffix) == "    y *= 2\n"


def test_whole_suffix_repeated_then_more() -> None:
    prefix = "int f(void) {\n  a();\n"
    gen = "  b();\n}\n\nint g(void) {\n  return 0;\n"
    assert clean_insertion(gen, prefix, "}\n") == "  b();\n"


def test_only_the_suffix_repeated_is_empty() -> None:
    assert clean_insertion("    return y\n", "def f():\n", "    return y\n") == ""


def test_repeated_blank_lines_before_repeat_are_dropped() -> None:
    prefix = "def f():\n    pass\n"
    suffix = "\n\ndef g():\n    pass\n"
    gen = "\n\ndef h():\n    pass\n\n\ndef g():\n    pass\n"
    assert clean_insertion(gen, prefix, suffix) == "\n\ndef h():\n    pass\n"


def test_inner_closing_brace_is_not_the_outer_one() -> None:
    prefix = "void f() {\n  if (a) {\n    x();\n  }\n"
    gen = "  if (b) {\n    y();\n  }\n"
    assert clean_insertion(gen, prefix, "}\n") == gen


def test_one_matching_line_mid_code_is_kept() -> None:
    prefix = "def f(a):\n    total = 0\n"
    suffix = "    total += 1\n    return total\n"
    gen = "    for x in a:\n    total += 1\n    log(x)\n"  # one equal line, then new code
    assert clean_insertion(gen, prefix, suffix) == gen


def test_model_closing_the_block_the_suffix_closes() -> None:
    prefix = "  if (a) {\n"
    gen = "    x();\n  }\n"
    assert clean_insertion(gen, prefix, "  }\n}\n") == "    x();\n"


def test_repeat_ignores_trailing_whitespace() -> None:
    gen = "    y = 2\n    return y   \n"
    assert clean_insertion(gen, "def f():\n", "    return y\n") == "    y = 2\n"


# --- indentation ---------------------------------------------------------------------------------------


def test_unindented_output_gets_block_level() -> None:
    prefix = "def f(x):\n    y = x\n"
    gen = "if y:\n    y += 1\n"
    assert clean_insertion(gen, prefix, "    return y\n") == "    if y:\n        y += 1\n"


def test_after_block_opener_uses_suffix_level() -> None:
    assert clean_insertion("y = 2\n", "def f():\n", "        return y\n") == "        y = 2\n"


def test_after_block_opener_without_suffix_guesses_unit() -> None:
    prefix = "class A:\n  def f(self):\n    pass\n  def g(self):\n"
    assert clean_insertion("return 1", prefix, "") == "    return 1\n"


def test_tabs_follow_the_file() -> None:
    prefix = "func f() {\n\tx := 1\n"
    assert clean_insertion("y := 2\n", prefix, "\treturn x\n}\n") == "\ty := 2\n"
    assert block_indent("int f() {\n\tint a;\n\tif (a) {\n", "\t}\n") == "\t\t"


def test_before_else_stays_in_the_block() -> None:
    prefix = "if a:\n    b()\n"
    assert clean_insertion("c()\n", prefix, "else:\n    d()\n") == "    c()\n"


def test_before_closing_brace_stays_in_the_block() -> None:
    prefix = "  if (x) {\n    a();\n"
    assert clean_insertion("b();\n", prefix, "  }\n}\n") == "    b();\n"


def test_dedent_to_the_suffix_level() -> None:
    prefix = "class A:\n    def f(self):\n        return 1\n"
    suffix = "\n    def g(self):\n        return 2\n"
    gen = "\ndef h(self):\n    return 3\n"
    want = "\n    def h(self):\n        return 3\n"
    assert clean_insertion(gen, prefix, suffix) == want


def test_correctly_indented_output_untouched() -> None:
    gen = "    y = 2\n    if y:\n        y = 3\n"
    assert clean_insertion(gen, "def f():\n    y = 1\n", "    return y\n") == gen


def test_column_zero_plausible_when_suffix_is_at_column_zero() -> None:
    prefix = "def f():\n    return 1\n"
    gen = "\n\ndef g():\n    return 2\n"
    assert clean_insertion(gen, prefix, "\n\ndef h():\n    pass\n") == gen
    assert clean_insertion("def g():\n    pass\n", prefix, "") == "def g():\n    pass\n"


def test_top_level_unchanged() -> None:
    assert clean_insertion("import os\n", "import sys\n", "import re\n") == "import os\n"


def test_comment_ending_with_colon_is_not_an_opener() -> None:
    assert block_indent("x = 1\n# Example:\n", "y = 2\n") == ""


def test_blank_lines_inside_output_stay_blank() -> None:
    prefix = "class A:\n    x = 1\n"
    gen = "def f(self):\n    pass\n\ndef g(self):\n    pass\n"
    want = "    def f(self):\n        pass\n\n    def g(self):\n        pass\n"
    assert clean_insertion(gen, prefix, "    y = 2\n") == want


# --- line boundary / mid-line ----------------------------------------------------------------------------


def test_newline_added_at_line_boundary() -> None:
    assert clean_insertion("    y = 2", "def f():\n", "    return y\n") == "    y = 2\n"
    assert clean_insertion("x = 1", "", "") == "x = 1\n"


def test_mid_line_no_indent_no_newline() -> None:
    prefix = "def f():\n    return g("
    assert clean_insertion("a, b", prefix, ")\n") == "a, b"


def test_mid_line_drops_newline_the_line_already_has() -> None:
    assert clean_insertion("1\n", "    x = ", "\n    y = 2\n") == "1"


def test_mid_line_cuts_repeat_of_following_lines() -> None:
    prefix = "def f():\n    x = "
    suffix = "\n    y = 2\n    return x + y\n"
    assert clean_insertion("1\n    y = 2\n    return x + y\n", prefix, suffix) == "1"


def test_mid_line_multiline_continuation_kept() -> None:
    prefix = "x = f("
    gen = "\n    a,\n    b,\n"
    assert clean_insertion(gen, prefix, ")\n") == gen


# --- nothing changes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "gen,prefix,suffix",
    [
        ("    y = 2\n", "def f():\n    x = 1\n", "    return x\n"),
        ("x = 1\n", "", ""),
        ("}\n", "int f() {\n  return 0;\n", ""),  # a closing brace the file needs
        ("    return y\n", "def f():\n    y = 1\n", "\n\ndef g():\n    return y\n"),  # not the next line
    ],
)
def test_nothing_to_clean(gen: str, prefix: str, suffix: str) -> None:
    assert clean_insertion(gen, prefix, suffix) == gen


def test_crlf_output_normalised() -> None:
    assert clean_insertion("x = 1\r\ny = 2\r\n", "", "z = 3\n") == "x = 1\ny = 2\n"
