"""`dscoder insert` through the CLI: every outcome asserts the file's bytes afterwards."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cli_helpers import SRC, invoke, isolated  # noqa: E402,F401  (isolated: an autouse fixture)


def test_in_place_edit_with_diff_on_stderr(fake, src):
    r = invoke(["insert", str(src), "--line", "2"])
    assert r.code == 0 and r.stdout == ""
    assert src.read_bytes() == b"def add(a, b):\n    return a + b\n    pass\n\nprint(add(1, 2))\n"
    assert "+    return a + b" in r.stderr and "\x1b" not in r.stderr


def test_dry_run_writes_nothing(fake, src):
    r = invoke(["insert", str(src), "--line", "2", "--dry-run"])
    assert r.code == 0 and "+    return a + b" in r.stderr
    assert src.read_bytes() == SRC


def test_print_writes_only_the_insertion(fake, src):
    r = invoke(["insert", str(src), "-l", "2", "--print"])
    assert (r.code, r.stdout) == (0, "    return a + b\n")
    assert src.read_bytes() == SRC


def test_backup_keeps_the_original(fake, src):
    assert invoke(["insert", str(src), "-l", "2", "--backup"]).code == 0
    assert Path(str(src) + "~").read_bytes() == SRC


def test_crlf_and_bom_are_kept(fake, tmp_path):
    p = tmp_path / "win.py"
    p.write_bytes(b"\xef\xbb\xbfdef add(a, b):\r\n    pass\r\n")
    assert invoke(["insert", str(p), "-l", "2"]).code == 0
    assert p.read_bytes() == b"\xef\xbb\xbfdef add(a, b):\r\n    return a + b\r\n    pass\r\n"
    # the model saw plain "\n" text, without the BOM
    assert "def add(a, b):\n<｜fim▁hole｜>    pass\n" in fake.engine.prompt_text()


def test_append_after_last_line(fake, tmp_path):
    p = tmp_path / "a.py"
    p.write_bytes(b"x = 1")
    fake.engine.reply = "y = 2\n"
    assert invoke(["insert", str(p), "-l", "2"]).code == 0
    assert p.read_bytes() == b"x = 1\ny = 2"


@pytest.mark.parametrize("make, line, words", [
    (lambda d: d / "missing.py", 1, "missing.py"),
    (lambda d: d, 1, str),
    (lambda d: (d / "bin.dat").write_bytes(b"\x00\x01\x02abc") and d / "bin.dat", 1, "bin"),
    (lambda d: (d / "latin.py").write_bytes(b"caf\xe9\n") and d / "latin.py", 1, "UTF-8"),
    (lambda d: (d / "short.py").write_bytes(b"a\nb\n") and d / "short.py", 9, "out of range"),
])
def test_bad_input_is_exit_2_and_untouched(fake, tmp_path, make, line, words):
    target = make(tmp_path)
    before = target.read_bytes() if target.is_file() else None
    r = invoke(["insert", str(target), "--line", str(line)])
    assert r.code == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: ")
    if isinstance(words, str):
        assert words in r.stderr
    assert fake.loads == 0  # checked before loading the model
    if before is not None:
        assert target.read_bytes() == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write read-only files")
def test_read_only_file_is_exit_2_before_loading(fake, src):
    src.chmod(0o444)
    r = invoke(["insert", str(src), "-l", "2"])
    assert r.code == 2 and fake.loads == 0 and src.read_bytes() == SRC


def test_file_changed_during_generation_writes_nothing(fake, src):
    changed = SRC + b"# edited meanwhile\n"
    fake.engine.on_generate = lambda: src.write_bytes(changed)
    r = invoke(["insert", str(src), "-l", "2"])
    assert r.code == 1 and "changed" in r.stderr
    assert src.read_bytes() == changed


def test_ctrl_c_writes_nothing(fake, src):
    fake.engine.interrupt_after = 2
    r = invoke(["insert", str(src), "-l", "2"])
    assert r.code == 130 and src.read_bytes() == SRC
    assert not [p for p in src.parent.iterdir() if p.name != src.name]


def test_nothing_useful_is_exit_1_and_untouched(fake, src):
    fake.engine.reply = "   \n"
    r = invoke(["insert", str(src), "-l", "2"])
    assert r.code == 1 and "unchanged" in r.stderr and src.read_bytes() == SRC


def test_dry_run_and_print_together_is_usage_error(fake, src):
    assert invoke(["insert", str(src), "-l", "2", "--dry-run", "--print"]).code == 2
