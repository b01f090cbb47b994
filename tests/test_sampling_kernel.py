"""The sampling noise kernel (dscoder.sampling_kernel) against sampling's torch arithmetic, on the
CPU under Triton's interpreter (TRITON_INTERPRET=1 must be set before triton is imported, so the
comparison runs in a child process: this file run as a script). Skipped without triton.
tests/gpu/test_cuda.py compares the compiled kernel on a GPU."""
from __future__ import annotations

import json
import os

import pytest
import torch
from triton_interpreter import run_under_interpreter


def run_cases() -> dict[str, float]:
    from dscoder import sampling, sampling_kernel

    out: dict[str, float] = {}
    ids = torch.randperm(5000)  # not a multiple of the block: the last block is masked
    for seed, pos in ((3, 17), (2**32 - 1, 123456), (0, 0)):
        s, p = torch.tensor([seed]), torch.tensor([pos])
        got = sampling_kernel.exponential_noise(s, p, ids)
        want = sampling.exponential_noise(s, p, ids)
        # the hash is integer arithmetic, the log fp32: at most an ulp or two apart
        out[f"{seed}-{pos}"] = ((got - want).abs() / want).max().item()
    return out


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_under_interpreter(__file__)


def test_noise_kernel_matches_the_torch_hash(interpreted):
    assert len(interpreted) == 3
    for case, rel in interpreted.items():
        assert rel < 3e-7, case


if __name__ == "__main__":  # the child process: TRITON_INTERPRET=1 is set already
    assert os.environ.get("TRITON_INTERPRET") == "1"
    print(json.dumps(run_cases()))
