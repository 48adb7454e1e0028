"""The web layer: OpenAI-compatible routes over the engine (FastAPI; ``pip install 'peftkit[serve]'``).

    GET    /v1/models               the base model and every adapter (the ``model`` a request may name)
    POST   /v1/completions          text completion; ``model`` picks the adapter (or the base model)
    POST   /v1/chat/completions     chat, through the tokenizer's chat template
    POST   /v1/adapters             {"name", "path"}: load an adapter from a folder inside --adapter-root
    DELETE /v1/adapters/{name}      unload it
    GET    /health                  200 while the engine runs (no API key needed)

Every refusal is a 4xx with OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``; an error never
ends the server. With an API key set, /v1 routes need ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from peftkit.errors import AdapterNameError, AdapterNotFoundError, CheckpointError, PeftkitError
from peftkit.serve import protocol as P
from peftkit.serve.adapters import AdapterBusyError, AdapterPathError, AdapterRegistry, describe
from peftkit.serve.engine import Engine, EngineStopped, Event
from peftkit.serve.engine import Request as Generation
from peftkit.serve.sampling import LockedTokenizer, SamplingParams

# error type -> (HTTP status, OpenAI-style code); the first match wins
ERRORS: tuple[tuple[type[Exception], int, str], ...] = (
    (AdapterNotFoundError, 404, "model_not_found"),
    (AdapterPathError, 403, "path_not_allowed"),
    (AdapterBusyError, 409, "adapter_busy"),
    (AdapterNameError, 400, "invalid_adapter_name"),
    (CheckpointError, 400, "invalid_adapter"),
    (EngineStopped, 503, "shutting_down"),
    (PeftkitError, 400, "invalid_request"),
)


@dataclass
class ServeState:
    """Everything the routes share."""

    engine: Engine
    registry: AdapterRegistry
    tokenizer: LockedTokenizer
    limits: P.Limits
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def base_name(self) -> str:
        return self.registry.base_name


def error_response(err: Exception) -> JSONResponse:
    """The 4xx (or 5xx) JSON answer for ``err``."""
    if isinstance(err, P.RequestError):
        return JSONResponse(err.body(), status_code=err.status)
    for kind, status, code in ERRORS:
        if isinstance(err, kind):
            return error_response(P.RequestError(str(err), status, code=code))
    if isinstance(err, (ValidationError, RequestValidationError)):
        first = err.errors()[0] if err.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        message = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in err.errors())
        return error_response(P.RequestError(f"Invalid request: {message}", 400, param, "invalid_value"))
    return error_response(P.RequestError(f"internal error: {type(err).__name__}: {err}", 500, code="internal"))


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON, refusing more than ``limit`` bytes (413) whatever Content-Length claims."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise P.RequestError(f"Request body of {declared} bytes exceeds the limit of {limit}.", 413, code="too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise P.RequestError(f"Request body exceeds the limit of {limit} bytes.", 413, code="too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks) or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise P.RequestError(f"The body is not valid JSON: {err}", 400, code="invalid_json") from None


def events(
    state: ServeState, prompt: list[int], adapter: str, params: SamplingParams, streaming: bool
) -> AsyncIterator[Event]:
    """Submit one generation to the engine now (a refusal raises here, before any response starts) and return its
    events (``streaming`` False: one, at the end, with the whole text); a client that goes away cancels it."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()

    def emit(event: Event) -> None:  # called on the engine thread
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutdown timed out): nobody is listening
            generation.cancelled = True

    generation = Generation(prompt, adapter, params, emit, state.tokenizer, streaming)
    state.engine.submit(generation)

    async def stream() -> AsyncIterator[Event]:
        finished = False
        try:
            while not finished:
                event = await queue.get()
                finished = event.finish_reason is not None
                yield event
        finally:
            generation.cancelled = not finished

    return stream()


def check_prompt(state: ServeState, ids: list[int]) -> None:
    """Refuse empty or over-long prompts and token ids outside the vocabulary."""
    limit = min(state.limits.max_prompt_tokens, state.engine.max_length - 1)
    if not ids:
        raise P.RequestError("The prompt is empty; give at least one token.", param="prompt")
    if len(ids) > limit:
        raise P.RequestError(f"The prompt has {len(ids)} tokens; the limit is {limit}.", param="prompt")
    vocab = state.engine.vocab_size
    if any(not 0 <= i < vocab for i in ids):
        raise P.RequestError(f"Token ids must lie in [0, {vocab}).", param="prompt")


async def collect(stream: AsyncIterator[Event]) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) of a generation run to its end."""
    parts, reason, tokens = [], "stop", 0
    async for event in stream:
        if event.error:
            raise P.RequestError(event.error, 500, code="generation_failed")
        parts.append(event.text)
        reason, tokens = event.finish_reason or reason, event.completion_tokens
    return "".join(parts), reason, tokens


def sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    """Server-sent events: one ``data: {json}`` per chunk, then ``data: [DONE]``."""

    async def lines() -> AsyncIterator[str]:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _usage_wanted(body: P.SamplingFields) -> bool:
    return bool((getattr(body, "stream_options", None) or {}).get("include_usage"))


async def _completion_chunks(
    rid: str, body: P.CompletionRequest, stream: AsyncIterator[Event], prompt_tokens: int
) -> AsyncIterator[dict]:
    tokens = 0
    async for event in stream:
        if event.error:
            yield P.RequestError(event.error, 500, code="generation_failed").body()
            return
        tokens = event.completion_tokens
        if event.text or event.finish_reason:
            yield P.completion(rid, body.model, event.text, event.finish_reason, None)
    if _usage_wanted(body):
        yield {**P.completion(rid, body.model, "", None, P.usage(prompt_tokens, tokens)), "choices": []}


async def _chat_chunks(
    rid: str, body: P.ChatRequest, stream: AsyncIterator[Event], prompt_tokens: int
) -> AsyncIterator[dict]:
    yield P.chat_chunk(rid, body.model, {"role": "assistant", "content": ""}, None)
    tokens = 0
    async for event in stream:
        if event.error:
            yield P.RequestError(event.error, 500, code="generation_failed").body()
            return
        tokens = event.completion_tokens
        if event.text or event.finish_reason:
            yield P.chat_chunk(rid, body.model, {"content": event.text} if event.text else {}, event.finish_reason)
    if _usage_wanted(body):
        yield {**P.chat_chunk(rid, body.model, {}, None), "choices": [], "usage": P.usage(prompt_tokens, tokens)}


def build_router(state: ServeState) -> APIRouter:
    """The /v1 routes (behind the API key when one is set)."""

    async def check_key(request: Request) -> None:
        if state.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {state.api_key}".encode()):
            raise P.RequestError("Missing or wrong API key: send 'Authorization: Bearer <key>'.", 401, code="auth")

    router = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])
    _generation_routes(router, state)
    _adapter_routes(router, state)
    return router


def _generation_routes(router: APIRouter, state: ServeState) -> None:
    @router.get("/models")
    async def models() -> dict:
        data = await asyncio.wrap_future(state.engine.call(lambda: describe(state.registry, state.created)))
        return {"object": "list", "data": data}

    @router.post("/completions")
    async def completions(request: Request) -> Any:
        body = P.CompletionRequest.model_validate(await read_json(request, state.limits.max_body_bytes))
        adapter = state.registry.route_name(body.model)
        params = body.params(state.limits, state.limits.default_completion_tokens)
        prompt = body.prompt_text()
        ids = state.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        check_prompt(state, ids)
        rid, stream = P.new_id("cmpl"), events(state, ids, adapter, params, body.stream)
        if body.stream:
            return sse(_completion_chunks(rid, body, stream, len(ids)))
        text, reason, tokens = await collect(stream)
        return P.completion(rid, body.model, text, reason, P.usage(len(ids), tokens))

    @router.post("/chat/completions")
    async def chat(request: Request) -> Any:
        body = P.ChatRequest.model_validate(await read_json(request, state.limits.max_body_bytes))
        adapter = state.registry.route_name(body.model)
        params = body.params(state.limits, state.limits.max_tokens)
        if not getattr(state.tokenizer, "chat_template", None):
            raise P.RequestError("The tokenizer has no chat template; use /v1/completions.", param="messages")
        ids = state.tokenizer.encode(state.tokenizer.chat_prompt([m.as_dict() for m in body.messages]))
        check_prompt(state, ids)
        rid, stream = P.new_id("chatcmpl"), events(state, ids, adapter, params, body.stream)
        if body.stream:
            return sse(_chat_chunks(rid, body, stream, len(ids)))
        text, reason, tokens = await collect(stream)
        return P.chat(rid, body.model, text, reason, P.usage(len(ids), tokens))


def _adapter_routes(router: APIRouter, state: ServeState) -> None:
    @router.post("/adapters", status_code=201)
    async def load_adapter(request: Request) -> dict:
        body = P.AdapterRequest.model_validate(await read_json(request, state.limits.max_body_bytes))
        await asyncio.wrap_future(state.engine.call(lambda: state.registry.add(body.name, body.path)))
        return {"id": body.name, "object": "model", "created": int(time.time()), "owned_by": "peftkit"}

    @router.delete("/adapters/{name}")
    async def unload_adapter(name: str) -> dict:
        await asyncio.wrap_future(state.engine.call(lambda: state.registry.remove(name)))
        return {"id": name, "object": "model", "deleted": True}


def create_app(state: ServeState) -> FastAPI:
    """The FastAPI application; its lifespan starts the engine and, at shutdown (after uvicorn has let the running
    requests finish), stops it once its last rows are done."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not state.engine.alive:
            state.engine.start()
        yield
        await asyncio.to_thread(state.engine.stop)

    app = FastAPI(title="peftkit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(build_router(state))

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = state.engine.alive
        return JSONResponse({"status": "ok" if ok else "stopped"}, status_code=200 if ok else 503)

    for kind in (Exception, RequestValidationError, ValidationError):
        app.add_exception_handler(kind, lambda request, err: error_response(err))
    app.add_exception_handler(P.RequestError, lambda request, err: error_response(err))
    app.add_exception_handler(PeftkitError, lambda request, err: error_response(err))
    return app
