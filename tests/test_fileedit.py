"""fileedit: byte-exact round trips, atomic writes, and refusals that leave the file untouched."""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest
from privileges import unprivileged

from dscoder import fileedit
from dscoder.errors import DscoderError, ExitCode, FileChanged, UsageError
from dscoder.fileedit import (
    check_writable,
    read_text_file,
    split_at_line,
    unified_diff,
    write_atomic,
)


def make(tmp_path: Path, data: bytes, name: str = "f.py") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def insert(path: Path, line: int, block: str, **kw) -> None:
    """What `dscoder insert` does: read, split, splice, write."""
    tf = read_text_file(path)
    prefix, suffix = split_at_line(tf.text, line, path)
    write_atomic(tf, prefix + block + suffix, **kw)


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# --- round trips -------------------------------------------------------------------------------


def test_lf_insert(tmp_path: Path) -> None:
    p = make(tmp_path, b"a\nb\nc\n")
    insert(p, 2, "X\nY\n")
    assert p.read_bytes() == b"a\nX\nY\nb\nc\n"
    assert listing(tmp_path) == ["f.py"]


def test_crlf_insert_gets_crlf(tmp_path: Path) -> None:
    p = make(tmp_path, b"a\r\nb\r\nc\r\n")
    tf = read_text_file(p)
    assert tf.text == "a\nb\nc\n" and tf.newline == "\r\n"
    insert(p, 3, "X\nY\n")
    assert p.read_bytes() == b"a\r\nb\r\nX\r\nY\r\nc\r\n"


def test_bom_kept(tmp_path: Path) -> None:
    p = make(tmp_path, b"\xef\xbb\xbfa\r\nb\r\n")
    tf = read_text_file(p)
    assert tf.bom and tf.text == "a\nb\n"
    insert(p, 1, "X\n")
    assert p.read_bytes() == b"\xef\xbb\xbfX\r\na\r\nb\r\n"


def test_unchanged_text_writes_identical_bytes(tmp_path: Path) -> None:
    data = "\ufeffé\r\nb\r\n".encode()
    p = make(tmp_path, data)
    tf = read_text_file(p)
    write_atomic(tf, tf.text)
    assert p.read_bytes() == data


def test_mixed_endings_keep_untouched_lines_exact(tmp_path: Path) -> None:
    p = make(tmp_path, b"a\r\nb\nc\r\nd\r\n")
    assert read_text_file(p).newline == "\r\n"
    insert(p, 3, "X\n")
    assert p.read_bytes() == b"a\r\nb\nX\r\nc\r\nd\r\n"


def test_mode_preserved(tmp_path: Path) -> None:
    p = make(tmp_path, b"#!/bin/sh\necho hi\n", "run.sh")
    os.chmod(p, 0o755)
    insert(p, 2, "set -e\n")
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o755
    assert p.read_bytes() == b"#!/bin/sh\nset -e\necho hi\n"


def test_no_final_newline_middle(tmp_path: Path) -> None:
    p = make(tmp_path, b"a\nb")
    tf = read_text_file(p)
    assert not tf.final_newline
    insert(p, 2, "X\n")
    assert p.read_bytes() == b"a\nX\nb"


def test_no_final_newline_append_keeps_style(tmp_path: Path) -> None:
    p = make(tmp_path, b"a\r\nb")
    insert(p, 3, "X\n")
    assert p.read_bytes() == b"a\r\nb\r\nX"


def test_append_at_n_plus_1(tmp_path: Path) -> None:
    p = make(tmp_path, b"a\nb\n")
    insert(p, 3, "c\n")
    assert p.read_bytes() == b"a\nb\nc\n"


def test_empty_file(tmp_path: Path) -> None:
    p = make(tmp_path, b"")
    tf = read_text_file(p)
    assert tf.newline == "\n" and tf.final_newline
    insert(p, 1, "x = 1\n")
    assert p.read_bytes() == b"x = 1\n"


def test_symlink_target_is_edited_link_kept(tmp_path: Path) -> None:
    real = make(tmp_path, b"a\n", "real.py")
    link = tmp_path / "link.py"
    link.symlink_to(real)
    insert(link, 2, "b\n")
    assert link.is_symlink() and real.read_bytes() == b"a\nb\n"


def test_backup_keeps_old_bytes(tmp_path: Path) -> None:
    data = b"\xef\xbb\xbfa\r\nb"
    p = make(tmp_path, data)
    insert(p, 2, "X\n", backup=True)
    assert (tmp_path / "f.py~").read_bytes() == data
    assert p.read_bytes() == b"\xef\xbb\xbfa\r\nX\r\nb"
    assert listing(tmp_path) == ["f.py", "f.py~"]


def test_backup_failure_names_the_backup(tmp_path: Path) -> None:
    p = make(tmp_path, b"a\n")
    (tmp_path / "f.py~").mkdir()
    with pytest.raises(DscoderError, match=r"cannot write the backup .*f\.py~"):
        insert(p, 2, "b\n", backup=True)
    assert p.read_bytes() == b"a\n" and listing(tmp_path) == ["f.py", "f.py~"]


# --- split_at_line ----------------------------------------------------------------------------


def test_split_at_line() -> None:
    assert split_at_line("a\nb\n", 1) == ("", "a\nb\n")
    assert split_at_line("a\nb\n", 2) == ("a\n", "b\n")
    assert split_at_line("a\nb\n", 3) == ("a\nb\n", "")
    assert split_at_line("a\nb", 3) == ("a\nb\n", "")  # the hole starts a line
    assert split_at_line("", 1) == ("", "")
    assert split_at_line("a\x0cb\n", 2) == ("a\x0cb\n", "")  # form feed is not a newline here


@pytest.mark.parametrize("line", [0, -1, 4])
def test_split_out_of_range(line: int) -> None:
    with pytest.raises(UsageError) as e:
        split_at_line("a\nb\n", line, "f.py")
    assert e.value.message == f"line {line} is out of range: f.py has 2 lines (use 1..3)."
    assert e.value.exit_code == ExitCode.USAGE


# --- bad input files -------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"nope\.py does not exist"):
        read_text_file(tmp_path / "nope.py")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is a directory"):
        read_text_file(tmp_path)


def test_fifo(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(UsageError, match="not a regular file"):
        read_text_file(tmp_path / "pipe")


def test_binary(tmp_path: Path) -> None:
    p = make(tmp_path, b"\x7fELF\x00\x01", "a.out")
    with pytest.raises(UsageError, match=r"a\.out looks like a binary file"):
        read_text_file(p)


def test_utf16(tmp_path: Path) -> None:
    p = make(tmp_path, "x = 1\n".encode("utf-16"))
    with pytest.raises(UsageError, match=r"f\.py is UTF-16"):
        read_text_file(p)


def test_latin1(tmp_path: Path) -> None:
    p = make(tmp_path, "café = 1\n".encode("latin-1"))
    with pytest.raises(UsageError) as e:
        read_text_file(p)
    assert "f.py is not valid UTF-8 (byte 0xe9 at offset 3)" in e.value.message
    assert e.value.message.endswith(".") and "\n" not in e.value.message


def test_helpers() -> None:
    assert fileedit.looks_binary(b"a\x00b") and not fileedit.looks_binary("é".encode())


# --- changed on disk / interrupted -------------------------------------------------------------------


def test_changed_on_disk_writes_nothing(tmp_path: Path) -> None:
    p = make(tmp_path, b"a\nb\n")
    tf = read_text_file(p)
    p.write_bytes(b"a\nb\nc\n")
    with pytest.raises(FileChanged) as e:
        write_atomic(tf, "a\nX\nb\n", backup=True)
    assert e.value.exit_code == ExitCode.RUNTIME and "f.py changed on disk" in e.value.message
    assert p.read_bytes() == b"a\nb\nc\n"
    assert listing(tmp_path) == ["f.py"]


def test_same_size_change_is_caught(tmp_path: Path) -> None:
    p = make(tmp_path, b"a\nb\n")
    tf = read_text_file(p)
    st = os.stat(p)
    p.write_bytes(b"a\nc\n")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only the hash knows
    with pytest.raises(FileChanged):
        write_atomic(tf, "X\n")
    assert p.read_bytes() == b"a\nc\n"


def test_deleted_since_read(tmp_path: Path) -> None:
    p = make(tmp_path, b"a\n")
    tf = read_text_file(p)
    p.unlink()
    with pytest.raises(FileChanged, match="moved or deleted"):
        write_atomic(tf, "X\n")
    assert listing(tmp_path) == []


@pytest.mark.parametrize("where", ["replace", "fsync", "fchmod"])
@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_interrupted_write_leaves_original(tmp_path: Path, monkeypatch, where: str, exc: type) -> None:
    data = b"a\r\nb\r\n"
    p = make(tmp_path, data)
    tf = read_text_file(p)

    def boom(*args, **kwargs):
        raise exc("boom")

    monkeypatch.setattr(fileedit.os, where, boom)
    with pytest.raises(exc):
        write_atomic(tf, "a\nX\nb\n", backup=True)
    monkeypatch.undo()
    assert p.read_bytes() == data
    assert all(not n.endswith(fileedit.TEMP_SUFFIX) for n in listing(tmp_path))
    assert "f.py" in listing(tmp_path)


def test_disk_full_is_a_runtime_error(tmp_path: Path, monkeypatch) -> None:
    p = make(tmp_path, b"a\n")
    tf = read_text_file(p)

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileedit.os, "fsync", full)
    with pytest.raises(DscoderError, match="No space left on device; nothing was changed") as e:
        write_atomic(tf, "X\n")
    assert e.value.exit_code == ExitCode.RUNTIME
    monkeypatch.undo()
    assert p.read_bytes() == b"a\n" and listing(tmp_path) == ["f.py"]


# --- permissions -----------------------------------------------------------------------------------
# Root ignores permission bits, so when the suite runs as root these cases run in a forked child
# that has dropped to the `nobody` user: the real check, not a mock. Off Unix-root they run inline.


@pytest.fixture
def shared_dir():
    """A folder that the unprivileged user can reach (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="dscoder-perm-"))
    os.chmod(d, 0o755)
    yield d
    os.chmod(d, 0o755)
    for n in os.listdir(d):
        os.unlink(d / n)
    os.rmdir(d)


def give_away(*paths: Path) -> None:
    if os.geteuid() == 0:
        for p in paths:
            os.chown(p, 65534, 65534)


def test_read_only_file(shared_dir: Path) -> None:
    p = make(shared_dir, b"a\n")
    give_away(shared_dir, p)
    os.chmod(p, 0o444)
    assert unprivileged(lambda: check_writable(p)).startswith("UsageError: ")
    assert "f.py is read-only" in unprivileged(lambda: check_writable(p))
    assert unprivileged(lambda: write_atomic(read_text_file(p), "X\n")).startswith("UsageError: ")
    assert p.read_bytes() == b"a\n" and listing(shared_dir) == ["f.py"]


def test_read_only_folder(shared_dir: Path) -> None:
    p = make(shared_dir, b"a\n")
    give_away(shared_dir, p)
    os.chmod(shared_dir, 0o555)
    assert "cannot write in the folder" in unprivileged(lambda: check_writable(p))
    assert unprivileged(lambda: write_atomic(read_text_file(p), "X\n")).startswith("UsageError: ")
    assert p.read_bytes() == b"a\n" and listing(shared_dir) == ["f.py"]


def test_unreadable_file(shared_dir: Path) -> None:
    p = make(shared_dir, b"a\n")
    give_away(shared_dir, p)
    os.chmod(p, 0o200)
    assert unprivileged(lambda: read_text_file(p)).startswith("UsageError: cannot read")


def test_writable_passes(shared_dir: Path) -> None:
    p = make(shared_dir, b"a\n")
    give_away(shared_dir, p)
    assert unprivileged(lambda: check_writable(p)) == ""
    assert unprivileged(lambda: write_atomic(read_text_file(p), "X\n")) == ""
    assert p.read_bytes() == b"X\n"
    assert os.stat(p).st_uid == (65534 if os.geteuid() == 0 else os.getuid())


def test_root_keeps_owner(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can give a file to another user")
    p = make(tmp_path, b"a\n")
    os.chown(p, 65534, 65534)
    insert(p, 2, "b\n")
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (65534, 65534)


# --- diff ---------------------------------------------------------------------------------------------


def test_unified_diff(tmp_path: Path) -> None:
    p = make(tmp_path, b"a\r\nb\r\n")
    tf = read_text_file(p)
    d = unified_diff(tf, "a\nX\nb\n")
    name = p.as_posix().lstrip("/")  # absolute: a/tmp/..., as git labels it
    assert d == f"--- a/{name}\n+++ b/{name}\n@@ -1,2 +1,3 @@\n a\n+X\n b\n"
    assert unified_diff(tf, tf.text) == ""


def test_unified_diff_labels_the_path_as_given(tmp_path: Path, monkeypatch) -> None:
    p = make(tmp_path, b"a\n")
    absolute = unified_diff(read_text_file(p), "a\nb\n").splitlines()[:2]
    assert absolute == [f"--- a{p.as_posix()}", f"+++ b{p.as_posix()}"]  # not a//tmp/...
    assert "//" not in absolute[0]
    monkeypatch.chdir(tmp_path)
    relative = unified_diff(read_text_file(Path(p.name)), "a\nb\n").splitlines()[:2]
    assert relative == [f"--- a/{p.name}", f"+++ b/{p.name}"]


def test_unified_diff_no_final_newline(tmp_path: Path) -> None:
    p = make(tmp_path, b"a\nb")
    d = unified_diff(read_text_file(p), "a\nb\nc\n")
    assert d.endswith("-b\n\\ No newline at end of file\n+b\n+c\n\\ No newline at end of file\n")
