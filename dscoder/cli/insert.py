"""`dscoder insert FILE --line N`: fill the gap before line N with fill-in-the-middle, safely.

Every check that can fail (file readable, text, line in range, writable) runs before the model
loads. The file is written once, atomically, after generation; Ctrl-C or a change on disk
meanwhile leaves it exactly as it was.
"""
from __future__ import annotations

import threading
from pathlib import Path

from dscoder import signals
from dscoder.cli.complete import build
from dscoder.cli.runtime import Runtime, stream_reply
from dscoder.errors import DscoderError, UsageError
from dscoder.fileedit import (
    check_backup,
    check_writable,
    hard_links,
    read_text_file,
    remove_stale_temps,
    split_at_line,
    unified_diff,
    write_atomic,
)
from dscoder.fim import clean_insertion
from dscoder.visible import escape_controls


class _Collect:
    def feed(self, text: str) -> None:
        pass

    def finish(self) -> None:
        pass


class NothingToInsert(DscoderError):
    pass


def insert(rt: Runtime, file: Path, *, line: int, dry_run: bool, print_only: bool, backup: bool,
           show_prompt: bool) -> None:
    if dry_run and print_only:
        raise UsageError("Give --dry-run or --print, not both.")
    original = read_text_file(file)
    prefix, suffix = split_at_line(original.text, line, file)
    writes = not (dry_run or print_only or show_prompt)
    if writes:
        check_writable(file)
        if backup:
            check_backup(file)
        remove_stale_temps(file)  # those of an earlier run that was killed mid-write
    prompt = rt.prompt_to_run(lambda: build(rt, prefix, suffix), show_prompt)
    if prompt is None:
        return
    cancel = threading.Event()
    events = rt.engine().generate(prompt.ids, rt.generation(), stop_ids=rt.fim_stop_ids(),
                                  cancel=cancel)
    with rt.term.working(f"filling the gap before line {line}") as progress:
        finished = stream_reply(events, _Collect(), prompt_tokens=len(prompt.ids), cancel=cancel,
                                on_tokens=progress)
    rt.report(finished)
    text = clean_insertion(finished.text, prefix, suffix)
    if not text:
        raise NothingToInsert(f"The model produced nothing useful to insert at line {line}; "
                              f"{file} is unchanged (try again, or a higher --temperature).")
    if print_only:  # a pipe or a file gets the text exactly; a terminal sees its controls escaped
        rt.term.write(escape_controls(text) if rt.term.stdout_is_tty else text)
        return
    new_text = prefix + text + suffix
    # The diff is for eyes (stderr): escape sequences in the model's text are shown, not obeyed.
    rt.term.diff(escape_controls(unified_diff(original, new_text)))
    if dry_run:
        rt.term.info(f"(dry run: {file} is unchanged)")
        return
    signals.check()  # an interrupt swallowed anywhere before this point: write nothing
    others = hard_links(file) - 1  # write_atomic then edits in place, so every name sees it
    write_atomic(original, new_text, backup=backup)
    added = text.count("\n") or 1
    shared = (f" (in place: it has {others} other hard link{'s' if others != 1 else ''}, "
              "which see the edit too)") if others else ""
    rt.term.info(f"Inserted {added} line{'s' if added != 1 else ''} at line {line} of {file}{shared}.")
