"""The DeepSeek-Coder-V2 tokenizer: loading, special ids, and a UTF-8-safe streaming detokenizer.

Encoding goes through the `tokenizers` library with the *added tokens removed*, so that text from
a user or a file can never turn into a special id. (`encode_special_tokens=True` is not enough:
it only covers tokens flagged ``special``, and the FIM sentinels are not.) Prompt builders put
special ids in themselves (see ``prompts.py``).

Decoding is done here, byte-level: each token maps once to its bytes and the bytes are decoded
as UTF-8 with replacement characters, exactly as the `tokenizers` ByteLevel decoder does. The
streaming detokenizer uses the same bytes and an incremental UTF-8 decoder, so it never emits
half a character and its output always joins up to ``decode(ids)``.
"""
from __future__ import annotations

import codecs
import functools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from dscoder.errors import DscoderError, ModelNotFound

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
FIM_HOLE = "<｜fim▁hole｜>"
FIM_BEGIN = "<｜fim▁begin｜>"
FIM_END = "<｜fim▁end｜>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable character table used by byte-level BPE."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_CHAR_TO_BYTE: dict[str, int] = {c: b for b, c in _bytes_to_unicode().items()}


def _token_str_to_bytes(token: str) -> bytes:
    """Bytes of one vocabulary entry; like the ByteLevel decoder, an entry holding any character
    outside the byte table (added tokens such as BOS) stands for its own UTF-8 text."""
    try:
        return bytes(_CHAR_TO_BYTE[c] for c in token)
    except KeyError:
        return token.encode("utf-8")


class Tokenizer:
    """Plain-text encoding, byte-level decoding and the ids of the special tokens."""

    def __init__(self, text_tokenizer: _HFTokenizer, added: dict[int, tuple[str, bool]],
                 bos_token: str = BOS_TOKEN, eos_token: str = EOS_TOKEN) -> None:
        # ``text_tokenizer`` has no added tokens; ``added`` maps id -> (content, special flag).
        self._tok = text_tokenizer
        self._added = dict(added)
        self._added_by_text = {content: i for i, (content, _) in self._added.items()}
        self._skip_ids = frozenset(i for i, (_, special) in self._added.items() if special)
        self._bytes_cache: dict[int, bytes] = {}
        self.bos_id = self._required_id(bos_token)
        self.eos_id = self._required_id(eos_token)
        self.fim_hole_id = self._required_id(FIM_HOLE)
        self.fim_begin_id = self._required_id(FIM_BEGIN)
        self.fim_end_id = self._required_id(FIM_END)

    def _required_id(self, content: str) -> int:
        token_id = self.token_to_id(content)
        if token_id is None:
            raise DscoderError(f"The tokenizer has no {content} token; "
                               "use the tokenizer.json released with DeepSeek-Coder-V2.")
        return token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows (the model's embedding may be larger)."""
        return max(self._tok.get_vocab_size(), max(self._added, default=-1) + 1)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters a token of encoded text can stand for (its bytes bound them):
        with it, text can be measured against a token budget before it is tokenized."""
        return max((len(self.token_bytes(i)) for i in self._tok.get_vocab().values()), default=1)

    def encode(self, text: str) -> list[int]:
        """Plain text to ids: no BOS, and special-token strings stay ordinary text."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Like ``encode``, plus each token's (start, end) character offsets in ``text``.
        Tokens that split one character share that character's offsets."""
        encoding = self._tok.encode(text, add_special_tokens=False)
        return encoding.ids, [tuple(o) for o in encoding.offsets]

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """Ids to text. Like `tokenizers`, skips BOS/EOS (``special`` added tokens) by default,
        and ignores ids the tokenizer does not know (the model's vocab is padded past them)."""
        data = b"".join(self.token_bytes(i, skip_special=skip_special) for i in ids)
        return data.decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int, *, skip_special: bool = True) -> bytes:
        """The bytes one id stands for (b"" for unknown ids and, if asked, special ones)."""
        if skip_special and token_id in self._skip_ids:
            return b""
        cached = self._bytes_cache.get(token_id)
        if cached is None:
            token = self.id_to_token(token_id)
            cached = b"" if token is None else _token_str_to_bytes(token)
            self._bytes_cache[token_id] = cached
        return cached

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry (byte-level spelling) or of an added token's content."""
        if token in self._added_by_text:
            return self._added_by_text[token]
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Vocabulary entry (byte-level spelling) or added token content; None if unknown."""
        if token_id in self._added:
            return self._added[token_id][0]
        if token_id < 0:
            return None
        return self._tok.id_to_token(token_id)

    def is_special(self, token_id: int) -> bool:
        """True for added tokens (BOS, EOS, FIM sentinels and the like)."""
        return token_id in self._added

    def detokenizer(self, *, skip_special: bool = True) -> StreamDetokenizer:
        return StreamDetokenizer(self, skip_special=skip_special)


class StreamDetokenizer:
    """Turns ids into text one at a time, holding back incomplete UTF-8 characters.

    Invariant: ``"".join(add(i) for i in ids) + flush() == tokenizer.decode(ids)``. Each step
    costs O(token length): the decoder keeps at most three pending bytes.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        """Text completed by this token (may be empty)."""
        data = self._tokenizer.token_bytes(token_id, skip_special=self._skip_special)
        return self._decoder.decode(data)

    def flush(self, *, partial: bool = True) -> str:
        """Whatever is pending, then starts afresh. Pending bytes are the start of a character
        that never got its last bytes: partial=True gives U+FFFD for it (as ``decode`` does),
        partial=False drops it (generation that was cut off must not put U+FFFD in a file)."""
        if partial:
            return self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return ""


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelNotFound(f"No {path.name} in {path.parent}; "
                            "pass a model directory that holds the tokenizer files.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DscoderError(f"Cannot read {path} ({e}); download the model again.") from None


def _parse(text: str, path: Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DscoderError(f"Cannot read {path} ({e}); download the model again.") from None


def _read_json(path: Path) -> Any:
    return _parse(_read_text(path), path)


def _token_name(config: dict[str, Any], key: str, default: str) -> str:
    """tokenizer_config.json spells a token as a string or as an AddedToken dict."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else default


def load_tokenizer(model_dir: Path, cls: type[Tokenizer] = Tokenizer) -> Tokenizer:
    """Load ``tokenizer.json`` (and ``tokenizer_config.json`` for the BOS/EOS names); ``cls``
    lets other models' tokenizers (dscoder.model_tokenizer) share this loading."""
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    text = _read_text(path)
    config_path = model_dir / "tokenizer_config.json"
    config = _read_json(config_path) if config_path.exists() else {}
    return tokenizer_from_text(text, config, path, cls)


def tokenizer_from_text(text: str, config: Any, where: Path,
                        cls: type[Tokenizer] = Tokenizer) -> Tokenizer:
    """A Tokenizer (or `cls`) from tokenizer.json's text and the parsed tokenizer_config.json."""
    split = _split_added_tokens(text)
    if split is None:  # not the usual layout: parse the whole file
        return tokenizer_from_json(_parse(text, where), config, where, cls)
    rest, added = split
    return _tokenizer(rest, added, config, where, cls)


_ADDED_TOKENS = re.compile(r'^\{\s*(?:"[a-z_]+"\s*:\s*(?:null|"[^"]*"|\{[^{}]*\})\s*,\s*)*"added_tokens"\s*:\s*(?=\[)')


def _split_added_tokens(text: str) -> tuple[str, Any] | None:
    """tokenizer.json's text with its top-level added_tokens array emptied, and that array; None
    unless the file starts as transformers writes it ("version", "truncation", "padding", then
    "added_tokens"). Decoding only that array and splicing the text skips a json.loads and
    json.dumps of the whole 3 MB file: 0.17 of the tokenizer's 0.41 s at every start."""
    head = _ADDED_TOKENS.match(text)
    if head is None:
        return None
    try:
        added, end = json.JSONDecoder().raw_decode(text, head.end())
    except json.JSONDecodeError:
        return None
    return text[:head.end()] + "[]" + text[end:], added


# The DeepSeek-Coder-V2 tokenizer (the same for Lite and the 236B model, Base and Instruct: the
# DeepSeek-V2 BPE plus the FIM tokens at 100002-100004), shipped with dscoder so that prompts
# can be built (--show-prompt, a remote engine) without the model on this machine.
BUNDLED_TOKENIZER = "deepseek-coder-v2-tokenizer.json.xz"


def load_bundled_tokenizer() -> Tokenizer:
    import lzma
    from importlib.resources import files

    resource = files("dscoder") / "data" / BUNDLED_TOKENIZER
    try:
        text = lzma.decompress(resource.read_bytes()).decode("utf-8")
    except (OSError, lzma.LZMAError, ValueError) as e:
        raise DscoderError(f"The tokenizer shipped with dscoder cannot be read ({e}); "
                           "reinstall dscoder.") from None
    return tokenizer_from_text(text, {}, Path(str(resource)))


def tokenizer_from_json(data: Any, config: Any, where: Path,
                        cls: type[Tokenizer] = Tokenizer) -> Tokenizer:
    """A Tokenizer (or `cls`) from the parsed tokenizer.json and tokenizer_config.json (read
    from `where`)."""
    if not isinstance(data, dict):
        raise _invalid(where)
    added = data.get("added_tokens")
    data["added_tokens"] = []  # so that no text can ever become a special id
    return _tokenizer(json.dumps(data), added, config, where, cls)


def _tokenizer(text: str, added: Any, config: Any, where: Path, cls: type[Tokenizer]) -> Tokenizer:
    """From tokenizer.json's text without its added tokens, and those tokens apart."""
    if not isinstance(config, dict):
        raise _invalid(where)
    try:
        specials = {int(t["id"]): (str(t["content"]), bool(t.get("special", False)))
                    for t in added or []}
        text_tokenizer = _HFTokenizer.from_str(text)
    except Exception as e:  # bad JSON shapes, and the Rust side raises plain Exception
        raise DscoderError(f"{where} is not a valid tokenizer ({e}); "
                           "download the model again.") from None
    return cls(text_tokenizer, specials,
               bos_token=_token_name(config, "bos_token", BOS_TOKEN),
               eos_token=_token_name(config, "eos_token", EOS_TOKEN))


def _invalid(where: Path) -> DscoderError:
    return DscoderError(f"The tokenizer files in {where.parent} are not valid; download the model again.")
