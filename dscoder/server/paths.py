"""Where the user's own server lives: $XDG_RUNTIME_DIR/dscoder/server.sock (a private folder in
/tmp when there is no runtime dir), beside server.json (its pid and model). Standard library only."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and Path(base).is_dir():
        return Path(base) / "dscoder"
    return Path(tempfile.gettempdir()) / f"dscoder-{os.getuid()}"


def default_socket() -> Path:
    return runtime_dir() / "server.sock"


def info_path() -> Path:
    return runtime_dir() / "server.json"
