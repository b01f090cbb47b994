"""A model's own chat template (tokenizer_config.json), as prompt parts that keep text as text.

The template is rendered with transformers' own Jinja renderer (the one apply_chat_template uses;
it does not import torch), but with every message's content replaced by a unique sentinel. The
rendered text then holds only what the template itself wrote, so it is split at the added tokens
it spells (BOS, <|EOT|>, <|im_end|>...) into special ids and text; each sentinel becomes the
message's content as plain text. A message that spells a special token stays text, and for any
other text the ids equal apply_chat_template's (runs of text are encoded whole by prompts._build).
"""
from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from dscoder.errors import DscoderError

Part = int | str


@dataclass(frozen=True)
class ChatTemplate:
    source: str  # the Jinja template
    specials: Mapping[str, int]  # added-token strings the template may spell -> their ids
    names: Mapping[str, str] = field(default_factory=dict)  # bos_token, eos_token... for Jinja

    def render(self, messages: Sequence[Mapping], *, add_generation_prompt: bool = True) -> str:
        try:
            from transformers.utils.chat_template_utils import render_jinja_template
        except ImportError as e:  # pragma: no cover (transformers is a dependency)
            raise DscoderError("Rendering this model's chat template needs transformers>=4.56; "
                               "pip install -U transformers.") from e
        try:
            rendered, _ = render_jinja_template([list(messages)], chat_template=self.source,
                                                add_generation_prompt=add_generation_prompt,
                                                **self.names)
        except Exception as e:  # Jinja errors, and templates that raise_exception() on their own
            raise DscoderError(f"The model's chat template failed: {e}.") from None
        return rendered[0]

    def parts(self, messages: Sequence[Mapping], *, add_generation_prompt: bool = True) -> list[Part]:
        """Special ids and text runs of the rendered conversation."""
        nonce = secrets.token_hex(4)
        marks = [f"\ue000{nonce}{i}\ue001" for i in range(len(messages))]
        masked = [{**m, "content": s} for m, s in zip(messages, marks, strict=True)]
        rendered = self.render(masked, add_generation_prompt=add_generation_prompt)
        contents = self._contents(messages, marks, rendered, add_generation_prompt)
        parts: list[Part] = []
        for i, piece in enumerate(re.split(f"\ue000{nonce}(\\d+)\ue001", rendered)):
            if i % 2:  # a sentinel: the message's content, as text
                parts.append(contents[int(piece)])
            elif piece:
                parts.extend(self.split_specials(piece))
        return parts

    def _contents(self, messages: Sequence[Mapping], marks: list[str], rendered: str,
                  add_generation_prompt: bool) -> list[str]:
        """What the template made of each content: itself, or stripped when the template trims
        (checked against a real render, so the parts spell exactly what the template gives)."""
        real = self.render(messages, add_generation_prompt=add_generation_prompt)
        for shape in (lambda s: s, str.strip):
            contents = [shape(m["content"]) for m in messages]
            filled = rendered
            for mark, text in zip(marks, contents, strict=True):
                filled = filled.replace(mark, text)
            if filled == real:
                return contents
        return [m["content"] for m in messages]  # a template that rewrites content: keep it as given

    def split_specials(self, text: str) -> list[Part]:
        """Template text as text runs and the ids of the added tokens it spells (longest first)."""
        if not self.specials:
            return [text]
        pattern = "|".join(re.escape(s) for s in sorted(self.specials, key=len, reverse=True))
        parts: list[Part] = []
        for i, piece in enumerate(re.split(f"({pattern})", text)):
            if i % 2:
                parts.append(self.specials[piece])
            elif piece:
                parts.append(piece)
        return parts

    def end_of_turn_id(self) -> int | None:
        """The special token the template writes right after an assistant message (<|EOT|>,
        EOS, <|im_end|>...): the model writes it to end its turn, so it stops generation."""
        nonce = secrets.token_hex(4)
        mark = f"\ue000{nonce}\ue001"
        rendered = self.render([{"role": "user", "content": "?"},
                                {"role": "assistant", "content": mark}],
                               add_generation_prompt=False)
        after = rendered.split(mark, 1)[-1] if mark in rendered else ""
        return next((p for p in self.split_specials(after) if isinstance(p, int)), None)
