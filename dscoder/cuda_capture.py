"""The process's one lock around CUDA graph captures (dscoder.graphs), and around the work that
must not overlap a capture: reading weights onto a GPU and freeing a model's memory.

While one thread captures, a synchronize issued by another thread (of the device, a stream or
an event) can fail with "operation not permitted when stream is capturing" and break the
capture, even in the thread-local capture mode the captures use: on an H100 with torch 2.11
the shard reader's copy-stream synchronize failed so while another engine captured a graph
ahead. Holding this lock, no capture runs in this process."""
from __future__ import annotations

import threading

import torch

# re-entrant: a thread that holds it may capture (dscoder.graphs takes it for each capture)
CAPTURE_LOCK = threading.RLock()


def synchronize(device: torch.device | None = None) -> None:
    """torch.cuda.synchronize(device) once no capture runs in this process."""
    with CAPTURE_LOCK:
        torch.cuda.synchronize(device)
