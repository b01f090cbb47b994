"""Which engine runs a checkpoint, and the tokenizer that goes with it. Torch-free: --show-prompt
needs the tokenizer and the choice without loading weights.

The native engine runs DeepSeek-V2 checkpoints (DeepSeek-Coder-V2); the transformers engine
(dscoder.hf_engine) runs every other causal LM, and DeepSeek-V2 too when asked.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from dscoder.errors import UsageError
from dscoder.settings import ENGINES

NATIVE_MODEL_TYPES = ("deepseek_v2",)
EngineName = Literal["native", "transformers"]
INDEX = "model.safetensors.index.json"  # a sharded checkpoint's tensor -> shard file map
SINGLE = "model.safetensors"  # an unsharded checkpoint


def shard_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files in the order the loader reads them (by name), from
    its index or its single file; [] when neither can be read (the loader says why later)."""
    try:
        names = set(json.loads((model_dir / INDEX).read_text(encoding="utf-8"))["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        names = {SINGLE} if (model_dir / SINGLE).is_file() else set()
    if not all(isinstance(n, str) for n in names):
        return []
    return [model_dir / n for n in sorted(names)]


def model_type(model_dir: Path) -> str | None:
    """config.json's model_type (None when it cannot be read: the loader says why later)."""
    try:
        value = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    kind = value.get("model_type") if isinstance(value, dict) else None
    return kind if isinstance(kind, str) else None


def choose_engine(model_dir: Path, engine: str = "auto") -> EngineName:
    """native for DeepSeek-V2 checkpoints, transformers for the rest, unless `engine` says."""
    if engine not in ENGINES:
        raise UsageError(f"Unknown engine {engine!r}; use auto, native or transformers.")
    kind = model_type(model_dir)
    native = kind in NATIVE_MODEL_TYPES or kind is None  # unreadable: the native loader explains
    if engine == "native" and not native:
        raise UsageError(f"The native engine runs DeepSeek-Coder-V2 (deepseek_v2) checkpoints, and "
                         f"{model_dir} is {kind}; use --engine transformers (or auto).")
    if engine == "auto":
        return "native" if native else "transformers"
    return engine  # type: ignore[return-value]


def load_tokenizer_for(model_dir: Path) -> Any:
    """DeepSeek-V2 checkpoints keep the exact native prompt builder (on either engine); other
    models get their tokenizer with the chat template from tokenizer_config.json."""
    if model_type(model_dir) in NATIVE_MODEL_TYPES:
        from dscoder.tokenizer import load_tokenizer

        return load_tokenizer(model_dir)
    from dscoder.model_tokenizer import load_model_tokenizer

    return load_model_tokenizer(model_dir)
