"""Prompts: the chat template against transformers, FIM and completion ids, truncation."""
from __future__ import annotations

import random
from itertools import pairwise
from pathlib import Path

import pytest

from dscoder.errors import PromptTooLong, UsageError
from dscoder.prompts import LOW_WATER, Prompt, chat_prompt, completion_prompt, fim_prompt, keep_head, keep_tail
from dscoder.tokenizer import Tokenizer, load_tokenizer

BOS, EOS, HOLE, BEGIN, END = 100000, 100001, 100002, 100003, 100004
SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜fim▁hole｜>",
            "<｜fim▁begin｜>", "<｜fim▁end｜>"]


def user(c: str) -> dict:
    return {"role": "user", "content": c}


def assistant(c: str) -> dict:
    return {"role": "assistant", "content": c}


def system(c: str) -> dict:
    return {"role": "system", "content": c}


CONVERSATIONS = [
    [user("write a quicksort in python")],
    [system("You are a helpful assistant."), user("hi")],
    [system("Be brief."), user("hi"), assistant("Hello! How can I help?"), user("sort a list")],
    [user("a"), assistant("b"), user("c"), assistant("d"), user("e")],
    [user("Grüße 你好 🚀 😶‍🌫️ — ½")],
    [user(""), assistant(""), user("")],
    [user("   "), assistant("\n\n"), user("\t \n")],
    [user("```python\ndef f():\n    return `x`\n```"), assistant("```js\nlet a = `${b}`;\n```"),
     user("and in rust?")],
    [user("  leading spaces"), assistant("\nleading newline"), user("\n\n  both")],
    [system(""), user("empty system")],
    [user("first"), system("a system message in the middle"), user("second")],
    [assistant("an assistant opening"), user("then a user")],
    [user("trailing space "), assistant("ok "), user("again ")],
]


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path) -> Tokenizer:
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def hf(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _reference_ids(hf, messages: list[dict]) -> list[int]:
    out = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    # transformers 5 returns a BatchEncoding (a dict with input_ids); 4.x a plain list
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_matches_transformers(tok: Tokenizer, hf, messages: list[dict]) -> None:
    prompt = chat_prompt(tok, messages)
    assert prompt.ids == _reference_ids(hf, messages)
    assert prompt.text == hf.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=False)
    assert prompt.ids.count(BOS) == 1 and prompt.ids[0] == BOS
    assert prompt.text.endswith("\n\nAssistant:")  # no trailing space
    assert prompt.dropped_messages == 0


def test_chat_rendering(tok: Tokenizer) -> None:
    p = chat_prompt(tok, [system("S"), user("u1"), assistant("a1"), user("u2")])
    assert p.text == ("<｜begin▁of▁sentence｜>S\n\nUser: u1\n\nAssistant: a1"
                      "<｜end▁of▁sentence｜>User: u2\n\nAssistant:")
    eos = p.ids.index(EOS)
    assert p.ids[1:eos] == tok.encode("S\n\nUser: u1\n\nAssistant: a1")  # one run, one call
    assert p.ids[eos + 1:] == tok.encode("User: u2\n\nAssistant:")


def test_chat_runs_are_not_encoded_piecewise(tok: Tokenizer) -> None:
    """Why runs are encoded whole: `User: write` is not `User: ` + `write`."""
    assert tok.encode("User: write") != tok.encode("User: ") + tok.encode("write")
    p = chat_prompt(tok, [user("write")])
    assert p.ids == [BOS, *tok.encode("User: write\n\nAssistant:")]


@pytest.mark.parametrize("special", SPECIALS)
def test_chat_special_strings_stay_plain(tok: Tokenizer, hf, special: str) -> None:
    messages = [system(f"sys {special}"), user(f"look: {special} here"),
                assistant(special), user(f"{special}")]
    p = chat_prompt(tok, messages)
    assert p.ids.count(BOS) == 1 and p.ids.count(EOS) == 1  # only the template's own
    assert not any(HOLE <= i <= END for i in p.ids)
    eos = p.ids.index(EOS)
    assert p.ids[1:eos] == tok.encode(f"sys {special}\n\nUser: look: {special} here\n\n"
                                      f"Assistant: {special}")
    # transformers renders the same text, but would turn the strings into special ids
    assert p.text == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert _reference_ids(hf, messages) != p.ids


def test_chat_rejects_bad_messages(tok: Tokenizer) -> None:
    with pytest.raises(UsageError, match="role 'tool'"):
        chat_prompt(tok, [{"role": "tool", "content": "x"}])
    with pytest.raises(UsageError, match="no text content"):
        chat_prompt(tok, [{"role": "user", "content": None}])


# --- chat truncation ----------------------------------------------------------------------------

def _long_chat() -> list[dict]:
    messages = [system("You are a careful reviewer.")]
    for i in range(8):
        messages += [user(f"question {i}: " + "why " * 20), assistant(f"answer {i}: " + "because " * 20)]
    return messages + [user("final question: what now?")]


def test_chat_truncation_drops_oldest_whole_turns(tok: Tokenizer) -> None:
    messages = _long_chat()
    full = chat_prompt(tok, messages)
    limit = len(full.ids) // 2
    p = chat_prompt(tok, messages, max_prompt_tokens=limit, low_water=1.0)
    assert len(p.ids) <= limit
    assert p.dropped_messages % 2 == 0 and p.dropped_messages > 0  # whole user+assistant turns
    kept = [messages[0], *messages[1 + p.dropped_messages:]]
    assert p == Prompt(chat_prompt(tok, kept).ids, chat_prompt(tok, kept).text,
                       dropped_messages=p.dropped_messages, dropped_turns=p.dropped_messages // 2)
    assert p.text.startswith("<｜begin▁of▁sentence｜>You are a careful reviewer.\n\nUser: question")
    assert p.text.endswith("User: final question: what now?\n\nAssistant:")
    # as few turns as possible were dropped
    one_less = [messages[0], *messages[1 + p.dropped_messages - 2:]]
    assert len(chat_prompt(tok, one_less).ids) > limit


def test_chat_overflow_drops_down_to_the_low_water_mark(tok: Tokenizer) -> None:
    messages = _long_chat()
    limit = len(chat_prompt(tok, messages).ids) - 1  # just over: one turn would be enough
    p = chat_prompt(tok, messages, max_prompt_tokens=limit)
    assert len(p.ids) <= limit * LOW_WATER
    # the fewest turns that reach the low-water mark
    one_less = [messages[0], *messages[1 + p.dropped_messages - 2:]]
    assert len(chat_prompt(tok, one_less).ids) > limit * LOW_WATER


def test_chat_after_overflow_keeps_its_prefix_for_several_turns(tok: Tokenizer) -> None:
    """A long chat cuts old turns in batches: between cuts each prompt extends the previous one
    (the KV cache is reused), instead of one turn dropped and the whole window prefilled per turn."""
    limit, messages, dropped, prompts = 400, [system("Be brief.")], 0, []
    for i in range(40):
        messages.append(user(f"question {i}: " + "why " * 10))
        p = chat_prompt(tok, messages, max_prompt_tokens=limit, dropped_turns=dropped)
        assert len(p.ids) <= limit and p.dropped_turns >= dropped
        dropped = p.dropped_turns
        prompts.append(p.ids)
        messages.append(assistant(f"answer {i}: " + "because " * 10))
    assert dropped > 0
    changed = sum(1 for a, b in pairwise(prompts) if b[:len(a) - 1] != a[:len(a) - 1])
    # every turn here adds ~50 tokens: a cut to half the window lasts about 4 turns
    assert 1 <= changed <= 40 // 3, changed


def test_chat_dropped_turns_stay_dropped_while_the_rest_fits(tok: Tokenizer) -> None:
    messages = _long_chat()
    p = chat_prompt(tok, messages, max_prompt_tokens=10_000, dropped_turns=3)
    assert p.dropped_turns == 3 and p.dropped_messages == 6
    assert p.ids == chat_prompt(tok, [messages[0], *messages[7:]]).ids


def test_chat_truncation_not_needed(tok: Tokenizer) -> None:
    messages = _long_chat()
    n = len(chat_prompt(tok, messages).ids)
    assert chat_prompt(tok, messages, max_prompt_tokens=n) == chat_prompt(tok, messages)


def test_chat_truncation_keeps_system_and_last_user(tok: Tokenizer) -> None:
    messages = _long_chat()
    minimal = chat_prompt(tok, [messages[0], messages[-1]])
    p = chat_prompt(tok, messages, max_prompt_tokens=len(minimal.ids))
    assert p.ids == minimal.ids and p.dropped_messages == len(messages) - 2
    with pytest.raises(PromptTooLong, match=rf"needs {len(minimal.ids)} tokens.*limit is "
                                            rf"{len(minimal.ids) - 1}"):
        chat_prompt(tok, messages, max_prompt_tokens=len(minimal.ids) - 1)


def test_chat_single_message_too_long(tok: Tokenizer) -> None:
    with pytest.raises(PromptTooLong, match="limit is 10"):
        chat_prompt(tok, [user("word " * 100)], max_prompt_tokens=10)


# --- fill-in-the-middle -------------------------------------------------------------------------

def test_fim_ids_by_hand(tok: Tokenizer) -> None:
    prefix, suffix = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"
    p = fim_prompt(tok, prefix, suffix)
    assert p.ids == [BOS, BEGIN, *tok.encode(prefix), HOLE, *tok.encode(suffix), END]
    assert p.text == f"<｜begin▁of▁sentence｜><｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>"
    assert p.truncated_chars == (0, 0)
    assert fim_prompt(tok, "", "").ids == [BOS, BEGIN, HOLE, END]


@pytest.mark.parametrize("special", SPECIALS)
def test_fim_special_strings_stay_plain(tok: Tokenizer, special: str) -> None:
    p = fim_prompt(tok, f"a = '{special}'\n", f"b = '{special}'")
    assert p.ids == [BOS, BEGIN, *tok.encode(f"a = '{special}'\n"), HOLE,
                     *tok.encode(f"b = '{special}'"), END]
    assert p.ids.count(BOS) == 1 and p.ids.count(HOLE) == 1


def _code(n: int, tag: str) -> str:
    return "".join(f"    {tag}_{i} = compute({i}, 'value {i}')  # line {i}\n" for i in range(n))


def _parts(p: Prompt) -> tuple[list[int], list[int]]:
    hole = p.ids.index(HOLE)
    assert p.ids[:2] == [BOS, BEGIN] and p.ids[-1] == END
    return p.ids[2:hole], p.ids[hole + 1:-1]


def test_fim_truncation_both_long(tok: Tokenizer) -> None:
    prefix, suffix = _code(300, "pre"), _code(300, "suf")
    p = fim_prompt(tok, prefix, suffix, max_prompt_tokens=404)
    pre, suf = _parts(p)
    assert len(p.ids) <= 404
    assert 0.6 * 400 <= len(pre) <= 0.75 * 400 and len(pre) + len(suf) >= 400 - 40
    cut_pre, cut_suf = p.truncated_chars
    kept_pre, kept_suf = prefix[cut_pre:], suffix[:len(suffix) - cut_suf]
    assert pre == tok.encode(kept_pre) and suf == tok.encode(kept_suf)
    assert kept_pre.startswith("    pre_") and prefix.endswith(kept_pre)  # at a line start
    assert kept_suf.endswith("\n") and kept_suf.startswith("    suf_0 ")  # nearest the hole


def test_fim_truncation_short_suffix_keeps_it_whole(tok: Tokenizer) -> None:
    prefix, suffix = _code(300, "pre"), "return x\n"
    p = fim_prompt(tok, prefix, suffix, max_prompt_tokens=204)
    pre, suf = _parts(p)
    assert len(p.ids) <= 204 and suf == tok.encode(suffix) and p.truncated_chars[1] == 0
    assert len(pre) > 200 - len(suf) - 25  # the prefix takes what the suffix leaves


def test_fim_truncation_short_prefix_keeps_it_whole(tok: Tokenizer) -> None:
    prefix, suffix = "def f():\n", _code(300, "suf")
    p = fim_prompt(tok, prefix, suffix, max_prompt_tokens=204)
    pre, suf = _parts(p)
    assert len(p.ids) <= 204 and pre == tok.encode(prefix) and p.truncated_chars[0] == 0
    assert len(suf) > 200 - len(pre) - 25


def test_fim_one_long_line_is_cut_mid_line(tok: Tokenizer) -> None:
    prefix = "x = [" + ", ".join(str(i) for i in range(2000))
    suffix = ", ".join(str(i) for i in range(2000)) + "]"
    p = fim_prompt(tok, prefix, suffix, max_prompt_tokens=104)
    pre, suf = _parts(p)
    assert len(p.ids) <= 104 and len(pre) + len(suf) >= 98
    assert prefix.endswith(prefix[p.truncated_chars[0]:]) and suffix.startswith(tok.decode(suf))


def test_fim_too_small_budget(tok: Tokenizer) -> None:
    assert fim_prompt(tok, "abc", "def", max_prompt_tokens=4).ids == [BOS, BEGIN, HOLE, END]
    with pytest.raises(PromptTooLong, match="at least 4 tokens"):
        fim_prompt(tok, "abc", "def", max_prompt_tokens=3)


def test_fim_never_exceeds_budget_on_random_text(tok: Tokenizer) -> None:
    rng = random.Random(7)
    alphabet = ["a", "b", " ", "  ", "\n", "\t", "é", "你", "🚀", "😶‍🌫️", "1", "(", "'", "\r\n"]
    for _ in range(60):
        prefix = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300)))
        suffix = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300)))
        limit = rng.randint(4, 120)
        p = fim_prompt(tok, prefix, suffix, max_prompt_tokens=limit)
        assert len(p.ids) <= limit
        pre, suf = _parts(p)
        a, b = p.truncated_chars
        assert pre == tok.encode(prefix[a:]) and suf == tok.encode(suffix[:len(suffix) - b])
        full = len(tok.encode(prefix)) + len(tok.encode(suffix)) + 4
        assert len(p.ids) >= min(full, limit) // 2  # truncation keeps a fair share


# --- completion ---------------------------------------------------------------------------------

def test_completion(tok: Tokenizer) -> None:
    p = completion_prompt(tok, "import os\n")
    assert p.ids == [BOS, *tok.encode("import os\n")] and p.text == "<｜begin▁of▁sentence｜>import os\n"
    assert completion_prompt(tok, "<｜end▁of▁sentence｜>").ids[1:] == tok.encode("<｜end▁of▁sentence｜>")


def test_completion_truncation_keeps_the_end(tok: Tokenizer) -> None:
    prefix = _code(300, "v") + "result = "
    p = completion_prompt(tok, prefix, max_prompt_tokens=101)
    kept = prefix[p.truncated_chars[0]:]
    assert len(p.ids) <= 101 and len(p.ids) > 80 and p.truncated_chars[1] == 0
    assert p.ids == [BOS, *tok.encode(kept)]
    assert kept.endswith("result = ") and kept.startswith("    v_")
    with pytest.raises(PromptTooLong):
        completion_prompt(tok, "x", max_prompt_tokens=0)


def test_keep_helpers_prefer_line_boundaries(tok: Tokenizer) -> None:
    text = "alpha beta gamma\n" * 40
    tail = keep_tail(tok, text, 30)
    head = keep_head(tok, text, 30)
    assert tail.startswith("alpha") and text.endswith(tail) and len(tok.encode(tail)) <= 30
    assert head.endswith("gamma\n") and text.startswith(head) and len(tok.encode(head)) <= 30
    assert keep_tail(tok, text, 0) == keep_head(tok, text, 0) == ""
    assert keep_tail(tok, "short", 10) == "short"


def test_chat_truncation_keeps_system_messages_in_place(tok: Tokenizer) -> None:
    messages = [user("old " * 50), assistant("reply " * 50), system("mid-conversation rule"),
                user("new question")]
    kept = [messages[2], messages[3]]
    p = chat_prompt(tok, messages, max_prompt_tokens=len(chat_prompt(tok, kept).ids))
    assert p.ids == chat_prompt(tok, kept).ids and p.dropped_messages == 2


# --- bounded work: the tokenizer sees text in proportion to the window, not to the input -------

class _Recording:
    """A tokenizer that records the length of every text it is asked to encode."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok, self.seen = tok, []

    def encode(self, text: str) -> list[int]:
        self.seen.append(len(text))
        return self.tok.encode(text)

    def encode_with_offsets(self, text: str):
        self.seen.append(len(text))
        return self.tok.encode_with_offsets(text)

    def __getattr__(self, name: str):
        return getattr(self.tok, name)


def _big_code(lines: int) -> str:
    return "".join(f"def f{i}(x):\n    return x * {i}  # line {i}\n" for i in range(lines))


def test_fim_and_completion_tokenize_a_bounded_piece_of_a_huge_file(tok: Tokenizer) -> None:
    from dscoder.prompts import CHARS_PER_TOKEN

    big = _big_code(60_000)  # about 2.5 MB on each side of the hole
    rec = _Recording(tok)
    budget = 500
    p = fim_prompt(rec, big, big, max_prompt_tokens=budget)
    assert len(p.ids) <= budget
    assert max(rec.seen) <= (budget - 4) * CHARS_PER_TOKEN + 200, max(rec.seen)
    # the text nearest the hole is what is kept, as without the cut
    assert p.text.split("<｜fim▁hole｜>")[0].endswith(big[-200:])
    assert p.truncated_chars[0] > len(big) - budget * CHARS_PER_TOKEN
    rec.seen.clear()
    c = completion_prompt(rec, big, max_prompt_tokens=budget)
    assert len(c.ids) <= budget and c.text.endswith(big[-300:])
    assert max(rec.seen) <= budget * CHARS_PER_TOKEN


def test_fim_cut_by_characters_keeps_the_same_text_as_a_full_tokenization(tok: Tokenizer) -> None:
    big = _big_code(3_000)
    budget = 800
    p = fim_prompt(tok, big, big, max_prompt_tokens=budget)
    full_prefix = keep_tail(tok, big[:], 600)  # what a full tokenization keeps of the prefix
    assert len(p.ids) <= budget and len(p.ids) > budget * 0.9  # the window is used, not wasted
    assert full_prefix[-500:] in p.text


def test_chat_refuses_a_huge_message_after_tokenizing_a_bounded_piece(tok: Tokenizer) -> None:
    from dscoder.prompts import CHARS_PER_TOKEN

    for lines in (100_000, 2_500):  # 4 MB: no token is that long; 90 KB: its start is enough
        rec = _Recording(tok)
        with pytest.raises(PromptTooLong, match="limit is 1000"):
            chat_prompt(rec, [user(_big_code(lines))], max_prompt_tokens=1000)
        assert max(rec.seen, default=0) <= 1000 * CHARS_PER_TOKEN


def test_chat_message_of_long_tokens_is_not_refused_by_its_length(tok: Tokenizer) -> None:
    # 100 spaces are one token: 20,000 characters in about 200 tokens fit a 1,000-token window
    text = ("x" + " " * 100) * 200
    p = chat_prompt(tok, [user(text)], max_prompt_tokens=1000)
    assert len(p.ids) <= 1000
    assert tok.max_token_chars == 128
