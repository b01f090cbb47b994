"""Choosing the next token: greedy, or temperature with top-k and top-p, from a seed.

The draw is a function of the logits, the seed and the position of the token being chosen, and
of nothing else: the random numbers come from a counter-based hash of (seed, position, token
id), not from a generator whose state advances. So the same seed gives the same reply whether
the engine samples on the host between steps or inside a captured CUDA graph several steps
ahead (dscoder.graphs): both call sample(). The hash is integer arithmetic, exact everywhere;
only its final fp32 log may differ in the last bit between devices (a GPU computes it in one
Triton kernel, dscoder.sampling_kernel).

Every knob lives in device tensors (SamplingParams), so one captured graph serves every
request's temperature, top-k, top-p and seed.
"""
from __future__ import annotations

import functools
import secrets
from dataclasses import dataclass

import torch

from dscoder.events import GenerationSettings

_MASK32 = 0xFFFFFFFF
# odd multipliers below 2**31: a 32-bit value times one stays below 2**63, so the hash never
# overflows int64 (whose overflow torch does not define) and is exact on every device
_MUL = (0x7FEB352D, 0x2C1B3C6D, 0x297A2D39)
_GOLDEN = 0x61C88647  # 2**32 / phi, halved to stay below 2**31


@dataclass
class SamplingParams:
    """The sampling knobs as one-element device tensors (fixed addresses: a graph reads them)."""

    temperature: torch.Tensor  # fp32
    top_k: torch.Tensor  # int64; the vocabulary size when off
    top_p: torch.Tensor  # fp32; above 1 when off
    seed: torch.Tensor  # int64, 32 bits

    @staticmethod
    def on(device: torch.device) -> SamplingParams:
        return SamplingParams(torch.ones(1, device=device), torch.ones(1, dtype=torch.long, device=device),
                              torch.full((1,), 2.0, device=device), torch.zeros(1, dtype=torch.long, device=device))

    def copy_(self, other: SamplingParams) -> None:
        for name in ("temperature", "top_k", "top_p", "seed"):
            getattr(self, name).copy_(getattr(other, name))


class Sampler:
    """One generation's sampling: greedy or not, and the knobs with the resolved seed as
    device tensors."""

    def __init__(self, settings: GenerationSettings, device: torch.device) -> None:
        self.greedy = settings.temperature <= 0
        # no seed given: a fresh one per generation (the reply is still a function of it)
        seed = (settings.seed if settings.seed is not None else secrets.randbits(32)) & _MASK32
        top_k = settings.top_k if settings.top_k > 0 else 1 << 62  # off: above any vocabulary
        top_p = settings.top_p if 0 < settings.top_p < 1 else 2.0
        self.params = SamplingParams(
            torch.tensor([max(settings.temperature, 1e-6)], dtype=torch.float32, device=device),
            torch.tensor([top_k], dtype=torch.long, device=device),
            torch.tensor([top_p], dtype=torch.float32, device=device),
            torch.tensor([seed], dtype=torch.long, device=device))

    def __call__(self, logits: torch.Tensor, pos: int | torch.Tensor) -> torch.Tensor:
        """logits (1, V) fp32 of the token at `pos` -> its id (1,), on the logits' device (no
        host sync here)."""
        if not isinstance(pos, torch.Tensor):
            pos = torch.tensor([pos], dtype=torch.long, device=logits.device)
        return sample(logits, pos, self.params, self.greedy)


def sample(logits: torch.Tensor, pos: torch.Tensor, params: SamplingParams, greedy: bool) -> torch.Tensor:
    """The next id (1,) for logits (1, V) of the token at position pos (1,): argmax when greedy,
    otherwise a draw from softmax(logits / temperature) cut to the top_k most likely tokens and
    then to the smallest set whose mass reaches top_p. No host sync, fixed shapes: graphable."""
    if greedy:
        return logits.argmax(dim=-1)
    vocab = logits.shape[-1]
    ranked, order = (logits.float() / params.temperature).sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)
    ranked = ranked.masked_fill(rank >= params.top_k, float("-inf"))
    probs = ranked.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
    probs = probs.masked_fill(before >= params.top_p, 0.0)  # the first token always stays
    # probs / Exp(1) noise, argmax: a draw in proportion to probs (the exponential race)
    noise = exponential_noise(params.seed, pos, order)
    return order.gather(-1, (probs / noise).argmax(dim=-1, keepdim=True)).view(-1)


def exponential_noise(seed: torch.Tensor, pos: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Exp(1) draws, one per token id in `ids`, fixed by (seed, pos): fp32, same shape as ids.
    On a GPU one Triton kernel computes the same (dscoder.sampling_kernel)."""
    if ids.is_cuda and _has_triton():
        from dscoder import sampling_kernel

        return sampling_kernel.exponential_noise(seed, pos, ids)
    key = _hash32(seed ^ _hash32(pos))  # one key per step
    bits = _hash32((key + ids * _GOLDEN) & _MASK32)
    uniform = ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))  # in (0, 1), never 0
    return -torch.log(uniform)


@functools.cache
def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:  # a CPU-only install
        return False
    return True


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (xorshift-multiply rounds) in int64 arithmetic that cannot overflow."""
    x = x & _MASK32
    for mul in _MUL:
        x = ((x ^ (x >> 16)) * mul) & _MASK32
    return x ^ (x >> 15)
