"""The tokenizer, parsed in a helper process while the CLI imports torch.

Parsing tokenizer.json (the `tokenizers` library, in Rust) holds the GIL for the whole call: 0.2-0.3 s
of a warm one-shot command on an H100 machine in which no other thread of the process could run
Python, on the way to the first token. A process of its own parses it beside `import torch`
instead: the CLI starts one (start) before it imports torch, and the loader takes its tokenizer
(take) where it would parse its own.

The helper sends its vocabulary once (every id's byte-level spelling: decoding and the special
ids need nothing more) and then encodes text on request, over its standard input and output
(length-prefixed pickles). It lives in a session of its own (a Ctrl-C at the terminal is the
CLI's to handle) and ends when its input closes, as when the CLI exits. Whatever goes wrong with
it (it cannot start, it reports an error, it dies, a request is interrupted) costs only the
parse it was to save: the tokenizer then loads in the process, which reports a bad file the
usual way.
"""
from __future__ import annotations

import pickle
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from dscoder.tokenizer import Tokenizer, load_tokenizer

_HEADER = struct.Struct("<Q")
_STARTED: dict[Path, subprocess.Popen] = {}  # at most one: the CLI loads one model a process


def start(model_dir: Path) -> None:
    """Start parsing model_dir's tokenizer in a helper process (no-op if one is parsing it)."""
    model_dir = Path(model_dir).resolve()
    if model_dir in _STARTED:
        return
    try:
        _STARTED[model_dir] = subprocess.Popen(
            [sys.executable, "-m", "dscoder.tokenizer_helper", str(model_dir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True)
    except OSError:
        pass  # the loader parses it itself


def take(model_dir: Path) -> Tokenizer | None:
    """The tokenizer the helper for model_dir parsed (waiting for it), or None: no helper was
    started for it, or it failed (the caller loads the tokenizer itself)."""
    model_dir = Path(model_dir).resolve()
    proc = _STARTED.pop(model_dir, None)
    if proc is None:
        return None
    try:
        hello = _receive(proc.stdout)
    except Exception:  # noqa: BLE001  (gone, or garbled: either way the caller parses it itself)
        hello = None
    if not (isinstance(hello, tuple) and hello[0] == "ok"):
        _stop(proc)
        return None
    _, added, vocab, bos_token, eos_token = hello
    remote = RemoteTextTokenizer(proc, vocab, lambda: load_tokenizer(model_dir)._tok)
    return Tokenizer(remote, added, bos_token=bos_token, eos_token=eos_token)


class Encoding:
    """What `tokenizers` returns from encode, as much of it as dscoder.tokenizer reads."""

    def __init__(self, ids: list[int], offsets: list[tuple[int, int]]) -> None:
        self.ids, self.offsets = ids, offsets


class RemoteTextTokenizer:
    """Stands for the `tokenizers.Tokenizer` that dscoder.tokenizer.Tokenizer wraps: the
    vocabulary is here, encoding is the helper's. After any failure of the helper (or a request
    cut short, which would leave its answer unread) it loads its own (`local`) and uses that."""

    def __init__(self, proc: subprocess.Popen, vocab: Sequence[str | None],
                 local: Callable[[], Any]) -> None:
        self._proc = proc
        self._vocab = list(vocab)
        self._ids: dict[str, int] | None = None
        self._local_loader = local
        self._local: Any = None
        self._lock = threading.Lock()  # one request and its answer at a time (the server's threads)

    def get_vocab_size(self) -> int:
        return len(self._vocab)

    def id_to_token(self, token_id: int) -> str | None:
        return self._vocab[token_id] if 0 <= token_id < len(self._vocab) else None

    def token_to_id(self, token: str) -> int | None:
        return self.get_vocab().get(token)

    def get_vocab(self) -> dict[str, int]:
        if self._ids is None:
            self._ids = {t: i for i, t in enumerate(self._vocab) if t is not None}
        return self._ids

    def encode(self, text: str, add_special_tokens: bool = False) -> Any:
        with self._lock:
            if self._local is None:
                try:
                    _send(self._proc.stdin, text)
                    ids, offsets = _receive(self._proc.stdout)
                    return Encoding(ids, offsets)
                except BaseException as e:  # the helper is gone, or its answer is left unread
                    _stop(self._proc)
                    self._local = self._local_loader()
                    if not isinstance(e, Exception):  # Ctrl-C, SIGTERM: theirs to handle
                        raise
            return self._local.encode(text, add_special_tokens=add_special_tokens)


def serve(model_dir: Path, inp: IO[bytes], out: IO[bytes]) -> None:
    """The helper's side: parse, send the vocabulary, then encode each text it is sent."""
    try:
        tok = load_tokenizer(model_dir)
    except Exception as e:  # noqa: BLE001  (the CLI loads it itself, and says what is wrong)
        _send(out, ("error", str(e)))
        return
    text_tokenizer = tok._tok
    vocab = [text_tokenizer.id_to_token(i) for i in range(text_tokenizer.get_vocab_size())]
    _send(out, ("ok", tok._added, vocab, tok.id_to_token(tok.bos_id), tok.id_to_token(tok.eos_id)))
    while True:
        try:
            text = _receive(inp)
        except EOFError:  # the CLI is done
            return
        encoding = text_tokenizer.encode(text, add_special_tokens=False)
        _send(out, (encoding.ids, [tuple(o) for o in encoding.offsets]))


def _send(stream: IO[bytes], obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _receive(stream: IO[bytes]) -> Any:
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise EOFError
    (size,) = _HEADER.unpack(head)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return pickle.loads(data)


def _stop(proc: subprocess.Popen) -> None:
    try:
        proc.kill()
        proc.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        pass


if __name__ == "__main__":
    serve(Path(sys.argv[1]), sys.stdin.buffer, sys.stdout.buffer)
