"""The real Coder-V2 tokenizer: special ids, llama.cpp's vectors, plain text, streaming decode."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from dscoder.errors import DscoderError, ModelNotFound
from dscoder.tokenizer import Tokenizer, load_tokenizer

DATA = Path(__file__).parent / "data"
SPECIAL_STRINGS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜fim▁hole｜>",
                   "<｜fim▁begin｜>", "<｜fim▁end｜>"]
TEXTS = [
    "",
    "hello world",
    "def f(x):\n    return x ** 2  # square\n",
    "Grüße, naïve café — ½ × π ≈ 1.57",
    "我想在apple工作1314151天～ 한국어 テキスト",
    "🚀 😶‍🌫️ 👨‍👩‍👧‍👦 🦙.cpp ✅",
    "```python\nprint('hi')\n```\n\n\t\r\n  trailing   ",
    "кириллица и العربية و עברית",
    "a<｜end▁of▁sentence｜>b<｜fim▁hole｜>c",
]


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path) -> Tokenizer:
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def hf(tokenizer_dir: Path):
    """The `tokenizers` library on the same file, added tokens included (the reference)."""
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))


def test_special_ids(tok: Tokenizer) -> None:
    assert (tok.bos_id, tok.eos_id) == (100000, 100001)
    assert (tok.fim_hole_id, tok.fim_begin_id, tok.fim_end_id) == (100002, 100003, 100004)
    assert [tok.token_to_id(s) for s in SPECIAL_STRINGS] == list(range(100000, 100005))
    assert [tok.id_to_token(i) for i in range(100000, 100005)] == SPECIAL_STRINGS
    assert tok.vocab_size == 100005
    assert tok.id_to_token(100005) is None and tok.id_to_token(-1) is None


def _vectors() -> list[tuple[str, list[int]]]:
    """llama.cpp's format: inputs split by a marker line, one line of ids per input."""
    inputs = (DATA / "ggml-vocab-deepseek-llm.gguf.inp").read_text(encoding="utf-8")
    outputs = (DATA / "ggml-vocab-deepseek-llm.gguf.out").read_text(encoding="utf-8")
    texts = inputs.split("\n__ggml_vocab_test__\n")
    lines = outputs.split("\n")
    assert len(texts) == len(lines) == 47 and texts[-1] == lines[-1] == ""  # trailing separator
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts[:-1], lines[:-1], strict=True)]


def test_llama_cpp_vectors(tok: Tokenizer) -> None:
    vectors = _vectors()
    assert len(vectors) == 46
    failures = [(text, tok.encode(text), ids) for text, ids in vectors if tok.encode(text) != ids]
    assert not failures
    for text, ids in vectors:
        assert tok.decode(ids) == text


def test_encode_adds_no_bos(tok: Tokenizer) -> None:
    assert tok.encode("Hello") == [17464]
    assert tok.encode("") == []


@pytest.mark.parametrize("special", SPECIAL_STRINGS)
def test_special_strings_stay_plain_text(tok: Tokenizer, special: str) -> None:
    ids = tok.encode(f"x {special} y")
    assert not any(i >= 100000 for i in ids)
    assert len(ids) > 5  # spelled out in ordinary tokens
    assert tok.decode(ids) == f"x {special} y"


def test_encode_special_tokens_flag_is_not_enough(hf) -> None:
    """Why we strip the added tokens: the FIM sentinels are not flagged special, so the library's
    encode_special_tokens still turns them into ids (this documents the library's behaviour)."""
    hf.encode_special_tokens = True
    try:
        ids = hf.encode("a<｜end▁of▁sentence｜>b<｜fim▁hole｜>c", add_special_tokens=False).ids
    finally:
        hf.encode_special_tokens = False
    assert 100001 not in ids and 100002 in ids


@pytest.mark.parametrize("text", [t for t in TEXTS if "<｜" not in t])
def test_encode_and_decode_match_tokenizers(tok: Tokenizer, hf, text: str) -> None:
    ids = tok.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == hf.decode(ids) == text


def test_decode_specials(tok: Tokenizer, hf) -> None:
    ids = [100000, 17464, 100002, 100003, 100004, 100001, 102399]  # 102399: model vocab padding
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special=False) == hf.decode(ids, skip_special_tokens=False)
    assert tok.decode(ids) == "Hello<｜fim▁hole｜><｜fim▁begin｜><｜fim▁end｜>"


def test_decode_matches_transformers(tok: Tokenizer, tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    ht = AutoTokenizer.from_pretrained(tokenizer_dir)
    for text in TEXTS:
        ids = [tok.bos_id, *tok.encode(text), tok.eos_id]
        assert tok.decode(ids) == ht.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special=False) == ht.decode(ids)


def _stream(tok: Tokenizer, ids: list[int], **kw) -> list[str]:
    detok = tok.detokenizer(**kw)
    return [detok.add(i) for i in ids] + [detok.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_invariant_on_text(tok: Tokenizer, text: str) -> None:
    ids = [tok.bos_id, *tok.encode(text), tok.eos_id]
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)  # never half a character
    assert "".join(_stream(tok, ids, skip_special=False)) == tok.decode(ids, skip_special=False)


def test_stream_holds_split_characters(tok: Tokenizer) -> None:
    ids = tok.encode("😶‍🌫️")  # byte-level tokens that cut characters apart
    assert len(ids) > 3
    detok = tok.detokenizer()
    out = [detok.add(i) for i in ids]
    assert "" in out  # something was held back...
    assert "".join(out) + detok.flush() == "😶‍🌫️"  # ...and released whole


def test_stream_flush_of_incomplete_char(tok: Tokenizer) -> None:
    ids = tok.encode("🚀")[:-1]  # drop the last byte(s): truly incomplete
    detok = tok.detokenizer()
    assert "".join(detok.add(i) for i in ids) == ""
    assert detok.flush() == tok.decode(ids) == "\ufffd"
    assert detok.add(tok.encode("a")[0]) == "a"  # flushed state starts afresh


def test_stream_invariant_on_random_ids(tok: Tokenizer, hf) -> None:
    rng = random.Random(1234)
    # Single-byte tokens (many are lone UTF-8 lead or continuation bytes) split characters often.
    byte_ids = [i for i in range(1000) if len(tok.token_bytes(i)) == 1 and tok.token_bytes(i)[0] >= 0x80]
    assert len(byte_ids) > 50
    for trial in range(300):
        n = rng.randint(1, 40)
        pool = byte_ids if trial % 2 else range(102400)
        ids = [rng.choice(pool) for _ in range(n)]
        if trial % 5 == 0:
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(range(100000, 100005)))
        expected = hf.decode(ids)
        assert tok.decode(ids) == expected, ids
        assert "".join(_stream(tok, ids)) == expected, ids


def test_stream_is_incremental(tok: Tokenizer) -> None:
    """O(1) per token: a long stream adds text piece by piece, never re-emitting earlier text."""
    ids = tok.encode("x = 1\n" * 5000)
    detok = tok.detokenizer()
    total = 0
    for i in ids:
        total += len(detok.add(i))
    assert total + len(detok.flush()) == len("x = 1\n" * 5000)


def test_token_bytes(tok: Tokenizer) -> None:
    assert tok.token_bytes(17464) == b"Hello"
    assert tok.token_bytes(207) == b" "
    assert tok.token_bytes(185) == b"\n"
    assert tok.token_bytes(100001) == b""
    assert tok.token_bytes(100001, skip_special=False) == "<｜end▁of▁sentence｜>".encode()


def test_offsets(tok: Tokenizer) -> None:
    ids, offsets = tok.encode_with_offsets("def f():\n    pass")
    assert ids == tok.encode("def f():\n    pass")
    assert offsets[0] == (0, 3) and offsets[-1][1] == len("def f():\n    pass")


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="No tokenizer.json in"):
        load_tokenizer(tmp_path)


def test_invalid_files(tmp_path: Path, tokenizer_dir: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DscoderError, match="Cannot read"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "nonsense"}}', encoding="utf-8")
    with pytest.raises(DscoderError, match="not a valid tokenizer"):
        load_tokenizer(tmp_path)


def test_missing_special_token(tmp_path: Path, tokenizer_dir: Path) -> None:
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    data["added_tokens"] = [t for t in data["added_tokens"] if "fim" not in t["content"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(DscoderError, match="no <｜fim▁hole｜> token"):
        load_tokenizer(tmp_path)


def test_bos_eos_names_from_config(tmp_path: Path, tokenizer_dir: Path) -> None:
    """tokenizer_config.json names BOS/EOS; here it swaps them, and the ids follow the names."""
    (tmp_path / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    config = {"bos_token": "<｜end▁of▁sentence｜>", "eos_token": {"content": "<｜begin▁of▁sentence｜>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    t = load_tokenizer(tmp_path)
    assert (t.bos_id, t.eos_id) == (100001, 100000)


def test_no_heavy_imports() -> None:
    import subprocess
    import sys

    code = ("import sys, dscoder.tokenizer, dscoder.prompts, dscoder.hub; "
            "print([m for m in ('torch', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_spliced_file_and_a_full_parse_give_the_same_tokenizer(tmp_path: Path, tokenizer_dir: Path) -> None:
    """load_tokenizer empties added_tokens in the file's text (no parse and re-dump of 3 MB);
    a file in another key order goes through the full parse. Same ids, same specials, and the
    special tokens' text stays plain text either way."""
    from dscoder import tokenizer as tokenizer_mod

    text = (tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8")
    assert tokenizer_mod._split_added_tokens(text) is not None  # the real file takes the fast path
    data = json.loads(text)
    reordered = {"model": data["model"], **{k: v for k, v in data.items() if k != "model"}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(reordered), encoding="utf-8")
    assert tokenizer_mod._split_added_tokens(json.dumps(reordered)) is None
    fast, full = load_tokenizer(tokenizer_dir), load_tokenizer(tmp_path)
    sample = "def f(x):\n    return x  # <｜fim▁hole｜> <｜end▁of▁sentence｜> 中文 🚀"
    assert fast.encode(sample) == full.encode(sample)
    assert fast.fim_hole_id not in fast.encode(sample) and fast.eos_id not in fast.encode(sample)
    assert (fast.bos_id, fast.eos_id, fast.fim_hole_id) == (full.bos_id, full.eos_id, full.fim_hole_id)
    assert fast.decode(fast.encode(sample)) == sample
