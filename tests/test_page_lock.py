"""Page-locking checkpoint files (dscoder.page_lock) with the CUDA driver faked: the files are
really mapped (libc), the registrations are recorded. The real driver is used on a GPU
(tests/gpu/test_startup_gpu.py)."""
from __future__ import annotations

import ctypes
import json
import threading

import pytest

from dscoder import page_lock, stage_helper
from dscoder.cli import backend
from dscoder.engines import INDEX, SINGLE, choose_engine, shard_files
from dscoder.settings import Settings


def registered(fake_driver) -> list[int]:
    return [size for what, size in fake_driver.log if what == "register"]


def test_early_locks_are_taken_once_each_with_the_file_s_bytes(fake_driver, files):
    page_lock.start_early(files, ordinal=1)
    for path in files:
        locked = page_lock.lock(path, 1)
        assert ctypes.string_at(locked.address, locked.size) == path.read_bytes()
        locked.close()
    assert registered(fake_driver) == [1000, 2000, 3000]  # in order, each once
    assert ("context", 1001) in fake_driver.log  # the device's primary context, made current
    assert fake_driver.registered == {}  # every one unlocked
    again = page_lock.lock(files[0], 1)  # taken already: locked anew
    assert registered(fake_driver) == [1000, 2000, 3000, 1000]
    again.close()


def test_a_file_past_the_memory_budget_is_left_to_the_reader(fake_driver, files, monkeypatch):
    monkeypatch.setattr(page_lock, "_memory_bytes", lambda: 2 * 3500)  # room for 1000 + 2000
    page_lock.start_early(files, ordinal=0)
    assert page_lock._EARLY.take(files[2]) is None  # not locked early: the reader locks it
    assert registered(fake_driver) == [1000, 2000]
    third = page_lock.lock(files[2], 0)
    assert registered(fake_driver) == [1000, 2000, 3000]
    third.close()


def test_release_unlocks_and_unmaps_what_was_not_taken(fake_driver, files):
    page_lock.start_early(files, ordinal=0)
    first = page_lock.lock(files[0], 0)
    page_lock._EARLY._ready[files[2]].wait()  # the thread has locked them all
    page_lock.release_early()
    assert sorted(fake_driver.registered.values()) == [1000]  # the one taken stays for its reader
    assert sorted(size for what, size in fake_driver.log if what == "unregister") == [2000, 3000]
    first.close()
    assert fake_driver.registered == {} and page_lock._EARLY is None


def test_a_release_while_locking_stops_the_thread_and_leaves_nothing_locked(fake_driver, files):
    fake_driver.gate.clear()  # the first registration waits
    page_lock.start_early(files, ordinal=0)
    early = page_lock._EARLY
    page_lock.release_early()
    fake_driver.gate.set()
    assert early.take(files[2]) is None  # the thread has finished
    assert fake_driver.registered == {}


def test_a_refused_file_stops_the_early_locks_and_the_reader_hears_why(fake_driver, files):
    fake_driver.refuse = {2000}
    page_lock.start_early(files, ordinal=0)
    page_lock.lock(files[0], 0).close()
    with pytest.raises(OSError, match="refused to page-lock"):
        page_lock.lock(files[1], 0)
    assert page_lock._EARLY.take(files[2]) is None  # not tried after the refusal
    assert registered(fake_driver) == [1000] and fake_driver.registered == {}


def test_without_a_driver_nothing_is_locked(monkeypatch, files):
    monkeypatch.setattr(page_lock.Driver, "_instance", None)
    monkeypatch.setattr(page_lock.Driver, "get", classmethod(lambda cls: None))
    page_lock.start_early(files, ordinal=0)
    assert page_lock._EARLY.take(files[0]) is None
    with pytest.raises(OSError, match="no CUDA driver"):
        page_lock.lock(files[0], 0)
    page_lock.release_early()


@pytest.fixture
def reader_copy(monkeypatch):
    """The shard reader's copies out of one shard (dscoder.shard_reader._Registered) with CUDA's
    events faked: copy(path, spans) -> (the shard, the bytes each (begin, size) span got)."""
    import torch

    import dscoder.shard_reader as reader

    class Event:
        def record(self, stream):
            pass

        def synchronize(self):
            pass

    monkeypatch.setattr(torch.cuda, "Event", Event)

    def copy(path, spans):
        entries = [reader.ShardEntry(path, torch.uint8, (n,), begin, begin + n) for begin, n in spans]
        dst = [torch.zeros(e.nbytes, dtype=torch.uint8) for e in entries]
        shard = reader._Registered(path, 0)
        shard.copy(list(zip(entries, dst, strict=True)), type("Stream", (), {"cuda_stream": 7})())
        return shard, b"".join(bytes(d.numpy()) for d in dst)

    return copy


def test_the_reader_copies_each_tensor_from_the_locked_mapping(fake_driver, files, reader_copy):
    page_lock.start_early(files, ordinal=0)
    shard, copied = reader_copy(files[1], ((0, 700), (700, 1), (701, 1299)))
    assert copied == files[1].read_bytes()
    assert shard.close() == 2000
    # locked early: unlocked after the first reply, not while the load's copies run
    assert ("unregister", 2000) not in fake_driver.log
    page_lock.unlock_deferred()
    assert ("unregister", 2000) in fake_driver.log


def test_shard_files_come_in_the_loader_s_order(tmp_path):
    index = {"weight_map": {"a": "model-00002-of-00002.safetensors",
                            "b": "model-00001-of-00002.safetensors",
                            "c": "model-00002-of-00002.safetensors"}}
    (tmp_path / INDEX).write_text(json.dumps(index))
    assert shard_files(tmp_path) == [tmp_path / "model-00001-of-00002.safetensors",
                                     tmp_path / "model-00002-of-00002.safetensors"]
    (tmp_path / INDEX).write_text("[1]")
    assert shard_files(tmp_path) == []
    (tmp_path / SINGLE).write_bytes(b"x")
    assert shard_files(tmp_path) == [tmp_path / SINGLE]


@pytest.mark.parametrize("device, ordinal", [("auto", 0), ("cuda", 0), ("cuda:2", 2), ("cpu", None),
                                             ("cuda:x", None), ("mps", None)])
def test_cuda_ordinal(device, ordinal):
    assert backend.cuda_ordinal(device) == ordinal


@pytest.mark.parametrize("change, starts", [
    ({}, True), ({"device": "cuda:1"}, True), ({"device": "cpu"}, False),
    ({"gpu_memory": "12GiB"}, True), ({"gpu_memory": "12GiB", "expert_dtype": "int8"}, False),
    ({"dtype": "float32"}, False), ({"dtype": "auto"}, True), ({"engine": "transformers"}, False)])
def test_the_cli_locks_early_only_for_a_whole_model_on_one_gpu(tmp_path, monkeypatch, change, starts):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v2"}))
    (tmp_path / SINGLE).write_bytes(b"x")
    calls, helpers = [], []
    monkeypatch.setattr(page_lock, "start_early", lambda paths, ordinal, stage, helper:
                        calls.append((paths, ordinal, stage, helper)))
    monkeypatch.setattr(stage_helper, "start", lambda paths, ordinal: helpers.append(ordinal) or "helper")
    settings = Settings(**change)
    backend.lock_shards_early(tmp_path, settings, choose_engine(tmp_path, settings.engine))
    ordinal = 1 if change.get("device") == "cuda:1" else 0
    stage = "gpu_memory" not in change  # a whole model on the GPU is staged, by a helper first
    assert calls == ([([tmp_path / SINGLE], ordinal, stage, "helper" if stage else None)] if starts else [])
    assert helpers == ([ordinal] if starts and stage else [])


def test_no_stage_helper_when_it_is_switched_off(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v2"}))
    (tmp_path / SINGLE).write_bytes(b"x")
    calls = []
    monkeypatch.setattr(stage_helper, "ENABLED", False)
    monkeypatch.setattr(stage_helper, "start", lambda paths, ordinal: pytest.fail("started"))
    monkeypatch.setattr(page_lock, "start_early", lambda paths, ordinal, stage, helper:
                        calls.append((stage, helper)))
    backend.lock_shards_early(tmp_path, Settings(), "native")
    assert calls == [(True, None)]  # page_lock's thread stages it alone


def test_the_cli_does_not_lock_when_direct_reads_are_off(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v2"}))
    (tmp_path / SINGLE).write_bytes(b"x")
    monkeypatch.setattr(page_lock, "ENABLED", False)
    monkeypatch.setattr(page_lock, "start_early", lambda paths, ordinal: pytest.fail("locked"))
    backend.lock_shards_early(tmp_path, Settings(), "native")


def test_a_load_releases_the_early_locks_even_when_it_fails(fake_driver, files, tmp_path):
    from dscoder.errors import DscoderError
    from dscoder.loader import load_engine

    page_lock.start_early(files, ordinal=0)
    third = page_lock._EARLY.take(files[2])  # the thread is done; this one the load "copied"
    page_lock.close_later(third)
    with pytest.raises(DscoderError):
        load_engine(tmp_path / "nowhere", device="cpu")
    assert page_lock._EARLY is None
    assert sorted(size for what, size in fake_driver.log if what == "unregister") == [1000, 2000, 3000]
    assert fake_driver.registered == {}


def test_deferred_unlocks_happen_on_a_timer_when_no_reply_comes(fake_driver, files):
    page_lock.start_early(files[:1], ordinal=0)
    locked = page_lock.lock(files[0], 0)
    page_lock.unlock_deferred_later(0.01)  # nothing deferred yet: no timer
    page_lock.close_later(locked)
    page_lock.unlock_deferred_later(0.01)
    for _ in range(500):
        if ("unregister", 1000) in fake_driver.log:
            break
        threading.Event().wait(0.01)
    assert ("unregister", 1000) in fake_driver.log and fake_driver.registered == {}


def staged(fake_driver, what: str) -> list[int]:
    return [size for logged, size in fake_driver.log if logged == what]


def test_staged_files_are_on_the_gpu_and_unlocked_before_the_reader_takes_them(fake_driver, files):
    page_lock.start_early(files, ordinal=0, stage=True)
    sources = [page_lock.source(path, 0) for path in files]
    assert all(isinstance(s, page_lock.StagedFile) for s in sources)
    for path, source in zip(files, sources, strict=True):
        assert ctypes.string_at(source.device_address, source.size) == path.read_bytes()
    # each was unlocked once its copy was done: nothing page-locked is left for the exit
    assert registered(fake_driver) == [1000, 2000, 3000] and fake_driver.registered == {}
    assert page_lock.early_staged()[0] == 6000
    for source in sources:
        source.close()
    assert staged(fake_driver, "free") == [1000, 2000, 3000] and fake_driver.allocated == {}


def test_staging_needs_room_for_the_model_twice(fake_driver, files):
    fake_driver.free_bytes = 2 * 6000 + page_lock.STAGING_RESERVE - 1
    page_lock.start_early(files, ordinal=0, stage=True)
    first = page_lock.source(files[0], 0)
    assert isinstance(first, page_lock.LockedFile) and staged(fake_driver, "alloc") == []
    first.close()


def test_no_staging_unless_asked_or_when_switched_off(fake_driver, files, monkeypatch):
    page_lock.start_early(files, ordinal=0)
    first = page_lock.source(files[0], 0)
    monkeypatch.setattr(page_lock, "STAGING", False)
    page_lock.start_early(files, ordinal=0, stage=True)
    second = page_lock.source(files[1], 0)
    assert isinstance(first, page_lock.LockedFile) and isinstance(second, page_lock.LockedFile)
    assert staged(fake_driver, "alloc") == []
    first.close()
    second.close()


def test_when_gpu_memory_runs_out_the_rest_stay_locked_in_order(fake_driver, files):
    fake_driver.no_memory = {2000}
    page_lock.start_early(files, ordinal=0, stage=True)
    sources = [page_lock.source(path, 0) for path in files]
    assert [type(s) for s in sources] == [page_lock.StagedFile, page_lock.LockedFile, page_lock.LockedFile]
    assert staged(fake_driver, "alloc") == [1000]
    for source in sources:
        source.close()
    assert fake_driver.registered == {} and fake_driver.allocated == {}


def test_a_reader_copies_on_the_device_from_a_staged_file_and_frees_it(fake_driver, files, reader_copy):
    page_lock.start_early(files, ordinal=0, stage=True)
    shard, copied = reader_copy(files[2], ((0, 1000), (1000, 2000)))
    assert copied == files[2].read_bytes()
    assert staged(fake_driver, "device copy") == [1000, 2000] and staged(fake_driver, "copy") == [1000, 2000, 3000]
    assert shard.close() == 3000
    assert staged(fake_driver, "free") == [3000]  # freed at once: nothing waits for a reply


def test_release_frees_staged_files_no_one_took(fake_driver, files):
    page_lock.start_early(files, ordinal=0, stage=True)
    page_lock._EARLY._ready[files[2]].wait()
    page_lock.release_early()
    assert sorted(staged(fake_driver, "free")) == [1000, 2000, 3000]
    assert fake_driver.allocated == {} and fake_driver.registered == {}


def test_a_use_that_needs_the_host_pages_gets_them_locked_not_staged(fake_driver, files):
    page_lock.start_early(files, ordinal=0, stage=True)
    locked = page_lock.lock(files[0], 0, borrow=False)  # dscoder.offload.mapped's kind of use
    assert isinstance(locked, page_lock.LockedFile)
    assert ctypes.string_at(locked.address, locked.size) == files[0].read_bytes()
    assert staged(fake_driver, "free") == [1000]  # its staging went
    locked.close()


def test_the_profile_says_what_was_staged_and_how_fast():
    from dscoder.profile import StartupProfile

    profile = StartupProfile()
    profile.add("staging (beside import)", 1.5)
    profile.count("bytes staged", 30_000_000_000)
    assert "staging (beside import) 1.50 s" in profile.summary()
    assert "30.0 GB staged at 20.0 GB/s" in profile.summary()


def test_a_release_that_waits_returns_with_everything_given_back(fake_driver, files):
    fake_driver.gate.clear()  # the thread is inside its first registration
    page_lock.start_early(files, ordinal=0, stage=True)
    threading.Timer(0.2, fake_driver.gate.set).start()
    page_lock.release_early(wait=True)
    assert fake_driver.gate.is_set()  # it returned only after the thread went on and stopped
    assert fake_driver.registered == {} and fake_driver.allocated == {}


@pytest.mark.parametrize("staged", [True, False])
def test_a_model_that_finds_no_room_beside_its_staged_shards_loads_without_them(
        tiny_checkpoint, monkeypatch, staged):
    import torch

    from dscoder import loader
    from dscoder.config import ModelConfig
    from dscoder.profile import StartupProfile

    calls, released = [], []
    real = loader.load_model

    def load_model(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(loader, "load_model", load_model)
    monkeypatch.setattr(page_lock, "early_staged", lambda: (6000, 1.0) if staged and not released else (0, 0.0))
    monkeypatch.setattr(page_lock, "release_early", lambda wait=False: released.append(wait))
    cfg = ModelConfig.from_file(tiny_checkpoint / "config.json")
    load = lambda: loader._load_resident(tiny_checkpoint, cfg, torch.device("cpu"), torch.float32, 64, None,  # noqa: E731
                                         "bf16", False, StartupProfile())
    if staged:
        assert load() is not None
        assert released == [True] and len(calls) == 2  # the staging let go of, then loaded again
    else:
        with pytest.raises(torch.cuda.OutOfMemoryError):
            load()
        assert released == [] and len(calls) == 1
