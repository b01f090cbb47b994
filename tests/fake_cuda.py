"""A stand-in for the CUDA driver calls of dscoder.page_lock, for tests without a GPU: the files
are really mapped (libc), registrations and copies are recorded, and copies really happen (the
"device" is host memory). The `fake_driver` fixture in conftest.py installs it."""
from __future__ import annotations

import ctypes
import threading

from dscoder import page_lock


class FakeCuda:
    """The driver calls page_lock makes, recorded; `refuse` lists sizes it will not lock."""

    def __init__(self) -> None:
        self.registered: dict[int, int] = {}  # address -> size
        self.log: list[tuple[str, int]] = []
        self.refuse: set[int] = set()
        self.gate = threading.Event()
        self.gate.set()

    def cuInit(self, flags):
        return 0

    def cuDeviceGet(self, device, ordinal):
        device._obj.value = ordinal
        return 0

    def cuDevicePrimaryCtxRetain(self, handle, device):
        handle._obj.value = 1000 + device.value
        return 0

    def cuCtxSetCurrent(self, ctx):
        self.log.append(("context", ctx))
        return 0

    def cuMemHostRegister_v2(self, address, size, flags):
        self.gate.wait()
        assert flags == page_lock.REGISTER_FLAGS
        if size in self.refuse:
            return 201
        self.registered[address] = size
        self.log.append(("register", size))
        return 0

    def cuMemcpyHtoDAsync_v2(self, dst, src, size, stream):
        self.log.append(("copy", size))
        ctypes.memmove(dst, src, size)  # the "device" is host memory here
        return 0

    def cuMemHostUnregister(self, address):
        self.log.append(("unregister", self.registered.pop(address)))
        return 0
