"""`dscoder insert FILE --line N`: fill the gap before line N with fill-in-the-middle, safely.

Every check that can fail (file readable, text, line in range, writable) runs before the model
loads. The file is written once, atomically, after generation; Ctrl-C or a change on disk
meanwhile leaves it exactly as it was.
"""
from __future__ import annotations

from pathlib import Path

from dscoder.cli.complete import build
from dscoder.cli.runtime import Runtime, stream_reply
from dscoder.errors import DscoderError, UsageError
from dscoder.fileedit import check_writable, read_text_file, split_at_line, unified_diff, write_atomic
from dscoder.fim import clean_insertion


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
    prompt = rt.prompt_to_run(lambda: build(rt, prefix, suffix), show_prompt)
    if prompt is None:
        return
    events = rt.engine().generate(prompt.ids, rt.generation(), stop_ids=rt.fim_stop_ids())
    with rt.term.working(f"filling the gap before line {line}") as progress:
        finished = stream_reply(events, _Collect(), prompt_tokens=len(prompt.ids),
                                on_tokens=progress)
    rt.report(finished)
    text = clean_insertion(finished.text, prefix, suffix)
    if not text:
        raise NothingToInsert(f"The model produced nothing useful to insert at line {line}; "
                              f"{file} is unchanged (try again, or a higher --temperature).")
    if print_only:
        rt.term.write(text)
        return
    new_text = prefix + text + suffix
    rt.term.diff(unified_diff(original, new_text))
    if dry_run:
        rt.term.info(f"(dry run: {file} is unchanged)")
        return
    write_atomic(original, new_text, backup=backup)
    added = text.count("\n") or 1
    rt.term.info(f"Inserted {added} line{'s' if added != 1 else ''} at line {line} of {file}.")
