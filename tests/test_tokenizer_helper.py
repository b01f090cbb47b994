"""dscoder.tokenizer_helper: the tokenizer parsed in a helper process gives what a local parse
gives, and any failure of the helper falls back to a local parse."""
from __future__ import annotations

import shutil
import threading

import pytest

from dscoder import tokenizer_helper
from dscoder.tokenizer import load_tokenizer

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "héllo wörld, 你好, emoji 🙂 and a lone \udcff?".encode("utf-8", "replace").decode("utf-8"),
    "<｜fim▁hole｜> and <｜begin▁of▁sentence｜> are plain text here",
    "x" * 5000 + "\n\n\t  trailing spaces   ",
    "",
]


@pytest.fixture
def helper(tokenizer_dir):
    tokenizer_helper.start(tokenizer_dir)
    tok = tokenizer_helper.take(tokenizer_dir)
    assert tok is not None and isinstance(tok._tok, tokenizer_helper.RemoteTextTokenizer)
    yield tok
    tokenizer_helper._stop(tok._tok._proc)


def test_the_helper_encodes_and_decodes_as_a_local_parse(helper, tokenizer_dir):
    local = load_tokenizer(tokenizer_dir)
    for text in TEXTS:
        assert helper.encode(text) == local.encode(text)
        assert helper.encode_with_offsets(text) == local.encode_with_offsets(text)
        ids = local.encode(text)
        assert helper.decode(ids) == local.decode(ids)
    special = [local.bos_id, local.eos_id, local.fim_hole_id, local.fim_begin_id, local.fim_end_id]
    assert [helper.bos_id, helper.eos_id, helper.fim_hole_id, helper.fim_begin_id, helper.fim_end_id] == special
    assert helper.decode(special, skip_special=False) == local.decode(special, skip_special=False)
    assert (helper.vocab_size, helper.max_token_chars) == (local.vocab_size, local.max_token_chars)
    assert helper.token_to_id("Ġreturn") == local.token_to_id("Ġreturn") is not None
    assert helper.id_to_token(10**6) is None and helper.id_to_token(-1) is None


def test_threads_get_their_own_answers(helper, tokenizer_dir):
    local = load_tokenizer(tokenizer_dir)
    texts = [f"def f{i}(x):\n    return x * {i}\n" * (i + 1) for i in range(16)]
    results: dict[int, list[int]] = {}

    def work(i: int) -> None:
        for _ in range(5):
            results[i] = helper.encode(texts[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: local.encode(t) for i, t in enumerate(texts)}


def test_a_helper_that_died_leaves_a_local_parse(helper, tokenizer_dir):
    proc = helper._tok._proc
    proc.kill()
    proc.wait()
    assert helper.encode(TEXTS[0]) == load_tokenizer(tokenizer_dir).encode(TEXTS[0])
    assert helper._tok._local is not None


def test_an_interrupted_request_is_never_answered_by_the_next(helper, tokenizer_dir, monkeypatch):
    """Ctrl-C while waiting for an answer: the answer would be read by the next request."""
    receive = tokenizer_helper._receive
    calls = []

    def interrupted(stream):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return receive(stream)

    monkeypatch.setattr(tokenizer_helper, "_receive", interrupted)
    with pytest.raises(KeyboardInterrupt):
        helper.encode(TEXTS[0])
    assert helper.encode(TEXTS[2]) == load_tokenizer(tokenizer_dir).encode(TEXTS[2])
    assert helper._tok._proc.poll() is not None  # stopped, not left with an unread answer


def test_a_bad_tokenizer_file_is_left_to_the_local_parse(tmp_path, tokenizer_dir):
    shutil.copy(tokenizer_dir / "tokenizer_config.json", tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "nothing"}}')
    tokenizer_helper.start(tmp_path)
    assert tokenizer_helper.take(tmp_path) is None


def test_take_without_start_and_a_helper_that_ends_with_its_input(tokenizer_dir):
    assert tokenizer_helper.take(tokenizer_dir) is None
    tokenizer_helper.start(tokenizer_dir)
    tokenizer_helper.start(tokenizer_dir)  # one helper a model
    tok = tokenizer_helper.take(tokenizer_dir)
    assert tok is not None and tokenizer_helper.take(tokenizer_dir) is None
    proc = tok._tok._proc
    proc.stdin.close()  # as when the CLI exits
    assert proc.wait(timeout=30) == 0


def test_the_cli_loads_the_engine_with_the_helpers_tokenizer(tiny_checkpoint):
    from dscoder.cli.backend import parse_tokenizer_early
    from dscoder.engine import load_engine
    parse_tokenizer_early(tiny_checkpoint, "native")
    engine = load_engine(tiny_checkpoint, device="cpu", dtype="float32")
    try:
        assert isinstance(engine.tokenizer._tok, tokenizer_helper.RemoteTextTokenizer)
        assert engine.tokenizer.encode(TEXTS[0]) == load_tokenizer(tiny_checkpoint).encode(TEXTS[0])
    finally:
        tokenizer_helper._stop(engine.tokenizer._tok._proc)
        engine.close()


def test_a_helper_that_cannot_start_leaves_a_local_parse(tokenizer_dir, monkeypatch, tmp_path):
    monkeypatch.setattr(tokenizer_helper.sys, "executable", str(tmp_path / "no-python"))
    tokenizer_helper.start(tokenizer_dir)
    assert tokenizer_helper.take(tokenizer_dir) is None
