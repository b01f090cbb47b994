"""Shared fixtures: the real tokenizer files, tiny random checkpoints in the real layout."""
from __future__ import annotations

from pathlib import Path

import pytest

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "deepseek-coder-v2-lite"


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A directory with the real Coder-V2 tokenizer.json and tokenizer_config.json."""
    from dscoder.tokenizer_files import write_tokenizer_files

    d = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer_files(d)
    return d
