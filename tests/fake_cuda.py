"""A stand-in for the CUDA driver calls of dscoder.page_lock, for tests without a GPU: the files
are really mapped (libc), registrations and copies are recorded, and copies really happen (the
"device" is host memory, and so is its "GPU memory"). The `fake_driver` fixture in conftest.py
installs it."""
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
        self.free_bytes = 1 << 40  # what cuMemGetInfo reports free
        self.no_memory: set[int] = set()  # sizes cuMemAlloc refuses
        self.allocated: dict[int, ctypes.Array] = {}  # "device" address -> its host buffer
        self.host: dict[int, ctypes.Array] = {}  # page-locked host memory (cuMemHostAlloc)
        self.ipc_fails = False  # cuIpcOpenMemHandle refuses every handle

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

    def cuMemcpyDtoDAsync_v2(self, dst, src, size, stream):
        self.log.append(("device copy", size))
        ctypes.memmove(dst, src, size)
        return 0

    def cuMemGetInfo_v2(self, free, total):
        free._obj.value = self.free_bytes
        total._obj.value = self.free_bytes
        return 0

    def cuMemAlloc_v2(self, address, size):
        if size in self.no_memory:
            return 2  # CUDA_ERROR_OUT_OF_MEMORY
        buffer = ctypes.create_string_buffer(size)
        address._obj.value = ctypes.addressof(buffer)
        self.allocated[ctypes.addressof(buffer)] = buffer
        self.log.append(("alloc", size))
        return 0

    def cuMemFree_v2(self, address):
        self.log.append(("free", len(self.allocated.pop(address))))
        return 0

    def cuMemHostAlloc(self, address, size, flags):
        buffer = ctypes.create_string_buffer(size)
        address._obj.value = ctypes.addressof(buffer)
        self.host[ctypes.addressof(buffer)] = buffer
        return 0

    def cuMemFreeHost(self, address):
        del self.host[address]
        return 0

    def cuIpcGetMemHandle(self, handle, address):
        assert address in self.allocated  # only the driver's own allocations can be shared
        ctypes.memmove(ctypes.addressof(handle._obj), address.to_bytes(8, "little"), 8)
        return 0

    def cuIpcOpenMemHandle_v2(self, address, handle, flags):
        # the "other process" is this one: the handle names the very buffer
        shared = int.from_bytes(bytes(handle.reserved[:8]), "little")
        if shared not in self.allocated or self.ipc_fails:
            return 201
        address._obj.value = shared
        self.log.append(("ipc open", len(self.allocated[shared])))
        return 0

    def cuIpcCloseMemHandle(self, address):
        self.log.append(("ipc close", len(self.allocated[address])))
        return 0

    def cuStreamCreate(self, stream, flags):
        stream._obj.value = 77
        return 0

    def cuStreamDestroy_v2(self, stream):
        assert stream == 77
        return 0

    def cuEventCreate(self, event, flags):
        event._obj.value = 88
        return 0

    def cuEventRecord(self, event, stream):
        assert (event, stream) == (88, 77)
        return 0

    def cuEventSynchronize(self, event):
        return 0

    def cuEventDestroy_v2(self, event):
        return 0
