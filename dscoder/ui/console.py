"""The terminal: which streams are ttys, whether colour is allowed, and the small messages on stderr.

The contract: stdout carries only the answer; everything else (errors, warnings, statistics, diffs)
goes to stderr. Escape codes only reach a stream that is a terminal, and never when NO_COLOR is
set or --no-pretty was given.
"""
from __future__ import annotations

import os
import re
import sys
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, TextIO

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from dscoder.events import Finished

LOADING = "reading weights"
PREPARING = "preparing the model"


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def color_allowed(stream: TextIO, env: Mapping[str, str], pretty: bool = True) -> bool:
    return (pretty and _isatty(stream) and not env.get("NO_COLOR")
            and env.get("TERM", "") != "dumb")


@dataclass
class Terminal:
    """The three standard streams and what each may receive. Tests build one around StringIO."""

    stdin: TextIO
    stdout: TextIO
    stderr: TextIO
    pretty: bool  # stdout gets Markdown and colour
    err_color: bool  # stderr gets colour
    _out: Console | None = field(default=None, repr=False)
    _err: Console | None = field(default=None, repr=False)

    @property
    def stdin_is_tty(self) -> bool:
        return _isatty(self.stdin)

    @property
    def stdout_is_tty(self) -> bool:
        return _isatty(self.stdout)

    @property
    def stderr_is_tty(self) -> bool:
        """Statistics and progress are for a person at a terminal, coloured or not (NO_COLOR
        and --no-pretty take the colour away, not the information)."""
        return _isatty(self.stderr)

    @property
    def out(self) -> Console:
        if self._out is None:
            self._out = _console(self.stdout, self.pretty)
        return self._out

    @property
    def err(self) -> Console:
        if self._err is None:
            self._err = _console(self.stderr, self.err_color)
        return self._err

    # -- stdout: answers only --------------------------------------------------------------
    def write(self, text: str) -> None:
        """Raw answer text, flushed at once so pipes see tokens as they come."""
        self.stdout.write(text)
        self.stdout.flush()

    # -- stderr: everything else ------------------------------------------------------------
    def error(self, message: str) -> None:
        self._line(f"error: {message}", "bold red")

    def warn(self, message: str) -> None:
        self._line(f"warning: {message}", "yellow")

    def info(self, message: str) -> None:
        self._line(message, "dim")

    def hint(self, message: str) -> None:
        self._line(message, "cyan")

    def _line(self, message: str, style: str) -> None:
        # wrap at words on a terminal; never break a line for a pipe or a log file
        self.err.print(Text(message, style=style if self.err_color else ""), soft_wrap=not self.err_color)

    def stats(self, finished: Finished, *, verbose: bool = False, load_seconds: float | None = None) -> None:
        self.info(stats_line(finished, verbose=verbose, load_seconds=load_seconds))

    def diff(self, diff_text: str) -> None:
        """A unified diff on stderr, coloured like git's when stderr is a terminal."""
        for line in diff_text.splitlines():
            style = ""
            if self.err_color:
                style = ("bold" if line.startswith(("---", "+++")) else "cyan" if line.startswith("@@")
                         else "green" if line.startswith("+") else "red" if line.startswith("-") else "")
            self.err.print(Text(line, style=style), soft_wrap=True, highlight=False)

    @contextmanager
    def load_progress(self) -> Iterator[Callable[[int, int], None]]:
        """A (done, total) callback that draws a bar on stderr while weights load, on a terminal
        only: a log file or a pipe gets no progress noise."""
        if not self.err_color:
            yield lambda done, total: None
            return
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                      DownloadColumn(), TimeRemainingColumn(), console=self.err,
                      transient=True) as bar:
            task = bar.add_task(LOADING, total=None)

            def update(done: int, total: int) -> None:
                # once every byte is read, what is left (page-locking host memory, copies to
                # the GPU, building the decode step) can take a while too: say so
                bar.update(task, completed=done, total=total,
                           description=PREPARING if total and done >= total else LOADING)

            yield update

    def confirm(self, question: str) -> bool:
        """Ask on stderr, read one line from stdin: Enter or y/yes says yes (end of input: no)."""
        self.stderr.write(question)
        self.stderr.flush()
        answer = self.stdin.readline()
        if not answer:  # Ctrl-D
            self.stderr.write("\n")
            return False
        return answer.strip().lower() in ("", "y", "yes")

    @contextmanager
    def working(self, what: str) -> Iterator[Callable[[int], None]]:
        """A spinner with a token count on stderr while the model writes something that is not
        shown as it comes (insert), erased when done; a (tokens so far) callback. On a terminal
        only, like the loading bar."""
        if not self.err_color:
            yield lambda tokens: None
            return
        with Progress(SpinnerColumn(), TextColumn(what), TextColumn("{task.completed} tokens"),
                      console=self.err, transient=True) as bar:
            task = bar.add_task(what, total=None)
            yield lambda tokens: bar.update(task, completed=tokens)

    def input_muted(self) -> AbstractContextManager[TypeAhead]:
        """While a reply streams or the model loads: keys typed are not echoed, and are kept for
        the next prompt (see `muted_input`)."""
        return muted_input(self.stdin)

    def show_prompt(self, text: str, tokens: int) -> None:
        """--show-prompt: the exact prompt text on stdout, its size on stderr."""
        self.write(text if text.endswith("\n") or not self.stdout_is_tty else text + "\n")
        self.info(f"[{tokens} tokens]")


@dataclass
class TypeAhead:
    """What was typed while the input was muted, as text for the next prompt (no Enter acts)."""

    text: str = ""


_ESCAPE = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|O.|.)?", re.S)  # arrow keys and the like


def typed_text(data: bytes) -> str:
    """Keys typed ahead as plain text: Enter becomes a newline (never a send), escape sequences
    and other control keys are dropped, and the text is trimmed of trailing newlines."""
    text = _ESCAPE.sub("", data.decode("utf-8", errors="ignore")).replace("\r\n", "\n")
    text = text.replace("\r", "\n")
    return "".join(c for c in text if c in "\n\t" or c >= " ").rstrip("\n")


@contextmanager
def muted_input(stream: TextIO) -> Iterator[TypeAhead]:
    """Terminal echo off while the body runs (a reply streams, the model loads); what was typed
    meanwhile is kept, as text for the next prompt.

    The terminal would echo keys typed into rich's live window and garble it, so ECHO goes off,
    and so does line buffering (ICANON), so that half a line typed can be read back at the end.
    ISIG stays, so Ctrl-C still interrupts. The keys typed come back as `TypeAhead.text` for the
    next prompt to start with: the user sees them there, and an Enter among them is a newline,
    so nothing is sent that nobody read over. The settings come back in any case: normal end,
    Ctrl-C or an exception. Anything but a terminal (a pipe, a file, no termios on this
    platform) is left alone."""
    typed = TypeAhead()
    try:
        import termios

        fd = stream.fileno()
        saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    except (ImportError, AttributeError, ValueError, OSError):
        saved = None
    if saved is None:
        yield typed
        return
    muted = list(saved)
    muted[3] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON)  # lflag
    muted[6] = list(saved[6])
    muted[6][termios.VMIN], muted[6][termios.VTIME] = 0, 0  # reads return what is there
    try:
        termios.tcsetattr(fd, termios.TCSANOW, muted)
    except termios.error:  # e.g. a background process group: leave the terminal alone
        yield typed
        return
    try:
        yield typed
    finally:
        try:
            typed.text = typed_text(_drain(fd))
            termios.tcsetattr(fd, termios.TCSANOW, saved)
        except (termios.error, OSError):
            pass


def _drain(fd: int) -> bytes:
    """Everything waiting to be read on a terminal in non-canonical mode with VMIN 0."""
    data = b""
    while chunk := os.read(fd, 4096):
        data += chunk
    return data


def _console(stream: TextIO, color: bool) -> Console:
    # force_terminal=False plus no_color keeps rich from emitting any escape into pipes or files.
    return Console(file=stream, force_terminal=color, no_color=not color, color_system="auto" if color else None,
                   highlight=False, emoji=False, soft_wrap=False)


_REASONS = {"length": "stopped at max tokens", "stop": "stopped at a stop string",
            "cancelled": "interrupted"}


def stats_line(f: Finished, *, verbose: bool = False, load_seconds: float | None = None) -> str:
    cached = f" ({f.cached_tokens} cached)" if f.cached_tokens else ""
    line = (f"[prompt {f.prompt_tokens} tokens{cached}, {f.prefill_tokens_per_second:.1f} tok/s"
            f" | reply {f.generated_tokens} tokens, {f.decode_tokens_per_second:.1f} tok/s")
    if f.wall_seconds is not None:
        line += f" | {f.wall_seconds:.1f} s"
    if f.reason in _REASONS:
        line += f" | {_REASONS[f.reason]}"
    if verbose:
        line += f" | prefill {f.prefill_seconds:.2f}s, decode {f.decode_seconds:.2f}s"
        if load_seconds is not None:
            line += f", load {load_seconds:.1f}s"
        line += "".join(f", {k} {_fmt(v)}" for k, v in f.stats.items())
    return line + "]"


def _fmt(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def make_terminal(*, pretty: bool = True, env: Mapping[str, str] | None = None,
                  stdin: TextIO | None = None, stdout: TextIO | None = None,
                  stderr: TextIO | None = None) -> Terminal:
    env = os.environ if env is None else env
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    return Terminal(stdin, stdout, stderr, pretty=color_allowed(stdout, env, pretty),
                    err_color=color_allowed(stderr, env, pretty))
