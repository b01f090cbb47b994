"""Prompts as token ids: the chat template, fill-in-the-middle, plain completion; truncation.

A prompt is built as a list of parts: special ids that the template itself inserts (BOS, EOS,
FIM sentinels) and runs of text between them. Each maximal run of text is encoded in one call
(encoding smaller pieces changes the ids at the seams), and the text never becomes special ids,
whatever it contains. The result equals what the released chat template gives through
transformers for ordinary text.

Models other than DeepSeek-Coder-V2 bring their own chat template (dscoder.chat_template): their
tokenizer (dscoder.model_tokenizer) carries it, and ``chat_prompt`` uses it instead of the native
builder, with the same truncation and the same guarantee that text stays text.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dscoder.errors import PromptTooLong, UsageError
from dscoder.tokenizer import Tokenizer

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
Part = int | str  # a special id the template inserts, or a run of text
ROLES = ("system", "user", "assistant")
PREFIX_SHARE = 0.75  # FIM: the prefix's share of the budget when prefix and suffix are both long
LOW_WATER = 0.5  # chat: a conversation that overflows is cut to this share of the limit at once
# Text is cut by characters before it is tokenized, so time and memory follow the context window,
# not the file (a 50 MB file took minutes and 18 GB to tokenize whole). Code averages 3-4
# characters a token; 16 keeps a full window for all but pathological text (runs of blanks).
CHARS_PER_TOKEN = 16


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    text: str  # the rendered prompt, special tokens spelled out (for --show-prompt)
    dropped_messages: int = 0  # chat: messages dropped (whole turns) to fit
    dropped_turns: int = 0  # chat: the oldest turns left out (pass it to the next chat_prompt)
    truncated_chars: tuple[int, int] = (0, 0)  # characters cut from the prefix start / suffix end


def _build(tok: Tokenizer, parts: Sequence[Part]) -> tuple[list[int], str]:
    """Ids and display text of a list of parts; adjacent text parts are encoded together."""
    ids: list[int] = []
    shown: list[str] = []
    run: list[str] = []
    for part in [*parts, None]:
        if isinstance(part, str):
            run.append(part)
            continue
        if run:  # a maximal run of text ends here
            ids.extend(tok.encode("".join(run)))
            shown.extend(run)
            run = []
        if part is not None:
            ids.append(part)
            shown.append(tok.id_to_token(part) or "")
    return ids, "".join(shown)


# --- chat -----------------------------------------------------------------------------------

def _check_messages(messages: Sequence[Message]) -> None:
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES:
            raise UsageError(f"Message {i + 1} has role {m.get('role')!r}; "
                             f"use one of {', '.join(ROLES)}.")
        if not isinstance(m.get("content"), str):
            raise UsageError(f"Message {i + 1} has no text content; give it a string.")


def _chat_parts(tok: Tokenizer, messages: Sequence[Message]) -> list[Part]:
    """The released template, verbatim: BOS, then per role, then the generation prompt."""
    parts: list[Part] = [tok.bos_id]
    for m in messages:
        if m["role"] == "user":
            parts.append("User: " + m["content"] + "\n\n")
        elif m["role"] == "assistant":
            parts += ["Assistant: " + m["content"], tok.eos_id]
        else:
            parts.append(m["content"] + "\n\n")
    parts.append("Assistant:")  # no trailing space: it derails the model (model card)
    return parts


def _parts_builder(tok: Tokenizer) -> Callable[[Sequence[Message]], list[Part]]:
    """The model's own template when its tokenizer has one, else the native V2 builder."""
    if not hasattr(tok, "chat_template"):
        return lambda messages: _chat_parts(tok, messages)
    template = tok.chat_template
    if template is None:
        raise UsageError("This model has no chat template (a base model?); use dscoder complete "
                         "or insert with it, or chat with an Instruct model.")
    return template.parts


def _turns(messages: Sequence[Message]) -> list[list[int]]:
    """Indices of the droppable turns, oldest first: each user message with the replies that
    follow it. System messages and the last turn (the one being answered) are never dropped."""
    turns: list[list[int]] = []
    for i, m in enumerate(messages):
        if m["role"] == "system":
            continue
        if m["role"] == "user" or not turns:
            turns.append([])
        turns[-1].append(i)
    return turns[:-1]


def _without_turns(messages: Sequence[Message], turns: list[list[int]], k: int) -> list[Message]:
    dropped = {i for turn in turns[:k] for i in turn}
    return [m for i, m in enumerate(messages) if i not in dropped]


def chat_prompt(tok: Tokenizer, messages: Sequence[Message], *,
                max_prompt_tokens: int | None = None, dropped_turns: int = 0,
                low_water: float = LOW_WATER) -> Prompt:
    """The chat prompt with the generation prompt ``Assistant:``; leaves out the oldest whole
    turns (keeping system messages and the last user message) when it exceeds ``max_prompt_tokens``.

    ``dropped_turns``: turns the previous prompt of this conversation already left out; they
    stay out while the rest fits, so consecutive prompts share their prefix and the engine reuses
    its KV cache. When the rest no longer fits, turns go out at once until the prompt is at most
    ``low_water`` of the limit: the window then has room for several more turns before the
    prefix has to change again (one turn per turn would change it, and prefill the whole
    window, on every turn)."""
    _check_messages(messages)
    parts = _parts_builder(tok)
    turns = _turns(messages)
    k0 = min(dropped_turns, len(turns))
    if max_prompt_tokens is not None:
        _refuse_huge(tok, messages, turns, max_prompt_tokens)

    def attempt(k: int) -> tuple[list[int], str]:
        return _build(tok, parts(_without_turns(messages, turns, k)))

    def prompt(k: int, built: tuple[list[int], str]) -> Prompt:
        return Prompt(built[0], built[1], dropped_messages=sum(len(t) for t in turns[:k]),
                      dropped_turns=k)

    built = attempt(k0)
    if max_prompt_tokens is None or len(built[0]) <= max_prompt_tokens:
        return prompt(k0, built)
    target = int(max_prompt_tokens * low_water)
    k = _least(k0 + 1, len(turns), lambda k: len(attempt(k)[0]) <= target) if k0 < len(turns) else k0
    built = attempt(k)
    if len(built[0]) > max_prompt_tokens:
        raise PromptTooLong(
            f"The prompt needs {len(built[0])} tokens even without earlier turns, but the limit is "
            f"{max_prompt_tokens}; shorten the message or the system prompt, or raise the limit.")
    return prompt(k, built)


def _refuse_huge(tok: Tokenizer, messages: Sequence[Message], turns: list[list[int]],
                 limit: int) -> None:
    """PromptTooLong at once for a message that can never fit (10 MB piped into chat), found by
    tokenizing at most ``limit * CHARS_PER_TOKEN`` characters of it, not all of it."""
    droppable = {i for turn in turns for i in turn}
    for i, m in enumerate(messages):
        if i not in droppable and _surely_over(tok, m["content"], limit):
            raise PromptTooLong(
                f"Message {i + 1} has {len(m['content'])} characters, more than fit in the prompt "
                f"(the limit is {limit} tokens); shorten it, or pipe in only the part that matters.")


def _surely_over(tok: Tokenizer, text: str, limit: int) -> bool:
    """Whether ``text`` needs more than ``limit`` tokens, decided from a bounded piece of it:
    the tokens of a prefix are at most one more (its last one, cut) than the whole has there."""
    most = max_token_chars(tok)
    if most is not None and len(text) > limit * most:
        return True
    head = text[: limit * CHARS_PER_TOKEN]
    return len(head) < len(text) and len(tok.encode(head)) > limit + 1


def max_token_chars(tok: Tokenizer) -> int | None:
    """The most characters one token can stand for (128 for DeepSeek-Coder-V2: a run of spaces);
    None when the tokenizer cannot say."""
    return getattr(tok, "max_token_chars", None)


def _least(lo: int, hi: int, ok: Callable[[int], bool]) -> int:
    """Smallest k in [lo, hi] with ok(k) (assuming ok is monotone), or hi if none is."""
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


# --- fill-in-the-middle and completion --------------------------------------------------------

def _count(tok: Tokenizer, text: str) -> int:
    return len(tok.encode(text)) if text else 0


def keep_tail(tok: Tokenizer, text: str, budget: int) -> str:
    """The end of ``text`` in at most ``budget`` tokens, starting at a line start if that keeps
    at least half the budget. The pre-tokenizer isolates newlines, so lines encode alone.
    Only the last ``budget * CHARS_PER_TOKEN`` characters are tokenized."""
    text = text[max(len(text) - max(budget, 0) * CHARS_PER_TOKEN, 0):]
    ids, offsets = tok.encode_with_offsets(text)
    if len(ids) <= budget:
        return text
    if budget <= 0:
        return ""
    starts = [o[0] for o in offsets]
    first = len(ids) - budget  # index of the first token we could keep
    cut = starts[first]
    line = text.find("\n", cut - 1 if cut > 0 else 0) + 1  # just after a newline
    if 0 < line < len(text) and len(ids) - bisect_left(starts, line) >= budget // 2:
        cut = line
    while _count(tok, text[cut:]) > budget:  # the seam can re-merge; step to the next token
        first = bisect_right(starts, cut)
        cut = starts[first] if first < len(starts) else len(text)
    return text[cut:]


def keep_head(tok: Tokenizer, text: str, budget: int) -> str:
    """The start of ``text`` in at most ``budget`` tokens, ending at a line end if that keeps at
    least half the budget. Only the first ``budget * CHARS_PER_TOKEN`` characters are tokenized."""
    text = text[: max(budget, 0) * CHARS_PER_TOKEN]
    ids, offsets = tok.encode_with_offsets(text)
    if len(ids) <= budget:
        return text
    if budget <= 0:
        return ""
    ends = [o[1] for o in offsets]
    cut = ends[budget - 1]
    line = text.rfind("\n", 0, cut) + 1  # just after a newline, so the line keeps its ending
    if line > 0 and bisect_right(ends, line) >= budget // 2:
        cut = line
    while _count(tok, text[:cut]) > budget:
        last = bisect_left(ends, cut) - 1
        cut = ends[last] if last >= 0 else 0
    return text[:cut]


def _budget_split(budget: int, n_prefix: int, n_suffix: int) -> int:
    """Tokens for the prefix: all it needs if the suffix is short, else about 3/4."""
    if n_prefix + n_suffix <= budget:
        return n_prefix
    share = int(budget * PREFIX_SHARE)
    if n_suffix <= budget - share:
        return budget - n_suffix
    return min(n_prefix, share)


def _room(max_prompt_tokens: int, n_special: int, what: str) -> int:
    room = max_prompt_tokens - n_special
    if room < 0:
        raise PromptTooLong(f"A {what} prompt needs at least {n_special} tokens, but the limit is "
                            f"{max_prompt_tokens}; raise the limit.")
    return room


def _bos(tok: Tokenizer) -> list[Part]:
    """BOS, for the models that have one (Qwen's tokenizers have none)."""
    return [] if tok.bos_id is None else [tok.bos_id]


def fim_prompt(tok: Tokenizer, prefix: str, suffix: str, *,
               max_prompt_tokens: int | None = None, context: str = "") -> Prompt:
    """``<BOS>{context}<fim_begin>{prefix}<fim_hole>{suffix}<fim_end>``; keeps the text nearest
    the hole. ``context`` (other files of the repository, as editors send it) gets the room the
    prefix and suffix leave, and keeps its end: the snippets nearest the prefix."""
    if None in (tok.fim_begin_id, tok.fim_hole_id, tok.fim_end_id):
        raise UsageError("This model's tokenizer has no fill-in-the-middle tokens; use "
                         "dscoder complete without --suffix, or a DeepSeek-Coder model.")
    kept_prefix, kept_suffix, kept_context = prefix, suffix, context
    if max_prompt_tokens is not None:
        room = _room(max_prompt_tokens, 3 + len(_bos(tok)), "fill-in-the-middle")
        # never tokenize more than the window could hold (see CHARS_PER_TOKEN)
        near_prefix = prefix[max(len(prefix) - room * CHARS_PER_TOKEN, 0):]
        near_suffix = suffix[: room * CHARS_PER_TOKEN]
        n_prefix, n_suffix = _count(tok, near_prefix), _count(tok, near_suffix)
        if n_prefix + n_suffix > room or len(near_prefix) < len(prefix) or len(near_suffix) < len(suffix):
            kept_prefix = keep_tail(tok, near_prefix, _budget_split(room, n_prefix, n_suffix))
            kept_suffix = keep_head(tok, near_suffix, room - _count(tok, kept_prefix))
        if context:
            used = _count(tok, kept_prefix) + _count(tok, kept_suffix)
            kept_context = keep_tail(tok, context, room - used)  # keep_tail cuts by characters too
    parts: list[Part] = [*_bos(tok), kept_context, tok.fim_begin_id, kept_prefix,
                         tok.fim_hole_id, kept_suffix, tok.fim_end_id]
    ids, text = _build(tok, parts)
    return Prompt(ids, text, truncated_chars=(len(prefix) - len(kept_prefix),
                                              len(suffix) - len(kept_suffix)))


def completion_prompt(tok: Tokenizer, prefix: str, *,
                      max_prompt_tokens: int | None = None) -> Prompt:
    """``<BOS>{prefix}``; keeps the end of the prefix when it is too long."""
    kept = prefix
    if max_prompt_tokens is not None:
        kept = keep_tail(tok, prefix, _room(max_prompt_tokens, len(_bos(tok)), "completion"))
    ids, text = _build(tok, [*_bos(tok), kept])
    return Prompt(ids, text, truncated_chars=(len(prefix) - len(kept), 0))
