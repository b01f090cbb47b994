"""The model's shape, read from a DeepSeek-V2 config.json into a frozen dataclass.

Every field that changes the math is read here; a value we do not implement is an
UnsupportedConfig error rather than a silent guess, and a field we do not know at all is
refused too (it might change the math). Values of the wrong type or that contradict each
other are a BadCheckpoint error with one sentence per problem.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dscoder.errors import BadCheckpoint, UnsupportedConfig

SUPPORTED_TOPK = ("greedy", "group_limited_greedy")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
# Fields that do not change what the model computes at inference: metadata, training-only knobs
# (dropout, auxiliary losses), and flags of transformers' generic config. Anything not here and
# not read by ModelConfig.from_dict is refused, since it might change the numbers.
INERT_FIELDS = frozenset({
    "architectures", "auto_map", "transformers_version", "model_type", "use_cache",
    "initializer_range", "attention_dropout", "aux_loss_alpha", "seq_aux", "output_router_logits",
    "router_aux_loss_coef", "pretraining_tp", "ep_size", "pad_token_id", "output_attentions",
    "output_hidden_states", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder",
    "id2label", "label2id", "problem_type", "tokenizer_class", "torchscript", "use_return_dict",
    "bos_token_id", "eos_token_id", "torch_dtype", "dtype", "tie_word_embeddings", "attention_bias",
    "mlp_bias", "hidden_act", "scoring_func", "num_key_value_heads", "head_dim", "qk_head_dim",
    "rope_scaling", "rope_parameters", "rope_theta",
    # transformers' generic config: model plumbing and generation defaults (dscoder reads those
    # from generation_config.json), none of which changes the logits
    "is_decoder", "add_cross_attention", "tie_encoder_decoder", "cross_attention_hidden_size",
    "pruned_heads", "finetuning_task", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "tf_legacy_loss", "use_bfloat16", "output_scores",
    "return_dict_in_generate", "max_length", "min_length", "num_beams", "num_beam_groups",
    "do_sample", "early_stopping", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "diversity_penalty", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "encoder_no_repeat_ngram_size",
})
# keys of a rope_scaling / rope_parameters dict that we implement
_ROPE_KEYS = frozenset({"type", "rope_type", "factor", "original_max_position_embeddings",
                        "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "rope_theta"})
# other keys transformers knows, accepted only at the value that means what we compute
_ROPE_NEUTRAL = {"partial_rotary_factor": 1.0, "truncate": True, "attention_factor": None}


@dataclass(frozen=True)
class YarnScaling:
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0  # 0: not given (cos/sin then scale by yarn_mscale(factor), as transformers)
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
    def from_dict(cls, d: Any) -> ModelConfig:
        """Raises UnsupportedConfig for what we do not implement, BadCheckpoint for bad values
        (the message lists every problem, one sentence each, without naming the file)."""
        if not isinstance(d, dict):
            raise BadCheckpoint(f"it holds a JSON {_json_kind(d)}, not an object of settings.")
        _check_supported(d)
        r = _Reader(d)
        heads = r.int("num_attention_heads")
        routed = r.int("n_routed_experts", 0, low=0)
        rope_dim = r.int("qk_rope_head_dim")
        dense = r.int("intermediate_size")
        theta, yarn = _rope(d, r)
        cfg = dict(
            vocab_size=r.int("vocab_size"), hidden_size=r.int("hidden_size"),
            intermediate_size=dense, moe_intermediate_size=r.int("moe_intermediate_size", None) or dense,
            num_hidden_layers=r.int("num_hidden_layers"), num_attention_heads=heads,
            q_lora_rank=r.int("q_lora_rank", None), kv_lora_rank=r.int("kv_lora_rank"),
            qk_nope_head_dim=r.int("qk_nope_head_dim"), qk_rope_head_dim=rope_dim,
            v_head_dim=r.int("v_head_dim"), n_routed_experts=routed,
            n_shared_experts=r.int("n_shared_experts", 0, low=0),
            num_experts_per_tok=r.int("num_experts_per_tok", 0, low=0),
            first_k_dense_replace=r.int("first_k_dense_replace", 0, low=0),
            moe_layer_freq=r.int("moe_layer_freq", 1), topk_method=d.get("topk_method") or "greedy",
            n_group=r.int("n_group", 1), topk_group=r.int("topk_group", 1),
            norm_topk_prob=r.bool("norm_topk_prob", False),
            routed_scaling_factor=r.float("routed_scaling_factor", 1.0),
            rope_theta=theta, rope_scaling=yarn, rms_norm_eps=r.float("rms_norm_eps", 1e-6),
            max_position_embeddings=r.int("max_position_embeddings", low=2),
            bos_token_id=r.token("bos_token_id", 100000), eos_token_id=r.token("eos_token_id", 100001),
            torch_dtype=r.dtype(),
        )
        r.consistent(cfg)
        r.done()
        return cls(**cfg)

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise BadCheckpoint(f"Cannot read the model config {path}: {e}.") from e
        try:
            return cls.from_dict(data)
        except UnsupportedConfig:
            raise
        except BadCheckpoint as e:
            raise BadCheckpoint(f"The model config {path} is not valid: {e.message}") from None


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _json_kind(v: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(type(v), type(v).__name__)


class _Reader:
    """Reads typed fields and gathers every problem, so the user hears about all at once."""

    _MISSING = object()

    def __init__(self, d: dict[str, Any]) -> None:
        self.d = d
        self.problems: list[str] = []

    def _get(self, key: str, default: Any) -> Any:
        v = self.d.get(key)
        if v is None:  # absent, or null (transformers writes null for "not set")
            if default is self._MISSING:
                self.problems.append(f"The field {key!r} is missing." if key not in self.d
                                     else f"{key} must be set, not null.")
            return default
        return v

    def int(self, key: str, default: Any = _MISSING, *, low: int = 1) -> Any:
        v = self._get(key, default)
        if v is default:
            return None if v is self._MISSING else v
        if isinstance(v, bool) or not isinstance(v, int):
            self.problems.append(f"{key} must be a whole number, not {v!r}.")
            return default if default is not self._MISSING else low
        if v < low:
            self.problems.append(f"{key} must be at least {low}, not {v}.")
        return v

    def float(self, key: str, default: float) -> float:
        v = self._get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            self.problems.append(f"{key} must be a positive number, not {v!r}.")
            return default
        return float(v)

    def bool(self, key: str, default: bool) -> bool:
        v = self._get(key, default)
        if not isinstance(v, bool):
            self.problems.append(f"{key} must be true or false, not {v!r}.")
            return default
        return v

    def token(self, key: str, default: int) -> int:
        v = self._get(key, default)
        if isinstance(v, list) and len(v) == 1:
            v = v[0]  # transformers writes a list; one id means the same
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            self.problems.append(f"{key} must be one token id, not {v!r}.")
            return default
        return v

    def dtype(self) -> str:
        v = self.d.get("torch_dtype") or self.d.get("dtype") or "bfloat16"
        if v not in DTYPE_NAMES:
            self.problems.append(f"torch_dtype must be one of {', '.join(DTYPE_NAMES)}, not {v!r}.")
            return "bfloat16"
        return v

    def consistent(self, c: dict[str, Any]) -> None:
        """Values that are fine alone but contradict each other."""
        p = self.problems
        if any(v is None for k, v in c.items() if k != "q_lora_rank"):
            return  # a missing or mistyped field was already reported
        routed, k = c["n_routed_experts"], c["num_experts_per_tok"]
        if routed and not 1 <= k <= routed:
            p.append(f"num_experts_per_tok ({k}) must be between 1 and n_routed_experts ({routed}).")
        if routed and c["topk_method"] == "group_limited_greedy":
            groups, top = c["n_group"], c["topk_group"]
            if routed % groups:
                p.append(f"n_routed_experts ({routed}) must be a multiple of n_group ({groups}).")
            elif top > groups or top * (routed // groups) < k:
                p.append(f"topk_group ({top}) of n_group ({groups}) groups cannot hold "
                         f"num_experts_per_tok ({k}) experts.")
        if c["qk_rope_head_dim"] % 2:
            p.append(f"qk_rope_head_dim ({c['qk_rope_head_dim']}) must be even (rotary pairs).")
        for key in ("bos_token_id", "eos_token_id"):
            if c[key] >= c["vocab_size"]:
                p.append(f"{key} ({c[key]}) is not below vocab_size ({c['vocab_size']}).")
        # fields transformers derives and writes: they must agree with what we derive
        for key, want in (("head_dim", c["qk_rope_head_dim"]),
                          ("qk_head_dim", c["qk_nope_head_dim"] + c["qk_rope_head_dim"])):
            if key in self.d and self.d[key] != want:
                p.append(f"{key} ({self.d[key]!r}) disagrees with the head sizes ({want}).")

    def done(self) -> None:
        if self.problems:
            raise BadCheckpoint(" ".join(self.problems))


def _rope(d: dict[str, Any], r: _Reader) -> tuple[float, YarnScaling | None]:
    """(rope_theta, YaRN) from the released layout (rope_scaling + rope_theta) or transformers 5's
    (rope_parameters, with rope_theta inside); both present must agree."""
    found = []
    for key in ("rope_scaling", "rope_parameters"):
        rs = d.get(key)
        if rs is None:
            continue
        if not isinstance(rs, dict):
            r.problems.append(f"{key} must be an object, not {rs!r}.")
            continue
        theta = rs.get("rope_theta", d.get("rope_theta", 10000.0))
        found.append((key, _theta(theta, r), _yarn(rs, key, r)))
    if not found:
        return _theta(d.get("rope_theta", 10000.0), r), None
    if len(found) == 2 and found[0][1:] != found[1][1:]:
        r.problems.append("rope_scaling and rope_parameters disagree; keep one of them.")
    return found[-1][1], found[-1][2]


def _theta(v: Any, r: _Reader) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        r.problems.append(f"rope_theta must be a positive number, not {v!r}.")
        return 10000.0
    return float(v)


def _yarn(rs: dict[str, Any], key: str, r: _Reader) -> YarnScaling | None:
    kind = rs.get("rope_type") or rs.get("type") or "default"
    extra = sorted(k for k in set(rs) - _ROPE_KEYS
                   if k not in _ROPE_NEUTRAL or rs[k] != _ROPE_NEUTRAL[k])
    if extra:
        raise _unsupported(f"{key}.{extra[0]}")
    if kind == "default":
        return None
    if kind != "yarn":
        raise _unsupported(f"{key} type {kind!r}")

    def num(name: str, default: float | None, low: float = 0.0) -> float:
        v = rs.get(name)
        if v is None and default is not None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < low:
            r.problems.append(f"{key}.{name} must be a number of at least {low:g}, not {v!r}.")
            return default or 1.0
        return float(v)

    orig = num("original_max_position_embeddings", None, 1)
    return YarnScaling(
        factor=num("factor", None, 1), original_max_position_embeddings=int(orig),
        beta_fast=num("beta_fast", 32.0) or 32.0, beta_slow=num("beta_slow", 1.0) or 1.0,
        mscale=num("mscale", 0.0), mscale_all_dim=num("mscale_all_dim", 0.0))


def _unsupported(what: str) -> UnsupportedConfig:
    return UnsupportedConfig(f"This checkpoint uses {what}, which dscoder does not support "
                             "(it runs DeepSeek-V2 / DeepSeek-Coder-V2 checkpoints).")


_READ_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
    "v_head_dim", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
    "first_k_dense_replace", "moe_layer_freq", "topk_method", "n_group", "topk_group",
    "norm_topk_prob", "routed_scaling_factor", "rms_norm_eps", "max_position_embeddings",
})


def _check_supported(d: dict[str, Any]) -> None:
    def need(key: str, ok: Any, default: Any) -> None:
        v = d.get(key, default)
        if v != ok:
            raise _unsupported(f"{key} {v!r}")

    need("model_type", "deepseek_v2", "deepseek_v2")
    need("scoring_func", "softmax", "softmax")
    need("hidden_act", "silu", "silu")
    if (d.get("topk_method") or "greedy") not in SUPPORTED_TOPK:  # null: transformers' default
        raise _unsupported(f"topk_method {d.get('topk_method')!r}")
    for flag in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
        if d.get(flag):
            raise _unsupported(flag)
    heads, kv_heads = d.get("num_attention_heads"), d.get("num_key_value_heads")
    if kv_heads is not None and kv_heads != heads:
        raise _unsupported(f"num_key_value_heads {kv_heads} != num_attention_heads {heads}")
    unknown = sorted(k for k in set(d) - _READ_FIELDS - INERT_FIELDS if not k.startswith("_"))
    if unknown:
        raise UnsupportedConfig(
            f"This checkpoint's config.json has the field {unknown[0]!r}, which dscoder does not "
            "know and which might change the model's output; if it does not, remove it from "
            "config.json.")
