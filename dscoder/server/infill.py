"""llama.cpp's /infill semantics on top of the engine: the prompt (repository context, then FIM)
and the two limits editors use to keep completions short (n_indent, t_max_predict_ms)."""
from __future__ import annotations

import time

from dscoder.prompts import Prompt, fim_prompt
from dscoder.server.schemas import InfillRequest

# llama-server's separator between input_extra chunks for models without a file-separator token
# (DeepSeek-Coder-V2 has none): a blank line, "--- snippet ---", a blank line.
SNIPPET = "\n\n--- snippet ---\n\n"


def infill_prompt(tok, req: InfillRequest, max_prompt_tokens: int) -> Prompt:
    """``<BOS>{snippets}<fim_begin>{prefix}{prompt}<fim_hole>{suffix}<fim_end>``, cut to fit."""
    context = "".join(SNIPPET + chunk.text for chunk in req.input_extra)
    return fim_prompt(tok, req.input_prefix + req.prompt, req.input_suffix,
                      max_prompt_tokens=max_prompt_tokens, context=context)


class InfillLimits:
    """Cuts the streamed text as llama-server does: with n_indent > 0, before the first line after
    the first whose indentation is less than n_indent; with t_max_predict_ms, once a newline has
    been generated and that many milliseconds have passed. `feed` returns (text to send, stop)."""

    def __init__(self, n_indent: int, t_max_predict_ms: int) -> None:
        self.n_indent, self.t_max = n_indent, t_max_predict_ms / 1000
        self.start = time.monotonic()
        self.indent = ""  # leading blanks of the current line, held until its indentation is known
        self.decided = False  # the current line's indentation is known (and deep enough)
        self.seen_newline = False

    def feed(self, text: str) -> tuple[str, bool]:
        out: list[str] = []
        for ch in text:
            if ch == "\n":
                out.append(self.indent + ch)
                self.indent, self.decided, self.seen_newline = "", False, True
            elif self.decided or not (self.n_indent and self.seen_newline):
                out.append(ch)
            elif ch in " \t":
                self.indent += ch
            elif len(self.indent) < self.n_indent:  # a line less indented than the hole's
                self.indent = ""
                return "".join(out), True
            else:
                out.append(self.indent + ch)
                self.indent, self.decided = "", True
        late = self.t_max and self.seen_newline and time.monotonic() - self.start > self.t_max
        return "".join(out), bool(late)
