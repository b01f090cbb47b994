"""The chat state and the REPL's slash commands. Pure logic: output goes through the Terminal."""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

from dscoder.errors import UsageError
from dscoder.settings import Settings, unescape, validate
from dscoder.ui.console import Terminal

SETTABLE = ("temperature", "top_p", "top_k", "seed", "max_tokens", "stop", "verbose")
INTERRUPTED_MARK = "interrupted"  # key set on an assistant message cut short by Ctrl-C


def fence(text: str, info: str = "") -> str:
    """Fence `text` as Markdown with a fence longer than any backtick run inside it."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    marks = "`" * max(3, longest + 1)
    return f"{marks}{info}\n{text.rstrip(chr(10))}\n{marks}"


def with_context(instruction: str | None, context: str | None, label: str = "") -> str:
    """Piped text (or a /read file) is context, fenced; the typed message is the instruction."""
    if not context:
        return instruction or ""
    block = (f"{label}\n" if label else "") + fence(context)
    return f"{block}\n\n{instruction}" if instruction else block


@dataclass
class Conversation:
    system: str | None = None
    messages: list[dict] = field(default_factory=list)  # user and assistant turns, in order
    attachments: list[str] = field(default_factory=list)  # /read files waiting for the next message
    # The oldest turns left out of the prompt when it outgrew the context window; they stay out
    # so that the following prompts share a prefix (see prompts.chat_prompt).
    dropped_turns: int = 0

    def prompt_messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": m["role"], "content": m["content"]} for m in self.messages]

    def add_user(self, text: str) -> None:
        if self.attachments:
            text = "\n\n".join(self.attachments) + ("\n\n" + text if text else "")
            self.attachments = []
        self.messages.append({"role": "user", "content": text})

    def add_assistant(self, text: str, *, interrupted: bool = False) -> None:
        message = {"role": "assistant", "content": text}
        if interrupted:
            message[INTERRUPTED_MARK] = True
        self.messages.append(message)

    def drop_last_reply(self) -> bool:
        """For /regen: forget the last answer so the last question is asked again."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        return bool(self.messages) and self.messages[-1]["role"] == "user"

    def to_json(self) -> str:
        return json.dumps({"system": self.system, "messages": self.messages}, ensure_ascii=False, indent=2)

    @classmethod
    def from_json(cls, text: str, where: str) -> "Conversation":
        try:
            data = json.loads(text)
            messages = data["messages"]
            ok = all(m["role"] in ("user", "assistant") and isinstance(m["content"], str) for m in messages)
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise UsageError(f"{where} is not a conversation saved by /save.")
        return cls(system=data.get("system"), messages=list(messages))


def set_setting(settings: Settings, key: str, value: str) -> Settings:
    """`/set KEY VALUE`: the same parsing and checks as flags and the config file."""
    from dscoder.settings import _CONVERT

    key = key.replace("-", "_")
    if key not in SETTABLE:
        raise UsageError(f"/set knows {', '.join(SETTABLE)}; {key!r} is not one of them.")
    if key == "stop":  # `/set stop` clears; `/set stop X` adds one more stop string
        return replace(settings, stop=settings.stop + (unescape(value),) if value else ())
    if value.lower() in ("", "default", "none") and key != "verbose":
        return replace(settings, **{key: None})
    try:
        parsed = _CONVERT[key](value)
    except ValueError as e:
        raise UsageError(f"Bad value for {key}: {e}.") from None
    return validate(replace(settings, **{key: parsed}))


HELP = """\
/help, /?            this help
/exit, /quit, /bye   leave (or Ctrl-D, or Ctrl-C twice on an empty line)
/clear               forget the conversation (the system message stays)
/system [TEXT|off]   show, set or remove the system message
/set KEY VALUE       temperature, top_p, top_k, seed, max_tokens, stop, verbose
                     (`/set KEY default` restores the model's default, `/set stop` clears stops)
/show                the model, the settings and the conversation's size
/regen               answer the last message again
/read FILE           attach FILE to your next message
/save FILE, /load FILE  keep or restore the conversation (JSON)

Keys: Enter sends; Alt+Enter, Esc Enter or Ctrl-J add a newline; start with \"\"\" to write
several lines until a closing \"\"\"; a paste is one message. Up/Down and Ctrl-R search the
history (Enter sends the line found, Escape edits it, Ctrl-C gives up). Ctrl-C stops a reply
(what was written stays, marked interrupted) or clears the line."""

COMMANDS = ("/help", "/?", "/exit", "/quit", "/bye", "/clear", "/system", "/set", "/show",
            "/regen", "/read", "/save", "/load")
EXIT, REGEN, CONTINUE = "exit", "regen", "continue"


def is_command(text: str) -> bool:
    """Typed, one line, starting with '/'. (Pasted text never reaches here as a command.)"""
    return text.startswith("/") and "\n" not in text.strip()


@dataclass
class ChatState:
    conversation: Conversation
    settings: Settings
    model_name: str


def run_command(line: str, state: ChatState, term: Terminal) -> str:
    """Run one slash command; returns EXIT, REGEN or CONTINUE. Bad input raises UsageError."""
    name, _, rest = line.strip().partition(" ")
    rest = rest.strip()
    handler = _HANDLERS.get(name)
    if handler is None:
        raise UsageError(f"Unknown command {name}; /help lists them (to send text that starts "
                         "with /, begin it with a space).")
    return handler(rest, state, term) or CONTINUE


def _help(rest: str, state: ChatState, term: Terminal) -> None:
    term.hint(HELP)


def _exit(rest: str, state: ChatState, term: Terminal) -> str:
    return EXIT


def _clear(rest: str, state: ChatState, term: Terminal) -> None:
    state.conversation.messages.clear()
    state.conversation.attachments.clear()
    state.conversation.dropped_turns = 0
    term.hint("Conversation cleared.")


def _system(rest: str, state: ChatState, term: Terminal) -> None:
    convo = state.conversation
    if not rest:
        term.hint(f"System message: {convo.system}" if convo.system else "No system message.")
    elif rest.lower() in ("off", "none", "clear"):
        convo.system = None
        term.hint("System message removed.")
    else:
        convo.system = unescape(rest)
        term.hint("System message set.")


def _set(rest: str, state: ChatState, term: Terminal) -> None:
    key, _, value = rest.partition(" ")
    if not key:
        raise UsageError("Usage: /set KEY VALUE (see /help).")
    state.settings = set_setting(state.settings, key, value.strip())
    term.hint(f"{key}: {show_value(getattr(state.settings, key.replace('-', '_')))}")


def show_value(value: object) -> str:
    """A setting as a person reads it (and as /set takes it): no Python reprs."""
    if value is None:
        return "model default"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return ", ".join(show_value(v) for v in value) if value else "none"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # quoted, with \n and \t as /set takes them
    return str(value)


def _show(rest: str, state: ChatState, term: Terminal) -> None:
    s = state.settings
    shown = {f.name: getattr(s, f.name) for f in fields(s) if f.name in SETTABLE}
    lines = [f"model: {state.model_name}",
             f"system: {state.conversation.system or 'none'}",
             *(f"{k}: {show_value(v)}" for k, v in shown.items()),
             f"messages: {len(state.conversation.messages)}"]
    term.hint("\n".join(lines))


def _regen(rest: str, state: ChatState, term: Terminal) -> str | None:
    if not state.conversation.drop_last_reply():
        term.hint("Nothing to answer again yet.")
        return None
    return REGEN


def _path(rest: str, what: str) -> Path:
    parts = shlex.split(rest) if rest else []
    if len(parts) != 1:
        raise UsageError(f"Usage: {what} FILE")
    return Path(parts[0]).expanduser()


def _read(rest: str, state: ChatState, term: Terminal) -> None:
    from dscoder.fileedit import read_text_file

    path = _path(rest, "/read")
    text = read_text_file(path).text
    state.conversation.attachments.append(with_context(None, text, label=f"{path}:"))
    lines = len(text.splitlines())
    term.hint(f"Attached {path} ({lines} line{'' if lines == 1 else 's'}); it goes with your next "
              "message.")


def _save(rest: str, state: ChatState, term: Terminal) -> None:
    path = _path(rest, "/save")
    try:
        path.write_text(state.conversation.to_json() + "\n", encoding="utf-8")
    except OSError as e:
        raise UsageError(f"Cannot write {path}: {e.strerror}.") from None
    term.hint(f"Saved {len(state.conversation.messages)} messages to {path}.")


def _load(rest: str, state: ChatState, term: Terminal) -> None:
    path = _path(rest, "/load")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"Cannot read {path}: {getattr(e, 'strerror', None) or e}.") from None
    state.conversation = Conversation.from_json(text, str(path))
    term.hint(f"Loaded {len(state.conversation.messages)} messages from {path}.")


_HANDLERS: dict[str, Callable[[str, ChatState, Terminal], str | None]] = {
    "/help": _help, "/?": _help, "/exit": _exit, "/quit": _exit, "/bye": _exit, "/clear": _clear,
    "/system": _system, "/set": _set, "/show": _show, "/regen": _regen, "/read": _read,
    "/save": _save, "/load": _load,
}
