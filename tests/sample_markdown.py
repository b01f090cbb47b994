"""A realistic chat reply in Markdown (headings, lists, fenced code, a quote, a table), any length.

Used by the rendering tests and by benchmarks/bench_render.py.
"""
from __future__ import annotations

SECTIONS = (
    "## Overview\n\nHere is how to **parse** the file and `load` it. The approach keeps memory flat "
    "by streaming lines instead of reading the whole file, which matters for large inputs.\n\n",
    "1. Open the file with `open(path)`.\n2. Read it line by line.\n3. Parse each record.\n\n",
    "```python\nimport json\n\n\ndef load(path: str) -> list[dict]:\n    \"\"\"Read records.\"\"\"\n"
    "    out = []\n    with open(path) as f:\n        for line in f:\n"
    "            out.append(json.loads(line))\n    return out\n```\n\n",
    "- first point with *emphasis*\n- second point\n  continued on a second line\n- third `x = 1`\n\n",
    "### Rust version\n\nThe same in Rust:\n\n```rust\nuse std::fs;\n\nfn main() {\n"
    "    let s = fs::read_to_string(\"a.txt\").unwrap();\n\n    for line in s.lines() {\n"
    "        println!(\"{}\", line);\n    }\n}\n```\n\n",
    "> Note: errors are not handled here; in production, return a `Result`.\n\n",
    "| name | value |\n|---|---|\n| a | 1 |\n| b | 2 |\n\n",
    "- loose list item one\n\n- loose list item two\n\n  with a second paragraph\n\n",
    "Finally, run it:\n\n```sh\npython load.py data.jsonl\n```\n\nThat is all.\n\n",
)
CHARS_PER_TOKEN = 4  # about what the DeepSeek tokenizer gives for English and code


def markdown_reply(tokens: int) -> str:
    """About `tokens` tokens of Markdown (CHARS_PER_TOKEN characters each), ending cleanly."""
    out, i = "", 0
    while len(out) < tokens * CHARS_PER_TOKEN:
        out += SECTIONS[i % len(SECTIONS)]
        i += 1
    return out[: tokens * CHARS_PER_TOKEN].rstrip() + "\n"
