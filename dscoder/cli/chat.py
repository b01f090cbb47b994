"""`dscoder chat`: one answer (message argument and/or piped stdin) or the interactive REPL."""
from __future__ import annotations

import json
import os
import signal
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from dscoder import signals
from dscoder.cli.conversation import (
    COMMANDS,
    EXIT,
    REGEN,
    ChatState,
    Conversation,
    is_command,
    run_command,
    with_context,
)
from dscoder.cli.runtime import Interrupted, Runtime, stream_reply
from dscoder.errors import DscoderError, UsageError
from dscoder.events import Finished
from dscoder.prompts import Prompt, chat_prompt
from dscoder.settings import state_dir
from dscoder.ui.render import answer_stream, warmed
from dscoder.visible import EscapingStream


class _Silent:
    """The stream for --json: the text goes into the JSON object instead."""

    def feed(self, text: str) -> None:
        pass

    def finish(self) -> None:
        pass


def read_piped(rt: Runtime) -> str | None:
    """Piped stdin as text, or None when stdin is a terminal (or empty)."""
    from dscoder.fileedit import read_stdin_text

    if rt.term.stdin_is_tty:
        return None
    try:
        data = read_stdin_text(rt.term.stdin)
    except (OSError, ValueError):  # stdin closed
        return None
    return data if data.strip() else None


def build_prompt(rt: Runtime, messages: list[dict] | Conversation) -> Prompt:
    """The chat prompt; for a REPL conversation, turns once left out stay out (see chat_prompt)."""
    convo = messages if isinstance(messages, Conversation) else None
    before = convo.dropped_turns if convo else 0
    prompt = chat_prompt(rt.tokenizer(), convo.prompt_messages() if convo else messages,
                         max_prompt_tokens=rt.max_prompt_tokens(), dropped_turns=before)
    if convo is not None:
        convo.dropped_turns = prompt.dropped_turns
    if prompt.dropped_turns > before:  # said once per cut, not on every turn after it
        rt.term.warn(f"The conversation is longer than the context window; the "
                     f"{prompt.dropped_messages} oldest messages are left out of the prompt.")
    return prompt


def chat(rt: Runtime, message: str | None, *, system: str | None, json_out: bool,
         show_prompt: bool) -> None:
    system = system if system is not None else rt.settings.system
    piped = read_piped(rt)
    if message is None and piped is None:
        if show_prompt or json_out or not rt.term.stdin_is_tty:
            raise UsageError('Nothing to answer: give a message (dscoder chat "...") or pipe text in.')
        return repl(rt, system)
    # Piped text alone is the message; with an instruction it is context for it.
    content = with_context(message, piped) if message is not None else piped
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": content}]
    with warmed(rt.term, rt.settings.code_theme) if not (show_prompt or json_out) else nullcontext():
        prompt = rt.prompt_to_run(lambda: build_prompt(rt, messages), show_prompt)
    if prompt is None:
        return
    stream = (_Silent() if json_out
              else _shown(rt, answer_stream(rt.term, code_theme=rt.settings.code_theme)))
    cancel = threading.Event()
    finished = stream_reply(rt.engine().generate(prompt.ids, rt.generation(), cancel=cancel),
                            stream, prompt_tokens=len(prompt.ids), cancel=cancel)
    if json_out:
        rt.term.write(json.dumps(result_json(rt, finished), ensure_ascii=False) + "\n")
    rt.report(finished)


def result_json(rt: Runtime, f: Finished) -> dict[str, Any]:
    return {"model": rt.model_name, "text": f.text, "finish_reason": f.reason,
            "prompt_tokens": f.prompt_tokens, "cached_tokens": f.cached_tokens,
            "generated_tokens": f.generated_tokens, "prefill_seconds": round(f.prefill_seconds, 4),
            "decode_seconds": round(f.decode_seconds, 4),
            "prefill_tokens_per_second": round(f.prefill_tokens_per_second, 2),
            "decode_tokens_per_second": round(f.decode_tokens_per_second, 2),
            "load_seconds": None if rt.load_seconds is None else round(rt.load_seconds, 3)}


def history_file(rt: Runtime) -> Path | None:
    """The input history file, or None (history in memory) with one warning when it cannot be
    used: checked before the weights load, so a read-only home costs seconds, not a session."""
    if not rt.settings.history:
        return None
    path = state_dir(_env()) / "history"
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.exists() and not path.is_file():
            raise IsADirectoryError(21, "it is a folder, not a file")
        os.close(os.open(path, os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o600))  # private, as ui.repl
    except OSError as e:
        reason = e.strerror or str(e)
        rt.term.warn(f"Cannot keep the input history in {path} ({reason}); this session's history "
                     "stays in memory (set XDG_STATE_HOME, or use --no-history).")
        return None
    return path


def repl(rt: Runtime, system: str | None) -> None:
    from dscoder.ui.repl import LineReader  # prompt_toolkit only for the interactive path

    history = history_file(rt)
    # keys typed while the model loads wait for the prompt
    with rt.term.input_muted() as typed, warmed(rt.term, rt.settings.code_theme):
        engine = rt.engine()
    session = engine.new_session()
    state = ChatState(Conversation(system=system), rt.settings, rt.model_name)
    try:
        reader = LineReader(history, commands=COMMANDS, on_hint=rt.term.hint)
    except OSError as e:  # the file went away or turned read-only since the check
        rt.term.warn(f"Cannot keep the input history ({e.strerror or e}); it stays in memory.")
        reader = LineReader(None, commands=COMMANDS, on_hint=rt.term.hint)
    rt.term.hint(f"dscoder chat with {rt.model_name}. /help for commands, Ctrl-D to leave.")
    pending = typed.text
    while (entry := reader.read(pending)) is not None:
        pending = ""
        try:
            if not entry.pasted and is_command(entry.text):
                action = run_command(entry.text, state, rt.term)
                if action == EXIT:
                    return
                if action != REGEN:
                    continue
            elif not entry.text.strip():
                continue
            else:
                state.conversation.add_user(entry.text)
            rt.settings = state.settings
            pending = reply(rt, session, state.conversation)
        except DscoderError as e:
            rt.term.error(e.message)
        except Exception as e:  # noqa: BLE001  (the session is worth more than the failed turn)
            rt.term.error(turn_failed(e))


def turn_failed(error: Exception) -> str:
    """One sentence for an unexpected failure in one REPL turn; the session goes on."""
    from dscoder.cli.backend import explain_oom

    oom = explain_oom(error)
    what = oom.message if oom else f"Unexpected error: {type(error).__name__}: {error}."
    return (f"{what} The conversation is kept; send the message again, or /save it "
            "(run with --debug and please report errors that are not yours).")


def reply(rt: Runtime, session: Any, convo: Conversation) -> str:
    """One answer in the REPL; Ctrl-C keeps the partial answer, marked, and returns to the prompt.
    If the turn fails, the unanswered message is taken back so the conversation stays whole.
    Returns what the user typed meanwhile (not echoed), for the next prompt to start with."""
    asked = len(convo.messages)
    try:
        prompt = build_prompt(rt, convo)
    except DscoderError:
        convo.messages.pop()  # the message that did not fit: the user can shorten it
        raise
    stream = _shown(rt, answer_stream(rt.term, code_theme=rt.settings.code_theme))
    try:
        with rt.term.input_muted() as typed:  # keys typed meanwhile would land in the live window
            cancel = threading.Event()
            finished = stream_reply(session.generate(prompt.ids, rt.generation(), cancel=cancel),
                                    stream, prompt_tokens=len(prompt.ids), cancel=cancel)
    except Interrupted as e:
        if signals.received() == signal.SIGTERM:  # not a Ctrl-C: the process is asked to end
            raise
        signals.forget()
        finished = e.finished
        rt.term.hint("(interrupted)")
    except Exception:
        if len(convo.messages) == asked and convo.messages and convo.messages[-1]["role"] == "user":
            convo.messages.pop()
        raise
    convo.add_assistant(finished.text, interrupted=finished.reason == "cancelled")
    rt.term.stats(finished, verbose=rt.settings.verbose, load_seconds=rt.load_seconds)
    rt.say_compile_failure()
    return typed.text


def _shown(rt: Runtime, stream: Any) -> Any:
    """On a terminal, control characters in the model's text are shown, not obeyed."""
    return EscapingStream(stream) if rt.term.stdout_is_tty else stream


def _env() -> dict[str, str]:
    return dict(os.environ)
