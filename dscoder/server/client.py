"""Client mode: the CLI's engine when a server holds the model (dscoder serve, or any server that
speaks OpenAI's /v1/completions with token-id prompts: vLLM, SGLang).

The CLI builds its prompts locally, exactly as in-process (the chat template, FIM, truncation to
the server's context window), and sends the token ids; the server never re-templates them, so the
same settings give the same tokens. Torch-free: a one-shot through a warm server starts in a
fraction of a second.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from dscoder.errors import DscoderError, PromptTooLong, UsageError
from dscoder.events import Event, Finished, GenerationSettings, TextDelta
from dscoder.server.paths import default_socket, runtime_dir

CONNECT_TIMEOUT = 5.0


class ServerError(DscoderError):
    pass


def _client(url: str, api_key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = httpx.Timeout(connect=CONNECT_TIMEOUT, read=None, write=60.0, pool=None)
    # Certificates are loaded only for https: a default client builds a TLS context (20-40 ms,
    # a tenth of a one-shot through a warm server) even for a Unix socket or plain http.
    tls = url.startswith("https://")
    if url.startswith("unix:"):
        transport = httpx.HTTPTransport(uds=url.removeprefix("unix:"), verify=False)
        return httpx.Client(transport=transport, base_url="http://dscoder", headers=headers,
                            timeout=timeout, verify=False)
    return httpx.Client(base_url=url.rstrip("/").removesuffix("/v1"), headers=headers,
                        timeout=timeout, verify=tls)


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        return error["message"] if isinstance(error, dict) else str(error)
    except (ValueError, KeyError, TypeError):
        return response.text.strip()[:200] or response.reason_phrase


def _raise_for(response: httpx.Response, url: str) -> None:
    if response.status_code < 400:
        return
    message = _error_message(response)
    if response.status_code == 401:
        raise UsageError(f"The server at {url} refused the API key; set DSCODER_API_KEY.")
    if "context" in message and response.status_code == 400:
        raise PromptTooLong(message)
    if response.status_code < 500:
        raise UsageError(f"The server at {url} refused the request: {message}")
    raise ServerError(f"The server at {url} failed: {message}")


class RemoteTokenizer:
    """The encoding half of dscoder.tokenizer.Tokenizer, by a dscoder server's /tokenize: what
    prompts.py needs to build (and truncate) a prompt, without loading 4.5 MB of vocabulary."""

    def __init__(self, http: httpx.Client, url: str, specials: dict[str, dict]) -> None:
        self._http, self._url = http, url
        for name, special in specials.items():
            setattr(self, name, int(special["id"]))
        self._names = {int(s["id"]): s["text"] for s in specials.values()}

    def _tokenize(self, text: str, offsets: bool) -> dict:
        response = self._http.post("/tokenize", json={"content": text, "with_offsets": offsets})
        _raise_for(response, self._url)
        return response.json()

    def encode(self, text: str) -> list[int]:
        return self._tokenize(text, False)["tokens"]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        data = self._tokenize(text, True)
        return data["tokens"], [tuple(o) for o in data["offsets"]]

    def id_to_token(self, token_id: int) -> str | None:
        return self._names.get(token_id)


class RemoteEngine:
    """The engine API the CLI uses (generate, new_session, context_length, defaults, tokenizer)
    over HTTP. A server keeps its own prefix cache, so a session is the engine itself."""

    def __init__(self, url: str, model: str, *, api_key: str | None = None,
                 tokenizer: Callable[[], Any] | None = None) -> None:
        self.url, self.model = url, model
        self._http = _client(url, api_key)
        self._load_tokenizer = tokenizer
        self._tokenizer: Any = None
        info = self._model_info()
        self.served_model: str = info.get("id", model)
        ext = info.get("dscoder") or {}
        self.context_length: int = int(ext.get("context_length") or info.get("max_model_len") or 4096)
        d = ext.get("defaults") or {}
        self.defaults = GenerationSettings(**{k: d[k] for k in ("max_tokens", "temperature",
                                                                 "top_p", "top_k") if k in d})
        if ext.get("special_tokens"):  # a dscoder server tokenizes for us: no tokenizer to load
            self._tokenizer = RemoteTokenizer(self._http, self.url, ext["special_tokens"])

    def _model_info(self) -> dict:
        try:
            response = self._http.get("/v1/models")
        except httpx.HTTPError as e:
            raise ServerError(f"Cannot reach the server at {self.url} ({e}); start it with "
                              "dscoder serve, or run without --server.") from None
        _raise_for(response, self.url)
        data = response.json().get("data") or [{}]
        return next((m for m in data if m.get("id") == self.model), data[0])

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            if self._load_tokenizer is None:
                raise UsageError("Client mode needs the model's tokenizer to build prompts.")
            self._tokenizer = self._load_tokenizer()
        return self._tokenizer

    def new_session(self) -> "RemoteEngine":
        return self

    def close(self) -> None:
        self._http.close()

    def generate(self, prompt_ids: Sequence[int], settings: GenerationSettings | None = None, *,
                 stop_ids: Collection[int] | None = None,
                 cancel: threading.Event | None = None) -> Iterator[Event]:
        settings = settings or self.defaults
        body: dict[str, Any] = {
            "model": self.served_model, "prompt": list(prompt_ids), "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": max(0, min(settings.max_tokens, self.context_length - len(prompt_ids))),
            "temperature": settings.temperature, "top_p": settings.top_p,
        }
        if settings.top_k:
            body["top_k"] = settings.top_k
        if settings.seed is not None:
            body["seed"] = settings.seed
        if settings.stop:
            body["stop"] = list(settings.stop)
        if stop_ids:
            body["stop_token_ids"] = sorted(stop_ids)
        return self._stream(body, len(prompt_ids), cancel)

    def _stream(self, body: dict, prompt_tokens: int,
                cancel: threading.Event | None) -> Iterator[Event]:
        start = time.monotonic()
        first: float | None = None
        parts: list[str] = []
        usage: dict = {}
        ext: dict = {}
        reason = "length"
        try:
            with self._http.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for(response, self.url)
                for chunk in _events(response.iter_lines()):
                    if "error" in chunk:
                        raise ServerError(f"The server at {self.url} failed: "
                                          f"{chunk['error'].get('message')}")
                    usage = chunk.get("usage") or usage
                    ext = chunk.get("dscoder") or ext
                    for choice in chunk.get("choices") or ():
                        if choice.get("text"):
                            first = first or time.monotonic()
                            parts.append(choice["text"])
                            yield TextDelta(choice["text"], ())
                        if choice.get("finish_reason"):
                            reason = "stop" if choice["finish_reason"] == "stop" else "length"
                    if cancel is not None and cancel.is_set():
                        reason = "cancelled"
                        break
        except httpx.HTTPError as e:
            raise ServerError(f"Lost the server at {self.url} ({e}).") from None
        end = time.monotonic()
        yield Finished(
            reason=ext.get("reason", reason), text="".join(parts),
            token_ids=tuple(ext.get("token_ids", ())), prompt_tokens=prompt_tokens,
            cached_tokens=int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
            prefill_seconds=ext.get("prefill_seconds", (first or end) - start),
            decode_seconds=ext.get("decode_seconds", end - (first or end)),
            stats=ext.get("stats") or {}, generated_count=usage.get("completion_tokens"))


def _events(lines: Iterator[str]) -> Iterator[dict]:
    """The JSON payloads of a server-sent event stream, up to [DONE]."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


# --- finding a server ---------------------------------------------------------------------------

def default_server(model: str) -> str | None:
    """The user's own server on the default socket, if it is up and serves `model`."""
    path = default_socket()
    if not path.exists():
        return None
    url = f"unix:{path}"
    try:
        with _client(url, None) as http:
            data = http.get("/v1/models", timeout=2.0).json().get("data") or []
    except (httpx.HTTPError, ValueError):
        return None
    return url if any(m.get("id") == model for m in data) else None


def start_background_server(model: str, serve_args: list[str], keep_alive: str,
                            say: Callable[[str], None]) -> str:
    """Start `dscoder serve` on the default socket, detached, and wait until it answers."""
    log = runtime_dir() / "server.log"
    log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    cmd = [sys.executable, "-m", "dscoder.cli.entry", *serve_args, "serve",
           "--socket", str(default_socket()), "--keep-alive", keep_alive]
    say(f"Starting a dscoder server for {model} in the background (stays {keep_alive} after "
        f"the last request; log: {log}).")
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)
    while True:
        url = default_server(model)
        if url is not None:
            return url
        if proc.poll() is not None:
            tail = _tail(log)
            raise ServerError(f"The background server exited with code {proc.returncode}: {tail}")
        time.sleep(0.1)


def _tail(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"
