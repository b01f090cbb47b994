"""Engine switches (DSCODER_CUDA_GRAPHS, _COMPILE, _OFFLOAD_POLICY, _PREFETCH_DEPTH, _ROUTING_TRACE)
go through the settings layer: validated, exit 2 with one sentence, config-file keys too, and
passed to load_engine explicitly."""
from __future__ import annotations

import pytest
from cli_helpers import invoke, isolated  # noqa: F401  (the fixture isolates the environment)

from dscoder.errors import UsageError
from dscoder.settings import load_settings

HOME = {"HOME": "/nonexistent"}


def test_defaults():
    s = load_settings({}, HOME)
    assert (s.cuda_graphs, s.compile, s.offload_policy, s.prefetch_depth, s.routing_trace) == (
        True, True, "lru", 1, None)


def test_environment_and_config_file(tmp_path):
    cfg = tmp_path / "dscoder" / "config.toml"
    cfg.parent.mkdir()
    cfg.write_text('offload_policy = "lfu"\nprefetch_depth = 2\ncompile = false\n')
    env = {"XDG_CONFIG_HOME": str(tmp_path), "DSCODER_CUDA_GRAPHS": "0",
           "DSCODER_PREFETCH_DEPTH": "3", "DSCODER_ROUTING_TRACE": "/tmp/trace.jsonl"}
    s = load_settings({}, env)
    assert (s.cuda_graphs, s.compile, s.offload_policy, s.prefetch_depth, s.routing_trace) == (
        False, False, "lfu", 3, "/tmp/trace.jsonl")


@pytest.mark.parametrize("name,value,words", [
    ("DSCODER_PREFETCH_DEPTH", "two", "Bad value for prefetch_depth in DSCODER_PREFETCH_DEPTH"),
    ("DSCODER_PREFETCH_DEPTH", "-1", "must be 0 or more"),
    ("DSCODER_OFFLOAD_POLICY", "fifo", "Unknown offload_policy 'fifo'"),
    ("DSCODER_CUDA_GRAPHS", "maybe", "DSCODER_CUDA_GRAPHS"),
    ("DSCODER_COMPILE", "2", "DSCODER_COMPILE"),
])
def test_bad_switch_is_one_sentence(name, value, words):
    with pytest.raises(UsageError, match=words) as e:
        load_settings({}, {**HOME, name: value})
    assert e.value.message.endswith(".") and e.value.message.count(". ") == 0


def test_bad_switch_in_the_config_file(tmp_path):
    cfg = tmp_path / "dscoder" / "config.toml"
    cfg.parent.mkdir()
    cfg.write_text('offload_policy = "mru"\n')
    with pytest.raises(UsageError, match="Unknown offload_policy 'mru'"):
        load_settings({}, {"XDG_CONFIG_HOME": str(tmp_path)})


def test_bad_switch_exits_2_before_loading(monkeypatch):
    r = invoke(["chat", "hi"], env={"DSCODER_PREFETCH_DEPTH": "two"})
    assert r.code == 2 and "DSCODER_PREFETCH_DEPTH" in r.stderr
    assert "Unexpected error" not in r.stderr and "Traceback" not in r.stderr


def test_switches_reach_load_engine(monkeypatch, tiny_checkpoint):
    import dscoder.engine
    from dscoder.cli.backend import RealBackend

    seen = {}
    monkeypatch.setattr(dscoder.engine, "load_engine", lambda *a, **kw: seen.update(kw) or "engine")
    s = load_settings({"model": str(tiny_checkpoint), "device": "cpu"},
                      {**HOME, "DSCODER_CUDA_GRAPHS": "off", "DSCODER_COMPILE": "0",
                       "DSCODER_OFFLOAD_POLICY": "lfu-layer", "DSCODER_PREFETCH_DEPTH": "2",
                       "DSCODER_ROUTING_TRACE": "t.jsonl"})
    warnings: list[str] = []
    assert RealBackend().load_engine(s, warnings.append, warnings.append) == "engine"
    assert {k: seen[k] for k in ("cuda_graphs", "compile", "offload_policy", "prefetch_depth",
                                  "routing_trace")} == {
        "cuda_graphs": False, "compile": False, "offload_policy": "lfu-layer", "prefetch_depth": 2,
        "routing_trace": "t.jsonl"}
    assert seen["warn"] is not None and seen["notice"] is not None  # heard without --verbose


def test_unwritable_routing_trace_is_one_sentence(tiny_checkpoint, tmp_path):
    from dscoder.engine import load_engine

    with pytest.raises(UsageError, match="Cannot write the routing trace"):
        load_engine(tiny_checkpoint, device="cpu", dtype="float32", context_length=64,
                    routing_trace=tmp_path / "missing" / "t.jsonl")
