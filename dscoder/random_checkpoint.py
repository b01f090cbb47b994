"""Write a random checkpoint in the released layout, for tests and benchmarks.

    python -m dscoder.random_checkpoint --shape tiny DIR
    python -m dscoder.random_checkpoint --shape lite DIR   # exact Lite shapes, ~31 GB in bf16

The result has the hub's key names, sharded safetensors with model.safetensors.index.json,
config.json, generation_config.json and the real tokenizer, so it loads exactly like the
released model (and transformers' DeepseekV2ForCausalLM loads it too).
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dscoder.config import ModelConfig
from dscoder.model.transformer import Transformer
from dscoder.tokenizer_files import write_tokenizer_files
from dscoder.weights import INDEX, expected_keys

_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
         "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
LITE: dict = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
    "attention_bias": False, "attention_dropout": 0.0, "aux_loss_alpha": 0.001,
    "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64,
    "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16,
    "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16,
    "pretraining_tp": 1, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06, "rope_scaling": _YARN, "rope_theta": 10000,
    "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy",
    "torch_dtype": "bfloat16", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
}
# Small shapes with every feature of Lite: yarn (reached at short lengths), a dense first layer,
# several MoE layers with shared experts.
TINY = {**LITE, "hidden_size": 64, "intermediate_size": 128, "kv_lora_rank": 32,
        "max_position_embeddings": 4096, "moe_intermediate_size": 32, "n_routed_experts": 8,
        "num_attention_heads": 4, "num_key_value_heads": 4, "num_experts_per_tok": 3,
        "num_hidden_layers": 3, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "rope_scaling": {**_YARN, "original_max_position_embeddings": 32}}
# The 236B model's features in small: q low-rank, group-limited routing, scaling factor 16.
TINY_236B = {**TINY, "q_lora_rank": 24, "n_routed_experts": 16, "n_group": 4, "topk_group": 2,
             "topk_method": "group_limited_greedy", "routed_scaling_factor": 16.0}
SHAPES = {"tiny": TINY, "tiny-236b": TINY_236B, "lite": LITE}
GENERATION = {"bos_token_id": 100000, "eos_token_id": 100001, "do_sample": True,
              "temperature": 0.3, "top_p": 0.95}


def _random(key: str, shape: tuple[int, ...], gen: torch.Generator, device: str) -> torch.Tensor:
    if key.endswith("norm.weight") or key.endswith("layernorm.weight"):
        # norms start at one (as in training); small noise so a wrong norm would show in tests
        return 1.0 + 0.1 * torch.randn(shape, generator=gen, device=device)
    return 0.02 * torch.randn(shape, generator=gen, device=device)


def write_random_checkpoint(dst: Path, shape: str | dict = "tiny", *, seed: int = 0,
                            dtype: torch.dtype | None = None, max_shard_bytes: int = 5 << 30,
                            device: str = "cpu") -> Path:
    config = copy.deepcopy(SHAPES[shape] if isinstance(shape, str) else shape)
    # Lite-sized checkpoints are for the GPU and its benchmarks (bf16, as released); the small
    # ones are for exact comparisons on the CPU (fp32)
    dtype = dtype or (torch.bfloat16 if shape == "lite" else torch.float32)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    dst.mkdir(parents=True, exist_ok=True)
    write_tokenizer_files(dst)  # first: what can fail for want of a package fails before the shards
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_dict(config))
    gen = torch.Generator(device=device).manual_seed(seed)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    names: list[str] = []
    size = 0

    def flush() -> None:
        nonlocal shard, size
        name = f"model-{len(names) + 1:05d}.safetensors"
        save_file(shard, str(dst / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        names.append(name)
        shard, size = {}, 0

    for key, shp in expected_keys(model):
        t = _random(key, shp, gen, device).to(dtype).cpu()
        if size and size + t.nbytes > max_shard_bytes:
            flush()
        shard[key] = t
        size += t.nbytes
    flush()
    _finish(dst, names, weight_map, config)
    return dst


def _finish(dst: Path, names: list[str], weight_map: dict[str, str], config: dict) -> None:
    # the hub's shard names say how many shards there are: model-00001-of-00004.safetensors
    n = len(names)
    renamed = {old: old.replace(".safetensors", f"-of-{n:05d}.safetensors") for old in names}
    for old, new in renamed.items():
        (dst / old).rename(dst / new)
    total = sum((dst / new).stat().st_size for new in renamed.values())
    index = {"metadata": {"total_size": total},
             "weight_map": {k: renamed[v] for k, v in sorted(weight_map.items())}}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    (dst / "generation_config.json").write_text(json.dumps(GENERATION, indent=2))
    # last, through a temporary name: a checkpoint with its index is a whole one (the
    # benchmarks reuse a directory that has it)
    (dst / (INDEX + ".tmp")).write_text(json.dumps(index, indent=2))
    (dst / (INDEX + ".tmp")).replace(dst / INDEX)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=Path)
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to draw the random numbers (the GPU is much faster for lite)")
    a = p.parse_args()
    write_random_checkpoint(a.dir, a.shape, seed=a.seed, device=a.device,
                            dtype=getattr(torch, a.dtype) if a.dtype else None)
    print(a.dir)


if __name__ == "__main__":
    main()
