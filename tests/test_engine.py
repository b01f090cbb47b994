"""Generation behaviour: prefix reuse, cancellation, stop strings, seeds, limits."""
from __future__ import annotations

import threading

import pytest

from dscoder.errors import PromptTooLong, UsageError
from dscoder.events import Finished, GenerationSettings, TextDelta

GREEDY = GenerationSettings(max_tokens=12, temperature=0)


def run(gen) -> tuple[str, Finished]:
    events = list(gen)
    final = events[-1]
    assert isinstance(final, Finished)
    assert all(isinstance(e, TextDelta) for e in events[:-1])
    assert "".join(e.text for e in events[:-1]) == final.text
    return final.text, final


def prompt_ids(engine, text: str) -> list[int]:
    return [engine.tokenizer.bos_id] + engine.tokenizer.encode(text)


def test_session_reuses_the_common_prefix(tiny_engine):
    s = tiny_engine.new_session()
    first = prompt_ids(tiny_engine, "User: hello\n\nAssistant:")
    _, f1 = run(s.generate(first, GREEDY, stop_ids=()))
    assert f1.cached_tokens == 0
    second = first + list(f1.token_ids) + prompt_ids(tiny_engine, "User: more\n\nAssistant:")[1:]
    _, f2 = run(s.generate(second, GREEDY, stop_ids=()))
    # everything but the last generated token (never fed back) was already in the cache
    assert f2.cached_tokens == len(first) + len(f1.token_ids) - 1
    fresh = tiny_engine.new_session()
    _, f3 = run(fresh.generate(second, GREEDY, stop_ids=()))
    assert f3.cached_tokens == 0 and f3.token_ids == f2.token_ids


def test_same_prompt_twice_recomputes_only_the_last_token(tiny_engine):
    s = tiny_engine.new_session()
    ids = prompt_ids(tiny_engine, "x = 1")
    _, a = run(s.generate(ids, GREEDY, stop_ids=()))
    _, b = run(s.generate(ids, GREEDY, stop_ids=()))
    assert b.cached_tokens == len(ids) - 1 and a.token_ids == b.token_ids


def test_cancel_between_tokens_keeps_the_session_usable(tiny_engine):
    s = tiny_engine.new_session()
    ids = prompt_ids(tiny_engine, "cancel me")
    cancel = threading.Event()
    gen = s.generate(ids, GenerationSettings(max_tokens=50, temperature=0), stop_ids=(), cancel=cancel)
    first = next(gen)
    cancel.set()
    rest = list(gen)
    assert isinstance(rest[-1], Finished) and rest[-1].reason == "cancelled"
    assert len(rest[-1].token_ids) <= 2
    _, again = run(s.generate(ids, GREEDY, stop_ids=()))
    _, clean = run(tiny_engine.new_session().generate(ids, GREEDY, stop_ids=()))
    assert again.token_ids == clean.token_ids
    assert isinstance(first, TextDelta)


def test_interrupt_mid_generation_keeps_the_session_usable(tiny_engine):
    s = tiny_engine.new_session()
    ids = prompt_ids(tiny_engine, "interrupt")
    gen = s.generate(ids, GenerationSettings(max_tokens=50, temperature=0), stop_ids=())
    next(gen)
    gen.close()  # what happens when Ctrl-C unwinds the consumer's loop
    _, again = run(s.generate(ids, GREEDY, stop_ids=()))
    _, clean = run(tiny_engine.new_session().generate(ids, GREEDY, stop_ids=()))
    assert again.token_ids == clean.token_ids


def test_stop_string_cuts_the_text(tiny_engine):
    ids = prompt_ids(tiny_engine, "stop")
    text, _ = run(tiny_engine.new_session().generate(ids, GenerationSettings(max_tokens=20, temperature=0),
                                                     stop_ids=()))
    stop = text[5:9]
    assert stop.strip()
    cut, final = run(tiny_engine.new_session().generate(
        ids, GenerationSettings(max_tokens=20, temperature=0, stop=(stop,)), stop_ids=()))
    assert final.reason == "stop" and cut == text[: text.index(stop)]


def test_stop_id_ends_generation(tiny_engine):
    ids = prompt_ids(tiny_engine, "eos")
    _, free = run(tiny_engine.new_session().generate(ids, GREEDY, stop_ids=()))
    third = free.token_ids[2]
    _, final = run(tiny_engine.new_session().generate(ids, GREEDY, stop_ids={third}))
    assert final.reason == "eos" and final.token_ids == free.token_ids[: free.token_ids.index(third)]


def test_seed_makes_sampling_repeatable(tiny_engine):
    ids = prompt_ids(tiny_engine, "sample")
    settings = GenerationSettings(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    _, a = run(tiny_engine.new_session().generate(ids, settings, stop_ids=()))
    _, b = run(tiny_engine.new_session().generate(ids, settings, stop_ids=()))
    other = GenerationSettings(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=8)
    _, c = run(tiny_engine.new_session().generate(ids, other, stop_ids=()))
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_prompt_longer_than_the_context_is_an_error(tiny_engine):
    too_long = [tiny_engine.tokenizer.bos_id] + [100] * tiny_engine.context_length
    with pytest.raises(PromptTooLong, match="context window"):
        tiny_engine.new_session().generate(too_long, GREEDY)
    with pytest.raises(UsageError):
        tiny_engine.new_session().generate([], GREEDY)


def test_generation_stops_at_the_context_window(tiny_checkpoint):
    from dscoder.engine import load_engine

    engine = load_engine(tiny_checkpoint, device="cpu", dtype="float32", context_length=16)
    ids = prompt_ids(engine, "abc")
    _, final = run(engine.new_session().generate(ids, GenerationSettings(max_tokens=100, temperature=0),
                                                 stop_ids=()))
    assert final.reason == "length" and len(ids) + len(final.token_ids) == 16


def test_sampling_defaults_come_from_generation_config(tiny_engine, tmp_path):
    import json

    from dscoder.loader import generation_defaults

    # the released file (0.3 / 0.95) reaches the engine...
    assert (tiny_engine.defaults.temperature, tiny_engine.defaults.top_p) == pytest.approx((0.3, 0.95))
    # ...and other values are read, not assumed (GenerationSettings' own defaults are 0.3 / 0.95)
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20}))
    d = generation_defaults(tmp_path)
    assert (d.temperature, d.top_p, d.top_k) == pytest.approx((0.7, 0.8, 20))
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    assert generation_defaults(tmp_path).temperature == 0


def test_decode_seconds_count_only_the_engines_work(tiny_engine, monkeypatch):
    """A slow consumer (a terminal rendering Markdown) must not show up as a slow model: the
    time the generator is suspended in `yield` is not decode time."""
    import time as real_time
    import types

    import dscoder.decode_loop as loop_mod  # the engines' shared loop keeps the clock

    clock = {"skew": 0.0}  # a clock that the consumer moves forward by 1000 s per token
    fake_time = types.SimpleNamespace(perf_counter=lambda: real_time.perf_counter() + clock["skew"])
    monkeypatch.setattr(loop_mod, "time", fake_time)
    events = []
    for event in tiny_engine.new_session().generate(prompt_ids(tiny_engine, "slow reader"), GREEDY,
                                                    stop_ids=()):
        events.append(event)
        clock["skew"] += 1000.0  # "rendering" this token took 1000 s
    final = events[-1]
    assert isinstance(final, Finished) and len(final.token_ids) >= 2
    assert final.decode_seconds < 1000.0
