"""`dscoder complete [FILE|-]`: continue code (raw prefix), or fill a gap when given a suffix (FIM)."""
from __future__ import annotations

import threading
from pathlib import Path

from dscoder.cli.runtime import Runtime, stream_reply
from dscoder.errors import UsageError
from dscoder.prompts import Prompt, completion_prompt, fim_prompt
from dscoder.ui.render import answer_stream


def read_source(rt: Runtime, file: str | None) -> str:
    """FILE, or stdin for '-' or when text is piped in."""
    if file is None or file == "-":
        if file is None and rt.term.stdin_is_tty:
            raise UsageError("Give a FILE to continue, or pipe code in (cat foo.py | dscoder complete).")
        from dscoder.fileedit import read_stdin_text

        try:
            return read_stdin_text(rt.term.stdin)
        except (OSError, ValueError) as e:  # stdin closed: nothing to continue
            raise UsageError("Standard input is closed; give a FILE or pipe code in.") from e
    from dscoder.fileedit import read_text_file

    return read_text_file(Path(file)).text


def read_suffix(suffix: str | None, suffix_file: Path | None) -> str | None:
    if suffix is not None and suffix_file is not None:
        raise UsageError("Give --suffix or --suffix-file, not both.")
    if suffix_file is not None:
        from dscoder.fileedit import read_text_file

        return read_text_file(suffix_file).text
    return suffix


def build(rt: Runtime, prefix: str, suffix: str | None) -> Prompt:
    limit = rt.max_prompt_tokens()
    if suffix is None:
        prompt = completion_prompt(rt.tokenizer(), prefix, max_prompt_tokens=limit)
    else:
        prompt = fim_prompt(rt.tokenizer(), prefix, suffix, max_prompt_tokens=limit)
    cut_prefix, cut_suffix = prompt.truncated_chars
    if cut_prefix or cut_suffix:
        rt.term.warn(f"The code is longer than the context window; {cut_prefix} characters were cut "
                     f"from the start and {cut_suffix} from the end, keeping the text nearest the gap.")
    return prompt


def complete(rt: Runtime, file: str | None, *, suffix: str | None, suffix_file: Path | None,
             max_lines: int | None, show_prompt: bool) -> None:
    prefix = read_source(rt, file)
    suffix_text = read_suffix(suffix, suffix_file)
    prompt = rt.prompt_to_run(lambda: build(rt, prefix, suffix_text), show_prompt)
    if prompt is None:
        return
    # Raw text, never Markdown: the output is code that continues the input.
    stream = answer_stream(rt.term, markdown=False, newline=rt.term.stdout_is_tty)
    if rt.term.stdout_is_tty:  # control characters in the model's text are shown, not obeyed
        from dscoder.visible import EscapingStream

        stream = EscapingStream(stream)
    cancel = threading.Event()  # set for --max-lines, so the engine ends the reply and reports it
    events = rt.engine().generate(prompt.ids, rt.generation(), stop_ids=rt.fim_stop_ids(),
                                  cancel=cancel)
    rt.report(stream_reply(events, stream, prompt_tokens=len(prompt.ids), max_lines=max_lines,
                           cancel=cancel))
