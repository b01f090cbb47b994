"""Running the real CLI entry point in process (typer's CliRunner isolation) with a fake model."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from dscoder.cli.app import run  # noqa: E402


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


def invoke(args: list[str], *, input: str | None = "", env: dict | None = None) -> Result:
    """`dscoder ARGS` with stdin from `input` (not a tty), stdout and stderr captured."""
    runner = CliRunner()
    with runner.isolation(input=input, env=env) as (out, err, _mixed):
        code = run(list(args))
        sys.stdout.flush()
        sys.stderr.flush()
        stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
    return Result(int(code), stdout, stderr)


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No user config, history or colour leaks into a test (import it into a test module)."""
    for name in list(os.environ):
        if name.startswith("DSCODER_") or name == "NO_COLOR":
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


# The file the insert tests edit (conftest.py's `src` fixture writes it; `fake` fills its gap).
SRC = b"def add(a, b):\n    pass\n\nprint(add(1, 2))\n"

