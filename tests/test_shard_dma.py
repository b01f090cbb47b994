"""The shard reader's DMA path (dscoder.shard_reader._ShardDMA) without a GPU: its shard-by-shard
order, what it hands back to the staged reads after a refusal, and that no shard stays
page-locked after an error. CUDA is replaced by fakes here; the real registrations and copies
are tested on a GPU (tests/gpu/test_startup_gpu.py)."""
from __future__ import annotations

import contextlib

import pytest
import torch
from safetensors.torch import save_file

import dscoder.shard_reader as reader


class FakeRegistered:
    """_Registered's life cycle, recorded: registration, queued copies (done at once on the
    CPU), close."""

    log: list[tuple[str, str]] = []
    refuse: set[str] = set()
    fail_copy: set[str] = set()

    def __init__(self, path, ordinal):
        assert ordinal == 0
        if path.name in self.refuse:
            raise OSError("refused")
        self.path = path
        self.nbytes = 0
        self.log.append(("register", path.name))

    def copy(self, jobs, stream):
        if self.path.name in self.fail_copy:
            raise RuntimeError("a copy failed")
        for entry, dst in jobs:
            with open(entry.path, "rb") as f:
                f.seek(entry.begin)
                reader._bytes(dst).copy_(torch.frombuffer(bytearray(f.read(entry.nbytes)), dtype=torch.uint8))
            self.nbytes += entry.nbytes
        self.log.append(("copy", self.path.name))

    def close(self):
        self.log.append(("close", self.path.name))
        return self.nbytes


@pytest.fixture
def shards(tmp_path, monkeypatch):
    """Three shards of two tensors each, with the DMA path taking every CPU destination."""
    tensors = {}
    for i in range(3):
        part = {f"s{i}.a": torch.randn(50, 8), f"s{i}.b": torch.randn(13)}
        save_file(part, tmp_path / f"s{i}.safetensors")
        tensors.update(part)
    entries = {}
    for i in range(3):
        entries.update(reader.read_header(tmp_path / f"s{i}.safetensors"))
    monkeypatch.setattr(reader, "_Registered", FakeRegistered)
    monkeypatch.setattr(reader._ShardDMA, "refused", False)
    monkeypatch.setattr(reader._ShardDMA, "takes", staticmethod(lambda entry, dst: not reader._ShardDMA.refused))
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    FakeRegistered.log, FakeRegistered.refuse, FakeRegistered.fail_copy = [], set(), set()
    return tensors, entries


def jobs(tensors, entries):
    dst = {k: torch.empty_like(v) for k, v in tensors.items()}
    return dst, [(entries[k], dst[k]) for k in sorted(tensors)]


def test_each_shard_registers_while_the_last_one_copies_then_closes(shards):
    tensors, entries = shards
    dst, batch = jobs(tensors, entries)
    progress = []
    reader.read_parallel(batch, progress=lambda done, total: progress.append((done, total)))
    assert all(torch.equal(dst[k], tensors[k]) for k in tensors)
    log = FakeRegistered.log
    names = [f"s{i}.safetensors" for i in range(3)]
    assert sorted(log) == sorted((what, name) for what in ("register", "copy", "close") for name in names)
    for name in names:  # each shard's life in order (closes run on another thread)
        assert log.index(("register", name)) < log.index(("copy", name)) < log.index(("close", name))
    # s2 is locked once s0 is unlocked: never more than two locked at once
    assert log.index(("close", names[0])) < log.index(("register", names[2]))
    total = sum(e.nbytes for e, _ in batch)
    assert progress[-1] == (total, total)


def test_a_refused_shard_and_those_after_it_go_to_the_staged_reads(shards):
    tensors, entries = shards
    FakeRegistered.refuse = {"s1.safetensors"}
    dst, batch = jobs(tensors, entries)
    reader.read_parallel(batch)
    assert all(torch.equal(dst[k], tensors[k]) for k in tensors)  # s1 and s2 read staged
    assert [name for what, name in FakeRegistered.log if what == "register"] == ["s0.safetensors"]
    assert ("close", "s0.safetensors") in FakeRegistered.log
    assert reader._ShardDMA.refused


def test_after_a_failed_copy_no_shard_stays_page_locked(shards):
    tensors, entries = shards
    FakeRegistered.fail_copy = {"s1.safetensors"}
    _, batch = jobs(tensors, entries)
    with pytest.raises(RuntimeError, match="a copy failed"):
        reader.read_parallel(batch)
    registered = [name for what, name in FakeRegistered.log if what == "register"]
    closed = [name for what, name in FakeRegistered.log if what == "close"]
    assert registered == ["s0.safetensors", "s1.safetensors"] and sorted(closed) == registered


def test_a_header_is_parsed_once_per_version_of_its_file(tmp_path):
    path = tmp_path / "s.safetensors"
    save_file({"a": torch.randn(4, 4)}, path)
    first = reader.read_header(path)
    before = reader._parsed_header.cache_info()
    second = reader.read_header(path)
    assert second == first and reader._parsed_header.cache_info().hits == before.hits + 1
    second.clear()  # a caller's copy: the cache keeps its own
    assert reader.read_header(path) == first
    save_file({"a": torch.randn(4, 4), "b": torch.randn(2)}, path)  # a new version
    assert set(reader.read_header(path)) == {"a", "b"}
