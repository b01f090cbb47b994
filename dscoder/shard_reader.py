"""Reading safetensors shards at page-cache speed, straight into the tensors that keep them.

safetensors' own reader hands back a new CPU tensor per key, which we then copied again (into a
stacked expert tensor, or to the GPU from pageable memory: through the driver's bounce buffer
at about 15 GB/s). Here each shard's header is parsed once and several threads `preadv` the
bytes of each tensor directly into its destination: a CPU tensor is filled by the read itself
(one copy, page cache to final buffer), a GPU tensor through a small pinned staging buffer per
thread whose copy to the device runs while the thread reads the next chunk.

To a GPU, each shard is first tried straight from the page cache: mapped, page-locked where it
lies (dscoder.page_lock, read-only) and copied by DMA, so no CPU copies its bytes. On an H100
machine registering the page cache went at 35 GB/s and the copies at 51 GB/s; one thread
registers the next shard while the last one's copies run (_ShardDMA), unless the CLI had them
locked while torch was importing (page_lock.start_early), or even copied whole to the GPU then:
such a shard's tensors are copies on the device. Where the driver refuses (no read-only
registration), the staged reads take over. DSCODER_DIRECT_READS=0 turns it off.
"""
from __future__ import annotations

import functools
import json
import os
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch

from dscoder import page_lock
from dscoder.cuda_capture import CAPTURE_LOCK
from dscoder.errors import BadCheckpoint

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}
READ_THREADS = 8  # page-cache reads scale with threads up to the memory bandwidth
STAGING_BYTES = 16 << 20  # per buffer; two per thread (pinning costs about 0.7 s per GiB)
# While the shards are read, the GIL changes hands every 0.2 ms instead of 5: a thread running
# Python meanwhile (the decode step compiling in the background) otherwise holds it 5 ms at a
# time while every reading thread waits to start its next read. Measured on 2 cores with a busy
# Python thread: 0.8 GB/s at 5 ms, 5 GB/s at 0.2 ms (11 GB/s alone); the busy thread kept 85%.
LOAD_SWITCH_INTERVAL = 0.0002
# shards the DMA path has locked and not yet unlocked, at most (a shard is locked while the
# one before it copies; beyond these, only those that page_lock.start_early locked)
LOCKED_AHEAD = 2
DIRECT = page_lock.ENABLED
Progress = Callable[[int, int], None]  # (bytes done, bytes total)
Job = tuple["ShardEntry", torch.Tensor]


@dataclass(frozen=True)
class ShardEntry:
    """One tensor in a shard: its dtype, shape and absolute byte range in the file."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def why(e: BaseException) -> str:
    """An OS error as the end of a sentence."""
    if isinstance(e, PermissionError):
        return "permission denied (check the file's owner and mode, e.g. chmod a+r)"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror[0].lower() + e.strerror[1:]
    return str(e)


def read_header(path: Path) -> dict[str, ShardEntry]:
    """The tensors of a .safetensors file, checked against the file's size. Parsed once per
    version of the file (its size and mtime): a load under a GPU budget reads every header
    twice (dscoder.offload.mapped, then the loader), an unsharded checkpoint's too."""
    if not path.is_file():
        raise BadCheckpoint(f"The checkpoint shard {path} is missing; download the model again.")
    try:
        st = path.stat()
    except OSError as e:
        raise BadCheckpoint(f"Cannot read the checkpoint shard {path}: {why(e)}.") from e
    return dict(_parsed_header(path, st.st_size, st.st_mtime_ns))  # a copy: callers may change it


@functools.lru_cache(maxsize=64)
def _parsed_header(path: Path, size: int, mtime_ns: int) -> dict[str, ShardEntry]:
    try:
        f = open(path, "rb")
    except OSError as e:
        raise BadCheckpoint(f"Cannot read the checkpoint shard {path}: {why(e)}.") from e
    try:
        with f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        entries = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            begin, end = (8 + n + int(o) for o in info["data_offsets"])
            entries[key] = ShardEntry(path, DTYPES[info["dtype"]], tuple(info["shape"]), begin, end)
            if end > size:
                raise ValueError(f"{key} ends at byte {end} of a {size}-byte file")
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise BadCheckpoint(f"The checkpoint shard {path} is damaged or truncated ({e}).") from e
    return entries


def read_parallel(jobs: Sequence[Job], progress: Progress | None = None,
                  threads: int = READ_THREADS) -> None:
    """Fill each destination tensor with its entry's data (converting dtype where they differ)."""
    total = sum(e.nbytes for e, _ in jobs)
    fds = {path: os.open(path, os.O_RDONLY) for path in {e.path for e, _ in jobs}}
    stagings: list[_Staging] = []
    local = _Local(stagings)
    direct: list[Job] = []
    staged: list[Job] = []
    for job in jobs:
        (direct if _ShardDMA.takes(*job) else staged).append(job)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(min(switch, LOAD_SWITCH_INTERVAL))
    try:
        # no CUDA graph capture may run meanwhile: the workers synchronize copy streams and
        # events, which can fail and break another thread's capture (dscoder.cuda_capture)
        with CAPTURE_LOCK, ThreadPoolExecutor(max(1, min(threads, os.cpu_count() or 1, len(jobs)))) as pool:
            def submit(batch: Sequence[Job]) -> set[Future]:
                new = {pool.submit(_read_one, e, dst, fds[e.path], local): e.nbytes for e, dst in batch}
                futures.update(new)
                return set(new)

            futures: dict[Future, int] = {}
            pending = submit(staged)
            dma = _ShardDMA.start(direct) if direct else None
            done_bytes = 0
            try:
                while pending or dma is not None:
                    done, pending = wait(pending | ({dma.future} if dma else set()),
                                         return_when=FIRST_EXCEPTION, timeout=0.2)
                    for f in done:
                        if dma is not None and f is dma.future:
                            pending |= submit(f.result())  # what the driver refused to register
                            done_bytes += dma.copied
                            dma = None
                            continue
                        f.result()  # re-raises a worker's error (the pool drains, nothing half-used)
                        done_bytes += futures[f]
                    if progress:
                        progress(done_bytes + (dma.copied if dma else 0), total)
            finally:  # after an error too: nothing may still be copying when this returns
                if dma is not None:
                    wait([dma.future])
            # the last staged copies: their streams alone, not the device (whose synchronize
            # would also wait for other engines' work)
            for staging in stagings:
                staging.stream.synchronize()
    finally:
        sys.setswitchinterval(switch)
        for fd in fds.values():
            os.close(fd)


class _ShardDMA:
    """Copies to the GPU straight from the page cache, shard by shard, on a thread of its own
    (which locks the next shard while the last one's copies run)."""

    refused = False  # the driver refused a registration: staged reads from then on

    @staticmethod
    def takes(entry: ShardEntry, dst: torch.Tensor) -> bool:
        return (DIRECT and not _ShardDMA.refused and dst.is_cuda and dst.dtype == entry.dtype
                and dst.is_contiguous())

    @classmethod
    def start(cls, jobs: Sequence[Job]) -> _ShardDMA:
        dma = cls()
        threading.Thread(target=dma._run, args=(jobs,), name="dscoder-dma", daemon=True).start()
        return dma

    def __init__(self) -> None:
        self.copied = 0  # bytes on the device so far
        self.future: Future = Future()  # the jobs left to the staged reads

    def _run(self, jobs: Sequence[Job]) -> None:
        try:
            with torch.cuda.device(jobs[0][1].device):
                self.future.set_result(self._copy(jobs))
        except BaseException as e:
            self.future.set_exception(e)

    def _copy(self, jobs: Sequence[Job]) -> list[Job]:
        shards: dict[Path, list[Job]] = {}
        for job in jobs:
            shards.setdefault(job[0].path, []).append(job)
        device = jobs[0][1].device
        stream = torch.cuda.Stream(device)
        rest: list[Job] = []  # what the driver refused: for the staged reads
        closes: list[Future] = []
        # Another thread waits for each shard's copies and unlocks it, so that this one queues
        # the next shard's meanwhile. (An unlock still holds up the queueing, in the driver,
        # for 0.05-0.18 s per 5 GB shard on an H100 machine: the shards that start_early
        # locked are unlocked after the first reply instead, page_lock.close_later.)
        with ThreadPoolExecutor(1, thread_name_prefix="dscoder-unlock") as closer:
            try:
                for k, (path, group) in enumerate(shards.items()):
                    if k >= LOCKED_AHEAD:
                        closes[k - LOCKED_AHEAD].result()
                    try:
                        shard = _Registered(path, device.index or 0)
                    except OSError:  # no driver, no mapping of this file, or no registration
                        _ShardDMA.refused = True
                        rest = [job for batch in list(shards.values())[k:] for job in batch]
                        break
                    try:
                        shard.copy(group, stream)
                    finally:  # also after an error: nothing stays page-locked
                        closes.append(closer.submit(self._close, shard))
            finally:
                wait(closes)
        for close in closes:
            close.result()
        return rest

    def _close(self, shard: _Registered) -> None:
        self.copied += shard.close()  # one closing thread: the only writer


class _Registered:
    """A shard's bytes where the GPU can copy them from (page_lock.source): page-locked in place,
    or staged whole on the GPU by start_early(); copy() queues its tensors' copies, close()
    waits for them and lets the shard go."""

    def __init__(self, path: Path, ordinal: int) -> None:
        self.source = page_lock.source(path, ordinal)
        self.ordinal = ordinal
        self.nbytes = 0
        self.event: torch.cuda.Event | None = None
        self.stream: torch.cuda.Stream | None = None

    def copy(self, jobs: Sequence[Job], stream: torch.cuda.Stream) -> None:
        """Queue the copies of `jobs` (contiguous destinations of the entry's dtype: raw bytes)
        on `stream`, through the driver (page_lock.Driver)."""
        self.stream = stream
        self.source.driver.use_device(self.ordinal)
        for entry, dst in jobs:
            self.source.copy_to(dst.data_ptr(), entry.begin, entry.nbytes, stream.cuda_stream)
            self.nbytes += entry.nbytes
        self.event = torch.cuda.Event()
        self.event.record(stream)

    def close(self) -> int:
        """Wait for this shard's copies, then free its staging, or unlock and unmap it (one that
        start_early locked: after the first reply, page_lock.close_later); the bytes it copied."""
        if self.event is not None:
            self.event.synchronize()
        elif self.stream is not None:  # a copy failed to queue: wait for those that did
            self.stream.synchronize()
        source = self.source
        if isinstance(source, page_lock.LockedFile) and source.early:
            page_lock.close_later(source)
        else:
            source.close()
        return self.nbytes


def _read_one(entry: ShardEntry, dst: torch.Tensor, fd: int, local: _Local) -> None:
    # inference mode is per thread: a destination made under the caller's inference_mode can
    # only be written to under it
    with torch.inference_mode(dst.is_inference()):
        _read_into(entry, dst, fd, local)


def _read_into(entry: ShardEntry, dst: torch.Tensor, fd: int, local: _Local) -> None:
    if dst.dtype != entry.dtype or not dst.is_contiguous():
        tmp = torch.empty(entry.shape, dtype=entry.dtype)  # a conversion (fp32 routers): small
        _pread(fd, _bytes(tmp), entry)
        dst.copy_(tmp)
        if dst.is_cuda:  # done before read_parallel returns (it waits on no other stream)
            torch.cuda.current_stream(dst.device).synchronize()
    elif dst.is_cuda:
        _staged(fd, _bytes(dst), entry, _staging(local, dst.device))
    else:
        _pread(fd, _bytes(dst), entry)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's memory as a flat uint8 tensor (a view, no copy)."""
    return t.reshape(-1).view(torch.uint8)


def _pread(fd: int, dst: torch.Tensor, entry: ShardEntry, offset: int = 0) -> None:
    """Read len(dst) bytes of entry, from `offset` into it, straight into CPU memory dst."""
    view = memoryview(dst.numpy())
    done, n = 0, dst.numel()
    while done < n:
        got = os.preadv(fd, [view[done:]], entry.begin + offset + done)
        if got <= 0:
            raise BadCheckpoint(f"The checkpoint shard {entry.path} is damaged or truncated "
                                f"(it ends inside a tensor).")
        done += got


class _Staging:
    """A thread's two pinned buffers and its copy stream: read into one while the other copies."""

    def __init__(self, device: torch.device) -> None:
        self.buffers = [torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.events: list[torch.cuda.Event | None] = [None, None]
        self.stream = torch.cuda.Stream(device)
        self.turn = 0

    def next(self) -> tuple[int, torch.Tensor]:
        i = self.turn = 1 - self.turn
        event = self.events[i]
        if event is not None:
            event.synchronize()  # its previous copy has left the buffer
        return i, self.buffers[i]


class _Local(threading.local):
    """A worker thread's staging, made at its first staged copy; `everyone` lists them all (one
    list, shared by the threads)."""

    def __init__(self, everyone: list[_Staging]) -> None:
        self.staging: _Staging | None = None
        self.everyone = everyone


def _staging(local: _Local, device: torch.device) -> _Staging:
    if local.staging is None:
        local.staging = _Staging(device)
        local.everyone.append(local.staging)
    return local.staging


def _staged(fd: int, dst: torch.Tensor, entry: ShardEntry, staging: _Staging) -> None:
    for off in range(0, entry.nbytes, STAGING_BYTES):
        n = min(STAGING_BYTES, entry.nbytes - off)
        i, buf = staging.next()
        _pread(fd, buf[:n], entry, off)
        with torch.cuda.stream(staging.stream):
            dst[off:off + n].copy_(buf[:n], non_blocking=True)
            event = torch.cuda.Event()
            event.record(staging.stream)
        staging.events[i] = event
