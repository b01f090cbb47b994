"""Routed-expert weights at one byte each: symmetric int8 with one scale per output channel.

A weight matrix w (N, K) is stored as q = round(w / s) in int8 with s = absmax(w[n, :]) / 127
per row n (an output channel), s in fp32: the scales cost 4 bytes per row (0.2% of a Lite
expert's bytes). Measured on Lite-shaped (2816 x 2048) bf16 weights: relative error 8.29e-3 with
fp32 scales, 8.38e-3 with bf16 ones (Gaussian, as in the random checkpoints); so fp32, for
0.1% of the bytes. The Triton expert kernel multiplies each row's fp32 accumulator by its
scale; the torch path dequantizes the few experts it uses with dequantize().

Why int8 and not fp8 e4m3: Ampere and consumer cards, the 12-24 GB audience of offloading,
lack fp8, and per-channel int8 is the more accurate of the two on these weights: 8.3e-3
against 2.6e-2 (Gaussian), 2.2e-2 against 2.6e-2 with heavy tails (Student-t, 4 degrees of
freedom); benchmarks/bench_offload.py measures both on the checkpoint it runs.
"""
from __future__ import annotations

import torch

QMAX = 127
SCALE_DTYPE = torch.float32
QUANT_CHUNK = 8  # experts quantized at once: bounds the fp32 temporaries to a few experts


def quantizes(expert_dtype: str | None) -> bool:
    """Whether --expert-dtype stores the routed experts in int8."""
    return expert_dtype == "int8"


def quantize_into(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """Fill q (..., N, K) int8 and scale (..., N) from w (..., N, K), a few experts (or rows,
    for one matrix) at a time."""
    for a in range(0, w.shape[0], QUANT_CHUNK):
        wf = w[a:a + QUANT_CHUNK].float()
        s = wf.abs().amax(dim=-1) / QMAX
        s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row: any scale reproduces it
        q[a:a + QUANT_CHUNK] = (wf / s[..., None]).round_().clamp_(-QMAX, QMAX).to(torch.int8)
        scale[a:a + QUANT_CHUNK] = s.to(scale.dtype)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8, scale fp32 per row) of w (..., N, K)."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[:-1], dtype=SCALE_DTYPE, device=w.device)
    quantize_into(w, q, scale)
    return q, scale


def dequantize(w: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The weights in `dtype`: w itself when it is not quantized (scale None), else w * scale
    row by row. The torch path's one dequantization (CPU, prefill-sized calls)."""
    if scale is None:
        return w
    return (w.to(torch.float32) * scale.to(torch.float32)[..., None]).to(dtype)


def fp8_relative_error(w: torch.Tensor) -> float:
    """The relative error (Frobenius) of w through per-output-channel fp8 e4m3, for comparison
    with int8 (the benchmark's weight-error row)."""
    f8 = torch.float8_e4m3fn
    wf = w.float()
    s = wf.abs().amax(dim=-1, keepdim=True) / torch.finfo(f8).max
    s = torch.where(s > 0, s, torch.ones_like(s))
    back = (wf / s).to(f8).float() * s
    return ((back - wf).norm() / wf.norm()).item()


def int8_relative_error(w: torch.Tensor) -> float:
    q, s = quantize(w)
    wf = w.float()
    return ((dequantize(q, s, torch.float32) - wf).norm() / wf.norm()).item()


def expert_nbytes(hidden: int, intermediate: int, dtype: torch.dtype, expert_dtype: str | None) -> int:
    """One routed expert's bytes (w13 (2I, H) and w2 (H, I)), with its scales when int8."""
    weights = 3 * hidden * intermediate
    if not quantizes(expert_dtype):
        return weights * dtype.itemsize
    return weights + (2 * intermediate + hidden) * SCALE_DTYPE.itemsize
