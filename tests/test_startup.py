"""Start-up: the profile, the compile cache's place, no recompile at a new length, parallel reads."""
from __future__ import annotations

import functools
import io
import json
import shutil
import threading

import pytest
import torch

from dscoder.compile_cache import cache_root, configure_cache_dirs
from dscoder.profile import StartupProfile


def test_profile_orders_phases_and_adds_repeats():
    p = StartupProfile()
    p.add("graph capture", 0.25)
    p.add("import", 1.5)
    p.add("graph capture", 0.25)
    p.count("bytes loaded", 4_000_000_000)
    p.add("load weights", 2.0)
    p.add("allocate", 0.2)
    p.add("before import", 0.3)
    p.count("compiles", 2)
    line = p.summary()
    assert line.startswith("start-up: before import 0.30 s, import 1.50 s, allocate 0.20 s, "
                           "load weights 2.00 s, graph capture 0.50 s")
    assert "4.0 GB at 2.0 GB/s" in line and "2 compiles" in line
    assert p.as_dict()["seconds"]["graph capture"] == 0.5


def test_profile_phase_runs_sync_before_stopping_the_clock():
    p, calls = StartupProfile(), []
    with p.phase("graph capture", lambda: calls.append("sync")):
        calls.append("work")
    assert calls == ["work", "sync"] and p.seconds["graph capture"] >= 0


def test_compile_cache_lives_under_the_user_cache_dir(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    dirs = configure_cache_dirs(env)
    assert dirs == {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "dscoder" / "inductor"),
                    "TRITON_CACHE_DIR": str(tmp_path / "dscoder" / "triton")}
    assert env["TORCHINDUCTOR_CACHE_DIR"] == dirs["TORCHINDUCTOR_CACHE_DIR"]


def test_compile_cache_defaults_to_home_and_ignores_a_relative_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root({}) == tmp_path / ".cache" / "dscoder"
    assert cache_root({"XDG_CACHE_HOME": "relative/dir"}) == tmp_path / ".cache" / "dscoder"


def test_user_set_cache_dirs_win(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path), "TORCHINDUCTOR_CACHE_DIR": "/mine/inductor",
           "TRITON_CACHE_DIR": "/mine/triton"}
    assert configure_cache_dirs(env) == {"TORCHINDUCTOR_CACHE_DIR": "/mine/inductor",
                                         "TRITON_CACHE_DIR": "/mine/triton"}


def test_loading_points_the_compile_cache_at_the_user_cache_dir(tiny_checkpoint, monkeypatch, tmp_path):
    from dscoder.engine import load_engine

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    load_engine(tiny_checkpoint, device="cpu", dtype="float32")
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "dscoder" / "inductor")


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    from dscoder.config import ModelConfig
    from dscoder.weights import load_model

    cfg = ModelConfig.from_file(tiny_checkpoint / "config.json")
    model = load_model(tiny_checkpoint, cfg, device=torch.device("cpu"), dtype=torch.float32)
    model.set_context(8192)
    return model


def test_a_new_length_or_cache_size_needs_no_recompile(tiny_model):
    """The compiled decode step sees the bucket and the cache capacity as dynamic sizes from
    its first compile: one graph per layer kind (dense, MoE), whatever the length."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    m = tiny_model
    m.compile_decode(backend=counting_backend)
    try:
        ids = torch.tensor([7])
        with torch.inference_mode():
            for capacity, pos, visible in [(1025, 3, 1024), (4096, 1500, 2048), (4096, 3000, 3072),
                                           (8192, 5000, 5120), (4096, 4000, 4096)]:
                got = m.decode_at(ids, torch.tensor([pos]), m.new_cache(capacity), visible)
                m._compiled_layer, compiled = None, m._compiled_layer
                want = m.decode_at(ids, torch.tensor([pos]), m.new_cache(capacity), visible)
                m._compiled_layer = compiled
                assert torch.allclose(got, want, atol=1e-5)
                assert len(graphs) == 2, f"recompiled at capacity {capacity}, {visible} rows"
    finally:
        m._compiled_layer = None


def test_parallel_read_fills_converted_and_stacked_tensors(tiny_checkpoint, tmp_path):
    """bf16 from an fp32 checkpoint (a converting read) equals safetensors' own loading."""
    import sys

    from safetensors.torch import load_file

    from dscoder.config import ModelConfig
    from dscoder.weights import load_model

    cfg = ModelConfig.from_file(tiny_checkpoint / "config.json")
    seen, switch = [], sys.getswitchinterval()
    m = load_model(tiny_checkpoint, cfg, device=torch.device("cpu"), dtype=torch.bfloat16,
                   progress=lambda done, total: seen.append((done, total)))
    assert sys.getswitchinterval() == switch  # lowered only while reading
    ref = {}
    for f in tiny_checkpoint.glob("*.safetensors"):
        ref.update(load_file(f))
    assert torch.equal(m.model.layers[0].self_attn.kv_b_proj.weight,
                       ref["model.layers.0.self_attn.kv_b_proj.weight"].bfloat16())
    assert torch.equal(m.model.layers[1].mlp.experts.w2[3],
                       ref["model.layers.1.mlp.experts.3.down_proj.weight"].bfloat16())
    assert m.model.layers[1].mlp.gate.weight.dtype == torch.float32
    assert seen and seen[-1][0] == seen[-1][1]


def test_a_shard_cut_inside_a_tensor_is_named(tiny_checkpoint, tmp_path):
    """The header is intact but a tensor's bytes run past the end of the file."""
    from dscoder.errors import BadCheckpoint
    from dscoder.shard_reader import read_header

    src = next(tiny_checkpoint.glob("*.safetensors"))
    victim = tmp_path / src.name
    shutil.copy(src, victim)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size - 1)
    with pytest.raises(BadCheckpoint, match=f"{victim.name}.*damaged or truncated"):
        read_header(victim)


def test_engine_records_its_start_up_and_first_prefill(tiny_checkpoint):
    from dscoder.engine import load_engine
    from dscoder.events import GenerationSettings

    engine = load_engine(tiny_checkpoint, device="cpu", dtype="float32")
    profile = engine.startup_profile
    assert {"config", "allocate", "load weights", "tokenizer"} <= set(profile.seconds)
    assert profile.counts["bytes loaded"] > 0
    list(engine.generate([1, 2, 3], GenerationSettings(max_tokens=2, temperature=0), stop_ids=()))
    first = profile.seconds["first prefill"]
    list(engine.generate([4, 5, 6], GenerationSettings(max_tokens=2, temperature=0), stop_ids=()))
    assert profile.seconds["first prefill"] == first  # the first reply's only


def test_verbose_prints_the_start_up_profile(monkeypatch):
    import io

    import dscoder.cli.backend as backend
    from dscoder.cli.runtime import Runtime
    from dscoder.settings import Settings
    from dscoder.ui.console import Terminal

    profile = StartupProfile()
    profile.add("import", 1.25)

    class Backend:
        def model_name(self, settings):
            return "m"

        def load_engine(self, settings, warn, info=None, progress=None):
            return type("E", (), {"tokenizer": None, "startup_profile": profile, "context_length": 4096})()

    monkeypatch.setattr(backend, "BACKEND", Backend())
    for verbose in (False, True):
        err = io.StringIO()
        term = Terminal(io.StringIO(), io.StringIO(), err, pretty=False, err_color=False)
        Runtime(Settings(verbose=verbose, server="off"), term).engine()
        assert ("start-up: import 1.25 s" in err.getvalue()) == verbose


def test_the_background_compile_serves_every_layer_and_length(tiny_checkpoint):
    """The step compiled in the background (one graph per layer kind) serves every layer and
    a cache and bucket of other sizes: nothing compiles again after the switch."""
    from dscoder.config import ModelConfig
    from dscoder.graphs import swap_step
    from dscoder.warmup import Precompile
    from dscoder.weights import load_model

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    cfg = ModelConfig.from_file(tiny_checkpoint / "config.json")
    profile = StartupProfile()
    model = load_model(tiny_checkpoint, cfg, device=torch.device("cpu"), dtype=torch.float32)
    model.set_context(4096)
    pre = Precompile(model, 1024, profile, backend=counting_backend)
    compiled = pre.result(wait=True)
    assert pre.error is None and compiled is not None and len(graphs) == 2  # a dense and a MoE layer
    swap_step(model, compiled)
    cache = model.new_cache(4096)  # made as a session makes it; ids and position as the graphs'
    with torch.inference_mode():
        model.decode_at(torch.tensor([3]), torch.tensor([100]), cache, 2048)
    assert len(graphs) == 2
    assert profile.counts["compiles"] == 2 and "compile (background)" in profile.seconds


def test_decoding_switches_to_the_compiled_step_when_it_is_ready(tiny_checkpoint):
    """Replies before the compile is ready use the uncompiled step; the next decode round after
    it is ready switches (the decoder's graphs of the old step are recaptured), same ids."""
    from dscoder.engine import load_engine
    from dscoder.events import GenerationSettings
    from dscoder.shapes import BUCKET
    from dscoder.warmup import Precompile

    calls, release = [], threading.Event()

    def held_backend(gm, example_inputs):  # the compile waits for `release`
        release.wait()

        def run(*args):
            calls.append(1)
            return gm.forward(*args)
        return run

    def greedy(engine, ids, n=12):
        events = list(engine.generate(ids, GenerationSettings(max_tokens=n, temperature=0), stop_ids=()))
        return events[-1].token_ids

    engine = load_engine(tiny_checkpoint, device="cpu", dtype="float32")
    expected = greedy(engine, [1, 2, 3])
    engine.close()
    engine = load_engine(tiny_checkpoint, device="cpu", dtype="float32")
    engine.use_graphs = True  # GraphedDecoder runs its steps eagerly on the CPU, as replays
    engine.precompile = pre = Precompile(engine.model, BUCKET, StartupProfile(), backend=held_backend)
    assert greedy(engine, [1, 2, 3]) == expected
    assert not calls and engine.precompile is pre and engine.model._compiled_layer is None
    decoder = engine._session._graphs
    release.set()
    pre.done.wait()
    assert greedy(engine, [1, 2, 3]) == expected  # the first round switched
    assert calls and engine.precompile is None and engine.model._compiled_layer is not None
    assert all(decoder.fresh(v) for v in decoder.versions) and decoder.versions


def test_loading_leaves_no_file_open(tiny_checkpoint):
    import os

    from dscoder.config import ModelConfig
    from dscoder.weights import load_model

    cfg = ModelConfig.from_file(tiny_checkpoint / "config.json")
    before = len(os.listdir("/proc/self/fd"))
    load_model(tiny_checkpoint, cfg, device=torch.device("cpu"), dtype=torch.float32)
    assert len(os.listdir("/proc/self/fd")) <= before


def test_capture_worker_runs_in_order_and_a_stopped_one_cancels():
    """What waits on a capture (a decode step, Engine.close) hears back even after exit began."""
    from dscoder.graphs import _failed, _Worker
    from dscoder.shapes import bucket_rows

    worker, order = _Worker(), []
    futures = [worker.submit(order.append, i) for i in range(3)]
    assert not any(_failed(f) for f in futures) and order == [0, 1, 2]
    boom = worker.submit(lambda: 1 / 0)
    assert _failed(boom)
    worker.stopping = True
    late = worker.submit(order.append, 9)
    assert _failed(late) and late.cancelled() and 9 not in order
    assert [bucket_rows(p, 4096) for p in (0, 1023, 1024, 4095)] == [1024, 1024, 2048, 4096]
    assert bucket_rows(5000, 4096) == 4096


def test_capture_ahead_is_a_setting_that_reaches_load_engine(monkeypatch, tiny_checkpoint):
    import dscoder.engine
    from dscoder.cli.backend import RealBackend
    from dscoder.errors import UsageError
    from dscoder.settings import load_settings

    home = {"HOME": "/nonexistent"}
    assert load_settings({}, home).capture_ahead is True
    seen = {}
    monkeypatch.setattr(dscoder.engine, "load_engine", lambda *a, **kw: seen.update(kw) or "engine")
    s = load_settings({"model": str(tiny_checkpoint), "device": "cpu"},
                      {**home, "DSCODER_CAPTURE_AHEAD": "0"})
    RealBackend().load_engine(s, lambda m: None, lambda m: None)
    assert seen["capture_ahead"] is False and seen["profile"] is not None
    with pytest.raises(UsageError, match="DSCODER_CAPTURE_AHEAD"):
        load_settings({}, {**home, "DSCODER_CAPTURE_AHEAD": "later"})


class _FakeGraph:
    def __init__(self, log: list, visible: int) -> None:
        self.log, self.visible = log, visible

    def replay(self) -> None:
        self.log.append(("replay", self.visible))


def _fake_decoder(fail_in_background: bool = False, whole: bool = False):
    """A GraphedDecoder whose captures record instead of touching CUDA: the bookkeeping
    (which bucket, ahead or on need, waiting, falling back) is what is tested here."""
    import threading
    from types import SimpleNamespace

    from dscoder.graphs import _THREAD, GraphedDecoder

    class Fake(GraphedDecoder):
        def _capture(self, visible: int) -> None:
            background = threading.current_thread().name == _THREAD
            self.log.append(("capture", visible, background))
            if background and fail_in_background:
                raise RuntimeError("capture failed")
            self._install(visible, _FakeGraph(self.log, visible).replay, self.model.step_version)

    cache = type("Cache", (), {"capacity": 4096})()
    model = SimpleNamespace(lm_head=SimpleNamespace(weight=torch.zeros(1)), cfg=SimpleNamespace(vocab_size=8),
                            step_version=0, decode_bounded_by_position=lambda: whole)
    d = Fake(model, cache)
    d.cuda = True  # as on a GPU: later buckets are captured on the background thread
    d.log = []
    return d


def test_the_next_bucket_is_captured_in_the_background_before_it_is_needed():
    d = _fake_decoder()
    for pos in range(700, 1030):
        d(5, pos)
    d.wait()
    captures = [e for e in d.log if e[0] == "capture"]
    assert captures == [("capture", 1024, False), ("capture", 2048, True)]
    assert ("replay", 2048) in d.log  # positions 1024.. replayed the graph captured ahead


def test_one_graph_serves_every_length_where_attention_stops_at_the_position():
    """With the MLA decode kernel the step reads only the rows up to the device position, so the
    graph reads the whole cache: crossing buckets neither captures nor captures ahead."""
    d = _fake_decoder(whole=True)
    for pos in (0, 700, 1023, 1024, 2500, 4095):
        d(5, pos)
    d.wait()
    assert [e for e in d.log if e[0] == "capture"] == [("capture", 4096, False)]
    assert d.rows(10) == d.rows(4000) == 4096 and not d.pending


def test_a_failed_background_capture_is_redone_where_it_is_needed():
    d = _fake_decoder(fail_in_background=True)
    for pos in range(1000, 1030):
        d(5, pos)
    assert ("capture", 2048, True) in d.log and ("capture", 2048, False) in d.log
    assert d.ahead is False and ("replay", 2048) in d.log


def test_a_reply_asks_for_its_first_decode_graph_before_prefilling(tiny_checkpoint, monkeypatch):
    """The engine's hooks: load captures the first bucket (wait), a reply asks for the bucket
    of its first decode step ahead of its prefill."""
    import dscoder.engine as engine_mod
    from dscoder.engine import load_engine
    from dscoder.events import GenerationSettings

    engine = load_engine(tiny_checkpoint, device="cpu", dtype="float32")
    calls = []

    class Recorder:
        def __init__(self, engine, cache):
            self.cache = cache

        def capture(self, visible):
            calls.append(("capture", visible))

        def capture_ahead(self, visibles):
            calls.append(("ahead", *visibles))

        def rows(self, pos):  # as the torch attention path's decoder: buckets
            from dscoder.shapes import bucket_rows

            return bucket_rows(pos, self.cache.capacity)

        def __call__(self, token, pos):
            calls.append(("decode", pos))
            x = torch.tensor([token])
            return engine.model(x, self.cache, pos)

    monkeypatch.setattr(engine_mod, "make_decoder", Recorder)
    engine.use_graphs = True
    engine.prepare()
    assert calls == [("capture", 1024)]
    prompt = list(range(1, 1100))
    list(engine.generate(prompt, GenerationSettings(max_tokens=3, temperature=0), stop_ids=()))
    assert calls[1] == ("ahead", 2048)  # position 1099 reads 2,048 rows: asked before prefill
    assert [c for c in calls if c[0] == "decode"] == [("decode", 1099), ("decode", 1100)]


def test_the_profile_says_how_old_the_process_is():
    """--verbose's start-up line ends with the process's age, so that the time no phase names
    shows (interpreter start-up included)."""
    import subprocess
    import sys

    code = ("import time; time.sleep(0.6); from dscoder.profile import StartupProfile; "
            "p = StartupProfile(); p.add('import', 0.1); print(p.summary())")
    line = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    age = float(line.rsplit("process ", 1)[1].split(" s")[0])
    assert line.startswith("start-up: import 0.10 s, process ") and 0.6 <= age < 30


def test_the_compilers_hints_to_pytorch_developers_stay_off_the_users_terminal():
    import warnings

    from dscoder.model.transformer import compile_decode_layer

    compile_decode_layer("eager")
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn_explicit("Online softmax is disabled on the fly", UserWarning, "lowering.py", 1,
                               module="torch._inductor.lowering")
        warnings.warn_explicit("ours", UserWarning, "x.py", 1, module="dscoder.x")
    assert [str(w.message) for w in seen] == ["ours"]


def test_the_compile_starts_after_the_first_reply_or_once_a_reply_runs_long(tiny_checkpoint, monkeypatch):
    """A short one-shot answer never starts the compile (its thread would slow that answer);
    the end of the first reply starts it, and so does a reply that runs past LONG_REPLY."""
    from types import SimpleNamespace

    import dscoder.engine as engine_mod
    from dscoder.engine import load_engine
    from dscoder.events import GenerationSettings

    monkeypatch.setattr(engine_mod, "LONG_REPLY", 8)
    monkeypatch.setattr(engine_mod, "SWITCH_ROUND", 4)

    def engine_with_pending_compile():
        engine = load_engine(tiny_checkpoint, device="cpu", dtype="float32")
        engine.use_graphs = True  # decode rounds as on a GPU (GraphedDecoder steps run eagerly)
        started = []

        def start():  # a compile that never finishes
            started.append(len(engine.default_session().tokens))
            return SimpleNamespace(done=threading.Event(), result=lambda wait=False: None)

        engine.compile_step = start
        return engine, started

    engine, started = engine_with_pending_compile()
    for _ in engine.generate([1, 2, 3], GenerationSettings(max_tokens=6, temperature=0), stop_ids=()):
        assert not started
    assert len(started) == 1 and engine.step_pending
    list(engine.generate([1, 2, 3, 4], GenerationSettings(max_tokens=6, temperature=0), stop_ids=()))
    assert len(started) == 1  # started once

    engine, started = engine_with_pending_compile()
    during = []
    for _ in engine.generate([1, 2, 3], GenerationSettings(max_tokens=40, temperature=0), stop_ids=()):
        during.append(bool(started))
    assert during[-1] and not during[0] and 3 + 8 <= started[0] <= 3 + 8 + 4


def test_verbose_says_once_that_the_background_compile_failed():
    from dscoder.cli.runtime import Runtime
    from dscoder.settings import Settings
    from dscoder.ui.console import Terminal

    def said(verbose: bool) -> str:
        err = io.StringIO()
        term = Terminal(io.StringIO(), io.StringIO(), err, pretty=False, err_color=False)
        rt = Runtime(Settings(verbose=verbose, server="off"), term)
        rt._engine = type("E", (), {"compile_error": RuntimeError("no C compiler")})()
        rt.say_compile_failure()
        rt.say_compile_failure()
        return err.getvalue()

    assert said(True).count("compiling the decode step failed (RuntimeError('no C compiler'))") == 1
    assert said(False) == ""


def test_a_failed_background_compile_is_kept_for_the_cli_to_say(tiny_checkpoint):
    from types import SimpleNamespace

    from dscoder.engine import load_engine

    engine = load_engine(tiny_checkpoint, device="cpu", dtype="float32")
    done, error = threading.Event(), RuntimeError("no C compiler")
    done.set()
    engine.precompile = SimpleNamespace(done=done, error=error, result=lambda wait=False: None)
    assert not engine.use_compiled_step()
    assert engine.compile_error is error and engine.precompile is None and not engine.step_pending


def test_loading_and_a_first_reply_leave_dynamo_unimported(tiny_checkpoint):
    """Importing Dynamo takes about 1 s; only the background compile may pay for it (some torch
    modules import it: torch.nn.attention.bias did, from the prefill attention). A prompt of
    several chunks, so that a later chunk's attention runs too."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from dscoder.engine import load_engine\n"
        "from dscoder.events import GenerationSettings\n"
        "from dscoder import shapes\n"
        "shapes.PREFILL_CHUNK = 8\n"
        f"e = load_engine({str(tiny_checkpoint)!r}, device='cpu')\n"
        "list(e.generate(list(range(1, 30)), GenerationSettings(max_tokens=4, temperature=0), stop_ids=()))\n"
        "print('torch._dynamo' in sys.modules)\n"
        "import torch\n"
        "print(hasattr(torch.ops.dscoder, 'mla_decode'))\n"
        "from dscoder.model.transformer import compile_decode_layer\n"
        "compile_decode_layer()\n"
        "print(hasattr(torch.ops.dscoder, 'mla_decode'))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # Dynamo unimported; the compiled attention's operator is defined by the compile, not by
    # loading
    assert done.stdout.strip().splitlines()[-3:] == ["False", "False", "True"]


@pytest.fixture
def fake_triton_key(monkeypatch):
    """Triton's installation key replaced by one that counts its computations (the real one
    hashes 500 MB)."""
    triton_cache = pytest.importorskip("triton.runtime.cache")
    calls = []

    @functools.lru_cache()
    def triton_key():
        calls.append(1)
        return "3.x-fake-key"

    monkeypatch.setattr(triton_cache, "triton_key", triton_key)
    return triton_cache, calls


def test_tritons_installation_key_is_computed_in_the_background_and_kept(fake_triton_key, tmp_path):
    """Computed on a daemon thread the first time, and kept: the next process's lookups find
    it without hashing Triton's installation again."""
    from dscoder.compile_cache import TRITON_KEY_FILE, prefetch_triton_key

    triton_cache, calls = fake_triton_key
    thread = prefetch_triton_key(tmp_path)
    assert thread is not None and thread.daemon and thread is not threading.current_thread()
    thread.join(timeout=60)
    assert calls == [1] and json.loads((tmp_path / TRITON_KEY_FILE).read_text())["key"] == "3.x-fake-key"
    assert list(tmp_path.iterdir()) == [tmp_path / TRITON_KEY_FILE]  # no temporary file left

    triton_cache.triton_key.cache_clear()  # a new process: nothing computed yet
    assert prefetch_triton_key(tmp_path) is None  # kept: no thread
    assert triton_cache.triton_key() == "3.x-fake-key" and calls == [1]


@pytest.mark.parametrize("kept", ["{not json", '{"fingerprint": "another installation", "key": "old"}',
                                  '["a list"]', '{"fingerprint": null}'])
def test_a_stale_or_damaged_kept_triton_key_is_computed_again(fake_triton_key, tmp_path, kept):
    from dscoder.compile_cache import TRITON_KEY_FILE, prefetch_triton_key

    triton_cache, calls = fake_triton_key
    (tmp_path / TRITON_KEY_FILE).write_text(kept)
    thread = prefetch_triton_key(tmp_path)
    assert thread is not None
    thread.join(timeout=60)
    assert calls == [1] and json.loads((tmp_path / TRITON_KEY_FILE).read_text())["key"] == "3.x-fake-key"


def test_the_installation_fingerprint_follows_every_file_but_bytecode(tmp_path):
    import os

    from dscoder.compile_cache import installation_fingerprint

    pkg = tmp_path / "triton"
    (pkg / "_C").mkdir(parents=True)
    (pkg / "__pycache__").mkdir()
    (pkg / "cache.py").write_text("x = 1\n")
    (pkg / "_C" / "libtriton.so").write_bytes(b"\0" * 64)
    first = installation_fingerprint(pkg, "3.6.0")
    (pkg / "__pycache__" / "cache.cpython-311.pyc").write_bytes(b"bytecode")
    assert installation_fingerprint(pkg, "3.6.0") == first
    assert installation_fingerprint(pkg, "3.6.1") != first
    os.utime(pkg / "_C" / "libtriton.so", ns=(1, 1))  # same size, another time
    second = installation_fingerprint(pkg, "3.6.0")
    assert second != first
    (pkg / "cache.py").write_text("x = 22\n")
    assert installation_fingerprint(pkg, "3.6.0") != second


def test_a_cache_dir_that_cannot_be_written_only_costs_the_key_again(tmp_path):
    from dscoder.compile_cache import TRITON_KEY_FILE, _keep_key

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory would be")
    _keep_key(blocker / TRITON_KEY_FILE, "fp", "key")  # no exception
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-dir"]


def test_no_server_running_means_no_http_client_import(tmp_path):
    """An in-process one-shot command with no server on the default socket (and none to start)
    does not import the HTTP client (0.1-0.2 s of every start-up on the GPU machine); with a
    socket there, it asks that server (here nothing answers: it loads in-process)."""
    import os
    import subprocess
    import sys

    code = ("import io, sys\n"
            "from dscoder.cli.runtime import Runtime\n"
            "from dscoder.settings import Settings\n"
            "from dscoder.ui.console import Terminal\n"
            "term = Terminal(io.StringIO(), io.StringIO(), io.StringIO(), pretty=False, err_color=False)\n"
            "print(Runtime(Settings(), term).server_url(), 'httpx' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSCODER_")}
    env["XDG_RUNTIME_DIR"] = str(tmp_path)

    def run() -> str:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert run() == "None False"
    (tmp_path / "dscoder").mkdir()
    (tmp_path / "dscoder" / "server.sock").touch()  # a stale socket: nothing listens
    assert run() == "None True"
