"""The tokenizer of a model other than DeepSeek-Coder-V2: special tokens found by their strings,
and the chat template from tokenizer_config.json. Torch-free (--show-prompt loads no weights).

Encoding and decoding are dscoder.tokenizer's (text never becomes special ids; byte-level
decoding with a UTF-8-safe stream), so this reads byte-level BPE tokenizers: every DeepSeek
model's, and Llama 3, Qwen, StarCoder and GPT-2 style ones.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dscoder.chat_template import ChatTemplate
from dscoder.errors import DscoderError
from dscoder.tokenizer import FIM_BEGIN, FIM_END, FIM_HOLE, Tokenizer, load_tokenizer

_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")
# Fill-in-the-middle sentinels as (prefix, suffix, middle) markers, which is DeepSeek's
# (begin, hole, end): the same prefix-suffix-middle order, so one prompt builder serves all.
FIM_SPELLINGS = (
    (FIM_BEGIN, FIM_HOLE, FIM_END),  # DeepSeek-Coder V1 and V2
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, StarCoder2
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder
)


class ModelTokenizer(Tokenizer):
    """BOS and the FIM sentinels may be missing (None); a model without EOS cannot stop."""

    chat_template: ChatTemplate | None = None  # None: a base model, chat is refused

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for spelling in FIM_SPELLINGS:
            ids = [self.token_to_id(s) for s in spelling]
            if None not in ids:
                self.fim_begin_id, self.fim_hole_id, self.fim_end_id = ids
                break

    def _required_id(self, content: str) -> int | None:  # type: ignore[override]
        return self.token_to_id(content)

    def added_tokens(self) -> dict[str, int]:
        return {content: i for i, (content, _) in self._added.items()}


def _config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "tokenizer_config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except (OSError, ValueError) as e:
        raise DscoderError(f"Cannot read {path} ({e}); download the model again.") from None
    return data if isinstance(data, dict) else {}


def _is_byte_level(model_dir: Path) -> bool:
    try:
        data = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True  # load_tokenizer says what is wrong with the file
    decoder = data.get("decoder") or {}
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders") or []]
    return "ByteLevel" in kinds


def _name(config: dict[str, Any], key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _template(config: dict[str, Any], model_dir: Path) -> str | None:
    source = config.get("chat_template")
    if isinstance(source, list):  # several named templates: the default one
        source = next((t.get("template") for t in source if t.get("name") == "default"), None)
    jinja = model_dir / "chat_template.jinja"  # newer checkpoints keep it in its own file
    if not source and jinja.exists():
        source = jinja.read_text(encoding="utf-8")
    return source if isinstance(source, str) and source else None


def load_model_tokenizer(model_dir: Path) -> ModelTokenizer:
    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.json").exists() and not _is_byte_level(model_dir):
        raise DscoderError(f"The tokenizer of {model_dir} is not byte-level BPE (a SentencePiece "
                           "model?); dscoder reads byte-level tokenizers such as DeepSeek's.")
    tok = load_tokenizer(model_dir, cls=ModelTokenizer)
    assert isinstance(tok, ModelTokenizer)
    config = _config(model_dir)
    if tok.eos_id is None:
        raise DscoderError(f"The tokenizer of {model_dir} names no end-of-text token that it has; "
                           "check eos_token in tokenizer_config.json.")
    if _name(config, "bos_token") is None:  # a model without BOS (Qwen...): none is added
        tok.bos_id = None  # type: ignore[assignment]
    source = _template(config, model_dir)
    if source is not None:
        names = {k: v for k in _NAMES if (v := _name(config, k)) is not None}
        tok.chat_template = ChatTemplate(source, tok.added_tokens(), names)
    return tok
