"""Start-up on CUDA: first graph at load, the compiled step switched in when ready, no recompile at a new length, graphs
captured ahead on the background thread, staged reads to the GPU.

Skipped without a GPU; run on the GPU machine with `python -m pytest tests/gpu -q`.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Dynamo's compiled code outlives an engine: a step compiled by an earlier test in this
    process would be reused here, and these tests count compiles."""
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def greedy(engine, ids: list[int], n: int) -> tuple[int, ...]:
    from dscoder.events import GenerationSettings

    events = list(engine.generate(ids, GenerationSettings(max_tokens=n, temperature=0), stop_ids=()))
    return events[-1].token_ids


def test_load_captures_the_first_graph_and_switches_to_the_compiled_step(tiny_checkpoint):
    """Loading captures the uncompiled step's first graph (the compile runs in the background);
    once the compiled step is ready the next reply recaptures with it and gives the same ids,
    and later replies in that bucket compile and capture nothing."""
    from dscoder.engine import load_engine
    from dscoder.shapes import BUCKET
    from dscoder.warmup import compile_count

    engine = load_engine(tiny_checkpoint, device="cuda", dtype="float32")
    profile = engine.startup_profile
    assert {"graph capture", "load weights"} <= set(profile.seconds)
    assert profile.counts["graphs captured"] == 1
    assert BUCKET in engine._session._graphs.graphs
    first = greedy(engine, [1, 2, 3, 4], 16)
    assert engine.use_compiled_step(wait=True)
    assert profile.counts["compiles"] == 2 and "compile (background)" in profile.seconds
    assert greedy(engine, [1, 2, 3, 4], 16) == first
    captured, before = profile.counts["graphs captured"], compile_count()
    greedy(engine, [5, 6, 7], 16)  # inside the first bucket: nothing to compile or capture
    assert compile_count() == before
    assert profile.counts["graphs captured"] == captured


def test_new_lengths_and_cache_growth_never_recompile(tiny_checkpoint, monkeypatch):
    import dscoder.graphs as graphs_mod
    from dscoder import shapes
    from dscoder.engine import load_engine
    from dscoder.warmup import compile_count

    monkeypatch.setattr(shapes, "BUCKET", 16)
    monkeypatch.setattr(graphs_mod, "AHEAD_ROWS", 8)
    monkeypatch.setattr(shapes, "FIRST_CAPACITY", 32)
    graphed = load_engine(tiny_checkpoint, device="cuda", dtype="float32")
    assert graphed.use_compiled_step(wait=True)
    before = compile_count()
    got = [greedy(graphed, [1, 5, 9], 100), greedy(graphed, list(range(1, 70)), 40)]
    assert compile_count() == before, "a new bucket or a grown cache recompiled the decode step"
    assert graphed.startup_profile.counts.get("graphs captured ahead", 0) > 0
    eager = load_engine(tiny_checkpoint, device="cuda", dtype="float32", cuda_graphs=False)
    assert got == [greedy(eager, [1, 5, 9], 100), greedy(eager, list(range(1, 70)), 40)]


def test_half_precision_graphs_read_the_whole_cache_so_a_new_length_never_captures(tiny_checkpoint, monkeypatch):
    """Where the MLA decode kernel runs (half precision, Hopper) it reads only the rows up to the
    device position, so one graph per cache serves every length (dscoder.graphs): crossing
    buckets captures nothing, and the ids are those of graphs captured per bucket."""
    from dscoder import shapes
    from dscoder.engine import load_engine
    from dscoder.model.transformer import Transformer

    monkeypatch.setattr(shapes, "BUCKET", 16)
    prompts = ([1, 5, 9], list(range(1, 40)))
    whole = load_engine(tiny_checkpoint, device="cuda", dtype="bfloat16")
    if not whole.model.decode_bounded_by_position():
        pytest.skip("no MLA decode kernel on this card")
    assert whole.use_compiled_step(wait=True)
    greedy(whole, [3], 2)  # the compiled step's graph, recaptured
    counts = whole.startup_profile.counts
    captured = counts["graphs captured"]
    got = [greedy(whole, p, 60) for p in prompts]  # positions 3..99: seven 16-row buckets
    assert counts["graphs captured"] == captured
    assert set(whole._session._graphs.graphs) == {min(shapes.FIRST_CAPACITY, whole.context_length)}

    monkeypatch.setattr(Transformer, "decode_bounded_by_position", lambda self: False)
    buckets = load_engine(tiny_checkpoint, device="cuda", dtype="bfloat16")
    assert buckets.use_compiled_step(wait=True)
    assert [greedy(buckets, p, 60) for p in prompts] == got
    assert len(buckets._session._graphs.graphs) > 1


def test_capture_ahead_off_captures_on_need_with_the_same_ids(tiny_checkpoint, monkeypatch):
    from dscoder import shapes
    from dscoder.engine import load_engine

    monkeypatch.setattr(shapes, "BUCKET", 16)
    ahead = load_engine(tiny_checkpoint, device="cuda", dtype="float32")
    on_need = load_engine(tiny_checkpoint, device="cuda", dtype="float32", capture_ahead=False)
    assert greedy(ahead, [1, 2], 60) == greedy(on_need, [1, 2], 60)
    assert on_need.startup_profile.counts.get("graphs captured ahead", 0) == 0


def _gpu_and_cpu_loads_agree(tiny_checkpoint, dtype: torch.dtype = torch.bfloat16) -> None:
    from dscoder.config import ModelConfig
    from dscoder.weights import load_model

    cfg = ModelConfig.from_file(tiny_checkpoint / "config.json")
    gpu = load_model(tiny_checkpoint, cfg, device=torch.device("cuda"), dtype=dtype)
    cpu = load_model(tiny_checkpoint, cfg, device=torch.device("cpu"), dtype=dtype)
    cpu_params = dict(cpu.named_parameters())
    for name, p in gpu.named_parameters():
        assert torch.equal(p.cpu(), cpu_params[name]), name


@pytest.mark.parametrize("direct", [True, False], ids=["from-the-page-cache", "staged"])
def test_reads_to_the_gpu_equal_reads_to_the_cpu(tiny_checkpoint, monkeypatch, direct):
    """Both ways to the GPU: DMA from the registered page cache (each shard registered once;
    the checkpoint's own dtype, as nothing converts), and staged through pinned buffers (tiny
    ones: many chunks per tensor, buffers reused)."""
    import dscoder.shard_reader as reader

    registered = []
    init = reader._Registered.__init__

    def counting(self, path, ordinal):
        init(self, path, ordinal)
        registered.append(path)

    monkeypatch.setattr(reader._Registered, "__init__", counting)
    monkeypatch.setattr(reader, "DIRECT", direct)
    monkeypatch.setattr(reader._ShardDMA, "refused", False)
    monkeypatch.setattr(reader, "STAGING_BYTES", 4096)
    _gpu_and_cpu_loads_agree(tiny_checkpoint, torch.float32)  # the tiny checkpoint's dtype
    shards = sorted(tiny_checkpoint.glob("*.safetensors"))
    assert sorted(registered) == (shards if direct else [])


def test_shards_locked_before_the_load_are_copied_from_without_locking_again(tiny_checkpoint,
                                                                           monkeypatch):
    """The CLI's early page-locking (dscoder.page_lock.start_early, which runs before torch is
    imported there): the load takes every shard from it, none is locked twice, and the GPU's
    weights equal the CPU's."""
    import dscoder.shard_reader as reader
    from dscoder import page_lock
    from dscoder.engines import shard_files

    driver = page_lock.Driver.get()
    register, sizes = driver.register, []
    monkeypatch.setattr(driver, "register", lambda address, size: sizes.append(size) or register(address, size))
    monkeypatch.setattr(reader, "DIRECT", True)
    monkeypatch.setattr(reader._ShardDMA, "refused", False)
    shards = shard_files(tiny_checkpoint)
    unregister, unlocked = driver.unregister, []
    monkeypatch.setattr(driver, "unregister", lambda address: unlocked.append(address) or unregister(address))
    page_lock.start_early(shards, 0)
    try:
        _gpu_and_cpu_loads_agree(tiny_checkpoint, torch.float32)
        assert unlocked == []  # kept locked for after the first reply
    finally:
        page_lock.release_early()
        page_lock.unlock_deferred()
    assert sorted(sizes) == sorted(p.stat().st_size for p in shards)
    assert len(unlocked) == len(shards)


def _driver_calls(monkeypatch, *names: str) -> list[str]:
    """The names of the driver's calls among `names` (page_lock.Driver), as they are made, with
    the loads' DMA from the page cache (or the staged shards) on."""
    import dscoder.shard_reader as reader
    from dscoder import page_lock

    driver = page_lock.Driver.get()
    log: list[str] = []
    for name in names:
        real = getattr(driver, name)
        monkeypatch.setattr(driver, name, lambda *a, _real=real, _name=name: log.append(_name) or _real(*a))
    monkeypatch.setattr(reader, "DIRECT", True)
    monkeypatch.setattr(reader._ShardDMA, "refused", False)
    return log


def test_shards_staged_on_the_gpu_before_the_load_fill_it_by_device_copies(tiny_checkpoint, monkeypatch):
    """The CLI's staging (page_lock.start_early(stage=True)): each shard is copied whole to the
    GPU and unlocked before the load takes it; the load copies on the device, frees every
    staging, and the GPU's weights equal the CPU's."""
    from dscoder import page_lock
    from dscoder.engines import shard_files

    log = _driver_calls(monkeypatch, "alloc", "free", "unregister", "copy_on_device")
    shards = shard_files(tiny_checkpoint)
    page_lock.start_early(shards, 0, stage=True)
    try:
        page_lock._EARLY._ready[shards[-1]].wait()  # as when torch's import outlasts the staging
        assert log.count("unregister") == log.count("alloc") == len(shards)  # all unlocked already
        _gpu_and_cpu_loads_agree(tiny_checkpoint, torch.float32)
    finally:
        page_lock.release_early()
    assert log.count("free") == len(shards) and log.count("copy_on_device") > 0


def test_shards_a_helper_process_staged_fill_the_model_and_the_helper_ends(tiny_checkpoint, monkeypatch):
    """The CLI's staging by a helper process (dscoder.stage_helper): each shard, read and copied
    to the GPU there, is mapped here through CUDA IPC, nothing is page-locked or allocated here
    for it; the load copies on the device, closes every mapping, and the helper ends; the GPU's
    weights equal the CPU's."""
    from dscoder import page_lock, stage_helper
    from dscoder.engines import shard_files

    log = _driver_calls(monkeypatch, "alloc", "register", "ipc_open", "ipc_close")
    shards = shard_files(tiny_checkpoint)
    helper = stage_helper.start(shards, 0)
    assert helper is not None
    page_lock.start_early(shards, 0, stage=True, helper=helper)
    try:
        for path in shards:  # a helper's shards come in about the order of its threads
            page_lock._EARLY._ready[path].wait()
        assert log.count("ipc_open") == len(shards) and log.count("alloc") == log.count("register") == 0
        assert page_lock.early_staged()[0] == sum(p.stat().st_size for p in shards)
        _gpu_and_cpu_loads_agree(tiny_checkpoint, torch.float32)
    finally:
        page_lock.release_early()
    assert log.count("ipc_close") == len(shards)
    assert helper._proc.wait(timeout=30) == 0


@pytest.mark.parametrize("helper", [False, True], ids=["staged-here", "staged-by-a-helper"])
def test_a_model_with_no_room_beside_its_staged_shards_loads_from_the_page_cache(tiny_checkpoint, monkeypatch,
                                                                                  helper):
    """Another process took the GPU's memory after the shards were staged: the model's
    allocation runs out, the loader lets the staging go and loads from the page cache."""
    import dscoder.shard_reader as reader
    from dscoder import loader, page_lock, stage_helper
    from dscoder.config import ModelConfig
    from dscoder.engines import shard_files
    from dscoder.profile import StartupProfile
    from dscoder.weights import load_model

    monkeypatch.setattr(reader, "DIRECT", True)
    monkeypatch.setattr(reader._ShardDMA, "refused", False)
    driver = page_lock.Driver.get()
    cfg = ModelConfig.from_file(tiny_checkpoint / "config.json")
    shards = shard_files(tiny_checkpoint)
    staged = sum(p.stat().st_size for p in shards)
    torch.cuda.empty_cache()
    page_lock.start_early(shards, 0, stage=True, helper=stage_helper.start(shards, 0) if helper else None)
    hog = gpu = None
    try:
        for path in shards:
            page_lock._EARLY._ready[path].wait()
        assert page_lock.early_staged()[0] == staged
        # what is left: half the model's size
        hog = torch.empty(driver.free_memory() - staged // 2, dtype=torch.uint8, device="cuda")
        gpu = loader._load_resident(tiny_checkpoint, cfg, torch.device("cuda"), torch.float32, 64, None,
                                    "bf16", False, StartupProfile())
        assert page_lock._EARLY is None  # released to make room
    finally:
        del hog
        page_lock.release_early()
        page_lock.unlock_deferred()
    cpu = dict(load_model(tiny_checkpoint, cfg, device=torch.device("cpu"), dtype=torch.float32).named_parameters())
    for name, p in gpu.named_parameters():
        assert torch.equal(p.cpu(), cpu[name]), name
    del gpu
    torch.cuda.empty_cache()


def test_a_refused_registration_falls_back_to_staged_reads(tiny_checkpoint, monkeypatch):
    """A driver that cannot page-lock a file's mapping (cuMemHostRegister fails): the staged
    reads load every tensor, no CUDA error is left behind, and later loads go staged at once."""
    import dscoder.shard_reader as reader
    from dscoder import page_lock

    calls = []
    driver = page_lock.Driver.get()

    def refused(address, size):  # a real failure: flags no driver accepts
        calls.append(address)
        return driver.cuda.cuMemHostRegister_v2(address, size, 1 << 30)

    monkeypatch.setattr(reader._ShardDMA, "refused", False)
    monkeypatch.setattr(driver, "register", refused)
    _gpu_and_cpu_loads_agree(tiny_checkpoint, torch.float32)
    assert len(calls) == 1 and reader._ShardDMA.refused
    _gpu_and_cpu_loads_agree(tiny_checkpoint, torch.float32)
    assert len(calls) == 1
    torch.ones(4, device="cuda").add_(1)  # a kernel launch: no stale error is reported
    torch.cuda.synchronize()


def test_close_after_captures_ahead_frees_the_gpu(tiny_checkpoint, monkeypatch):
    import gc

    import dscoder.graphs as graphs_mod
    from dscoder import shapes
    from dscoder.engine import load_engine

    monkeypatch.setattr(shapes, "BUCKET", 16)
    monkeypatch.setattr(graphs_mod, "AHEAD_ROWS", 8)
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    engine = load_engine(tiny_checkpoint, device="cuda", dtype="float32", context_length=512)
    greedy(engine, [1, 2, 3], 60)
    assert engine.startup_profile.counts.get("graphs captured ahead", 0) > 0
    engine.close()
    gc.collect()
    assert torch.cuda.memory_allocated() <= base, "a background capture kept GPU memory alive"


def test_loading_weights_while_another_thread_captures_a_graph(tmp_path):
    """The shard reader holds the capture lock (dscoder.cuda_capture), as every capture does: its
    workers' stream and event synchronizes failed now and then with "operation not permitted
    when stream is capturing" while another engine captured a graph ahead, in
    test_new_lengths_and_cache_growth_never_recompile's second load (H100). A load that starts
    during a capture now reads once the capture has ended, and both succeed."""
    import threading
    import time

    from safetensors.torch import save_file

    from dscoder.cuda_capture import CAPTURE_LOCK
    from dscoder.shard_reader import read_header, read_parallel

    tensors = {"w": torch.randn(3000, 700).bfloat16(), "router": torch.randn(64, 32)}
    save_file(tensors, tmp_path / "s.safetensors")
    entries = read_header(tmp_path / "s.safetensors")
    # "router" arrives as fp32 into a bf16 destination: the converting path
    dst = {k: torch.empty(v.shape, dtype=torch.bfloat16, device="cuda") for k, v in tensors.items()}
    counter = torch.zeros(4, device="cuda")
    capturing = threading.Event()
    done: dict = {}

    def capture() -> None:
        try:
            with CAPTURE_LOCK:  # as dscoder.graphs.capture_graph captures
                side = torch.cuda.Stream()
                with torch.cuda.stream(side):
                    graph = torch.cuda.CUDAGraph()
                    graph.capture_begin(capture_error_mode="thread_local")
                    counter.add_(1)
                    capturing.set()
                    time.sleep(0.5)  # the load below starts meanwhile
                    graph.capture_end()
                done["ended"] = time.monotonic()
            done["graph"] = graph
        except Exception as e:  # reported below, in the test's thread
            done["error"] = e
            capturing.set()

    thread = threading.Thread(target=capture)
    thread.start()
    capturing.wait(60)
    try:
        read_parallel([(entries[k], dst[k]) for k in tensors], threads=2)
        loaded = time.monotonic()
    finally:
        thread.join(60)
    assert "error" not in done, done.get("error")
    assert loaded >= done["ended"], "the load ran while the capture was in progress"
    done["graph"].replay()
    torch.cuda.synchronize()
    assert counter.tolist() == [1.0] * 4  # the capture survived: its replay ran once
    for k, v in tensors.items():
        assert torch.equal(dst[k].cpu(), v.bfloat16())


BUILDS_SCRIPT = r"""
import json, os, sys, threading
from pathlib import Path

import dscoder.kernel_prebuild as kp
from dscoder.engine import load_engine
from dscoder.events import GenerationSettings

cache = Path(os.environ["TRITON_CACHE_DIR"])
seen = {}
wait = kp.KernelPrebuild.wait

def built():  # a directory per build: the kernel's files, or a launcher's
    return sorted(f"{d.name[:8]}/{f.name}" for d in cache.iterdir() for f in d.iterdir()
                  if f.suffix in (".so", ".cubin"))

def waited(self):
    wait(self)
    seen["after the builds"] = built()
    seen["errors"] = [repr(e) for e in self.errors]

kp.KernelPrebuild.wait = waited
try:  # Triton 3.6's C launchers: which thread compiles each (Triton 3.9 has none per kernel)
    from triton.backends.nvidia import driver as nvidia
    from triton.runtime import build
    seen["per-kernel launchers"] = hasattr(nvidia, "make_launcher")
    seen["launcher builds"] = []
    c_build = build._build

    def counted(name, *args, **kwargs):
        if name == "__triton_launcher":  # not Triton's own utilities
            seen["launcher builds"].append(threading.current_thread().name)
        return c_build(name, *args, **kwargs)

    build._build = counted
except ImportError:
    pass
budget = sys.argv[2] if len(sys.argv) > 2 else None  # bytes: experts offloaded behind a cache
engine = load_engine(sys.argv[1], device="cuda", dtype="bfloat16", compile=False, gpu_memory=budget,
                     context_length=512 if budget else None)
assert (engine.model.offload is not None) == bool(budget)
for temperature in (0.8, 0.0):  # the sampled step's kernel and the greedy step
    events = list(engine.generate([1, 2, 3], GenerationSettings(max_tokens=8, temperature=temperature, seed=1),
                                  stop_ids=()))
    assert len(events[-1].token_ids) == 8
seen["at the end"] = built()
seen["counts"] = engine.startup_profile.counts
seen["seconds"] = engine.startup_profile.seconds
print(json.dumps(seen))
"""


@pytest.mark.parametrize("offloaded", [False, True])
def test_kernels_build_before_the_first_capture_and_no_reply_builds_one(six_layer_checkpoint, tmp_path,
                                                                        offloaded):
    """With an empty Triton cache (the first run after install), the dry run's builds (during
    the load; offloaded: before the first capture), through one layer or segment of each kind
    (six layers: a dense one, five MoE ones), are every build the process needs: the
    first graph capture, a sampled and a greedy reply add nothing to the cache (each build,
    and each C launcher, adds a directory). Then twice with that cache (warm starts: the
    builds are lookups, loaded on the prebuild's thread), which once failed with a kernel
    called through another kernel's launcher when several threads loaded launchers at once.
    Fresh processes: this one's kernels are built."""
    import json
    import os
    import subprocess
    import sys

    from dscoder.config import ModelConfig
    from dscoder.offload.planner import budget_for_slots
    from dscoder.offload.setup import model_sizes

    budget = []
    if offloaded:  # room for 9 of the 40 routed experts (the least: twice 4 a token) at 512 tokens
        cfg = ModelConfig.from_file(six_layer_checkpoint / "config.json")
        slots = 2 * cfg.num_experts_per_tok + 1
        budget = [str(budget_for_slots(model_sizes(cfg, torch.bfloat16), slots, 512, cuda=True))]
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    runs = []
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", BUILDS_SCRIPT, str(six_layer_checkpoint), *budget], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        runs.append(json.loads(done.stdout.splitlines()[-1]))
    cold = runs[0]
    assert cold["errors"] == []
    assert cold["counts"]["kernels built"] >= 7  # gemv variants, routing, cache row, MLA, noise
    if cold.get("per-kernel launchers"):  # compiled on the build threads, none where they load
        assert cold["launcher builds"], "no C launcher was built"
        assert "dscoder-kernels" not in cold["launcher builds"], cold["launcher builds"]
    assert "kernel builds (background)" in cold["seconds"]
    assert len(cold["after the builds"]) >= cold["counts"]["kernels built"]
    assert cold["at the end"] == cold["after the builds"]
    for warm in runs[1:]:
        assert warm["errors"] == []
        assert warm["counts"]["kernels built"] == cold["counts"]["kernels built"]
        assert warm["at the end"] == cold["at the end"]
