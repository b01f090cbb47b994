"""The transformers engine on CUDA: whole on the GPU, and under a --gpu-memory budget small enough
that accelerate keeps layers in host memory. Both must give the CPU engine's greedy ids.

Skipped without a GPU; run with `python -m pytest tests/gpu/test_hf_gpu.py -q`.
"""
from __future__ import annotations

import pytest
import torch

from dscoder.errors import UsageError

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def coder_v1(tmp_path_factory):
    from dscoder.llama_checkpoint import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("coder-v1"), "small", seed=0)


def greedy(engine, n: int = 16) -> tuple[int, ...]:
    from dscoder.events import GenerationSettings
    from dscoder.prompts import completion_prompt

    ids = completion_prompt(engine.tokenizer, "def quicksort(xs):\n    ").ids
    session = engine.new_session()
    first = list(session.generate(ids, GenerationSettings(max_tokens=n, temperature=0), stop_ids=()))
    again = list(session.generate(ids + list(first[-1].token_ids[:3]),  # cache reuse on the GPU
                                  GenerationSettings(max_tokens=n - 3, temperature=0), stop_ids=()))
    assert again[-1].cached_tokens == len(ids) + 2
    assert again[-1].token_ids == first[-1].token_ids[3:]
    return first[-1].token_ids


def test_gpu_and_offloaded_match_the_cpu(coder_v1):
    from dscoder.loader import load_engine

    cpu = greedy(load_engine(coder_v1, device="cpu", dtype="float32"))
    gpu = load_engine(coder_v1, device="cuda", dtype="float32", context_length=256)
    assert gpu.device.type == "cuda" and greedy(gpu) == cpu
    gpu.close()
    # a budget that holds the embeddings and a few layers, not the rest (the activation reserve
    # and the KV cache come off the top first)
    from dscoder.hf_engine import ACTIVATION_RESERVE

    weights = sum(f.stat().st_size for f in coder_v1.glob("*.safetensors"))
    budget = ACTIVATION_RESERVE + (1 << 20) + int(weights * 0.85)
    offloaded = load_engine(coder_v1, device="cuda", dtype="float32", context_length=256,
                            gpu_memory=str(budget))
    placed = set(offloaded.model.hf_device_map.values())
    assert "cpu" in placed and placed - {"cpu", "disk"}
    assert greedy(offloaded) == cpu
    with pytest.raises(UsageError, match="no room on the GPU"):
        load_engine(coder_v1, device="cuda", dtype="float32", context_length=256,
                    gpu_memory=str(ACTIVATION_RESERVE + (4 << 20)))  # 2 MiB after the KV cache
