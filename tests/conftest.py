"""Shared fixtures: the real tokenizer files, tiny random checkpoints in the real layout."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A directory with the real Coder-V2 tokenizer.json and tokenizer_config.json."""
    from dscoder.tokenizer_files import write_tokenizer_files

    d = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer_files(d)
    return d


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random checkpoint with Lite's features in small shapes, in the hub layout (fp32)."""
    from dscoder.random_checkpoint import write_random_checkpoint

    # small shards, so that loading goes through the index across several files
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", seed=0,
                                   max_shard_bytes=16 << 20)


@pytest.fixture(scope="session")
def six_layer_checkpoint(tmp_path_factory) -> Path:
    """tiny with six layers, a dense one and five MoE layers, and 4 experts a token (rows of the
    routing buffers 16-byte aligned): layers and decode segments that are alike, as most of
    Lite's are (the kernel prebuild's dry run takes one of each kind)."""
    import copy

    from dscoder.random_checkpoint import TINY, write_random_checkpoint

    shape = copy.deepcopy(TINY)
    shape["num_hidden_layers"] = 6
    shape["num_experts_per_tok"] = 4
    return write_random_checkpoint(tmp_path_factory.mktemp("six"), shape, seed=1)


@pytest.fixture(scope="session")
def tiny236_checkpoint(tmp_path_factory) -> Path:
    """The 236B model's features (q low-rank, group-limited routing, scaling 16) in small shapes."""
    from dscoder.random_checkpoint import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("tiny236"), "tiny-236b", seed=1)


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint):
    """An fp32 CPU engine on the tiny checkpoint, shared by tests that only generate."""
    from dscoder.engine import load_engine

    return load_engine(tiny_checkpoint, device="cpu", dtype="float32")


@pytest.fixture
def fake(monkeypatch):
    """The fake model of tests/fakes.py in place of the real one, filling add.py's gap."""
    from fakes import FakeBackend

    from dscoder.cli import backend

    fb = FakeBackend(reply="    return a + b\n")
    monkeypatch.setattr(backend, "BACKEND", fb)
    return fb


@pytest.fixture
def src(tmp_path) -> Path:
    """add.py with a gap at line 2 (cli_helpers.SRC)."""
    from cli_helpers import SRC

    p = tmp_path / "add.py"
    p.write_bytes(SRC)
    return p


@pytest.fixture
def files(tmp_path):
    """Three checkpoint shards of different sizes (a file's size names it in the fake driver's log)."""
    paths = []
    for i, size in enumerate((1000, 2000, 3000)):
        path = tmp_path / f"model-0000{i + 1}.safetensors"
        path.write_bytes(bytes((i * 7 + k) % 251 for k in range(size)))
        paths.append(path)
    return paths


@pytest.fixture
def fake_driver(monkeypatch):
    """dscoder.page_lock on a faked CUDA driver (tests/fake_cuda.py); nothing stays locked after."""
    from fake_cuda import FakeCuda

    from dscoder import page_lock

    fake = FakeCuda()
    monkeypatch.setattr(page_lock.Driver, "_instance", page_lock.Driver(fake))
    yield fake
    page_lock.release_early()
    page_lock.unlock_deferred()
