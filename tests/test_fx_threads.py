"""Module calls on one thread while torch.fx traces on another (the background compile)."""
from __future__ import annotations

import subprocess
import sys
import threading

import torch

CHILD = r'''
import sys, threading, torch
if sys.argv[1] == "install":
    from dscoder import fx_threads
    assert fx_threads.install()
started, release = threading.Event(), threading.Event()

def slow(x):  # traced on the other thread; it waits there, mid-trace, for this one
    started.set()
    release.wait(30)
    return x + 1

tracer = threading.Thread(target=torch.fx.symbolic_trace, args=(slow,))
tracer.start()
started.wait(30)
try:
    print(float(torch.nn.Linear(2, 1)(torch.ones(1, 2)).shape[-1]))
except NameError as e:
    print("NameError:", e)
finally:
    release.set()
    tracer.join()
'''


def run_child(mode: str) -> str:
    done = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_a_module_call_during_another_threads_trace():
    """torch's own behaviour fails the call (the reason for fx_threads); after install() it runs."""
    assert run_child("plain").startswith("NameError")
    assert run_child("install") == "1.0"


def test_the_tracing_thread_still_records_module_calls():
    from dscoder import fx_threads

    assert fx_threads.install()

    class Outer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.inner(x) * 2

    traced = {}
    thread = threading.Thread(target=lambda: traced.setdefault("g", torch.fx.symbolic_trace(Outer())))
    thread.start()
    thread.join()
    ops = [n.op for n in traced["g"].graph.nodes]
    assert "call_module" in ops and "get_attr" not in ops
