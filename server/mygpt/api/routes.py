"""Thin routes: resolve the service, await it, return."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sse_starlette import EventSourceResponse, ServerSentEvent

from mygpt.api import completions, tokenize
from mygpt.api.auth import caller
from mygpt.api.chat import ChatService, Closing
from mygpt.api.embeddings import EmbeddingService
from mygpt.api.errors import APIError, model_not_found
from mygpt.api.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingList,
    EmbeddingRequest,
    ModelCard,
    ModelDeleted,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from mygpt.finetune.store import off_loop
from mygpt.state import ServerState
from mygpt.tenancy.auth import Principal

router = APIRouter()
WEB = Path(__file__).resolve().parents[1] / "web"  # the chat page: static files, no build step
PAGE_FILES = {p.name: p for p in WEB.iterdir() if p.is_file()}  # served by name only: no paths


def _state(request: Request) -> ServerState:
    return request.app.state.mygpt


def _chat(request: Request) -> ChatService:
    state = _state(request)
    reason = state.not_ready_reason()
    if reason is not None or state.chat is None:
        raise APIError(
            503, f"The server is not ready: {reason}.", code="not_ready", headers={"Retry-After": "5"}
        )
    return state.chat


@router.get("/live")
async def live() -> dict:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> Response:
    reason = _state(request).not_ready_reason()
    if reason is None:
        return JSONResponse({"status": "ready"})
    return APIError(503, f"not ready: {reason}", code="not_ready", headers={"Retry-After": "5"}).response()


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    """Prometheus text format; open like the probes (scrapers carry no tenant key)."""
    m = _state(request).metrics  # (read off the event loop: some values come from the store)
    return Response(await off_loop(m.exposition) if m else b"", media_type=CONTENT_TYPE_LATEST)


@router.get("/", include_in_schema=False)
async def chat_page() -> FileResponse:
    """The chat page; open like the probes (its API calls carry the key the user types in)."""
    return FileResponse(WEB / "index.html")


@router.get("/web/{name}", include_in_schema=False)
async def chat_page_file(name: str) -> FileResponse:
    if name not in PAGE_FILES:
        raise APIError(404, "Not Found", code="not_found")
    return FileResponse(PAGE_FILES[name])


@router.get("/v1/models")
async def list_models(request: Request, principal: Principal = Depends(caller)) -> ModelList:
    chat = _chat(request)
    ids = await asyncio.to_thread(chat.model_ids, principal)  # checks adapters' files: off the loop
    return ModelList(data=[_card(request, chat, m) for m in ids])


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request, principal: Principal = Depends(caller)) -> ModelCard:
    chat = _chat(request)
    if model not in await asyncio.to_thread(chat.model_ids, principal):
        raise model_not_found(model)
    return _card(request, chat, model)


@router.delete("/v1/models/{model:path}")
async def delete_model(model: str, request: Request, principal: Principal = Depends(caller)) -> ModelDeleted:
    """OpenAI's deletion of a fine-tuned model: the caller's own, made by its fine-tuning jobs."""
    chat = _chat(request)
    if model == chat.model_name:
        raise APIError(403, f"The base model '{model}' cannot be deleted.", code="insufficient_permissions")
    entry = chat.adapter_of(principal, model)
    if entry is None:
        raise model_not_found(model)
    state = _state(request)
    if state.jobs is None and state.settings.finetune:
        raise APIError(503, "The server is not ready: fine-tuning is starting.", code="not_ready",
                       headers={"Retry-After": "5"})  # fmt: skip
    if state.jobs is None or not await off_loop(state.jobs.made, entry.tenant, entry.name):
        raise APIError(
            403, f"'{model}' is not a model of this tenant's fine-tuning jobs: adapters that the server's "
            "operator loaded are unloaded with an admin key (DELETE /v1/admin/adapters/{tenant}/{name}).",
            code="insufficient_permissions",
        )  # fmt: skip
    # the adapter leaves routing at once (requests using it finish on it) and its files the store
    if await asyncio.to_thread(state.registry.delete, entry.tenant, entry.name) is None:
        raise model_not_found(model)  # deleted meanwhile (by another request)
    await off_loop(state.jobs.forget_model, entry.tenant, entry.name)
    return ModelDeleted(id=model)


def _card(request: Request, chat: ChatService, model: str) -> ModelCard:
    base = chat.model_name
    return ModelCard(
        id=model, created=_state(request).created, root=base, parent=None if model == base else base,
        max_model_len=chat.limits.context_len,
    )  # fmt: skip


def _json_or_sse(model) -> dict:
    """The 200 of an endpoint that answers JSON, or server-sent events with `stream: true`."""
    sse = {"schema": {"type": "string", "description": "data: <chunk JSON> lines, then data: [DONE]"}}
    return {200: {"model": model, "content": {"text/event-stream": sse}}}


@router.post("/v1/chat/completions", response_model=None, responses=_json_or_sse(ChatCompletion))
async def chat_completions(
    body: ChatCompletionRequest, request: Request, response: Response, principal: Principal = Depends(caller)
) -> ChatCompletion | Response:
    chat = _chat(request)
    gen, ticket = await chat.prepare(principal, body)
    if body.stream:
        return await _sse(request, chat.stream(body, gen, ticket, _keepalive(request)), chat, principal)
    return _with_rate_headers(
        response, chat, principal, await _until_disconnected(request, chat.complete(body, gen, ticket))
    )


@router.post("/v1/completions", response_model=None, responses=_json_or_sse(Completion))
async def text_completions(
    body: CompletionRequest, request: Request, response: Response, principal: Principal = Depends(caller)
) -> Completion | Response:
    chat = _chat(request)
    prompts = await completions.prepare(chat, principal, body)
    if body.stream:
        opening = completions.stream(chat, body, prompts, _keepalive(request))
        return await _sse(request, opening, chat, principal)
    return _with_rate_headers(
        response,
        chat,
        principal,
        await _until_disconnected(request, completions.complete(chat, body, prompts)),
    )


@router.post("/v1/embeddings", response_model=None, responses={200: {"model": EmbeddingList}})
async def embeddings(
    body: EmbeddingRequest, request: Request, principal: Principal = Depends(caller)
) -> Response:
    chat = _chat(request)
    service: EmbeddingService = _state(request).embeddings
    answer = await _until_disconnected(request, service.embed(principal, body))
    if isinstance(answer, Response):  # the client left
        return answer
    # up to 2,048 vectors: serialized off the event loop (FastAPI's encoder takes seconds for 512 of
    # 4,096 floats, which every stream would wait for)
    content = await asyncio.to_thread(answer.model_dump_json)
    return Response(content, media_type="application/json", headers=chat.tenants.rate_headers(principal))


@router.post("/tokenize")
async def tokenize_prompt(
    body: TokenizeRequest, request: Request, principal: Principal = Depends(caller)
) -> TokenizeResponse:
    """vLLM's: a prompt's or chat messages' token ids as the server counts them."""
    return await tokenize.tokenize(_chat(request), principal, body)


@router.post("/detokenize")
async def detokenize_tokens(
    body: DetokenizeRequest, request: Request, principal: Principal = Depends(caller)
) -> DetokenizeResponse:
    return await tokenize.detokenize(_chat(request), principal, body)


def _with_rate_headers(response: Response, chat: ChatService, principal: Principal, answer):
    """The answer, with the tenant's x-ratelimit-* headers as they stand after it (its tokens charged)."""
    if not isinstance(answer, Response):  # (a Response: the client left, nobody reads it)
        response.headers.update(chat.tenants.rate_headers(principal))
    return answer


def _keepalive(request: Request) -> float:
    return _state(request).settings.keepalive_s


async def _sse(request: Request, opening, chat: ChatService, principal: Principal) -> Response:
    """The stream that `opening` returns once its choices' first events came (see chat.opened());
    an error before then is its HTTP status (C2), a client that leaves meanwhile aborts it. Its headers
    carry the tenant's x-ratelimit-* (its prompt charged)."""
    payloads = await _until_disconnected(request, opening)
    if isinstance(payloads, Response):  # the client left before the first byte
        return payloads
    return _EventStream(
        payloads, sep="\n", ping=_keepalive(request), ping_message_factory=_keep_alive,
        headers=chat.tenants.rate_headers(principal),
    )  # fmt: skip


class _EventStream(EventSourceResponse):
    """Closes its payloads however the response ends, even before its body began (the client left
    as it opened): that aborts the request."""

    def __init__(self, payloads: Closing, **kw):
        super().__init__(_as_events(payloads), **kw)
        self._payloads = payloads

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._payloads.aclose()


def _keep_alive() -> ServerSentEvent:
    return ServerSentEvent(comment="keep-alive", sep="\n")


async def _as_events(payloads):
    async with contextlib.aclosing(payloads):
        async for p in payloads:
            # None: a keep-alive comment; a dict: a named event (the Responses API's)
            yield _keep_alive() if p is None else p if isinstance(p, dict) else {"data": p}


async def _until_disconnected(request: Request, work):
    """Runs `work`; if the client goes away first, cancels it (which aborts the generation) and answers
    499 to nobody, rather than letting the cancellation out as an ASGI error (a traceback per client
    timeout in the log)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if task.cancelled() and watcher.done() and not asyncio.current_task().cancelling():
            return Response(status_code=499)  # the client closed the request (as nginx logs it)
        raise  # the server itself is cancelling this request
    finally:
        watcher.cancel()
