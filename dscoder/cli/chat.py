"""`dscoder chat`: one answer (message argument and/or piped stdin) or the interactive REPL."""
from __future__ import annotations

import json
from typing import Any

from dscoder.cli.conversation import (EXIT, REGEN, COMMANDS, ChatState, Conversation, is_command,
                                      run_command, with_context)
from dscoder.cli.runtime import Interrupted, Runtime, stream_reply
from dscoder.errors import DscoderError, UsageError
from dscoder.events import Finished
from dscoder.prompts import Prompt, chat_prompt
from dscoder.settings import state_dir
from dscoder.ui.render import answer_stream


class _Silent:
    """The stream for --json: the text goes into the JSON object instead."""

    def feed(self, text: str) -> None:
        pass

    def finish(self) -> None:
        pass


def read_piped(rt: Runtime) -> str | None:
    """Piped stdin as text, or None when stdin is a terminal (or empty)."""
    if rt.term.stdin_is_tty:
        return None
    try:
        data = rt.term.stdin.read()
    except (OSError, ValueError):  # stdin closed
        return None
    except UnicodeDecodeError:
        raise UsageError("The piped input is not UTF-8 text; pipe text, not binary data.") from None
    return data if data.strip() else None


def build_prompt(rt: Runtime, messages: list[dict]) -> Prompt:
    prompt = chat_prompt(rt.tokenizer(), messages, max_prompt_tokens=rt.max_prompt_tokens())
    if prompt.dropped_messages:
        rt.term.warn(f"The conversation is longer than the context window; the "
                     f"{prompt.dropped_messages} oldest messages were left out of the prompt.")
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
    prompt = rt.prompt_to_run(lambda: build_prompt(rt, messages), show_prompt)
    if prompt is None:
        return
    stream = _Silent() if json_out else answer_stream(rt.term, code_theme=rt.settings.code_theme)
    finished = stream_reply(rt.engine().generate(prompt.ids, rt.generation()), stream,
                            prompt_tokens=len(prompt.ids))
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


def repl(rt: Runtime, system: str | None) -> None:
    from dscoder.ui.repl import LineReader  # prompt_toolkit only for the interactive path

    with rt.term.input_muted() as typed:  # keys typed while the model loads wait for the prompt
        engine = rt.engine()
    session = engine.new_session()
    state = ChatState(Conversation(system=system), rt.settings, rt.model_name)
    history = state_dir(_env()) / "history" if rt.settings.history else None
    reader = LineReader(history, commands=COMMANDS, on_hint=rt.term.hint)
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


def reply(rt: Runtime, session: Any, convo: Conversation) -> str:
    """One answer in the REPL; Ctrl-C keeps the partial answer, marked, and returns to the prompt.
    Returns what the user typed meanwhile (not echoed), for the next prompt to start with."""
    try:
        prompt = build_prompt(rt, convo.prompt_messages())
    except DscoderError:
        convo.messages.pop()  # the message that did not fit: the user can shorten it
        raise
    stream = answer_stream(rt.term, code_theme=rt.settings.code_theme)
    try:
        with rt.term.input_muted() as typed:  # keys typed meanwhile would land in the live window
            finished = stream_reply(session.generate(prompt.ids, rt.generation()), stream,
                                    prompt_tokens=len(prompt.ids))
    except Interrupted as e:
        finished = e.finished
        rt.term.hint("(interrupted)")
    convo.add_assistant(finished.text, interrupted=finished.reason == "cancelled")
    rt.term.stats(finished, verbose=rt.settings.verbose, load_seconds=rt.load_seconds)
    return typed.text


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)
