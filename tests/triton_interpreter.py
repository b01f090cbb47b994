"""Running a test file's Triton cases on the CPU under Triton's interpreter.

TRITON_INTERPRET=1 must be set before triton is imported, so the cases run in a child process:
the test file run as a script, whose last line of output is a JSON object of results."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def run_under_interpreter(script: str) -> dict:
    """The JSON object `script` prints last when run with TRITON_INTERPRET=1 (skips the calling
    test where triton is not installed)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.splitlines()[-1])
