"""OpenAI's Responses API (POST /v1/responses, GET and DELETE /v1/responses/{id}, GET
/v1/responses/{id}/input_items) over the chat
completions path: a Responses request becomes a ChatCompletionRequest (instructions, input items, the
stored turns of previous_response_id, function tools, text.format), runs through ChatService as any
chat request does (tenants, limits, adapters, grammars, usage), and its answer or chunks become a
Response or the Responses stream's events (response.created ... response.completed), which the openai
SDK's `responses.create` and `responses.stream` read.

Honoured: model, input (text, messages with input_text/output_text parts, function_call and
function_call_output items, reasoning items replayed: their text goes to the next assistant turn),
instructions, max_output_tokens, temperature, top_p, tools (function tools), tool_choice,
parallel_tool_calls, text.format (text, json_object, json_schema), stream, store,
previous_response_id, metadata, user, max_tool_calls (it bounds built-in tools' calls: there are
none), reasoning.effort (as chat's reasoning_effort). A reasoning model's thinking comes as a
`reasoning` output item before the answer (reasoning_text content; streamed as
response.reasoning_text.delta events). Refused with a 400 naming them (B2): what this server cannot do
(built-in tools, images and files, background mode, conversations, prompt templates, include, top_logprobs,
truncation "auto", text.verbosity other than "medium", context management, moderation). Stored
responses, each tenant's newest STORED_RESPONSES within STORED_BYTES, each visible to its own tenant
only, live in the server's store (SQLite beside the adapter store, shared by the replicas that share
it, kept across restarts) where there is one (fine-tuning on, the default), else in memory.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import threading
import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mygpt.api import routes
from mygpt.api.auth import caller
from mygpt.api.chat import ChatService, Closing
from mygpt.api.errors import APIError, invalid, invalid_value
from mygpt.api.protocol import ChatCompletion, ChatCompletionRequest, Metadata, page
from mygpt.finetune.store import Store, off_loop
from mygpt.tenancy.auth import Principal

router = APIRouter()
log = logging.getLogger(__name__)
STORED_RESPONSES = 1024  # per tenant, oldest forgotten first
STORED_BYTES = 64 * 2**20  # per tenant (their JSON's size), oldest forgotten first
# fields refused by name when set to anything but their "off" value (what this server cannot do)
REFUSED = {
    "background": (None, False), "conversation": (None,), "prompt": (None,), "include": (None, []),
    "top_logprobs": (None, 0), "truncation": (None, "disabled"),
    "context_management": (None, []), "moderation": (None,),
}  # fmt: skip


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # B1: unknown fields are ignored (REFUSED ones are checked)

    model: str
    input: str | list[dict[str, Any]] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    stream: bool | None = False
    store: bool | None = True
    stream_options: dict[str, Any] | None = None  # include_obfuscation: nothing to obfuscate here
    previous_response_id: str | None = None
    metadata: Metadata | None = None
    user: str | None = None
    max_tool_calls: int | None = Field(None, ge=1)
    # {"effort": ...}: "none" and "minimal" turn a reasoning model's thinking off (chat's reasoning_effort)
    reasoning: dict[str, Any] | None = None


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True


class ResponseStore:
    """Stored responses, per tenant: id -> (the response, the conversation so far as chat messages, its
    size, the request's own input items). Each tenant's newest `limit` within `budget` bytes: one
    tenant cannot push out another's."""

    def __init__(self, limit: int = STORED_RESPONSES, budget: int = STORED_BYTES):
        self.limit, self.budget = limit, budget
        self._tenants: dict[str, collections.OrderedDict[str, tuple[dict, list[dict], int, list[dict]]]] = {}
        self._bytes: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def put(self, tenant: str, response: dict, messages: list[dict], inputs: list[dict] = ()) -> None:
        """messages: the conversation a later turn continues; inputs: this request's input items."""
        size = len(json.dumps(response)) + len(json.dumps(messages)) + len(json.dumps(inputs))
        with self._lock:
            items = self._tenants.setdefault(tenant, collections.OrderedDict())
            items[response["id"]] = (response, messages, size, list(inputs))
            self._bytes[tenant] += size
            while items and (len(items) > self.limit or self._bytes[tenant] > self.budget):
                self._bytes[tenant] -= items.popitem(last=False)[1][2]

    def get(self, tenant: str, response_id: str) -> tuple[dict, list[dict]] | None:
        with self._lock:
            item = self._tenants.get(tenant, {}).get(response_id)
        return None if item is None else (item[0], item[1])

    def inputs(self, tenant: str, response_id: str) -> list[dict] | None:
        with self._lock:
            item = self._tenants.get(tenant, {}).get(response_id)
        return None if item is None else item[3]

    def delete(self, tenant: str, response_id: str) -> bool:
        with self._lock:
            item = self._tenants.get(tenant, {}).pop(response_id, None)
            if item is not None:
                self._bytes[tenant] -= item[2]
            return item is not None


class SharedResponses:
    """ResponseStore's interface on the server's SQLite store: replicas sharing it continue each
    other's conversations, and a restart forgets none. Its calls wait for the disk: call them from a
    thread."""

    def __init__(self, store: Store, limit: int = STORED_RESPONSES, budget: int = STORED_BYTES):
        self.store, self.limit, self.budget = store, limit, budget

    def put(self, tenant: str, response: dict, messages: list[dict], inputs: list[dict] = ()) -> None:
        self.store.put_response(tenant, response, messages, list(inputs), self.limit, self.budget)

    def get(self, tenant: str, response_id: str) -> tuple[dict, list[dict]] | None:
        found = self.store.get_response(tenant, response_id)
        return None if found is None else (found[0], found[1])

    def inputs(self, tenant: str, response_id: str) -> list[dict] | None:
        found = self.store.get_response(tenant, response_id)
        return None if found is None else found[2]

    def delete(self, tenant: str, response_id: str) -> bool:
        return self.store.delete_response(tenant, response_id)


Stored = ResponseStore | SharedResponses


# ----------------------------------------------------------------------------- routes


@router.post("/v1/responses", response_model=None)
async def create_response(
    body: ResponsesRequest, request: Request, response: Response, principal: Principal = Depends(caller)
) -> dict | Response:
    chat = routes._chat(request)
    store = _store(request)
    history = await off_loop(_history, store, principal, body)
    chat_req = _as_chat(body, history)
    turn = Turn(body, chat_req.messages, len(history), _tenant(principal))
    try:
        gen, ticket = await chat.prepare(principal, chat_req)
        if body.stream:
            opening = _events(chat, chat_req, gen, ticket, turn, store, routes._keepalive(request))
            return await routes._sse(request, opening, chat, principal)
        done = await routes._until_disconnected(request, chat.complete(chat_req, gen, ticket))
    except APIError as exc:  # named as this request names its parameters
        raise _renamed(exc, body) from None
    if isinstance(done, Response):  # the client left
        return done
    answer = turn.response(_output(done), done.usage.model_dump(), done.choices[0].finish_reason)
    await _keep(turn, store, answer)
    return routes._with_rate_headers(response, chat, principal, answer)


@router.get("/v1/responses/{response_id}")
async def get_response(
    response_id: str, request: Request, stream: bool = False, principal: Principal = Depends(caller)
) -> dict:
    if stream:  # replaying a stored response's events: not kept
        raise invalid(
            "Streaming a stored response again is not supported; retrieve it whole.", param="stream"
        )
    found = await off_loop(_store(request).get, _tenant(principal), response_id)
    if found is None:
        raise _not_found(response_id)
    return found[0]


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(
    response_id: str, request: Request, order: Literal["asc", "desc"] = "desc", after: str | None = None,
    limit: int = Query(20, ge=1, le=100), principal: Principal = Depends(caller),
) -> dict:  # fmt: skip
    """The request's own input items (those of previous_response_id are that response's)."""
    items = await off_loop(_store(request).inputs, _tenant(principal), response_id)
    if items is None:
        raise _not_found(response_id)
    return page(items[::-1] if order == "desc" else items, after, limit)


@router.delete("/v1/responses/{response_id}")
async def delete_response(
    response_id: str, request: Request, principal: Principal = Depends(caller)
) -> DeletedResponse:
    if not await off_loop(_store(request).delete, _tenant(principal), response_id):
        raise _not_found(response_id)
    return DeletedResponse(id=response_id)


def _store(request: Request) -> Stored:
    state = request.app.state.mygpt
    if state.responses is None:
        shared = state.finetune_store
        if shared is None and not state.ready:  # the store may still be on its way: decide once ready
            raise APIError(
                503, "The server is not ready yet.", code="not_ready", headers={"Retry-After": "5"}
            )
        state.responses = SharedResponses(shared) if shared is not None else ResponseStore()
    return state.responses


async def _keep(turn: Turn, store: Stored, response: dict) -> None:
    """Stores the finished response (before its last event, so that a next turn finds it). A store that
    fails (a lock held too long, a full disk) does not take the answer with it: it is sent, marked
    `store: false`, so the client knows not to chain on it."""
    try:
        await off_loop(turn.keep, store, response)
    except Exception:
        log.exception("response %s could not be stored", response["id"])
        response["store"] = False


def _tenant(principal: Principal) -> str:
    return principal.tenant or ""  # admin keys share one space


def _not_found(response_id: str) -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found.", param="response_id",
                    code="not_found")  # fmt: skip


# ----------------------------------------------------------------------------- request -> chat request


def _history(store: Stored, principal: Principal, body: ResponsesRequest) -> list[dict]:
    """The refusals (B2), then the conversation of previous_response_id (its input and output)."""
    extra = body.model_extra or {}
    for name, off in REFUSED.items():
        if extra.get(name, None) not in off:
            raise invalid(
                f"'{name}' is not supported by this server.", param=name, code="unsupported_parameter"
            )
    if body.previous_response_id is None:
        return []
    found = store.get(_tenant(principal), body.previous_response_id)
    if found is None:
        raise invalid(
            f"Previous response with id '{body.previous_response_id}' not found.",
            param="previous_response_id",
        )
    return found[1]


def _as_chat(body: ResponsesRequest, history: list[dict]) -> ChatCompletionRequest:
    messages = [{"role": "system", "content": body.instructions}] if body.instructions else []
    messages += history + _input_messages(body.input, history)
    verbosity = (body.text or {}).get("verbosity")
    if verbosity not in (None, "medium"):
        raise invalid(
            "text.verbosity other than 'medium' is not supported by this server.", param="text.verbosity"
        )
    if body.stream_options is not None and not body.stream:
        raise invalid("stream_options is only allowed when stream is true.", param="stream_options")
    chat: dict[str, Any] = {
        "model": body.model, "messages": messages, "max_tokens": body.max_output_tokens,
        "temperature": body.temperature, "top_p": body.top_p, "stream": body.stream, "user": body.user,
        "parallel_tool_calls": body.parallel_tool_calls,
    }  # fmt: skip
    if body.stream:
        chat["stream_options"] = {"include_usage": True}  # response.completed carries the usage
    if body.reasoning:  # its summary: none is written here (the thinking itself comes as reasoning_text)
        unknown = set(body.reasoning) - {"effort", "summary"}
        if unknown:
            key = sorted(unknown)[0]
            raise invalid(f"reasoning.{key} is not supported by this server.", param=f"reasoning.{key}")
        chat["reasoning_effort"] = body.reasoning.get("effort")
    if body.tools is not None:
        chat["tools"] = [_tool(i, t) for i, t in enumerate(body.tools)]
    if body.tool_choice is not None:
        chat["tool_choice"] = _tool_choice(body.tool_choice)
    fmt = (body.text or {}).get("format")
    if fmt is not None:
        chat["response_format"] = _format(fmt)
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in chat.items() if v is not None})
    except ValidationError as exc:
        raise invalid_value(exc.errors(), rename=_param) from None


def _input_messages(items: str | list[dict[str, Any]], history: list[dict]) -> list[dict]:
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict] = []
    called = {c["id"] for m in history for c in m.get("tool_calls") or []}  # call ids an output may answer
    thought: str | None = None  # a replayed reasoning item's text, for the assistant turn after it
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        if kind == "reasoning":  # as a client replays a response's output: the next assistant turn's
            parts = [p.get("text", "") for p in item.get("content") or [] if isinstance(p, dict)]
            if not all(isinstance(p, str) for p in parts):
                raise invalid(f"input[{i}].content: a reasoning_text's text must be a string.",
                              param=f"input[{i}].content")  # fmt: skip
            thought = "".join(parts) or None
            continue
        if kind == "function_call_output" or (kind == "message" and item.get("role") != "assistant"):
            thought = None  # it went with no assistant turn
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise invalid(
                    f"input[{i}].role must be user, system, developer or assistant.", param=f"input[{i}].role"
                )
            out.append({"role": role, "content": _text(item.get("content"), f"input[{i}].content")})
            if role == "assistant" and thought is not None:  # to the template, which decides (Qwen3 drops it)
                out[-1]["reasoning_content"], thought = thought, None
        elif kind == "function_call":
            for field in ("call_id", "name", "arguments"):
                if not isinstance(item.get(field), str) or not item[field]:
                    raise invalid(
                        f"input[{i}].{field} must be a non-empty string.", param=f"input[{i}].{field}"
                    )
            try:
                json.loads(item["arguments"])
            except ValueError as exc:
                raise invalid(
                    f"input[{i}].arguments are not JSON: {exc}", param=f"input[{i}].arguments"
                ) from None
            called.add(item["call_id"])
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}  # fmt: skip
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls"):
                out[-1]["tool_calls"].append(call)  # one assistant turn's parallel calls
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
            if thought is not None:
                out[-1]["reasoning_content"], thought = thought, None
        elif kind == "function_call_output":
            if item.get("call_id") not in called:
                raise invalid(
                    f"input[{i}]: no function call with call_id {item.get('call_id')!r} precedes this output "
                    "(in this input or the conversation of previous_response_id).",
                    param=f"input[{i}].call_id",
                )  # fmt: skip
            output = item.get("output")
            content = output if isinstance(output, str) else _text(output, f"input[{i}].output")
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": content})
        else:
            raise invalid(f"input[{i}]: items of type '{kind}' are not supported by this server.",
                          param=f"input[{i}].type", code="unsupported_value")  # fmt: skip
    return out


def _text(content: Any, param: str) -> str:
    """A message's content as text: a string, or input_text/output_text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{param} must be a string or a list of text parts.", param=param)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise invalid(f"{param}[{j}]: content of type '{kind}' is not supported (text only).",
                          param=f"{param}[{j}]", code="unsupported_value")  # fmt: skip
        texts.append(str(part.get("text", "")))
    return "".join(texts)


def _tool(i: int, tool: dict) -> dict:
    if tool.get("type") != "function":
        raise invalid(f"tools[{i}]: tools of type '{tool.get('type')}' are not supported (function tools only).",
                      param=f"tools[{i}].type", code="unsupported_value")  # fmt: skip
    fields = ("name", "description", "parameters", "strict")
    return {"type": "function", "function": {k: tool[k] for k in fields if tool.get(k) is not None}}


def _tool_choice(choice: str | dict) -> str | dict:
    if isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and choice.get("name"):
        return {"type": "function", "function": {"name": choice["name"]}}
    if choice.get("type") == "allowed_tools":  # {"mode", "tools": [{"type": "function", "name"}]}
        listed = choice.get("tools")
        tools = [
            {"type": "function", "function": {"name": t.get("name")}} if isinstance(t, dict) else t
            for t in (listed if isinstance(listed, list) else [])
        ]
        return {
            "type": "allowed_tools",
            "allowed_tools": {"mode": choice.get("mode"), "tools": tools or listed},
        }
    raise invalid(f"tool_choice of type '{choice.get('type')}' is not supported.", param="tool_choice")


def _format(fmt: dict) -> dict:
    if fmt.get("type") != "json_schema":
        return {"type": fmt.get("type")}
    fields = ("name", "description", "schema", "strict")
    return {"type": "json_schema", "json_schema": {k: fmt[k] for k in fields if fmt.get(k) is not None}}


_PARAMS = {
    "messages": "input", "max_tokens": "max_output_tokens", "response_format": "text.format",
    "reasoning_effort": "reasoning.effort",
}  # fmt: skip


def _param(param: str | None, body: ResponsesRequest | None = None) -> str | None:
    """A chat request's parameter as this request named it: response_format.json_schema.x is
    text.format.x, tools.[i].function.x (or tools.i.function.x) is tools[i].x; a grammar that failed
    while generating (response_format) is the tools' where the request has tools and no text.format."""
    if param is None:
        return None
    if param == "response_format" and body is not None and body.tools:
        fmt = (body.text or {}).get("format") or {}
        if fmt.get("type", "text") == "text":
            return "tools"
    head, dot, rest = param.partition(".")
    if head == "tool_choice" and (m := re.fullmatch(r"allowed_tools(?:\.tools\.\[(\d+)\])?", rest)):
        return "tool_choice" + (f".tools[{m[1]}]" if m[1] else "")  # (this API's allowed_tools is flat)
    if head == "response_format":
        return "text.format" + (("." + rest.removeprefix("json_schema.")) if rest else "")
    if head == "tools" and (m := re.fullmatch(r"\[?(\d+)\]?(?:\.function)?(\..+)?", rest)):
        return f"tools[{m[1]}]{m[2] or ''}"
    return _PARAMS.get(head, head) + dot + rest


def _renamed(exc: APIError, body: ResponsesRequest) -> APIError:
    exc.info.param = _param(exc.info.param, body)
    names = {**_PARAMS, "response_format": "tools" if exc.info.param == "tools" else "text.format"}
    exc.info.message = exc.info.message.replace("tool_choice.allowed_tools", "tool_choice")
    for chat_name, name in names.items():
        exc.info.message = re.sub(rf"\b{chat_name}\b", name, exc.info.message)
    return exc


# ----------------------------------------------------------------------------- chat answer -> response


class Turn:
    """One response: its request's settings (echoed in the response), and the conversation it continues."""

    def __init__(self, body: ResponsesRequest, messages: list, history: int, tenant: str):
        self.body, self.tenant = body, tenant
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created = int(time.time())
        # the conversation a later previous_response_id continues: without the instructions (each
        # request gives its own, as OpenAI's do)
        skip = 1 if body.instructions else 0
        self.messages = [m.model_dump(exclude_none=True) for m in messages[skip:]]
        self.history = history  # of those, the conversation of previous_response_id

    def response(self, output: list[dict], usage: dict | None, finish: str | None, status: str | None = None,
                 error: dict | None = None) -> dict:  # fmt: skip
        b = self.body
        incomplete = finish == "length"
        status = status or ("incomplete" if incomplete else "completed")
        details = usage.get("prompt_tokens_details") or {} if usage else {}
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": error, "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": b.instructions, "max_output_tokens": b.max_output_tokens, "model": b.model,
            "output": output, "parallel_tool_calls": b.parallel_tool_calls is not False,
            "previous_response_id": b.previous_response_id, "reasoning": b.reasoning, "store": b.store is not False,
            "temperature": 1.0 if b.temperature is None else b.temperature,
            "text": b.text or {"format": {"type": "text"}}, "tool_choice": b.tool_choice or "auto",
            "tools": b.tools or [], "top_p": 1.0 if b.top_p is None else b.top_p, "truncation": "disabled",
            "usage": None if usage is None else {
                "input_tokens": usage["prompt_tokens"],
                "input_tokens_details": {"cached_tokens": details.get("cached_tokens", 0), "cache_write_tokens": 0},
                "output_tokens": usage["completion_tokens"],
                "output_tokens_details": {
                    "reasoning_tokens": (usage.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)
                },
                "total_tokens": usage["total_tokens"],
            },
            "user": b.user, "metadata": b.metadata or {}, "background": False,
        }  # fmt: skip

    def keep(self, store: Stored, response: dict) -> None:
        """Stores a finished response (store: true, OpenAI's default) with its conversation."""
        if self.body.store is False or response["status"] == "failed":
            return
        answer: list[dict] = []
        for item in response["output"]:
            if item["type"] == "reasoning":  # not kept: the next turn's template would drop it (Qwen3's)
                continue
            if item["type"] == "message":
                answer.append({"role": "assistant", "content": item["content"][0]["text"]})
            else:
                call = {"id": item["call_id"], "type": "function",
                        "function": {"name": item["name"], "arguments": item["arguments"]}}  # fmt: skip
                if answer and answer[-1].get("tool_calls"):
                    answer[-1]["tool_calls"].append(call)
                else:
                    answer.append({"role": "assistant", "content": None, "tool_calls": [call]})
        inputs = _as_items(self.messages[self.history :], response["id"])
        store.put(self.tenant, response, self.messages + answer, inputs)


def _as_items(messages: list[dict], response_id: str) -> list[dict]:
    """Chat messages as the Responses API's input items, with ids stable within their response."""
    tag = response_id.removeprefix("resp_")
    items: list[dict] = []
    for i, m in enumerate(messages):
        if m["role"] == "tool":
            items.append({"id": f"fco_{tag}_{i}", "type": "function_call_output", "call_id": m.get("tool_call_id"),
                          "output": m.get("content") or "", "status": "completed"})  # fmt: skip
            continue
        for j, call in enumerate(m.get("tool_calls") or []):
            items.append({"id": f"fc_{tag}_{i}_{j}", "type": "function_call", "call_id": call["id"],
                          "name": call["function"]["name"], "arguments": call["function"]["arguments"],
                          "status": "completed"})  # fmt: skip
        if m.get("content") is not None:  # (None: an assistant turn of tool calls only)
            part = (_text_part(m["content"])
                    if m["role"] == "assistant" else {"type": "input_text", "text": m["content"]})  # fmt: skip
            items.append({"id": f"msg_{tag}_{i}", "type": "message", "role": m["role"], "status": "completed",
                          "content": [part]})  # fmt: skip
    return items


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _status(finish: str | None) -> str:
    """An answer's status: cut by max_output_tokens, or whole."""
    return "incomplete" if finish == "length" else "completed"


def _message_item(text: str, status: str) -> dict:
    return {
        "type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": status, "role": "assistant",
        "content": [_text_part(text)],
    }  # fmt: skip


def _call_item(call_id: str, name: str, arguments: str) -> dict:
    return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call_id, "name": name,
            "arguments": arguments, "status": "completed"}  # fmt: skip


def _reasoning_item(text: str, status: str = "completed") -> dict:
    """A reasoning model's thinking (api/reasoning.py), as OpenAI gives an open model's: its text as
    reasoning_text content; no summary is written."""
    return {"type": "reasoning", "id": f"rs_{uuid.uuid4().hex}", "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "status": status}  # fmt: skip


def _output(done: ChatCompletion) -> list[dict]:
    choice = done.choices[0]
    message = choice.message
    thinking = [_reasoning_item(message.reasoning)] if message.reasoning else []  # (as a stream gives it)
    if message.tool_calls:
        return thinking + [
            _call_item(c.id, c.function.name, c.function.arguments) for c in message.tool_calls
        ]
    status = _status(choice.finish_reason)
    return thinking + [_message_item(message.content or "", status)]


async def _events(
    chat: ChatService,
    chat_req: ChatCompletionRequest,
    gen,
    ticket,
    turn: Turn,
    store: Stored,
    wait_s: float,
) -> Closing:
    """The Responses stream's events, from the chat stream's chunks (opened as it opens: C2)."""
    payloads = await chat.stream(chat_req, gen, ticket, wait_s)
    return Closing(_translate(payloads, turn, store), payloads.aclose)


async def _translate(payloads: Closing, turn: Turn, store: Stored):
    seq = 0

    def event(kind: str, **data: Any) -> dict:
        nonlocal seq
        seq += 1
        return {"event": kind, "data": json.dumps({"type": kind, "sequence_number": seq - 1, **data})}

    yield event("response.created", response=turn.response([], None, None, status="in_progress"))
    yield event("response.in_progress", response=turn.response([], None, None, status="in_progress"))
    output: list[dict] = []
    message: dict | None = None  # the message item being streamed
    text: list[str] = []
    thinking: dict | None = None  # the reasoning item being streamed (a reasoning model's)
    thought: list[str] = []

    def thought_done():  # the reasoning item ends where the answer (or a call) starts
        nonlocal thinking
        whole, at = "".join(thought), len(output)
        yield event("response.reasoning_text.done", item_id=thinking["id"], output_index=at, content_index=0,
                    text=whole)  # fmt: skip
        item = _reasoning_item(whole)
        item["id"] = thinking["id"]
        yield event("response.output_item.done", output_index=at, item=item)
        output.append(item)
        thinking = None

    finish, usage = None, None
    async for p in payloads:
        if p is None:  # a keep-alive comment
            yield None
            continue
        if p == "[DONE]":
            break
        chunk = json.loads(p)
        if "error" in chunk:  # after the first byte (A10): the error, then the failed response
            error = chunk["error"]
            param = _param(error.get("param"), turn.body)
            message_text = re.sub(r"\bresponse_format\b", param or "text.format", error["message"])
            yield event("error", code=error.get("code"), message=message_text, param=param)
            if thinking is not None:
                for e in thought_done():
                    yield e
            if message is not None:  # the answer so far, cut
                part = _text_part("".join(text))
                cut = {**message, "status": "incomplete", "content": [part]}
                yield event("response.output_item.done", output_index=len(output), item=cut)
                output.append(cut)
            code = "invalid_prompt" if param is not None else "server_error"  # ResponseError's codes
            failed = turn.response(
                output, None, None, status="failed", error={"code": code, "message": message_text}
            )
            yield event("response.failed", response=failed)
            return
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices", []):
            delta = choice.get("delta") or {}
            if delta.get("reasoning"):
                if thinking is None:
                    thinking = {**_reasoning_item("", "in_progress"), "content": []}
                    yield event("response.output_item.added", output_index=len(output), item=thinking)
                thought.append(delta["reasoning"])
                yield event("response.reasoning_text.delta", item_id=thinking["id"], output_index=len(output),
                            content_index=0, delta=delta["reasoning"])  # fmt: skip
            if thinking is not None and (delta.get("content") or delta.get("tool_calls")):
                for e in thought_done():
                    yield e
            if delta.get("content"):
                if message is None:
                    message = _message_item("", "in_progress")
                    message["content"] = []
                    yield event("response.output_item.added", output_index=len(output), item=message)
                    part = _text_part("")
                    yield event("response.content_part.added", item_id=message["id"], output_index=len(output),
                                content_index=0, part=part)  # fmt: skip
                text.append(delta["content"])
                yield event("response.output_text.delta", item_id=message["id"], output_index=len(output),
                            content_index=0, delta=delta["content"], logprobs=[])  # fmt: skip
            for call in delta.get("tool_calls") or []:  # a call comes whole (held back until complete)
                item = _call_item(call["id"], call["function"]["name"], call["function"]["arguments"])
                at = len(output)
                yield event("response.output_item.added", output_index=at, item={**item, "arguments": "",
                                                                                  "status": "in_progress"})  # fmt: skip
                yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=at,
                            delta=item["arguments"])  # fmt: skip
                yield event("response.function_call_arguments.done", item_id=item["id"], output_index=at,
                            name=item["name"], arguments=item["arguments"])  # fmt: skip
                yield event("response.output_item.done", output_index=at, item=item)
                output.append(item)
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
    if thinking is not None:  # (cut while thinking: no answer came)
        for e in thought_done():
            yield e
    if message is not None:
        status = _status(finish)
        whole = "".join(text)
        part = _text_part(whole)
        at = len(output)
        yield event("response.output_text.done", item_id=message["id"], output_index=at, content_index=0,
                    text=whole, logprobs=[])  # fmt: skip
        yield event(
            "response.content_part.done", item_id=message["id"], output_index=at, content_index=0, part=part
        )
        done = {**message, "status": status, "content": [part]}
        yield event("response.output_item.done", output_index=at, item=done)
        output.append(done)
    elif all(item["type"] == "reasoning" for item in output):  # an empty answer is still one message
        output.append(_message_item("", _status(finish)))
    final = turn.response(output, usage, finish)
    await _keep(turn, store, final)
    yield event(
        "response.incomplete" if final["status"] == "incomplete" else "response.completed", response=final
    )
