"""Decoding ahead: ids sampled on the device by the step that made their logits, read by the host
a few steps behind (dscoder.graphs.GraphedDecoder.run_ahead), and the position-keyed sampler that
makes both paths draw the same ids. On the CPU the graphs' steps run eagerly, so the same code
that a GPU replays is what these tests run."""
from __future__ import annotations

import pytest
import torch

from dscoder.events import Finished, GenerationSettings
from dscoder.sampling import Sampler, exponential_noise

GREEDY = GenerationSettings(max_tokens=40, temperature=0)
SAMPLED = GenerationSettings(max_tokens=40, temperature=0.9, top_p=0.9, top_k=40, seed=11)


@pytest.fixture
def engines(tiny_checkpoint, monkeypatch):
    """The same model twice: decoding ahead (the graphed path, eager on the CPU) and one step
    at a time; small buckets and a small first cache, so that replies cross buckets and grow it."""
    from dscoder import shapes
    from dscoder.engine import load_engine

    monkeypatch.setattr(shapes, "BUCKET", 16)
    monkeypatch.setattr(shapes, "FIRST_CAPACITY", 32)
    ahead = load_engine(tiny_checkpoint, device="cpu", dtype="float32", context_length=256)
    ahead.use_graphs = True
    stepwise = load_engine(tiny_checkpoint, device="cpu", dtype="float32", context_length=256)
    return ahead, stepwise


def finish(gen) -> Finished:
    events = list(gen)
    assert isinstance(events[-1], Finished)
    return events[-1]


def ids(engine, text: str) -> list[int]:
    return [engine.tokenizer.bos_id] + engine.tokenizer.encode(text)


@pytest.mark.parametrize("settings", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_decoding_ahead_gives_the_ids_of_decoding_step_by_step(engines, settings):
    ahead, stepwise = engines
    prompt = ids(ahead, "def fib(n):")
    a = ahead.new_session()
    got = finish(a.generate(prompt, settings, stop_ids=()))
    want = finish(stepwise.new_session().generate(prompt, settings, stop_ids=()))
    assert got.token_ids == want.token_ids and len(got.token_ids) == 40
    assert a._graphs.samplers  # it sampled in the decoder's sampling step, not on the host
    assert a._cache.capacity == 64  # the reply grew the cache (32 rows) on the way
    # the cache holds the prompt and every id but the last, as after a step-by-step reply
    assert a.tokens == prompt + list(got.token_ids[:-1])


def test_a_stop_leaves_only_the_ids_read_in_the_cache(engines):
    ahead, stepwise = engines
    prompt = ids(ahead, "class A:")
    free = finish(stepwise.new_session().generate(prompt, GREEDY, stop_ids=()))
    stop = free.token_ids[9]
    a = ahead.new_session()
    got = finish(a.generate(prompt, GREEDY, stop_ids={stop}))
    first = free.token_ids.index(stop)
    assert got.reason == "eos" and got.token_ids == free.token_ids[:first]
    # steps queued past the stop wrote rows the session does not count...
    assert a.tokens == prompt + list(free.token_ids[:first])
    # ...and the next turn, which reuses the counted ones, matches a fresh session's
    follow = prompt + list(got.token_ids) + ids(ahead, " again")[1:]
    again = finish(a.generate(follow, GREEDY, stop_ids=()))
    assert again.cached_tokens == len(prompt) + first
    assert again.token_ids == finish(stepwise.new_session().generate(follow, GREEDY, stop_ids=())).token_ids


def test_a_reply_closed_early_counts_the_ids_read(engines):
    ahead, _ = engines
    prompt = ids(ahead, "x = ")
    s = ahead.new_session()
    gen = s.generate(prompt, GREEDY, stop_ids=())
    deltas = [next(gen) for _ in range(3)]
    gen.close()  # the consumer went away (a server client disconnected)
    read = [t for d in deltas for t in d.token_ids]
    assert s.tokens == prompt + read[:-1]


def test_the_context_window_ends_a_reply_decoded_ahead(tiny_checkpoint):
    from dscoder.engine import load_engine

    engine = load_engine(tiny_checkpoint, device="cpu", dtype="float32", context_length=24)
    engine.use_graphs = True
    prompt = ids(engine, "abc")
    got = finish(engine.new_session().generate(prompt, GenerationSettings(max_tokens=100, temperature=0),
                                               stop_ids=()))
    assert got.reason == "length" and len(prompt) + len(got.token_ids) == 24


def test_the_draw_depends_on_seed_and_position_only():
    logits = torch.randn(1, 1000)
    s = Sampler(GenerationSettings(temperature=1.0, top_p=1.0, seed=5), torch.device("cpu"))
    again = Sampler(GenerationSettings(temperature=1.0, top_p=1.0, seed=5), torch.device("cpu"))
    other = Sampler(GenerationSettings(temperature=1.0, top_p=1.0, seed=6), torch.device("cpu"))
    draws = [int(s(logits, p)) for p in range(50)]
    assert draws == [int(again(logits, p)) for p in range(50)]
    assert draws != [int(other(logits, p)) for p in range(50)]
    assert len(set(draws)) > 10  # positions draw afresh


def test_draws_follow_the_distribution_and_its_cuts():
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.25, 0.15, 0.06, 0.04])
    logits = probs.log()[None]
    n = 20000
    counts = torch.zeros(5)
    s = Sampler(GenerationSettings(temperature=1.0, top_p=1.0, seed=1), torch.device("cpu"))
    for p in range(n):
        counts[int(s(logits, p))] += 1
    # within 5 standard deviations of each expected count
    assert torch.all((counts - n * probs).abs() < 5 * (n * probs * (1 - probs)).sqrt()), counts
    top_p = Sampler(GenerationSettings(temperature=1.0, top_p=0.8, seed=1), torch.device("cpu"))
    assert {int(top_p(logits, p)) for p in range(400)} == {0, 1, 2}  # 0.5 + 0.25 < 0.8
    top_k = Sampler(GenerationSettings(temperature=1.0, top_p=1.0, top_k=2, seed=1), torch.device("cpu"))
    assert {int(top_k(logits, p)) for p in range(400)} == {0, 1}
    cold = Sampler(GenerationSettings(temperature=0.05, top_p=1.0, seed=1), torch.device("cpu"))
    assert {int(cold(logits, p)) for p in range(400)} == {0}


def test_exponential_noise_is_fixed_by_its_key_and_has_mean_one():
    seed, pos = torch.tensor([3]), torch.tensor([17])
    vocab = torch.arange(100000)
    e = exponential_noise(seed, pos, vocab)
    assert torch.equal(e, exponential_noise(seed, pos, vocab))
    assert not torch.equal(e, exponential_noise(seed, pos + 1, vocab))
    assert e.min() > 0 and abs(e.mean().item() - 1) < 0.02 and abs(e.std().item() - 1) < 0.03
