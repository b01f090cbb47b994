"""Checkpoint files page-locked where they lie in the page cache, for DMA to the GPU.

A shard is mapped shared and read-only and registered with the CUDA driver (cuMemHostRegister,
portable and read-only), so that its copies to the GPU run by DMA straight from the page cache
(dscoder.shard_reader). The driver is called through ctypes, not torch: the locking can start
on a thread before torch is imported (start_early), when a warm `dscoder complete` still has
1.1-1.5 s of imports ahead of it, and the driver's calls release the GIL. A driver call's
failure is its return value alone (unlike the runtime API's, which also stays in the calling
thread's error state for a later kernel launch to report).

Who unlocks: the shard reader, once a shard's copies are done (a shard that start_early locked:
after the first reply, close_later); under a GPU budget the offloaded experts keep their shards
locked for the model's life (keep; dscoder.offload.mapped), and the load's own reads borrow them.

Staging (start_early(stage=True), a whole model on a GPU with room for it twice): the early
thread also copies each locked shard whole into GPU memory of its own and unlocks it at once,
all while torch imports and nothing else uses the driver. The load then fills the parameters
by copies on the device (0.1-0.2 s for Lite's 31 GB on an H100 machine, against 0.6-0.7 s of
DMA beside the kernel builds), frees the staging, and the process ends with nothing page-locked (an exit with
Lite's shards locked cost 0.3 s more on an H100 machine).

No torch here, and nothing that imports it.
"""
from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

# DSCODER_DIRECT_READS=0: no page-locking, the staged reads of dscoder.shard_reader instead
ENABLED = os.environ.get("DSCODER_DIRECT_READS", "1") != "0"
# DSCODER_GPU_STAGING=0: start_early locks the shards but does not copy them to the GPU
STAGING = os.environ.get("DSCODER_GPU_STAGING", "1") != "0"
# GPU memory left free beside the staged shards and the model (both the shards' size): the
# CUDA context's own, cuBLAS workspaces, the first graph's buffers
STAGING_RESERVE = 4 << 30
# CU_MEMHOSTREGISTER_PORTABLE (locked for every context, so a model on another device than the
# first can read it) and CU_MEMHOSTREGISTER_READ_ONLY (the device only reads the pages)
REGISTER_FLAGS = 1 | 8
_PROT_READ, _MAP_SHARED = 1, 1


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * 64)]  # CUipcMemHandle, passed by value


_OPTIONAL_CALLS = {
    "cuMemHostAlloc": [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint],
    "cuMemFreeHost": [ctypes.c_void_p],
    "cuIpcGetMemHandle": [ctypes.POINTER(_IpcHandle), ctypes.c_uint64],
    "cuIpcOpenMemHandle_v2": [ctypes.POINTER(ctypes.c_uint64), _IpcHandle, ctypes.c_uint],
    "cuIpcCloseMemHandle": [ctypes.c_uint64],
}


class Driver:
    """The few CUDA driver and libc calls this needs; get() is None where there is no driver."""

    _instance: Driver | None = None
    _lock = threading.Lock()

    def __init__(self, cuda: ctypes.CDLL) -> None:
        self.cuda = cuda
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.mmap.restype = ctypes.c_void_p
        self.libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                   ctypes.c_int, ctypes.c_long]
        self.libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.libc.pread.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long]
        self.libc.pread.restype = ctypes.c_ssize_t
        self._contexts: dict[int, int] = {}
        self._contexts_lock = threading.Lock()

    @classmethod
    def get(cls) -> Driver | None:
        with cls._lock:
            if cls._instance is None:
                try:
                    cuda = ctypes.CDLL("libcuda.so.1")
                    cuda.cuMemHostRegister_v2.argtypes = [ctypes.c_void_p, ctypes.c_size_t,
                                                          ctypes.c_uint]
                    cuda.cuMemHostUnregister.argtypes = [ctypes.c_void_p]
                    cuda.cuCtxSetCurrent.argtypes = [ctypes.c_void_p]
                    cuda.cuMemcpyHtoDAsync_v2.argtypes = [ctypes.c_uint64, ctypes.c_void_p,
                                                          ctypes.c_size_t, ctypes.c_void_p]
                    cuda.cuMemcpyDtoDAsync_v2.argtypes = [ctypes.c_uint64, ctypes.c_uint64,
                                                          ctypes.c_size_t, ctypes.c_void_p]
                    cuda.cuMemAlloc_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t]
                    cuda.cuMemFree_v2.argtypes = [ctypes.c_uint64]
                    cuda.cuMemGetInfo_v2.argtypes = [ctypes.POINTER(ctypes.c_size_t)] * 2
                    cuda.cuStreamCreate.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint]
                    cuda.cuStreamDestroy_v2.argtypes = [ctypes.c_void_p]
                    cuda.cuEventCreate.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint]
                    cuda.cuEventRecord.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
                    cuda.cuEventSynchronize.argtypes = [ctypes.c_void_p]
                    cuda.cuEventDestroy_v2.argtypes = [ctypes.c_void_p]
                    for name, argtypes in _OPTIONAL_CALLS.items():  # a stage helper's, both sides
                        try:
                            getattr(cuda, name).argtypes = argtypes
                        except AttributeError:  # an older driver: no helper, the CLI stages
                            pass
                    if cuda.cuInit(0) != 0:
                        return None
                    cls._instance = cls(cuda)
                except (OSError, AttributeError):  # no driver, or one without these calls
                    return None
            return cls._instance

    def use_device(self, ordinal: int) -> None:
        """Make `ordinal`'s primary context (the one the CUDA runtime, and so torch, uses)
        current on this thread, creating it if no one has yet."""
        with self._contexts_lock:
            ctx = self._contexts.get(ordinal)
            if ctx is None:
                device, handle = ctypes.c_int(), ctypes.c_void_p()
                if (self.cuda.cuDeviceGet(ctypes.byref(device), ordinal) != 0
                        or self.cuda.cuDevicePrimaryCtxRetain(ctypes.byref(handle), device) != 0):
                    raise OSError(f"CUDA device {ordinal} has no usable context")
                ctx = self._contexts[ordinal] = handle.value
        if self.cuda.cuCtxSetCurrent(ctx) != 0:
            raise OSError(f"cannot use CUDA device {ordinal}'s context")

    def register(self, address: int, size: int) -> int:
        """cuMemHostRegister's result: 0 when the range is page-locked."""
        return self.cuda.cuMemHostRegister_v2(address, size, REGISTER_FLAGS)

    def unregister(self, address: int) -> None:
        self.cuda.cuMemHostUnregister(address)

    def copy_to_device(self, device_address: int, host_address: int, size: int, stream: int) -> None:
        """Queue a copy on `stream` (a CUDA stream handle, e.g. torch's Stream.cuda_stream), in
        this thread's current context. Thousands of these queue one shard's tensors: through
        torch each cost the load's thread 25-30 us of the GIL, which the kernel prebuild and
        the copies' own queueing then waited for."""
        err = self.cuda.cuMemcpyHtoDAsync_v2(device_address, host_address, size, stream)
        if err != 0:
            raise RuntimeError(f"CUDA error {err} while queueing a copy to the GPU")

    def copy_on_device(self, device_address: int, source_address: int, size: int, stream: int) -> None:
        """Queue a copy between two places in GPU memory on `stream` (as copy_to_device)."""
        err = self.cuda.cuMemcpyDtoDAsync_v2(device_address, source_address, size, stream)
        if err != 0:
            raise RuntimeError(f"CUDA error {err} while queueing a copy on the GPU")

    def free_memory(self) -> int:
        """Bytes of GPU memory free in the current context's device (0 when unknown)."""
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        if self.cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)) != 0:
            return 0
        return free.value

    def alloc(self, size: int) -> int:
        """`size` bytes of GPU memory in the current context, outside torch's allocator."""
        address = ctypes.c_uint64()
        err = self.cuda.cuMemAlloc_v2(ctypes.byref(address), size)
        if err != 0:
            raise OSError(f"the CUDA driver could not allocate {size} bytes (error {err})")
        return address.value

    def free(self, device_address: int) -> None:
        self.cuda.cuMemFree_v2(device_address)

    def pread(self, fd: int, address: int, size: int, offset: int) -> int:
        """read(2) at `offset` of `fd` into memory at `address`; the bytes read, -1 on error."""
        return self.libc.pread(fd, address, size, offset)

    def host_alloc(self, size: int) -> int:
        """`size` bytes of page-locked host memory (cuMemHostAlloc)."""
        address = ctypes.c_void_p()
        err = self.cuda.cuMemHostAlloc(ctypes.byref(address), size, 0)
        if err != 0 or not address.value:
            raise OSError(f"the CUDA driver could not page-lock {size} bytes of memory (error {err})")
        return address.value

    def host_free(self, address: int) -> None:
        self.cuda.cuMemFreeHost(address)

    def ipc_handle(self, device_address: int) -> bytes:
        """A handle through which another process can map this GPU memory (ipc_open)."""
        handle = _IpcHandle()
        err = self.cuda.cuIpcGetMemHandle(ctypes.byref(handle), device_address)
        if err != 0:
            raise OSError(f"the CUDA driver could not share GPU memory (error {err})")
        return bytes(handle.reserved)

    def ipc_open(self, handle: bytes) -> int:
        """Map another process's GPU memory (its ipc_handle) into the current context."""
        shared = _IpcHandle.from_buffer_copy(handle)
        address = ctypes.c_uint64()
        # CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS: what the runtime's cudaIpcOpenMemHandle passes
        err = self.cuda.cuIpcOpenMemHandle_v2(ctypes.byref(address), shared, 1)
        if err != 0:
            raise OSError(f"the CUDA driver could not map another process's GPU memory (error {err})")
        return address.value

    def ipc_close(self, device_address: int) -> None:
        self.cuda.cuIpcCloseMemHandle(device_address)

    def new_stream(self) -> int:
        """A stream of the current context that does not wait for the legacy default stream."""
        stream = ctypes.c_void_p()
        if self.cuda.cuStreamCreate(ctypes.byref(stream), 1) != 0:  # CU_STREAM_NON_BLOCKING
            raise OSError("the CUDA driver could not create a stream")
        return stream.value or 0

    def destroy_stream(self, stream: int) -> None:
        self.cuda.cuStreamDestroy_v2(stream)

    def record(self, stream: int) -> int:
        """An event marking the work queued on `stream` so far (wait_and_destroy waits for it)."""
        event = ctypes.c_void_p()
        if self.cuda.cuEventCreate(ctypes.byref(event), 2) != 0:  # CU_EVENT_DISABLE_TIMING
            raise OSError("the CUDA driver could not create an event")
        if self.cuda.cuEventRecord(event.value, stream) != 0:
            self.cuda.cuEventDestroy_v2(event.value)
            raise OSError("the CUDA driver could not record an event")
        return event.value or 0

    def wait_and_destroy(self, event: int) -> None:
        """Wait for `event` (record()); OSError if the work before it failed."""
        err = self.cuda.cuEventSynchronize(event)
        self.cuda.cuEventDestroy_v2(event)
        if err != 0:
            raise OSError(f"a copy to the GPU failed (CUDA error {err})")


class LockedFile:
    """A file mapped read-only and page-locked for `ordinal`'s context: `address`, `size`.
    close() unlocks and unmaps it (once its copies are done); `early`: locked by start_early."""

    def __init__(self, path: Path, driver: Driver, ordinal: int, early: bool = False) -> None:
        self.path, self.driver, self.early = path, driver, early
        fd = os.open(path, os.O_RDONLY)
        try:
            self.size = os.fstat(fd).st_size
            if self.size == 0:
                raise OSError(f"{path} is empty")
            # shared: the pages locked are the page cache's own (locking a private mapping
            # copies every page first: that hung a load)
            address = driver.libc.mmap(None, self.size, _PROT_READ, _MAP_SHARED, fd, 0)
        finally:
            os.close(fd)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"cannot map {path}")
        self.address: int = address
        driver.use_device(ordinal)
        err = driver.register(address, self.size)
        if err != 0:
            driver.libc.munmap(address, self.size)
            raise OSError(f"the CUDA driver refused to page-lock {path} (error {err})")

    def copy_to(self, device_address: int, offset: int, size: int, stream: int) -> None:
        """Queue a copy of `size` bytes from `offset` in the file to the GPU (DMA)."""
        self.driver.copy_to_device(device_address, self.address + offset, size, stream)

    def close(self) -> None:
        if self.address:
            self.driver.unregister(self.address)
            self.driver.libc.munmap(self.address, self.size)
            self.address = 0


class _Borrowed(LockedFile):
    """Another user's view of a kept LockedFile (keep()): closing it leaves the file locked."""

    def __init__(self, owner: LockedFile) -> None:  # no mapping of its own: the owner's
        self.path, self.driver, self.early = owner.path, owner.driver, False
        self.size, self.address = owner.size, owner.address

    def close(self) -> None:
        self.address = 0


class StagedFile:
    """A file's bytes whole in GPU memory of its own (start_early's staging): `device_address`,
    `size`. copy_to() queues copies out of it, close() frees it."""

    def __init__(self, path: Path, driver: Driver, ordinal: int, device_address: int, size: int) -> None:
        self.path, self.driver, self.ordinal = path, driver, ordinal
        self.device_address, self.size = device_address, size

    def copy_to(self, device_address: int, offset: int, size: int, stream: int) -> None:
        """Queue a copy of `size` bytes from `offset` in the file to `device_address`."""
        self.driver.copy_on_device(device_address, self.device_address + offset, size, stream)

    def close(self) -> None:
        if self.device_address:
            self.driver.use_device(self.ordinal)
            self.driver.free(self.device_address)
            self.device_address = 0


class StageHelper(Protocol):
    """Another process that stages the files on the GPU (dscoder.stage_helper.Helper)."""

    def staged(self) -> Iterator[tuple[int, bytes]]:
        """(index in the files, ipc_handle of its GPU copy) for each file as it is staged;
        ends when all are, or when the helper gives up (the rest are then not staged)."""
        ...

    def free(self, index: int) -> None:
        """The file `index` is no longer mapped here: the helper may free its GPU copy."""
        ...

    def retire(self) -> None:
        """Nothing more will be taken from the helper: it ends once every file taken is freed."""
        ...

    def wait(self) -> None:
        """Until the helper has ended (retired, every file taken freed), its memory given back."""
        ...


class ImportedFile(StagedFile):
    """A file's bytes whole in GPU memory that another process staged and shares (a stage
    helper, dscoder.stage_helper): close() unmaps it here and lets the helper free it."""

    def __init__(self, path: Path, driver: Driver, ordinal: int, device_address: int, size: int,
                 helper: StageHelper, index: int) -> None:
        super().__init__(path, driver, ordinal, device_address, size)
        self.helper, self.index = helper, index

    def close(self) -> None:
        if self.device_address:
            self.driver.use_device(self.ordinal)
            self.driver.ipc_close(self.device_address)
            self.device_address = 0
            self.helper.free(self.index)


Source = LockedFile | StagedFile  # where a shard's copies to the GPU come from


class _Staging:
    """A locked file on its way to GPU memory: its copy is queued; finish() waits for it, unlocks
    the file and hands over the StagedFile."""

    def __init__(self, locked: LockedFile, stream: int, ordinal: int) -> None:
        driver = self.driver = locked.driver
        self.locked, self.ordinal = locked, ordinal
        self.device_address = driver.alloc(locked.size)
        try:
            locked.copy_to(self.device_address, 0, locked.size, stream)
            self.event = driver.record(stream)
        except (OSError, RuntimeError) as e:
            driver.free(self.device_address)
            raise OSError(str(e)) from e

    def finish(self) -> StagedFile:
        """The staged file; OSError (nothing kept) if its copy failed."""
        try:
            self.driver.wait_and_destroy(self.event)
        except OSError:
            self.driver.free(self.device_address)
            raise
        finally:
            self.locked.close()
        return StagedFile(self.locked.path, self.driver, self.ordinal, self.device_address,
                          self.locked.size)


_KEPT: dict[Path, LockedFile] = {}


def keep(locked: LockedFile) -> None:
    """`locked` stays locked for its owner (the offloaded experts read from it for as long as
    the model lives); lock() of its path meanwhile lends it instead of locking it again."""
    _KEPT[locked.path] = locked


def unkeep(locked: LockedFile) -> None:
    if _KEPT.get(locked.path) is locked:
        del _KEPT[locked.path]


def fits(nbytes: int) -> bool:
    """Whether `nbytes` of page cache may be locked at once: half the machine's memory, as for
    start_early (the page cache must stay, and the rest of the process needs room)."""
    return nbytes <= _memory_bytes() // 2


def source(path: Path, ordinal: int) -> Source:
    """Where the load copies `path`'s tensors to the GPU from: the file staged on the GPU by
    start_early() if it was, else the file page-locked (lock())."""
    kept = _KEPT.get(path)
    early = _EARLY
    if early is not None and (kept is None or not kept.address):
        taken = early.take(path)
        if taken is not None:
            return taken
    return lock(path, ordinal)


def lock(path: Path, ordinal: int, borrow: bool = True) -> LockedFile:
    """`path` locked for `ordinal`'s context: a kept one (lent, with `borrow`: for a use that
    ends before its owner's), one that start_early() locked, else now. OSError where there is
    no driver, the file cannot be mapped or the driver refuses."""
    kept = _KEPT.get(path) if borrow else None
    if kept is not None and kept.address:
        return _Borrowed(kept)
    early = _EARLY
    if early is not None:
        taken = early.take(path)
        if isinstance(taken, LockedFile):
            return taken
        if taken is not None:  # staged on the GPU, and this use wants the host's pages
            taken.close()
    driver = Driver.get()
    if driver is None:
        raise OSError("no CUDA driver")
    return LockedFile(path, driver, ordinal)


class _Early:
    """Files locked in order on a thread of their own, each handed over once (take); with
    `stage`, copied whole to the GPU as well and unlocked (StagedFile), while there is room."""

    def __init__(self, paths: Sequence[Path], ordinal: int, budget: int, stage: bool,
                 helper: StageHelper | None = None) -> None:
        self._ready = {path: threading.Event() for path in paths}
        self._locked: dict[Path, Source] = {}  # locked or staged, not yet taken
        self._closed = False
        self._helper = helper
        self._mutex = threading.Lock()
        self.staged_bytes = 0
        self.staged_seconds = 0.0  # from the thread's start to the last file staged
        self._thread = threading.Thread(target=self._run,
                                        args=(list(paths), ordinal, budget, stage, helper),
                                        name="dscoder-page-lock", daemon=True)
        self._thread.start()

    def _run(self, paths: list[Path], ordinal: int, budget: int, stage: bool,
             helper: StageHelper | None) -> None:
        t = time.perf_counter()
        stream = 0  # the staging copies' stream, while staging
        pending: _Staging | LockedFile | None = None  # held here, not handed over yet
        driver = Driver.get()
        try:
            if driver is None:
                return
            driver.use_device(ordinal)  # the CUDA context, made while torch imports
            model = paths
            if helper is not None:
                rest = self._import(helper, paths, driver, ordinal, t)
                if rest is None:  # released meanwhile
                    return
                paths = rest  # what the helper did not stage: locked or staged here instead
            if stage and room_to_stage(driver, paths, model):
                stream = driver.new_stream()
            staging_on = bool(stream)
            for path in paths:
                try:
                    size = path.stat().st_size
                except OSError:
                    return
                if size > budget:  # the rest is locked by the reader, two shards at a time
                    return
                try:  # while the last file's copy runs
                    locked = LockedFile(path, driver, ordinal, early=True)
                except OSError:
                    return
                # The last file is unlocked before this one's copy is queued: an unlock seems to
                # wait for the copies in flight. On an H100 machine Lite's 31 GB staged in
                # 1.73-2.43 s so, against 2.23-2.46 s unlocking after queueing the next copy,
                # and another thread's allocations meanwhile waited 0.03-0.62 s against 0.64-0.86 s.
                previous, pending = pending, locked
                if isinstance(previous, _Staging) and not self._hand_over(previous.finish(), t):
                    return
                staging = None
                if staging_on:
                    try:
                        staging = pending = _Staging(locked, stream, ordinal)
                    except OSError:
                        staging_on = False  # no more GPU memory, or no copy: locked files from here
                if staging is None:
                    budget -= size  # stays locked until the reader is done with it
                    pending = None
                    if not self._hand_over(locked, t):
                        return
            if isinstance(pending, _Staging):
                done, pending = pending, None
                self._hand_over(done.finish(), t)
        except OSError:
            return
        finally:
            if isinstance(pending, _Staging):  # stopped early: nothing stays locked or allocated
                try:
                    pending.finish().close()
                except OSError:
                    pass
            elif pending is not None:
                pending.close()
            if stream:
                driver.destroy_stream(stream)
            if helper is not None:
                helper.retire()
            for event in self._ready.values():
                event.set()

    def _import(self, helper: StageHelper, paths: list[Path], driver: Driver, ordinal: int,
                started: float) -> list[Path] | None:
        """Hand over each file as the helper stages it, mapped into this process; the files it
        did not stage (it failed, or found no room) are returned, None once released."""
        left = dict(enumerate(paths))
        try:
            for index, handle in helper.staged():
                path = left[index]
                try:
                    address = driver.ipc_open(handle)
                except (OSError, AttributeError):  # AttributeError: a driver without the call
                    helper.free(index)
                    break
                del left[index]
                imported = ImportedFile(path, driver, ordinal, address, path.stat().st_size,
                                        helper, index)
                if not self._hand_over(imported, started):
                    return None
        except (OSError, KeyError, ValueError):  # the helper is gone, or said something else
            pass
        return [left[index] for index in sorted(left)]

    def _hand_over(self, file: Source, started: float) -> bool:
        """Make `file` ready for take(); False (and `file` closed) once released."""
        with self._mutex:
            if self._closed:  # released meanwhile: the reader is done without it
                file.close()
                return False
            self._locked[file.path] = file
            if isinstance(file, StagedFile):
                self.staged_bytes += file.size
                self.staged_seconds = time.perf_counter() - started
        self._ready[file.path].set()
        return True

    def take(self, path: Path) -> Source | None:
        event = self._ready.get(path)
        if event is None:
            return None
        event.wait()
        with self._mutex:
            return self._locked.pop(path, None)

    def release(self, wait: bool) -> None:
        """Close what no one took; the thread stops at its next file and closes it (`wait`: for
        that, so that all it held is given back when this returns)."""
        with self._mutex:
            self._closed = True
            rest, self._locked = list(self._locked.values()), {}
        for file in rest:
            file.close()
        if wait and self._thread is not threading.current_thread():
            self._thread.join()
            if self._helper is not None:  # its GPU memory is given back as it ends
                self._helper.wait()


def room_to_stage(driver: Driver, paths: Sequence[Path], model: Sequence[Path] | None = None) -> bool:
    """Whether the device has room for the files staged, the model filled from them (`model`:
    all its files, where some are staged already, by a helper) and STAGING_RESERVE besides."""
    try:
        staged = sum(path.stat().st_size for path in paths)
        whole = staged if model is None else sum(path.stat().st_size for path in model)
    except OSError:
        return False
    return driver.free_memory() >= staged + whole + STAGING_RESERVE


_EARLY: _Early | None = None


def start_early(paths: Sequence[Path], ordinal: int = 0, stage: bool = False,
                helper: StageHelper | None = None) -> None:
    """Start locking `paths` in order on a thread (its first act creates the CUDA context), up
    to half the machine's memory: the page cache they lie in must stay, and the rest of the
    process needs room. With `stage` (and STAGING, and room on the device for the files twice)
    each is also copied whole to the GPU and unlocked. The shard reader takes them (source(),
    lock()); release_early() unlocks or frees what it did not take. A `helper` (another process,
    dscoder.stage_helper) stages the files first; those it does not, this thread locks or stages."""
    global _EARLY
    release_early()
    _EARLY = _Early(paths, ordinal, _memory_bytes() // 2, stage and STAGING, helper)


def early_staged() -> tuple[int, float]:
    """(bytes, seconds) start_early() has staged on the GPU so far: the seconds from its
    thread's start to its last file staged."""
    early = _EARLY
    if early is None:
        return 0, 0.0
    with early._mutex:
        return early.staged_bytes, early.staged_seconds


def release_early(wait: bool = False) -> None:
    """Unlock and unmap (or free) what start_early() locked (or staged) and no reader took
    (after a load, or when the process does not load after all); the thread stops at its next
    file (`wait`: this returns once it has)."""
    global _EARLY
    early, _EARLY = _EARLY, None
    if early is not None:
        early.release(wait)


_DEFERRED: list[LockedFile] = []
UNLOCK_AFTER = 10.0  # seconds after a load, at the latest (unlock_deferred_later)
_DEFERRED_LOCK = threading.Lock()


def close_later(locked: LockedFile) -> None:
    """Unlock `locked` at unlock_deferred(), not now. Unlocking holds a lock in the driver:
    on an H100 machine each 5 GB shard's unlock (0.05-0.18 s) stalled the next shard's copies
    beside it; a warm load took 0.92-0.97 s so against 0.61-0.66 s with the unlocks deferred."""
    with _DEFERRED_LOCK:
        _DEFERRED.append(locked)


def unlock_deferred(background: bool = False) -> None:
    """Unlock what close_later() kept (on a daemon thread with `background`). The engine does
    it after its first reply (a one-shot command exits then, which unlocks everything anyway),
    the loader's timer UNLOCK_AFTER seconds after the load (unlock_deferred_later)."""
    with _DEFERRED_LOCK:
        rest, _DEFERRED[:] = list(_DEFERRED), []
    if not rest:
        return

    def unlock() -> None:
        for locked in rest:
            locked.close()

    if background:
        threading.Thread(target=unlock, name="dscoder-unlock-later", daemon=True).start()
    else:
        unlock()


def unlock_deferred_later(seconds: float = UNLOCK_AFTER) -> None:
    """unlock_deferred() on a timer, if anything waits for it: the page cache cannot be
    reclaimed while it is locked, and a session may sit at its prompt for long."""
    with _DEFERRED_LOCK:
        if not _DEFERRED:
            return
    timer = threading.Timer(seconds, unlock_deferred)
    timer.daemon = True
    timer.start()


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return 0
