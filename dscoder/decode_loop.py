"""One generation's loop, shared by the native and the transformers engines: prefill, then sample
and decode token by token, streaming text through the UTF-8-safe detokenizer and the stop-string
matcher, until EOS, a stop string, the token budget or a cancel; the last event is Finished.

The engines differ only in how they run the model: prefill() and a Decode, which yields the
sampled ids (stepwise() makes one from a one-token step; the native engine's CUDA graphs sample
on the device, a few steps ahead of the ids this loop reads). Timing, stopping, interrupts and
the Finished event are defined here once.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

import torch

from dscoder.errors import PromptTooLong, UsageError
from dscoder.events import Event, Finished, GenerationSettings, TextDelta
from dscoder.sampling import Sampler
from dscoder.stops import StopMatcher


def check_prompt(prompt: list[int], context_length: int) -> None:
    """A prompt an engine can start from: not empty, and shorter than the context window."""
    if not prompt:
        raise UsageError("The prompt is empty.")
    if len(prompt) >= context_length:
        raise PromptTooLong(f"The prompt has {len(prompt)} tokens but the context window is "
                            f"{context_length}; shorten it or raise --context-length.")


def plan_request(prompt_ids: Sequence[int], settings: GenerationSettings, context_length: int,
                 stop_ids: Iterable[int | None]) -> tuple[list[int], frozenset[int], int]:
    """(prompt, stop ids, token budget) of a request both engines can start from: the prompt
    checked against the window, and at most max_tokens that still fit in it."""
    prompt = list(prompt_ids)
    check_prompt(prompt, context_length)
    stops = frozenset(i for i in stop_ids if i is not None)
    return prompt, stops, min(settings.max_tokens, context_length - len(prompt))


class Decode(Protocol):
    def __call__(self, logits: torch.Tensor, sampler: Sampler, pos: int, limit: int) -> Iterator[int]:
        """Up to `limit` ids: the one sampled from `logits` (the token at `pos`), then each one
        sampled after feeding the one before. Closing it early is allowed; the cache then holds
        every id read before the last one (as when a reply stops after it)."""
        ...


def stepwise(step: Callable[[int], torch.Tensor]) -> Decode:
    """A Decode from step(id) -> logits after that id: sample on the host, then step."""

    def decode(logits: torch.Tensor, sampler: Sampler, pos: int, limit: int) -> Iterator[int]:
        for i in range(limit):
            token = int(sampler(logits, pos + i))
            yield token
            if i + 1 < limit:
                logits = step(token)

    return decode


def run_generation(prefill: Callable[[], torch.Tensor], decode: Decode, *,
                   tokenizer, settings: GenerationSettings, device: torch.device,
                   stop_ids: frozenset[int], budget: int, cancel: threading.Event | None,
                   prompt_tokens: int, cached_tokens: int,
                   stats: Callable[[], dict] = dict,
                   on_prefill: Callable[[float], None] | None = None) -> Iterator[Event]:
    """prefill() gives the logits after the prompt; decode() the ids from there (see Decode)."""
    sampler = Sampler(settings, device)
    detok = tokenizer.detokenizer()
    stops = StopMatcher(settings.stop)
    generated: list[int] = []
    t0 = time.perf_counter()
    t1: float | None = None
    waited = 0.0  # time suspended in `yield`: the consumer's (rendering), not the engine's
    reason = "length"
    interrupt: KeyboardInterrupt | None = None
    ids: Iterator[int] = iter(())
    try:
        logits = prefill()
        if budget > 0:
            ids = decode(logits, sampler, prompt_tokens, budget)
        next_id = next(ids, None)
        t1 = time.perf_counter()
        if on_prefill is not None:
            on_prefill(t1 - t0)
        while next_id is not None:
            if next_id in stop_ids:
                reason = "eos"
                break
            generated.append(next_id)
            text, hit = stops.feed(detok.add(next_id))
            if text:
                paused = time.perf_counter()
                yield TextDelta(text, (next_id,))
                waited += time.perf_counter() - paused
            if hit:
                reason = "stop"
                break
            if len(generated) >= budget:
                break
            if cancel is not None and cancel.is_set():
                reason = "cancelled"
                break
            next_id = next(ids, None)
    except KeyboardInterrupt as e:
        # Ctrl-C (or SIGTERM) inside a step: the engine's cache holds every token it counts, so
        # the reply ends here like a cancel, with a "cancelled" Finished that has this
        # generation's real numbers; a caller that reads on past it gets the interrupt back (a
        # plain `for` loop over events still stops on Ctrl-C).
        reason, interrupt = "cancelled", e
    finally:
        close = getattr(ids, "close", None)
        if close is not None:
            close()  # the decode stops queueing steps
    if t1 is None:
        t1 = time.perf_counter()
    if reason != "stop":
        # a character cut in half by the end (max tokens, a cancel) is dropped, not U+FFFD
        tail = stops.finish(detok.flush(partial=False))
        if tail:
            paused = time.perf_counter()
            yield TextDelta(tail, ())
            waited += time.perf_counter() - paused
    yield Finished(reason=reason, text=stops.text, token_ids=tuple(generated),
                   prompt_tokens=prompt_tokens, cached_tokens=cached_tokens,
                   prefill_seconds=t1 - t0, decode_seconds=time.perf_counter() - t1 - waited,
                   stats=stats())
    if interrupt is not None:
        raise interrupt
