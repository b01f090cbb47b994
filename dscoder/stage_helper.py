"""The checkpoint staged on the GPU by a helper process while the CLI imports torch.

A whole model on a GPU with room for it twice is copied there, shard by shard, before the load
needs it (dscoder.page_lock's staging): the load then fills the parameters by copies on the
device. Done in the CLI's own process, that staging page-locked each shard where it lay in the
page cache, and each registration held the process's memory-map lock while it pinned 5 GB: the
import of torch beside it (which maps libraries and memory all the time) took 1.69-2.10 s on an
H100 machine against 1.31-1.66 s without it, and the staging itself, slowed in turn, ended
after the import, so the load waited for it.

So a process of its own does it: it reads each shard with pread on several threads into
page-locked chunks of its own and copies them to GPU memory it allocated (a memory copy from the
page cache scales with threads, where pinning it did not), and shares each staged shard through
a CUDA IPC handle. The CLI's page-lock thread maps each one into its context as it comes
(page_lock.ImportedFile) and the load copies from it as from a shard staged in the process.
On an H100 machine the helper had Lite's 31 GB on the GPU 1.5-1.6 s after it started, and a
warm `dscoder complete -n 64` took 3.50-3.63 s against 3.82-4.20 s staging in the process.

The helper reads its orders on its standard input: one line of JSON (the shards, the device),
then "free N" once shard N is no longer mapped by the CLI, and it ends when its input closes
(the CLI retires it once every shard it took is freed, or exits). It answers on its standard
output, one line each: "staged N HANDLE" (hex), then "done", or "error WHY" when it gives up
(no driver, no room, a failed read), after which the CLI locks or stages the rest itself.
Anything that goes wrong with it costs only the time it was to save.
"""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

from dscoder import page_lock

# DSCODER_STAGE_HELPER=0: the CLI's page-lock thread stages the shards itself, as before the helper
ENABLED = os.environ.get("DSCODER_STAGE_HELPER", "1") != "0"
DRIVER_NODE = Path("/dev/nvidiactl")  # where an NVIDIA driver is loaded
CHUNK = 16 << 20  # bytes a thread reads and copies at a time (two chunks each, page-locked)
MAX_THREADS = 12  # an H100 machine (16 cores) staged Lite in 1.5-1.6 s with 12, 2.0-2.1 s with 6 or 8


def threads() -> int:
    """How many threads the helper reads with: enough to reach the memory's copy speed, and
    a few cores left for the CLI's import beside it."""
    return max(2, min(MAX_THREADS, (os.cpu_count() or 4) - 4))


class Helper:
    """The CLI's side of a helper process (page_lock.StageHelper)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self._proc = proc
        self._lock = threading.Lock()
        self._taken: set[int] = set()  # shards staged() gave out and free() has not had back
        self._retired = False
        self._stopped = False

    def order(self, paths: Sequence[Path], ordinal: int) -> None:
        """Send the helper its orders: stage `paths` on GPU `ordinal`."""
        self._tell(json.dumps({"paths": [str(p) for p in paths], "ordinal": ordinal}) + "\n")

    def staged(self) -> Iterator[tuple[int, bytes]]:
        """(shard index, IPC handle) for each shard as the helper stages it; ends after the
        last, or when the helper gives up or goes (page_lock takes over the rest)."""
        for line in self._proc.stdout:
            word, _, rest = line.decode("ascii", "replace").strip().partition(" ")
            if word != "staged":  # "done", or "error WHY"
                return
            index, _, handle = rest.partition(" ")
            with self._lock:
                self._taken.add(int(index))
            yield int(index), bytes.fromhex(handle)

    def free(self, index: int) -> None:
        with self._lock:
            self._taken.discard(index)
            self._tell(f"free {index}\n")
            if self._retired and not self._taken:
                self._stop()

    def retire(self) -> None:
        with self._lock:
            self._retired = True
            if not self._taken:
                self._stop()

    def wait(self, timeout: float = 10.0) -> None:
        """Until the process has ended, if it was told to (a shard still mapped here keeps it)."""
        with self._lock:
            stopped = self._stopped
        if stopped:
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass

    def _tell(self, line: str) -> None:
        try:
            self._proc.stdin.write(line.encode("ascii"))
            self._proc.stdin.flush()
        except (OSError, ValueError):  # gone, or already told to stop
            pass

    def _stop(self) -> None:
        """Close its input: it frees everything and ends (not waited for: nothing here needs it)."""
        self._stopped = True
        try:
            self._proc.stdin.close()
        except OSError:
            pass


def start(paths: Sequence[Path], ordinal: int) -> Helper | None:
    """A helper process staging `paths` on GPU `ordinal`, or None if it cannot start (or there
    is no NVIDIA driver: `--device auto` on a machine without a GPU starts none)."""
    if not DRIVER_NODE.exists():
        return None
    try:
        proc = subprocess.Popen([sys.executable, "-m", "dscoder.stage_helper"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    except OSError:
        return None
    helper = Helper(proc)
    helper.order(paths, ordinal)
    return helper


def stage(paths: Sequence[Path], driver: page_lock.Driver, ordinal: int,
          report: Callable[[int, int], None], n_threads: int, chunk: int = CHUNK,
          stop: threading.Event | None = None) -> list[int]:
    """Copy each of `paths` whole into GPU memory of its own, reading with `n_threads`
    threads; report(index, device address) once each is there, in about the order of
    `paths`. The device addresses, in the order of `paths`. OSError on any failure, or once
    `stop` is set, with whatever was allocated and not reported freed."""
    sizes = [path.stat().st_size for path in paths]
    targets: list[int] = []
    reported: set[int] = set()
    try:
        for size in sizes:
            targets.append(driver.alloc(size))
        fds = [os.open(path, os.O_RDONLY) for path in paths]
    except OSError:
        for address in targets:
            driver.free(address)
        raise
    jobs = iter([(i, offset, min(chunk, size - offset))
                 for i, size in enumerate(sizes) for offset in range(0, size, chunk)])
    left = [-(-size // chunk) for size in sizes]  # each shard's chunks not yet on the GPU
    lock = threading.Lock()
    errors: list[BaseException] = []

    def landed(index: int) -> None:
        with lock:
            left[index] -= 1
            if left[index] == 0 and not errors:
                reported.add(index)
                report(index, targets[index])

    def work() -> None:
        buffers: list[int] = []
        stream = 0
        in_flight: list[tuple[int, int] | None] = [None, None]  # per buffer: (event, shard)
        try:
            driver.use_device(ordinal)
            buffers = [driver.host_alloc(chunk) for _ in range(2)]
            stream = driver.new_stream()
            turn = 0
            while not errors:
                if stop is not None and stop.is_set():
                    raise OSError("stopped")
                with lock:
                    job = next(jobs, None)
                if job is None:
                    break
                index, offset, size = job
                if in_flight[turn] is not None:  # the copy out of this buffer must be done
                    event, shard = in_flight[turn]
                    in_flight[turn] = None
                    driver.wait_and_destroy(event)
                    landed(shard)
                _read(fds[index], buffers[turn], size, offset, driver)
                driver.copy_to_device(targets[index] + offset, buffers[turn], size, stream)
                in_flight[turn] = (driver.record(stream), index)
                turn ^= 1
            for turn, pending in enumerate(in_flight):
                if pending is not None:
                    in_flight[turn] = None
                    driver.wait_and_destroy(pending[0])
                    landed(pending[1])
        except BaseException as e:  # noqa: BLE001  (reported below, on the calling thread)
            with lock:
                errors.append(e)
        finally:
            for pending in in_flight:
                if pending is not None:
                    try:
                        driver.wait_and_destroy(pending[0])
                    except OSError:
                        pass
            if stream:
                driver.destroy_stream(stream)
            for buffer in buffers:
                driver.host_free(buffer)

    workers = [threading.Thread(target=work, name=f"dscoder-stage-{k}") for k in range(n_threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for fd in fds:
        os.close(fd)
    if errors:
        for i, address in enumerate(targets):
            if i not in reported:
                driver.free(address)
        error = errors[0]
        raise error if isinstance(error, OSError) else OSError(str(error))
    return targets


def _read(fd: int, address: int, size: int, offset: int, driver: page_lock.Driver) -> None:
    """pread `size` bytes at `offset` into memory at `address` (the GIL let go meanwhile)."""
    done = 0
    while done < size:
        got = driver.pread(fd, address + done, size - done, offset + done)
        if got <= 0:
            raise OSError("the checkpoint ended early" if got == 0 else
                          f"could not read the checkpoint (error {ctypes.get_errno()})")
        done += got


def serve(inp: IO[bytes], out: IO[bytes]) -> None:
    """The helper's side: stage what the first line asks for, then free on request."""
    staged: dict[int, int] = {}  # shard index -> device address, until freed
    lock = threading.Lock()

    def say(line: str) -> None:
        with lock:
            out.write(line.encode("ascii") + b"\n")
            out.flush()

    try:
        order = json.loads(inp.readline())
        paths = [Path(p) for p in order["paths"]]
        ordinal = int(order["ordinal"])
    except (ValueError, KeyError, TypeError):
        say("error bad orders")
        return
    driver = page_lock.Driver.get()
    if driver is None:
        say("error no CUDA driver")
        return

    def report(index: int, address: int) -> None:
        with lock:
            staged[index] = address  # freed on request, or when our input closes
        say(f"staged {index} {driver.ipc_handle(address).hex()}")

    stop = threading.Event()  # the CLI is done with us: stage nothing more

    def run() -> None:
        try:
            driver.use_device(ordinal)
            if not page_lock.room_to_stage(driver, paths):
                say("error no room on the GPU")
                return
            stage(paths, driver, ordinal, report, threads(), stop=stop)
            say("done")
        except (OSError, ValueError) as e:
            say(f"error {e}")

    runner = threading.Thread(target=run, name="dscoder-stage", daemon=True)
    runner.start()
    for line in inp:  # "free N", until the CLI closes our input
        word, _, index = line.decode("ascii", "replace").strip().partition(" ")
        if word == "free" and index.isdigit():
            with lock:
                address = staged.pop(int(index), 0)
            if address:
                driver.use_device(ordinal)
                driver.free(address)
    # the input closed: the CLI is done with us (nothing of ours is mapped there), or gone
    stop.set()
    runner.join()
    with lock:
        rest = list(staged.values())
        staged.clear()
    for address in rest:
        driver.use_device(ordinal)
        driver.free(address)


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
    os._exit(0)  # the staging threads may still run: the process's end stops them and frees all
