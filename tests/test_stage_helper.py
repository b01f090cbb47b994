"""The stage helper (dscoder.stage_helper) with the CUDA driver faked (tests/fake_cuda.py): its
staging really reads the files into the fake's "GPU memory" (host memory), its protocol runs
over real pipes (the helper's side on a thread here), and the CLI's page-lock thread maps what
it shares. The real helper process on a GPU: tests/gpu/test_startup_gpu.py."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from types import SimpleNamespace

import pytest

from dscoder import page_lock, stage_helper


def logged(fake_driver, what: str) -> list[int]:
    return [size for name, size in fake_driver.log if name == what]


def test_stage_copies_every_file_whole_on_several_threads_in_chunks(fake_driver, files):
    reported = {}
    addresses = stage_helper.stage(files, page_lock.Driver.get(), 0, reported.__setitem__,
                                   n_threads=3, chunk=300)
    assert reported == dict(enumerate(addresses))
    for path, address in zip(files, addresses, strict=True):
        assert ctypes.string_at(address, path.stat().st_size) == path.read_bytes()
    assert sorted(logged(fake_driver, "copy")) == sorted([300] * 19 + [200, 100])  # 1000, 2000, 3000
    assert fake_driver.host == {}  # each thread's page-locked chunks given back


def test_a_failed_read_keeps_what_was_reported_and_frees_the_rest(fake_driver, files, monkeypatch):
    driver = page_lock.Driver.get()
    real = driver.pread
    # the third file (3000 bytes, the only one with offsets from 2500) ends early
    monkeypatch.setattr(driver, "pread", lambda fd, address, size, offset:
                        0 if offset >= 2500 else real(fd, address, size, offset))
    reported = {}
    with pytest.raises(OSError, match="ended early"):
        stage_helper.stage(files, driver, 0, reported.__setitem__, n_threads=1, chunk=500)
    assert list(reported) == [0, 1]  # in order, on one thread
    assert sorted(len(b) for b in fake_driver.allocated.values()) == [1000, 2000]  # the CLI's now
    assert fake_driver.host == {}


class Piped:
    """The helper's side (serve) on a thread, the CLI's side (Helper) on real pipes to it."""

    def __init__(self) -> None:
        orders_r, orders_w = os.pipe()
        answers_r, answers_w = os.pipe()
        self.thread = threading.Thread(target=stage_helper.serve,
                                       args=(os.fdopen(orders_r, "rb"), os.fdopen(answers_w, "wb")))
        self.thread.start()
        self.helper = stage_helper.Helper(SimpleNamespace(stdin=os.fdopen(orders_w, "wb"),
                                                          stdout=os.fdopen(answers_r, "rb"),
                                                          wait=lambda timeout: self.thread.join(timeout)))

    def ended(self, wait: float = 10.0) -> bool:
        self.thread.join(timeout=wait)
        return not self.thread.is_alive()


def test_the_cli_maps_each_shard_the_helper_stages_and_the_helper_frees_it_after(fake_driver, files):
    piped = Piped()
    piped.helper.order(files, 0)
    page_lock.start_early(files, ordinal=0, stage=True, helper=piped.helper)
    sources = [page_lock.source(path, 0) for path in files]
    assert all(isinstance(s, page_lock.ImportedFile) for s in sources)
    for path, source in zip(files, sources, strict=True):
        assert ctypes.string_at(source.device_address, source.size) == path.read_bytes()
    assert logged(fake_driver, "register") == []  # nothing page-locked in the CLI's process
    assert page_lock.early_staged()[0] == 6000
    for source in sources[:2]:
        source.close()
    assert not piped.ended(wait=0.3)  # one shard still mapped: the helper must keep it
    sources[2].close()
    assert piped.ended()  # retired once the last was freed
    assert sorted(logged(fake_driver, "ipc close")) == [1000, 2000, 3000]
    assert fake_driver.allocated == {}  # the helper freed each one on request


def test_what_the_helper_does_not_stage_the_cli_stages_itself(fake_driver, files, monkeypatch):
    driver = page_lock.Driver.get()
    real = driver.pread
    monkeypatch.setattr(driver, "pread", lambda fd, address, size, offset:
                        -1 if os.fstat(fd).st_size == 3000 else real(fd, address, size, offset))
    monkeypatch.setattr(stage_helper, "threads", lambda: 1)
    piped = Piped()
    piped.helper.order(files, 0)
    page_lock.start_early(files, ordinal=0, stage=True, helper=piped.helper)
    sources = [page_lock.source(path, 0) for path in files]
    # one thread, two chunks in flight: the first shard landed before the third one's read failed
    assert type(sources[0]) is page_lock.ImportedFile
    assert [type(s) for s in sources[1:]] == [page_lock.StagedFile] * 2
    for path, source in zip(files, sources, strict=True):
        assert ctypes.string_at(source.device_address, source.size) == path.read_bytes()
    for source in sources:
        source.close()
    assert piped.ended() and fake_driver.allocated == {}


class OneShard:
    """A helper that stages the first file (in this process), then gives up; meanwhile the GPU's
    free memory becomes `free_after` (what it holds counts against it)."""

    def __init__(self, fake_driver, path, free_after: int) -> None:
        self.driver, self.fake, self.free_after = page_lock.Driver.get(), fake_driver, free_after
        data = path.read_bytes()
        self.address = self.driver.alloc(len(data))
        ctypes.memmove(self.address, data, len(data))

    def staged(self):
        yield 0, self.driver.ipc_handle(self.address)
        self.fake.free_bytes = self.free_after

    def free(self, index: int) -> None:
        self.driver.free(self.address)

    def retire(self) -> None:
        pass

    def wait(self) -> None:
        pass


@pytest.mark.parametrize("free, staged_here", [(5000 + 6000, True), (5000 + 6000 - 1, False)])
def test_the_rest_is_staged_here_only_with_room_beside_the_whole_model(fake_driver, files, free, staged_here):
    # the two files left (5000 bytes) staged, the whole model (6000) filled from them, the reserve
    page_lock.start_early(files, ordinal=0, stage=True,
                          helper=OneShard(fake_driver, files[0], free + page_lock.STAGING_RESERVE))
    sources = [page_lock.source(path, 0) for path in files]
    assert type(sources[0]) is page_lock.ImportedFile
    expected = page_lock.StagedFile if staged_here else page_lock.LockedFile
    assert [type(s) for s in sources[1:]] == [expected] * 2
    for path, source in zip(files, sources, strict=True):
        if staged_here or source is sources[0]:
            assert ctypes.string_at(source.device_address, source.size) == path.read_bytes()
        source.close()
    assert fake_driver.allocated == {}


def test_a_shard_the_cli_cannot_map_is_freed_and_staged_here(fake_driver, files):
    fake_driver.ipc_fails = True
    piped = Piped()
    piped.helper.order(files, 0)
    page_lock.start_early(files, ordinal=0, stage=True, helper=piped.helper)
    sources = [page_lock.source(path, 0) for path in files]
    assert [type(s) for s in sources] == [page_lock.StagedFile] * 3
    for source in sources:
        source.close()
    assert piped.ended()
    assert fake_driver.allocated == {}  # what the helper staged, it freed


def test_a_helper_with_no_room_leaves_the_staging_to_the_cli(fake_driver, files):
    fake_driver.free_bytes = 2 * 6000 + page_lock.STAGING_RESERVE - 1  # no room, for either
    piped = Piped()
    piped.helper.order(files, 0)
    page_lock.start_early(files, ordinal=0, stage=True, helper=piped.helper)
    first = page_lock.source(files[0], 0)
    assert isinstance(first, page_lock.LockedFile)
    first.close()
    page_lock.release_early(wait=True)
    assert piped.ended() and logged(fake_driver, "alloc") == []


def test_bad_orders_get_an_error_not_a_traceback(fake_driver):
    piped = Piped()
    piped.helper._tell("not json\n")
    assert piped.helper._proc.stdout.readline() == b"error bad orders\n"
    piped.helper.retire()
    assert piped.ended()


def _has_cuda_driver() -> bool:
    return ctypes.util.find_library("cuda") is not None


def test_no_helper_where_there_is_no_nvidia_driver(files, tmp_path, monkeypatch):
    monkeypatch.setattr(stage_helper, "DRIVER_NODE", tmp_path / "nvidiactl")
    assert stage_helper.start(files, 0) is None


@pytest.mark.skipif(_has_cuda_driver(), reason="a CUDA driver is here: the GPU tests run the real helper")
def test_the_real_helper_process_without_a_driver_says_so_and_ends(files, tmp_path, monkeypatch):
    (tmp_path / "nvidiactl").touch()  # as if there were a driver: the helper finds none
    monkeypatch.setattr(stage_helper, "DRIVER_NODE", tmp_path / "nvidiactl")
    helper = stage_helper.start(files, 0)
    assert helper is not None
    assert list(helper.staged()) == []  # "error no CUDA driver"
    helper.retire()
    assert helper._proc.wait(timeout=30) == 0
