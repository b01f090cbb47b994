"""Every engine a GPU test loads is closed when the test ends, passed or failed.

An engine left open keeps its background compile running into the next tests, and that
compile's GPU work (it synchronizes the device while benchmarking kernels; a test's own random
tensors use the generator a capture has registered) broke captures and random draws in tests
that had nothing to do with it. Closing waits for the compile and frees the engine's memory,
so each test starts from a quiet GPU, and a --gpu-memory cap never meets another test's
leftovers."""
from __future__ import annotations

import gc

import pytest
import torch


@pytest.fixture(autouse=True)
def close_engines(monkeypatch):
    from dscoder import engine, loader

    opened = []
    load = loader.load_engine

    def tracked(*args, **kwargs):
        opened.append(load(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(loader, "load_engine", tracked)
    monkeypatch.setattr(engine, "load_engine", tracked)
    yield
    for e in opened:
        e.close()
    opened.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
