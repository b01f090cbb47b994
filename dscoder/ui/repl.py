"""Reading chat input on a terminal with prompt_toolkit.

Keys: Enter sends; Alt+Enter, Esc Enter or Ctrl-J insert a newline; a message that starts with
triple quotes continues until it ends with triple quotes; a paste is one message and is never
a /command; Up/Down and Ctrl-R search the history; Ctrl-C clears the line, and on an empty
line a second Ctrl-C (or Ctrl-D) leaves.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from prompt_toolkit import PromptSession, search
from prompt_toolkit.application import get_app
from prompt_toolkit.completion import Completer, Completion
from prompt_toolkit.filters import is_searching
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.keys import Keys

from dscoder.signals import Terminated

HISTORY_CAP = 1000  # entries kept in the history file (codex's grew to gigabytes)
QUOTES = '"""'


@dataclass(frozen=True)
class Entry:
    text: str
    pasted: bool  # typed text may be a /command; pasted text never is


class CappedFileHistory(FileHistory):
    """prompt_toolkit's file history, private (0600) and trimmed to the newest `cap` entries."""

    def __init__(self, path: Path, cap: int = HISTORY_CAP) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o600)
        os.close(fd)
        os.chmod(path, 0o600)  # an older file may have been created world-readable
        super().__init__(str(path))
        self.cap = cap
        self._trim()

    def _trim(self) -> None:
        entries = list(self.load_history_strings())  # newest first
        if len(entries) <= self.cap:
            return
        keep = reversed(entries[: self.cap])
        tmp = Path(self.filename + ".tmp")
        fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for entry in keep:
                f.write("\n" + "".join(f"+{line}\n" for line in entry.split("\n")))
        os.replace(tmp, self.filename)


class _SlashCompleter(Completer):
    def __init__(self, commands: Iterable[str]) -> None:
        self.commands = sorted(commands)

    def get_completions(self, document, complete_event):  # type: ignore[override]
        text = document.text_before_cursor
        if text.startswith("/") and " " not in text and "\n" not in text:
            for cmd in self.commands:
                if cmd.startswith(text):
                    yield Completion(cmd, start_position=-len(text))


def _in_quote_block(text: str) -> bool:
    stripped = text.strip()
    return stripped.startswith(QUOTES) and not (len(stripped) >= 6 and stripped.endswith(QUOTES))


def unquote(text: str) -> str:
    stripped = text.strip()
    if stripped.startswith(QUOTES) and stripped.endswith(QUOTES) and len(stripped) >= 6:
        return stripped[3:-3].strip("\n")
    return text


PLACEHOLDER = FormattedText([("fg:ansibrightblack", "Send a message (/? for help)")])


def _placeholder() -> FormattedText:
    """The hint in an empty prompt; not while a Ctrl-R search shows its match there, and not in
    the prompt's last drawing, which stays in the scrollback when the chat ends."""
    app = get_app()
    return FormattedText([]) if app.is_done or app.layout.is_searching else PLACEHOLDER


class LineReader:
    """One prompt_toolkit session for the whole chat. `read()` gives an Entry, or None to leave."""

    def __init__(self, history_file: Path | None, commands: Iterable[str] = (),
                 on_hint=None) -> None:
        history: History = CappedFileHistory(history_file) if history_file else InMemoryHistory()
        self._pasted = False
        self._on_hint = on_hint or (lambda message: None)
        self.session: PromptSession = PromptSession(
            history=history, multiline=True, key_bindings=self._bindings(),
            prompt_continuation="", completer=_SlashCompleter(commands), complete_while_typing=True,
            placeholder=_placeholder,
            enable_history_search=False, mouse_support=False)

    def _bindings(self) -> KeyBindings:
        kb = KeyBindings()

        @kb.add("enter", filter=is_searching)
        def _send_match(event: KeyPressEvent) -> None:
            # Enter in a Ctrl-R search sends the line found, as in bash (Escape keeps it on the
            # line to edit, Ctrl-C or Ctrl-G gives the search up: prompt_toolkit's own keys)
            search.accept_search()
            event.app.current_buffer.validate_and_handle()

        @kb.add("enter", filter=~is_searching)
        def _enter(event: KeyPressEvent) -> None:
            buf = event.current_buffer
            if buf.complete_state and buf.complete_state.current_completion:
                buf.apply_completion(buf.complete_state.current_completion)
                return
            if _in_quote_block(buf.text):
                buf.insert_text("\n")
            else:
                buf.validate_and_handle()

        @kb.add("escape", "enter")
        @kb.add("c-j")
        def _newline(event: KeyPressEvent) -> None:
            event.current_buffer.insert_text("\n")

        @kb.add(Keys.BracketedPaste)
        def _paste(event: KeyPressEvent) -> None:
            self._pasted = True
            event.current_buffer.insert_text(event.data.replace("\r\n", "\n").replace("\r", "\n"))

        @kb.add("c-c", filter=~is_searching)  # while searching, Ctrl-C leaves the search
        def _ctrl_c(event: KeyPressEvent) -> None:
            if event.current_buffer.text:
                event.current_buffer.reset()
            else:
                event.app.exit(exception=KeyboardInterrupt())

        return kb

    def read(self, typed_ahead: str = "") -> Entry | None:
        """The next message; `typed_ahead` (keys typed while a reply streamed) starts the line."""
        last_was_ctrl_c = False
        while True:
            self._pasted = False
            try:
                text = self.session.prompt(FormattedText([("bold", ">>> ")]), default=typed_ahead)
                typed_ahead = ""
            except EOFError:  # Ctrl-D on an empty line
                return None
            except Terminated:  # SIGTERM: leave, whatever the line holds
                raise
            except KeyboardInterrupt:  # Ctrl-C on an empty line
                typed_ahead = ""
                if last_was_ctrl_c:
                    return None
                last_was_ctrl_c = True
                self._on_hint("(press Ctrl-C again or Ctrl-D to leave)")
                continue
            return Entry(unquote(text), pasted=self._pasted)
