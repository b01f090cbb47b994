"""man/dscoder.1 in roff, from the same data as the completions (see gen_docs.py)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from dscoder import __version__

if TYPE_CHECKING:
    from dscoder.cli.gen_docs import Cmd, Opt

EXAMPLES = [
    ("Chat on a terminal (Ctrl-C stops a reply, Ctrl-D leaves):", "dscoder chat"),
    ("One answer, with piped text as context:", 'git diff | dscoder chat "review this"'),
    ("Continue a file (only the new code goes to stdout):", "dscoder complete --max-lines 20 foo.py"),
    ("Fill in the middle of piped code:", "head -40 foo.py | dscoder complete --suffix-file rest.py"),
    ("Fill the gap before line 40 in place, with a diff on stderr:", "dscoder insert src/app.py --line 40"),
    ("See exactly what the model would get:", 'dscoder chat --show-prompt "hello"'),
    ("Download the default model:", "dscoder pull"),
]

FILES = [
    ("$XDG_CONFIG_HOME/dscoder/config.toml",
     "Settings as TOML keys named like the options with underscores, e.g. temperature = 0.2, "
     "stop = [\"\\n\\n\"]; DSCODER_CONFIG names another file."),
    ("$XDG_STATE_HOME/dscoder/history",
     "Chat input history, mode 0600, the newest 1000 entries; --no-history or DSCODER_NOHISTORY=1 turn it off."),
]

EXIT = [("0", "success"), ("1", "runtime error (model, GPU, memory, a file changed meanwhile)"),
        ("2", "bad usage or bad input (flags, files, a prompt that does not fit)"),
        ("130", "interrupted with Ctrl-C; insert writes nothing")]


def esc(text: str) -> str:
    """Escape text for roff: backslashes, minus signs, and a leading dot or quote."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + ln if ln[:1] in (".", "'") else ln for ln in text.split("\n"))


def _opt(o: "Opt") -> list[str]:
    names = ", ".join(f"\\fB{esc(n)}\\fR" for n in o.names)
    value = f" \\fI{esc(o.metavar)}\\fR" if o.metavar else ""
    return [".TP", names + value, esc(o.help)]


def _bold(text: str) -> str:
    return f"\\fB{esc(text)}\\fR"


def _paragraphs(text: str) -> list[str]:
    out = []
    for para in text.strip().split("\n\n"):
        out += [".PP", esc(" ".join(para.split()))]
    return out


def man_page(root: "Cmd", subs: list["Cmd"]) -> str:
    from dscoder.settings import _CONVERT, env_name

    lines = [f'.TH DSCODER 1 "" "dscoder {__version__}" "User Commands"',
             ".SH NAME", "dscoder \\- chat with DeepSeek\\-Coder\\-V2, complete code and fill gaps in files",
             ".SH SYNOPSIS", f"\\fBdscoder\\fR {esc(root.usage.split(' ', 1)[1])}",
             *(f".br\n\\fBdscoder\\fR {esc(c.usage.split(' ', 1)[1])}" for c in subs),
             ".SH DESCRIPTION", *_paragraphs(root.help),
             ".SH OPTIONS"]
    # Subcommands that also take the global options (after their name) list only their own.
    takers = [c for c in subs if set(root.options) & set(c.options)]
    if takers:
        left_out = [o.names[0] for o in root.options if not all(o in c.options for c in takers)]
        lead = f"Apart from {', '.join(map(_bold, left_out))}, these" if left_out else "These"
        lines += [".PP", f"{lead} options also work after {', '.join(_bold(c.name) for c in takers)}, "
                  "where they win over the same option given before the command."]
    lines += [*(ln for o in root.options for ln in _opt(o)), ".SH COMMANDS"]
    for c in subs:
        lines += [f'.SS "{esc(c.usage)}"', *_paragraphs(c.help)]
        lines += [ln for o in c.options if o not in root.options for ln in _opt(o)]
        if c in takers:
            lines += [".PP", "The global options (see \\fBOPTIONS\\fR) work here too."]
    lines += [".SH ENVIRONMENT"]
    for key in _CONVERT:
        lines += [".TP", f"\\fB{esc(env_name(key))}\\fR", f"Same as the {esc(key.replace('_', ' '))} setting."]
    lines += [".TP", "\\fBNO_COLOR\\fR", "Plain text, no escape codes (like \\fB\\-\\-no\\-pretty\\fR).",
              ".SH FILES"]
    for path, text in FILES:
        lines += [".TP", f"\\fI{esc(path)}\\fR", esc(text)]
    lines += [".SH EXIT STATUS"]
    for code, text in EXIT:
        lines += [".TP", f"\\fB{code}\\fR", esc(text)]
    lines += [".SH EXAMPLES"]
    for text, cmd in EXAMPLES:
        lines += [".PP", esc(text), ".RS", ".nf", esc(cmd), ".fi", ".RE"]
    return "\n".join(lines) + "\n"
