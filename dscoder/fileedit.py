"""Read, split, diff and rewrite a text file so that nothing is ever damaged.

A file is read once into a `TextFile` (text with "\\n" newlines plus what is needed to write it
back: newline style, BOM, mode, and a stamp of the exact bytes). `write_atomic` writes a temporary
file next to it, fsyncs it and renames it over the original, so a reader, a crash or Ctrl-C sees
either the old file or the new one, never half of one. Torch-free and typer-free on purpose.
"""
from __future__ import annotations

import difflib
import hashlib
import os
import re
import shlex
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from dscoder import signals
from dscoder.errors import DscoderError, FileChanged, UsageError

BOM = b"\xef\xbb\xbf"
TEMP_SUFFIX = ".dscoder-tmp"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


@dataclass(frozen=True)
class TextFile:
    path: Path
    text: str  # content with newlines normalised to "\n", BOM removed
    newline: str  # "\n" or "\r\n": the dominant style; "\n" for a file without newlines
    bom: bool  # had a UTF-8 BOM
    final_newline: bool  # False only when the last line lacks a newline (an empty file: True)
    mode: int  # permission bits (stat.S_IMODE of st_mode)
    stamp: tuple  # (st_mtime_ns, size, sha256 hex) of the bytes read
    # The decoded lines with their own endings, so lines an edit does not touch keep their exact
    # bytes even in a file that mixes "\n" and "\r\n". Empty: derive from text and newline.
    raw_lines: tuple[str, ...] = field(default=(), repr=False, compare=False)


def looks_binary(data: bytes) -> bool:
    """True for content that is not text: NUL bytes never occur in UTF-8 source code."""
    return b"\x00" in data


def read_text_file(path: Path) -> TextFile:
    """Read a UTF-8 text file; UsageError (one sentence naming the file) when it cannot be edited."""
    path = Path(path)
    data, st = _read_bytes(path)
    bom = data.startswith(BOM)
    decoded = _decode(path, data[len(BOM):] if bom else data)
    text = decoded.replace("\r\n", "\n")
    return TextFile(
        path=path,
        text=text,
        newline=_dominant_newline(decoded),
        bom=bom,
        final_newline=text == "" or text.endswith("\n"),
        mode=stat.S_IMODE(st.st_mode),
        stamp=_stamp(st, data),
        raw_lines=tuple(split_keepends(decoded)),
    )


def _read_bytes(path: Path) -> tuple[bytes, os.stat_result]:
    try:
        # stat first: opening a FIFO or a device would block or read forever.
        if not stat.S_ISREG(os.stat(path).st_mode):
            kind = "a directory" if path.is_dir() else "not a regular file"
            raise UsageError(f"{path} is {kind}; give the path of a text file.")
        with open(path, "rb") as f:
            data = f.read()
            return data, os.fstat(f.fileno())
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist; check the path.") from None
    except PermissionError:
        raise UsageError(f"cannot read {path}: permission denied; check its permissions.") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a directory; give the path of a text file.") from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}.") from None


_BINARY_FILE = "looks like a binary file (it contains NUL bytes); give a text file"
_BINARY_PIPE = "looks like binary data (it contains NUL bytes); pipe text instead"


def _decode(path: Path | str, data: bytes, binary: str = _BINARY_FILE) -> str:
    if data.startswith(_UTF16_BOMS):
        raise UsageError(f"{path} is UTF-16 text; convert it to UTF-8 (iconv -f UTF-16 -t UTF-8).")
    if looks_binary(data):
        raise UsageError(f"{path} {binary}.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(
            f"{path} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "convert it to UTF-8 first (e.g. iconv -f LATIN1 -t UTF-8)."
        ) from None


PIPED = "The piped input"


def read_stdin_text(stream: TextIO) -> str:
    """All of piped stdin as text, by the same rules as a file: UTF-8, no NUL bytes, else a
    UsageError. The bytes are decoded here, not by Python's stdin, whose errors depend on the
    locale (under LC_ALL=C it uses surrogateescape and lets any byte through)."""
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:
        data = buffer.read()
    else:  # a text stream without bytes (tests): re-encode what it decoded
        try:
            data = stream.read().encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            data = b"\xff"  # a lone surrogate: it did not come from UTF-8
    text = _decode(PIPED, data, binary=_BINARY_PIPE)
    return text.removeprefix("\ufeff")


def _dominant_newline(decoded: str) -> str:
    crlf = decoded.count("\r\n")
    lf = decoded.count("\n") - crlf
    return "\r\n" if crlf > lf else "\n"


def _stamp(st: os.stat_result, data: bytes) -> tuple:
    return (st.st_mtime_ns, len(data), hashlib.sha256(data).hexdigest())


def split_keepends(text: str) -> list[str]:
    """Lines split on "\\n" only, each keeping its ending (str.splitlines also splits on \\f, \\x1c...)."""
    parts = text.split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    return lines + [parts[-1]] if parts[-1] else lines


def split_at_line(text: str, line: int, name: str | Path | None = None) -> tuple[str, str]:
    """(prefix, suffix) for a hole before 1-based `line`; line n+1 appends after the last line.

    Appending to text without a final newline puts one on the prefix, so the hole starts a line.
    """
    lines = split_keepends(text)
    n = len(lines)
    if not 1 <= line <= n + 1:
        what = name if name is not None else "the file"
        count = "1 line" if n == 1 else f"{n} lines"
        raise UsageError(f"line {line} is out of range: {what} has {count} (use 1..{n + 1}).")
    prefix, suffix = "".join(lines[: line - 1]), "".join(lines[line - 1 :])
    if line == n + 1 and prefix and not prefix.endswith("\n"):
        prefix += "\n"
    return prefix, suffix


def _final_text(original: TextFile, new_text: str) -> str:
    """The text that will be on disk (in "\\n" form): keeps a missing final newline missing."""
    text = new_text.replace("\r\n", "\n")
    if not original.final_newline and text.endswith("\n"):
        text = text[:-1]
    return text


def _encode(original: TextFile, text: str) -> bytes:
    """Bytes for `text` in the original's style; untouched leading/trailing lines keep their bytes."""
    norm_old = split_keepends(original.text)
    old = list(original.raw_lines) or [_restyle(ln, original.newline) for ln in norm_old]
    new = split_keepends(text)
    p = 0
    while p < min(len(old), len(new)) and norm_old[p] == new[p]:
        p += 1
    s = 0
    while s < min(len(old), len(new)) - p and norm_old[-1 - s] == new[-1 - s]:
        s += 1
    middle = [_restyle(ln, original.newline) for ln in new[p : len(new) - s]]
    body = "".join(old[:p] + middle + old[len(old) - s :])
    return (BOM if original.bom else b"") + body.encode("utf-8")


def _restyle(line: str, newline: str) -> str:
    return line[:-1] + newline if line.endswith("\n") else line


def unified_diff(original: TextFile, new_text: str) -> str:
    """Plain unified diff of what write_atomic would change; "" if nothing.

    The labels are a/FILE and b/FILE with FILE as the user gave it; an absolute path loses its
    leading slash, as in git (`git diff --no-index /tmp/x.py ...` shows a/tmp/x.py)."""
    name = original.path.as_posix().lstrip("/")
    old_text, new_text = original.text, _final_text(original, new_text)
    # difflib over a whole 50 MB file takes seconds and gigabytes; an edit changes one stretch,
    # so only that stretch and the lines around it are split and compared (the common start and
    # end are found by comparing slices, at memcmp speed), and the hunk headers shifted back.
    # The margin is wide so that difflib places a change in a run of equal lines (blank lines)
    # as it would over the whole file, with full context on both sides.
    head = _common_head_lines(old_text, new_text)
    tail = _common_tail_lines(old_text[head:], new_text[head:])
    lo = _back_lines(old_text, head, _MARGIN)
    old_mid = split_keepends(old_text[lo:_forward_lines(old_text, len(old_text) - tail, _MARGIN)])
    new_mid = split_keepends(new_text[lo:_forward_lines(new_text, len(new_text) - tail, _MARGIN)])
    shift = old_text.count("\n", 0, lo)
    out = difflib.unified_diff(old_mid, new_mid, f"a/{name}", f"b/{name}", n=_CONTEXT)
    out = (_shift_hunk(ln, shift) if ln.startswith("@@") else ln for ln in out)
    # difflib leaves a line without "\n" glued to the next one; mark it as diff/patch expect.
    return "".join(ln if ln.endswith("\n") else ln + "\n\\ No newline at end of file\n" for ln in out)


_CONTEXT = 3  # unchanged lines shown around a change, as in diff -u and git
_MARGIN = 1000  # unchanged lines given to difflib on each side of the changed stretch
_HUNK = re.compile(r"@@ -(\d+)((?:,\d+)?) \+(\d+)((?:,\d+)?) @@")


def _common_head_lines(a: str, b: str) -> int:
    """Length of the longest common start of a and b that ends at a line boundary."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # the longest k with a[:k] == b[:k]
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    if lo == len(a) == len(b):
        return lo
    return a.rfind("\n", 0, lo) + 1  # back to the start of the line that differs


def _common_tail_lines(a: str, b: str) -> int:
    """Length of the longest common end of a and b made of whole lines (each ending in \\n)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[len(a) - mid:] == b[len(b) - mid:]:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        return 0
    # The common end must start a line in both texts; if not, move on to the next line start
    # inside it (the same distance in both, and then both are after a "\n").
    start, start_b = len(a) - lo, len(b) - lo
    if (start > 0 and a[start - 1] != "\n") or (start_b > 0 and b[start_b - 1] != "\n"):
        nl = a.find("\n", start)
        start = len(a) if nl < 0 else nl + 1
    return len(a) - start


def _back_lines(text: str, pos: int, n: int) -> int:
    """The start of the line n lines before the one starting at pos (0 at the top)."""
    for _ in range(n):
        if pos == 0:
            break
        pos = text.rfind("\n", 0, pos - 1) + 1
    return pos


def _forward_lines(text: str, pos: int, n: int) -> int:
    """The end of the n lines that start at pos (the text's end if fewer)."""
    for _ in range(n):
        if pos >= len(text):
            break
        nl = text.find("\n", pos)
        pos = len(text) if nl < 0 else nl + 1
    return pos


def _shift_hunk(line: str, offset: int) -> str:
    if not offset:
        return line
    return _HUNK.sub(lambda m: f"@@ -{int(m[1]) + offset}{m[2]} +{int(m[3]) + offset}{m[4]} @@",
                     line, count=1)


def _real(path: Path) -> Path:
    """Write through symlinks: renaming over the link itself would replace it with a plain file."""
    return Path(os.path.realpath(path))


def check_writable(path: Path) -> None:
    """UsageError now, before minutes of generation, if the file or its folder cannot be written."""
    path = Path(path)
    target = _real(path)
    if target.exists() and not os.access(target, os.W_OK):
        raise UsageError(f"{path} is read-only; make it writable (chmod u+w {shlex.quote(str(path))}).")
    folder = target.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(
            f"cannot write in the folder {folder} (the edit goes to a temporary file there, "
            f"renamed over {path.name}); make the folder writable."
        )


def backup_path(path: Path) -> Path:
    """Where --backup keeps the original: FILE~ beside the file (the real file, for a symlink)."""
    target = _real(Path(path))
    return target.with_name(target.name + "~")


def check_backup(path: Path) -> None:
    """UsageError now, before generation, if FILE~ cannot become the backup."""
    backup = backup_path(path)
    # (its folder is the file's own, which check_writable has checked)
    if backup.is_dir() or (backup.exists() and not backup.is_file()):
        raise UsageError(f"the backup path {backup} is a folder or not a regular file; "
                         "move it away, or leave out --backup.")


def write_atomic(original: TextFile, new_text: str, *, backup: bool = False) -> None:
    """Replace the file with new_text ("\\n" newlines) in the original's newline style, BOM and mode.

    FileChanged (nothing written) if the bytes on disk are no longer those read; UsageError if the
    file or folder is not writable. On any exception, Ctrl-C and SIGTERM included, the original is
    untouched and no temporary file is left behind (a SIGKILL's is removed by the next write).
    backup=True first saves the old bytes, exactly, as FILE~, with the file's mode and owner.
    A file with other hard links is rewritten in place (see `_write_in_place`), so that all its
    names keep sharing the new text, as vim and emacs do.
    """
    check_writable(original.path)
    target = _real(original.path)
    data = _encode(original, _final_text(original, new_text))
    remove_stale_temps(target)
    try:
        if hard_links(target) > 1:
            _write_in_place(original, target, data, backup)
            return
        tmp = _write_temp(target, data, original.mode)
        try:
            old = _ensure_unchanged(original, target)
            if backup:
                _write_backup(target, old, original.mode)
            # The point of no return: an interrupt that was swallowed somewhere (signals.check)
            # or that arrives now stops us before the rename, never after it.
            with signals.deferred(deliver=False):
                signals.check()
                os.replace(tmp, target)
        except BaseException:
            _remove_quietly(tmp)
            raise
    except PermissionError as e:
        raise UsageError(f"cannot write {original.path}: permission denied; nothing was changed.") from e
    except OSError as e:
        raise DscoderError(f"cannot write {original.path}: {e.strerror or e}; nothing was changed.") from e
    _fsync_dir(target.parent)


def hard_links(target: Path) -> int:
    """How many names the file has (1 for a file that is not hard-linked, or cannot be read)."""
    try:
        return os.stat(target).st_nlink
    except OSError:
        return 1


def _write_in_place(original: TextFile, target: Path, data: bytes, backup: bool) -> None:
    """Overwrite the file's own inode: a rename would give this name a new inode and silently
    stop the other hard links from sharing the edit. Not atomic against a crash or SIGKILL, so
    the write itself runs with Ctrl-C and SIGTERM held back, after every check has passed."""
    old = _ensure_unchanged(original, target)
    if backup:
        _write_backup(target, old, original.mode)
    with signals.deferred(deliver=False):
        signals.check()
        with open(target, "r+b") as f:
            f.write(data)
            f.truncate()
            f.flush()
            os.fsync(f.fileno())


def _temp_name_re(name: str) -> re.Pattern[str]:
    # .NAME.PID.XXXXXXXX.dscoder-tmp: mkstemp's 8 random characters never include a dot
    return re.compile(rf"\.{re.escape(name)}\.(\d+)\.[A-Za-z0-9_]{{8}}{re.escape(TEMP_SUFFIX)}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, and is someone else's
        pass
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temporary files of FILE (and of its backup FILE~) left by a writer that died
    between writing and renaming them (SIGKILL, a crash, a power cut); their names carry the
    writer's pid, so those of a writer still running are kept. Returns what was removed."""
    target = _real(Path(path))
    removed: list[Path] = []
    for name in (target.name, target.name + "~"):
        pattern = _temp_name_re(name)
        try:
            candidates = list(target.parent.glob(f".{_glob_escape(name)}.*{TEMP_SUFFIX}"))
        except OSError:
            continue
        for p in candidates:
            m = pattern.fullmatch(p.name)
            if m and not _alive(int(m.group(1))):
                try:
                    os.unlink(p)
                    removed.append(p)
                except OSError:
                    pass
    return removed


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _write_temp(target: Path, data: bytes, mode: int, owner_of: Path | None = None) -> Path:
    """A fsynced temporary copy of `data` next to `target`, with its mode and (if we can) the
    owner of `owner_of` (default: `target`). The name carries our pid, for remove_stale_temps."""
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=TEMP_SUFFIX,
                                dir=target.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)  # mkstemp makes 0600; fchmod ignores the umask
            _copy_owner(f.fileno(), owner_of or target)
            os.fsync(f.fileno())
    except BaseException:
        _remove_quietly(tmp)
        raise
    return tmp


def _copy_owner(fd: int, target: Path) -> None:
    # Only root can give a file away; for anyone else the new file is theirs, as with any editor.
    try:
        st = os.stat(target)
        if (st.st_uid, st.st_gid) != (os.getuid(), os.getgid()):
            os.fchown(fd, st.st_uid, st.st_gid)
    except OSError:
        pass


def _ensure_unchanged(original: TextFile, target: Path) -> bytes:
    """The bytes on disk, if they are still those read; else FileChanged.

    Compares size and sha256, not mtime: a `touch` or an editor re-saving identical bytes changes
    nothing we would overwrite, while any content change, however quick, changes the hash.
    """
    try:
        data = target.read_bytes()
    except FileNotFoundError:
        raise FileChanged(f"{original.path} was moved or deleted since it was read; nothing was written.") from None
    if (len(data), hashlib.sha256(data).hexdigest()) != tuple(original.stamp[1:3]):
        raise FileChanged(
            f"{original.path} changed on disk since it was read; nothing was written, run the command again."
        )
    return data


def _write_backup(target: Path, data: bytes, mode: int) -> None:
    backup = backup_path(target)
    try:
        tmp = _write_temp(backup, data, mode, owner_of=target)
        try:
            os.replace(tmp, backup)
        except BaseException:
            _remove_quietly(tmp)
            raise
    except OSError as e:  # name the backup, not the file: the file itself is fine
        err = UsageError if isinstance(e, PermissionError) else DscoderError
        raise err(f"cannot write the backup {backup}: {e.strerror or e}; nothing was changed.") from e


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable; some filesystems cannot fsync a folder, which is fine."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
