"""Build the decode step's Triton kernels on several threads while the weights load.

The first graph capture built each Triton kernel at its first launch, one after another: with
an empty cache (the first run after install) that was 4.7-6.9 s of the capture on an H100
(Triton 3.6: 11 kernels and 8 C launchers). Here, as soon as the parameters have their memory
and before they are read, a dry run of the first reply's steps lists the launches it will make
(dscoder.model.triton_launch.recording: none runs), a pool of threads compiles the kernels
(Triton releases the GIL for most of a compile: 16 compiles took 2.8 s on one thread, 0.85 s
on eight, same H100 machine), and the prebuild's thread loads each into the GPU context and
builds its C launcher (a compiler run, outside the GIL). With a warm cache a compile is a
lookup on disk, also done while the weights load. The loader waits for the prebuild before the
first capture (KernelPrebuild.wait); a kernel it missed or failed to build is built by its
first launch, as before.

The dry run runs the step's torch operations on the unread weights (whatever their memory holds;
the outputs are thrown away). A model resident on one GPU dry-runs its first reply's steps
(resident_steps); an offloaded one its decode segments (offloaded_steps: device work only, no
expert id read on the host), once its expert cache exists, just before the first capture: the
builds then run on threads instead of one after another inside the capture (5.3-5.5 s of a first
run after install at --gpu-memory 12GiB on an H100 before).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from functools import partial
from typing import TYPE_CHECKING

import torch

from dscoder.model.transformer import Transformer
from dscoder.model.triton_launch import Launch, Recording, recording
from dscoder.profile import StartupProfile
from dscoder.sampling import SamplingParams, sample

if TYPE_CHECKING:
    from dscoder.offload.decoder import OffloadedDecoder

BUILD_THREADS = 8  # on a 16-core H100 machine: 0.85 s for 16 builds, 0.70 s on 16 threads


Piece = Callable[[], object]  # a part of a dry run, which may run beside the others


class KernelPrebuild:
    """The Triton kernels that the pieces made by `steps` launch (a first reply's steps, run
    dry: record()), building on a thread."""

    def __init__(self, steps: Callable[[], Sequence[Piece]], device: torch.device,
                 profile: StartupProfile | None = None, threads: int = BUILD_THREADS) -> None:
        self.errors: list[BaseException] = []
        self.built = 0
        self._profile = profile
        self._thread = threading.Thread(target=self._run, args=(steps, device, threads),
                                        name="dscoder-kernels", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        self._thread.join()

    def _run(self, steps: Callable[[], Sequence[Piece]], device: torch.device, threads: int) -> None:
        t = time.perf_counter()
        try:
            workers = max(1, min(threads, os.cpu_count() or 1))  # compiles are CPU work
            with torch.cuda.device(device), ThreadPoolExecutor(workers) as pool:
                builds: list[Future] = []
                # each kernel compiles as soon as the dry run reaches its first launch
                record(steps(), lambda launch: builds.append(pool.submit(_compile, device, launch)),
                       device)
                for build in as_completed(builds):
                    # loaded here, one at a time: Triton's C launchers are modules of one name,
                    # and loading two at once from two threads mixed them up (a kernel called
                    # through another kernel's launcher, H100, Triton 3.6)
                    try:
                        _load(build.result())
                        self.built += 1
                    except Exception as e:  # that kernel builds at its first launch
                        self.errors.append(e)
        except Exception as e:  # the capture builds what is missing, as without a prebuild
            self.errors.append(e)
        finally:
            if self._profile is not None:
                self._profile.add("kernel builds (background)", time.perf_counter() - t)
                self._profile.count("kernels built", self.built)


def record(pieces: Sequence[Piece], on_new: Callable[[Launch], None] | None = None,
           device: torch.device | None = None) -> list[Launch]:
    """The Triton launches of the pieces, one per specialization, none of them run; on_new sees
    each as it is first recorded. Two pieces or more run each on a thread of its own (on
    `device`): most of a dry run is its first CUDA calls, which load their kernels into the
    context outside the GIL, and several threads load them about twice as fast as one (H100:
    15 first calls in 0.24-0.26 s on 15 threads, 0.44-0.71 s on one)."""
    rec = Recording(on_new)
    if len(pieces) == 1:
        _record_piece(pieces[0], rec)
        return rec.launches
    errors: list[BaseException] = []

    def run(piece: Piece) -> None:
        on_gpu = device is not None and device.type == "cuda"
        try:
            with torch.cuda.device(device) if on_gpu else contextlib.nullcontext():
                _record_piece(piece, rec)
        except BaseException as e:  # raised on the calling thread below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(piece,), name="dscoder-dry-run", daemon=True)
               for piece in pieces]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return rec.launches


def _record_piece(piece: Piece, rec: Recording) -> None:
    with torch.inference_mode(), recording(into=rec):
        piece()


def resident_steps(model: Transformer, rows: int) -> list[Piece]:
    """What a first reply runs on a resident model: a decode step at `rows` cache rows (the
    first graph's) and a sampled step after it; a prompt's last token at a host position (a
    prompt whose other tokens are cached); a prompt of two tokens (whose experts are read by
    index, dscoder.model.moe.GATHER_PAIRS). Through one layer of each kind only (kinds()): the
    others launch the same kernels alike, and running all 27 of Lite's three times took 0.8 s
    of a warm start on an H100, which the first capture waited for. Each step of each kind is
    a piece of its own (they write into one scratch cache: their outputs are thrown away), but
    the two-token prompts, which set torch's global choice of attention kernels while they run
    (torch.nn.attention.sdpa_kernel), and another thread's restore would undo it."""
    device = model.lm_head.weight.device
    cache = model.new_cache(rows)
    layers = kinds(model)

    def decode(layer: int) -> None:
        ids = torch.zeros(1, dtype=torch.long, device=device)
        pos = torch.full((1,), rows - 1, dtype=torch.long, device=device)
        logits = model.decode_at(ids, pos, cache, rows, layers=[layer])
        sample(logits, pos + 1, SamplingParams.on(device), greedy=False)

    def last_token(layer: int) -> None:  # rows - 1 rows visible: most lengths' specialization
        model(torch.zeros(1, dtype=torch.long, device=device), cache, rows - 2, layers=[layer])

    def two_tokens() -> None:
        model(torch.zeros(2, dtype=torch.long, device=device), cache, 0, layers=layers)

    return [*(partial(step, layer) for step in (decode, last_token) for layer in layers), two_tokens]


def kinds(model: Transformer) -> list[int]:
    """The first layer of each kind (_kind): Lite has two, the dense first layer and the MoE ones."""
    first: dict[tuple, int] = {}
    for i, layer in enumerate(model.model.layers):
        first.setdefault(_kind(layer), i)
    return sorted(first.values())


def _kind(layer: torch.nn.Module) -> tuple:
    """What a Triton kernel's specialization sees of a layer: its modules' types, and its
    parameters' and buffers' shapes, dtypes and 16-byte alignment."""
    tensors = [*layer.named_parameters(), *layer.named_buffers()]
    return (tuple((name, type(m)) for name, m in layer.named_modules()),
            tuple((name, tuple(t.shape), t.dtype, t.data_ptr() % 16) for name, t in tensors))


def offloaded_steps(decoder: OffloadedDecoder, pos: int) -> list[Piece]:
    """What an offloaded model's first reply launches: each decode segment of a step at `pos`
    (into the decoder's own buffers and cache, which its capture's warm-up rewrites) and a
    sampled step after it. A prompt's products of several rows are cuBLAS's, not Triton's.
    One segment of each kind (segment_kinds), as the resident dry run takes one layer of each.
    One piece: the segments pass the decoder's buffers on, and each cuBLAS handle another
    thread would make keeps 32 MiB of a budget the expert cache needs."""
    def run() -> None:
        visible = decoder.rows(pos)
        for j in segment_kinds(decoder):
            decoder.segment(j, visible)
        sample(decoder.logits, decoder.pos + 1, SamplingParams.on(decoder.logits.device), greedy=False)

    return [run]


def segment_kinds(decoder: OffloadedDecoder) -> list[int]:
    """The first decode segment of each kind: the first (embedding) and the last (logits) are
    kinds of their own; a segment in between is the kinds of the MoE layer whose experts it
    runs, of the layers it runs whole and of the MoE layer it routes, the 16-byte alignment of
    its rows of the decoder's routing buffers (rows of 6 fp32 weights alternate), and how many
    routers of later layers it runs (fewer near the end). Lite: 5 of 27 (prefetch depth 1)."""
    moe = decoder.moe
    layer = [_kind(layer) for layer in decoder.model.model.layers]  # each layer's, once
    first: dict[tuple, int] = {}
    for j in range(decoder.segments):
        start = 0 if j == 0 else moe[j - 1] + 1
        end = moe[j] if j < len(moe) else len(layer)
        rows = [n for n in (j - 1, j) if 0 <= n < len(moe)]
        kind = (j == 0, j == len(moe),
                layer[moe[j - 1]] if j > 0 else None,
                tuple(layer[start:end]),
                layer[moe[j]] if j < len(moe) else None,
                tuple((n - j, buf[n].data_ptr() % 16) for n in rows
                      for buf in (decoder.route_w, decoder.slot_ids)),
                len(moe[j + 1:j + 1 + decoder.ahead]))
        first.setdefault(kind, j)
    return sorted(first.values())


def _compile(device: torch.device, launch: Launch):
    with torch.cuda.device(device):
        kernel = launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.kwargs)
    try:
        _build_launcher(kernel)
    except Exception:  # the load builds it, as without this
        pass
    return kernel


def _build_launcher(kernel) -> None:
    """Triton 3.6 (torch 2.11's) loads each kernel through a C launcher made for its signature,
    compiled by a C compiler at the kernel's first load: 0.22-0.41 s each, one at a time on
    the thread that loads (see _load), 2.6 s of a first run after install at --gpu-memory 12GiB
    on an H100. Compile it here instead, on the build threads, into Triton's cache, where the
    load finds it: the source as triton.backends.nvidia.driver.CudaLauncher makes it, cached as
    triton.runtime.build.compile_module_from_src caches it, without loading it. Triton's private
    steps: a Triton without them (3.9 has one launcher for all kernels) skips this."""
    try:
        from triton.backends.nvidia import driver as nvidia
        from triton.runtime import build
    except ImportError:
        return
    make_launcher = getattr(nvidia, "make_launcher", None)
    if make_launcher is None or not hasattr(build, "_build") or not hasattr(build, "platform_key"):
        return
    src, metadata = kernel.src, kernel.metadata
    names = src.fn.arg_names
    constants = {((names.index(k),) if isinstance(k, str) else k): v
                 for k, v in getattr(src, "constants", {}).items()}
    code = make_launcher(constants, dict(src.signature), getattr(metadata, "tensordesc_meta", None))
    name = "__triton_launcher"
    filename = name + sysconfig.get_config_var("EXT_SUFFIX")
    cache = build.get_cache_manager(hashlib.sha256((code + build.platform_key()).encode("utf-8")).hexdigest())
    if cache.get_file(filename) is not None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name + ".c")
        with open(path, "w") as f:
            f.write(code)
        so = build._build(name, path, tmp, nvidia.library_dirs(), nvidia.include_dirs,
                          nvidia.libraries, [])
        with open(so, "rb") as f:
            cache.put(f.read(), filename, binary=True)


def _load(kernel) -> None:
    """Load a compiled kernel into the GPU context and build its launcher now, not at its first
    launch (Triton's private step; a Triton without it does both at the first launch)."""
    init = getattr(kernel, "_init_handles", None)
    if init is not None:
        init()
