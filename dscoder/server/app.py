"""The HTTP routes: OpenAI's /v1/chat/completions, /v1/completions and /v1/models, llama.cpp's
/infill and /health. Prompts are built here with dscoder.prompts (the exact chat template and FIM
format; text that spells a special token stays text), then queued on the Worker.

Errors are OpenAI-shaped JSON ({"error": {"message", "type", "param", "code"}}): 400 for a bad
body or a prompt that does not fit, 401 for a wrong key, 503 when the GPU ran out of memory;
the server keeps serving after any of them.
"""
from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from dscoder import __version__
from dscoder.errors import DscoderError, PromptTooLong, UsageError, is_out_of_memory
from dscoder.events import Finished, GenerationSettings, TextDelta
from dscoder.prompts import chat_prompt, completion_prompt, fim_prompt
from dscoder.server.infill import InfillLimits, infill_prompt
from dscoder.server.schemas import ChatRequest, CompletionRequest, InfillRequest, Sampling, TokenizeRequest
from dscoder.server.worker import Job, Worker

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}
OPENAI_MAX_TOKENS = 16  # /v1/completions' default length, as in OpenAI's API


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.body()}, status_code=self.status)

    def body(self) -> dict:
        return {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}


def as_api_error(error: BaseException) -> ApiError:
    if isinstance(error, ApiError):
        return error
    if isinstance(error, PromptTooLong):
        return ApiError(400, error.message, code="context_length_exceeded")
    if is_out_of_memory(error):
        return ApiError(503, "The GPU ran out of memory for this request; try a shorter prompt "
                        "or max_tokens.", kind="server_error", code="out_of_memory")
    if isinstance(error, UsageError):
        return ApiError(400, error.message)
    if isinstance(error, DscoderError):
        return ApiError(500, error.message, kind="server_error")
    return ApiError(500, f"Internal error: {type(error).__name__}: {error}", kind="server_error")


@dataclass
class ServerState:
    engine: Any
    model_name: str
    api_key: str | None = None
    worker: Worker = field(init=False)
    last_activity: float = field(default_factory=time.monotonic)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.worker = Worker(self.engine)

    @property
    def idle_seconds(self) -> float:
        return 0.0 if self.worker.active else time.monotonic() - self.last_activity

    def fim_stop_ids(self) -> set[int]:
        tok = self.engine.tokenizer
        # plus the engine's own stops (the transformers engine: a Coder V1 Instruct middle ends
        # at <｜end▁of▁sentence｜>, not at its tokenizer's EOS <|EOT|>)
        engine_stops = getattr(self.engine, "stop_ids", ())
        return {tok.eos_id, tok.fim_begin_id, tok.fim_hole_id, tok.fim_end_id, *engine_stops}


class Guard:
    """Every request: note the activity (for --keep-alive) and check the API key (not /health,
    which load balancers and editors poll, as in llama-server)."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = self.state
        state.last_activity = time.monotonic()
        if state.api_key and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, f"Bearer {state.api_key}".encode()):
                response = ApiError(401, "Missing or wrong API key; send Authorization: Bearer KEY.",
                                    code="invalid_api_key").response()
                return await response(scope, receive, send)
        try:
            await self.app(scope, receive, send)
        finally:
            state.last_activity = time.monotonic()


def _route(path: str, method: str, handler: Callable, body: type[BaseModel] | None = None) -> Route:
    """A route whose body is validated into `body` and whose errors become OpenAI-shaped JSON."""

    async def endpoint(request: Request) -> Response:
        try:
            if body is None:
                result = await handler()
            else:
                result = await handler(_parse(body, await request.body()))
        except Exception as e:  # noqa: BLE001  (every failure is an answer; the server goes on)
            return as_api_error(e).response()
        return result if isinstance(result, Response) else JSONResponse(result)

    return Route(path, endpoint, methods=[method])


def _parse(model: type[BaseModel], raw: bytes) -> BaseModel:
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise _validation_error(e) from None


def create_app(state: ServerState) -> ASGIApp:
    async def health() -> dict:
        return {"status": "ok", "requests_active": state.worker.active}

    async def models() -> dict:
        engine = state.engine
        d = engine.defaults
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": state.created,
            "owned_by": "dscoder", "max_model_len": engine.context_length,
            "dscoder": {"version": __version__, "context_length": engine.context_length,
                        "defaults": {"max_tokens": d.max_tokens, "temperature": d.temperature,
                                     "top_p": d.top_p, "top_k": d.top_k},
                        "special_tokens": _specials(engine.tokenizer)}}]}

    async def tokenize(req: TokenizeRequest) -> dict:
        """llama-server's /tokenize; text never becomes special ids. With with_offsets, the
        character span of each token (dscoder's client truncates prompts with them)."""
        tok = state.engine.tokenizer
        if req.with_offsets:
            ids, offsets = tok.encode_with_offsets(req.content)
            return {"tokens": ids, "offsets": offsets}
        return {"tokens": tok.encode(req.content)}

    async def chat_completions(req: ChatRequest) -> Any:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        prompt = chat_prompt(state.engine.tokenizer, messages)
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        job = _job(state, prompt.ids, req, limit, stop_ids=None)
        return await _respond(state, job, req, chat=True)

    async def completions(req: CompletionRequest) -> Any:
        tok = state.engine.tokenizer
        if req.echo:
            raise ApiError(400, "echo is not supported; the reply holds only the new text.",
                           param="echo")
        raw = _single_prompt(req.prompt)
        if isinstance(raw, list):  # token ids: the prompt exactly as the client built it
            if req.suffix is not None:
                raise ApiError(400, "suffix needs a text prompt, not token ids.", param="suffix")
            ids = _checked_ids(raw, tok)
        elif req.suffix is not None:
            ids = fim_prompt(tok, raw, req.suffix).ids
        else:
            ids = completion_prompt(tok, raw).ids
        stop_ids = state.fim_stop_ids() | set(req.stop_token_ids or ())
        limit = req.max_tokens if req.max_tokens is not None else OPENAI_MAX_TOKENS
        job = _job(state, ids, req, limit, stop_ids=stop_ids)
        return await _respond(state, job, req, chat=False)

    async def infill(req: InfillRequest) -> Any:
        engine = state.engine
        n_predict = req.n_predict if req.n_predict >= 0 else engine.context_length
        # like llama-server, cut the input to fit (keeping the text nearest the hole)
        room = max(engine.context_length - min(n_predict, engine.context_length // 2), 5)
        prompt = infill_prompt(engine.tokenizer, req, room - 1)
        settings = _settings(engine.defaults, max_tokens=n_predict, temperature=req.temperature,
                             top_p=req.top_p, top_k=req.top_k,
                             seed=req.seed if req.seed is not None and req.seed >= 0 else None,
                             stop=tuple(req.stop))
        job = Job(prompt.ids, settings, state.fim_stop_ids())
        truncated = prompt.truncated_chars != (0, 0)
        return await _respond_infill(state, job, req, truncated)

    app = Starlette(routes=[
        _route("/health", "GET", health),
        _route("/v1/models", "GET", models),
        _route("/v1/chat/completions", "POST", chat_completions, ChatRequest),
        _route("/v1/completions", "POST", completions, CompletionRequest),
        _route("/infill", "POST", infill, InfillRequest),
        _route("/tokenize", "POST", tokenize, TokenizeRequest),
    ])
    app.state.dscoder = state
    return Guard(app, state)


SPECIAL_IDS = ("bos_id", "eos_id", "fim_begin_id", "fim_hole_id", "fim_end_id")


def _specials(tok: Any) -> dict[str, dict]:
    """The ids a prompt builder needs, and their spelling (for display)."""
    return {name: {"id": getattr(tok, name), "text": tok.id_to_token(getattr(tok, name))}
            for name in SPECIAL_IDS}


def _validation_error(exc: ValidationError) -> ApiError:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return ApiError(400, "The request body is not valid JSON.")
    if not first.get("loc"):
        return ApiError(400, "The request body must be a JSON object.")
    where = ".".join(str(p) for p in first.get("loc", ()))
    message = first.get("msg", "invalid value")
    return ApiError(400, f"Bad value for {where or 'the body'}: {message}.", param=where or None)


def _single_prompt(prompt: Any) -> str | list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError(400, "Give one prompt: this server answers one request at a time (batch 1).",
                           param="prompt")
        return prompt[0]
    return prompt


def _checked_ids(ids: list[int], tok: Any) -> list[int]:
    size = tok.vocab_size if hasattr(tok, "vocab_size") else None
    if not ids:
        raise ApiError(400, "The prompt is empty.", param="prompt")
    if size is not None and any(not 0 <= i < size for i in ids):
        raise ApiError(400, f"The prompt has token ids outside the vocabulary (0..{size - 1}).",
                       param="prompt")
    return list(ids)


def _settings(defaults: GenerationSettings, **chosen: Any) -> GenerationSettings:
    return replace(defaults, **{k: v for k, v in chosen.items() if v is not None})


def _job(state: ServerState, ids: list[int], req: Sampling, max_tokens: int | None,
         stop_ids: set[int] | None) -> Job:
    engine = state.engine
    if len(ids) >= engine.context_length:
        raise ApiError(400, f"The prompt has {len(ids)} tokens but the context window is "
                       f"{engine.context_length}; shorten it.", code="context_length_exceeded",
                       param="messages" if stop_ids is None else "prompt")
    if max_tokens is None:  # chat: as long as the context allows, as OpenAI does
        max_tokens = engine.context_length
    settings = _settings(engine.defaults, max_tokens=max_tokens, temperature=req.temperature,
                         top_p=req.top_p, top_k=req.top_k, seed=req.seed,
                         stop=req.stops() or None)
    return Job(ids, settings, stop_ids)


async def _started(state: ServerState, job: Job) -> AsyncIterator[TextDelta | Finished]:
    """The job's events, after the first has come: an error before any output is an HTTP error."""
    events = state.worker.stream(job)
    try:
        first = await anext(events)
    except StopAsyncIteration:  # pragma: no cover  (the engine always ends with Finished)
        raise ApiError(500, "The engine produced no result.", kind="server_error") from None

    async def all_events() -> AsyncIterator[TextDelta | Finished]:
        yield first
        async for event in events:
            yield event

    return all_events()


def _usage(f: Finished) -> dict:
    return {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.generated_tokens,
            "total_tokens": f.prompt_tokens + f.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": f.cached_tokens}}


def _extension(f: Finished) -> dict:
    """What the dscoder client needs to report like the in-process engine does."""
    return {"reason": f.reason, "token_ids": list(f.token_ids), "cached_tokens": f.cached_tokens,
            "prefill_seconds": f.prefill_seconds, "decode_seconds": f.decode_seconds,
            "stats": f.stats}


async def _respond(state: ServerState, job: Job, req: Sampling, *, chat: bool) -> Any:
    events = await _started(state, job)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    head = {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": state.model_name}
    if not req.stream:
        parts: list[str] = []
        async for event in events:
            if isinstance(event, TextDelta):
                parts.append(event.text)
            else:
                finished = event
        text = "".join(parts)
        choice: dict = {"index": 0, "finish_reason": FINISH[finished.reason], "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return {**head, "choices": [choice], "usage": _usage(finished), "dscoder": _extension(finished)}

    head["object"] = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, reason: str | None, first: bool = False) -> dict:
        if chat:
            delta = ({"role": "assistant", "content": text or ""} if first else
                     {"content": text} if text is not None else {})
            return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": reason,
                                         "logprobs": None}]}
        return {**head, "choices": [{"index": 0, "text": text or "", "finish_reason": reason,
                                     "logprobs": None}]}

    async def body() -> AsyncIterator[dict]:
        if chat:
            yield chunk(None, None, first=True)
        async for event in events:
            if isinstance(event, TextDelta):
                yield chunk(event.text, None)
            else:
                yield chunk(None, FINISH[event.reason])
                if req.include_usage:
                    yield {**head, "choices": [], "usage": _usage(event), "dscoder": _extension(event)}

    return _sse(body(), done=True)


async def _respond_infill(state: ServerState, job: Job, req: InfillRequest, truncated: bool) -> Any:
    limits = InfillLimits(req.n_indent, req.t_max_predict_ms)
    events = await _started(state, job)

    def summary(f: Finished, text: str) -> dict:
        prompt_n = f.prompt_tokens - f.cached_tokens
        n = f.generated_tokens
        stop_type = {"eos": "eos", "stop": "word", "length": "limit"}.get(f.reason, "limit")
        return {"content": text, "stop": True, "model": state.model_name, "id_slot": 0,
                "tokens_predicted": n, "tokens_evaluated": f.prompt_tokens,
                "tokens_cached": f.cached_tokens, "truncated": truncated, "stop_type": stop_type,
                "timings": {"cache_n": f.cached_tokens, "prompt_n": prompt_n,
                            "prompt_ms": f.prefill_seconds * 1000,
                            "prompt_per_second": prompt_n / f.prefill_seconds if f.prefill_seconds else 0.0,
                            "predicted_n": n, "predicted_ms": f.decode_seconds * 1000,
                            "predicted_per_second": n / f.decode_seconds if f.decode_seconds else 0.0}}

    async def limited() -> AsyncIterator[TextDelta | Finished]:
        stopped = False
        async for event in events:
            if isinstance(event, Finished):
                yield event
            elif not stopped:
                text, stopped = limits.feed(event.text)
                if text:
                    yield TextDelta(text, event.token_ids)
                if stopped:
                    job.cancel.set()  # the engine stops within a token; its Finished follows

    if not req.stream:
        parts: list[str] = []
        async for event in limited():
            if isinstance(event, TextDelta):
                parts.append(event.text)
            else:
                return summary(event, "".join(parts))

    async def body() -> AsyncIterator[dict]:
        async for event in limited():
            if isinstance(event, TextDelta):
                yield {"content": event.text, "stop": False}
            else:
                yield summary(event, "")

    return _sse(body(), done=False)


def _sse(chunks: AsyncIterator[dict], *, done: bool) -> StreamingResponse:
    """Server-sent events; an error after the stream began becomes a last `error` event."""

    async def lines() -> AsyncIterator[str]:
        try:
            async for c in chunks:
                yield f"data: {json.dumps(c, ensure_ascii=False)}\n\n"
        except Exception as e:  # noqa: BLE001  (headers are sent: the error goes in the stream)
            yield f"data: {json.dumps({'error': as_api_error(e).body()})}\n\n"
            return
        if done:
            yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
