"""Request bodies, validated by pydantic: a wrong type or value is a 400, unknown fields are ignored
(editor plugins send many llama.cpp-specific fields)."""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Sampling(_Body):
    """The sampling fields the OpenAI routes share; None keeps the model's default."""

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=0)
    temperature: Optional[float] = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: Optional[float] = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: Optional[int] = Field(None, ge=0)  # not OpenAI's; vLLM and SGLang take it too
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[int]] = None  # vLLM's and SGLang's name for extra stop ids
    stream: bool = False
    stream_options: Optional[dict] = None
    n: int = Field(1, ge=1, le=1)  # batch 1: one choice

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=0)


class CompletionRequest(Sampling):
    # text, token ids, or a batch of one of either
    prompt: Union[str, list[int], list[str], list[list[int]]]
    suffix: Optional[str] = None
    echo: bool = False


class ExtraChunk(_Body):
    filename: str = "tmp"
    text: str = ""


class InfillRequest(_Body):
    """llama.cpp's /infill, as llama.vim and llama.vscode send it."""

    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[ExtraChunk] = []
    prompt: str = ""  # text after the prefix, where the completion continues
    n_predict: int = Field(-1, ge=-1)
    temperature: Optional[float] = Field(None, ge=0, allow_inf_nan=False)
    top_k: Optional[int] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: Optional[int] = Field(None, ge=-1, lt=2**63)
    stop: list[str] = []
    stream: bool = False
    cache_prompt: bool = True
    t_max_predict_ms: int = Field(0, ge=0)
    n_indent: int = Field(0, ge=0)


class TokenizeRequest(_Body):
    content: str
    with_offsets: bool = False
