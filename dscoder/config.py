"""The model's shape, read from a DeepSeek-V2 config.json into a frozen dataclass.

Every field that changes the math is read here; a value we do not implement is an
UnsupportedConfig error rather than a silent guess.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dscoder.errors import BadCheckpoint, UnsupportedConfig

SUPPORTED_TOPK = ("greedy", "group_limited_greedy")


@dataclass(frozen=True)
class YarnScaling:
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense layers
    moe_intermediate_size: int  # one routed expert
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    first_k_dense_replace: int
    moe_layer_freq: int
    topk_method: str
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    rope_theta: float
    rope_scaling: YarnScaling | None
    rms_norm_eps: float
    max_position_embeddings: int
    bos_token_id: int
    eos_token_id: int
    torch_dtype: str = "bfloat16"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Numbers cached per token per layer: the latent plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, i: int) -> bool:
        return (self.n_routed_experts > 0 and i >= self.first_k_dense_replace
                and i % self.moe_layer_freq == 0)

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim ** -0.5
        y = self.rope_scaling
        if y is not None and y.mscale_all_dim:
            m = yarn_mscale(y.factor, y.mscale_all_dim)
            scale *= m * m
        return scale

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        _check_supported(d)
        get = d.get
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            moe_intermediate_size=get("moe_intermediate_size") or d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
            q_lora_rank=get("q_lora_rank"), kv_lora_rank=d["kv_lora_rank"],
            qk_nope_head_dim=d["qk_nope_head_dim"], qk_rope_head_dim=d["qk_rope_head_dim"],
            v_head_dim=d["v_head_dim"], n_routed_experts=get("n_routed_experts") or 0,
            n_shared_experts=get("n_shared_experts") or 0,
            num_experts_per_tok=get("num_experts_per_tok") or 0,
            first_k_dense_replace=get("first_k_dense_replace", 0),
            moe_layer_freq=get("moe_layer_freq", 1), topk_method=get("topk_method", "greedy"),
            n_group=get("n_group") or 1, topk_group=get("topk_group") or 1,
            norm_topk_prob=bool(get("norm_topk_prob", False)),
            routed_scaling_factor=float(get("routed_scaling_factor", 1.0)),
            rope_theta=float(get("rope_theta", 10000.0)),
            rope_scaling=_yarn(get("rope_scaling")),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            max_position_embeddings=d["max_position_embeddings"],
            bos_token_id=get("bos_token_id", 100000), eos_token_id=get("eos_token_id", 100001),
            torch_dtype=get("torch_dtype") or get("dtype") or "bfloat16",
        )

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise BadCheckpoint(f"Cannot read the model config {path}: {e}.") from e
        try:
            return cls.from_dict(data)
        except KeyError as e:
            raise BadCheckpoint(f"The model config {path} lacks the field {e.args[0]!r}.") from e


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(rs: dict[str, Any] | None) -> YarnScaling | None:
    if not rs:
        return None
    return YarnScaling(
        factor=float(rs["factor"]),
        original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
        beta_fast=float(rs.get("beta_fast") or 32), beta_slow=float(rs.get("beta_slow") or 1),
        mscale=float(rs.get("mscale") or 1.0), mscale_all_dim=float(rs.get("mscale_all_dim") or 0.0),
    )


def _check_supported(d: dict[str, Any]) -> None:
    def unsupported(what: str) -> UnsupportedConfig:
        return UnsupportedConfig(f"This checkpoint uses {what}, which dscoder does not support "
                                 "(it runs DeepSeek-V2 / DeepSeek-Coder-V2 checkpoints).")

    if d.get("model_type", "deepseek_v2") != "deepseek_v2":
        raise unsupported(f"model_type {d.get('model_type')!r}")
    if d.get("scoring_func", "softmax") != "softmax":
        raise unsupported(f"scoring_func {d.get('scoring_func')!r}")
    if d.get("topk_method", "greedy") not in SUPPORTED_TOPK:
        raise unsupported(f"topk_method {d.get('topk_method')!r}")
    if d.get("hidden_act", "silu") != "silu":
        raise unsupported(f"hidden_act {d.get('hidden_act')!r}")
    if d.get("attention_bias"):
        raise unsupported("attention_bias")
    rs = d.get("rope_scaling")
    if rs:
        kind = rs.get("type") or rs.get("rope_type")
        if kind != "yarn":
            raise unsupported(f"rope_scaling type {kind!r}")
    heads, kv_heads = d.get("num_attention_heads"), d.get("num_key_value_heads")
    if kv_heads is not None and kv_heads != heads:
        raise unsupported(f"num_key_value_heads {kv_heads} != num_attention_heads {heads}")
