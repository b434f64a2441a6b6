"""The app in-process (httpx ASGI transport): readiness, and errors after the first byte (A10)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import torch

from mygpt.api.chat import ChatLimits, ChatService
from mygpt.api.embeddings import EmbeddingService
from mygpt.app import build_app
from mygpt.config import Settings
from mygpt.engine.async_engine import AsyncEngine
from mygpt.engine.engine import Engine
from mygpt.engine.runner import ModelRunner
from mygpt.state import ServerState
from mygpt.tenancy.config import load_tenancy
from mygpt.tenancy.tenants import Tenants

HI = [{"role": "user", "content": "Hi"}]


def client_for(state: ServerState) -> httpx.AsyncClient:
    app = build_app(state.settings, state)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def sdk_for(state: ServerState):
    """The openai SDK's async client on the app in process (no retries: each error is seen)."""
    import openai

    transport = httpx.ASGITransport(app=build_app(state.settings, state))
    return openai.AsyncOpenAI(
        base_url="http://test/v1",
        api_key="x",
        max_retries=0,
        http_client=httpx.AsyncClient(transport=transport),
    )


@pytest.fixture
def served_state(tiny_model_dir, tokenizer):
    """A ready ServerState around a real engine on the tiny model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    engine = Engine(ModelRunner(model, 4, 512, torch.float32), tokenizer, [tokenizer.eos_token_id])
    engine.start()
    state = ServerState(Settings(), Tenants(load_tenancy(None)))
    state.engine = engine
    state.chat = ChatService(AsyncEngine(engine), tokenizer, "tiny", ChatLimits(512, 4, 4), state.tenants)
    state.embeddings = EmbeddingService(state.chat, "mean", model.config.hidden_size, window=4)
    state.ready = True
    yield state
    engine.stop()


def test_a_failed_warm_up_generation_is_a_start_up_failure(served_state, tokenizer, monkeypatch):
    """G1: the warm-up generation before /ready fails with the engine's error (here: a step that
    raises, as a device out of memory would), which start-up turns into /ready's 503 and its message;
    a working engine's warm-up passes."""
    from mygpt.state import _warm_up

    engine = served_state.engine
    _warm_up(engine, tokenizer)

    def fails(*args, **kw):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(engine.runner, "step", fails)
    with pytest.raises(RuntimeError, match="warm-up generation failed.*out of memory"):
        _warm_up(engine, tokenizer)


@pytest.mark.anyio
async def test_not_ready_while_loading():
    state = ServerState(Settings(), Tenants(load_tenancy(None)))  # nothing loaded yet
    async with client_for(state) as c:
        assert (await c.get("/live")).status_code == 200
        r = await c.get("/ready")
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        r = await c.post("/v1/chat/completions", json={"model": "tiny", "messages": HI})
        assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "not_ready"
    state.failure = "RuntimeError: no GPU"
    async with client_for(state) as c:
        r = await c.get("/ready")
        assert r.status_code == 503 and "no GPU" in r.json()["error"]["message"]


@pytest.mark.anyio
async def test_ready_turns_503_when_the_engine_stops(served_state):
    async with client_for(served_state) as c:
        assert (await c.get("/ready")).status_code == 200
        served_state.engine.stop()
        assert (await c.get("/ready")).status_code == 503


@pytest.mark.anyio
async def test_a_schema_that_fails_while_generating_is_the_requests_fault(served_state, monkeypatch):
    """A grammar that breaks down part way (past llguidance's limits, say) is a 400 naming
    response_format, or after the first byte an invalid_request_error event; not a server error."""
    from mygpt.engine.guided import Guide

    advanced = {"n": 0, "until": 0}  # tokens the guide takes before it breaks down

    def advance(self, token):
        advanced["n"] += 1
        return advanced["n"] <= advanced["until"]

    monkeypatch.setattr(Guide, "advance", advance)
    body = {"model": "tiny", "messages": HI, "max_tokens": 20, "response_format": {"type": "json_object"}}
    async with client_for(served_state) as c:
        for stream in (False, True):  # at the first token: nothing was sent, so a real 400 (C2)
            advanced["n"] = 0
            r = await c.post("/v1/chat/completions", json={**body, "stream": stream})
            assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
            assert "could not be followed" in r.json()["error"]["message"]
        advanced.update(n=0, until=1)  # at the second token, after the first was sent
        r = await c.post("/v1/chat/completions", json={**body, "stream": True})
    assert r.status_code == 200
    data = [line.removeprefix("data: ") for line in r.text.split("\n") if line.startswith("data: ")]
    error = json.loads(data[-1])["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "response_format"


@pytest.mark.anyio
async def test_a_choice_that_fails_at_its_first_token_is_a_real_status_whatever_came_before(
    served_state, monkeypatch
):
    """C2 with n > 1: the stream waits for every choice's first event, so a choice whose schema breaks
    at its first token is a 400 even when another choice's first token came before its failure."""
    from mygpt.engine.guided import Guide

    guides = []

    def advance(self, token):  # the first guide (choice 0) follows; the others break at once
        if not guides:
            guides.append(self)
        return self is guides[0]

    monkeypatch.setattr(Guide, "advance", advance)
    body = {"model": "tiny", "messages": HI, "max_tokens": 4, "n": 2, "stream": True,
            "response_format": {"type": "json_object"}}  # fmt: skip
    async with client_for(served_state) as c:
        r = await c.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text


@pytest.mark.anyio
async def test_failure_after_first_byte_sends_an_error_event(served_state, monkeypatch):
    """A10: the stream carries data: {"error": ...} and ends, so the SDK raises instead of hanging."""
    runner = served_state.engine.runner
    real = runner.step
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("device lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "step", flaky)
    body = {"model": "tiny", "messages": HI, "max_tokens": 20, "stream": True, "temperature": 0}
    async with client_for(served_state) as c:
        r = await c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    data = [line.removeprefix("data: ") for line in r.text.split("\n") if line.startswith("data: ")]
    assert json.loads(data[0])["choices"][0]["delta"]["role"] == "assistant"
    error = json.loads(data[-1])["error"]
    assert "device lost" in error["message"] and error["type"] == "server_error"
    assert "[DONE]" not in data
    # the SDK turns it into an exception
    import openai

    sdk = sdk_for(served_state)
    calls["n"] = 0
    with pytest.raises(openai.APIError, match="device lost"):
        async for _ in await sdk.chat.completions.create(**body):
            pass
    # the engine carries on
    async with client_for(served_state) as c:
        r = await c.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
    assert r.status_code == 200


def failing_steps(monkeypatch, runner, failing: set[int], delay_s: float = 0.0) -> dict:
    """Makes the runner's steps numbered in `failing` (from 1) raise as a lost device would; each step
    first sleeps `delay_s`. Returns the step counter (reset it to start again)."""
    real = runner.step
    calls = {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        time.sleep(delay_s)
        if calls["n"] in failing:
            raise RuntimeError("CUDA error: out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "step", step)
    return calls


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_a_stream_that_fails_before_its_first_token_is_a_real_error_status(
    served_state, monkeypatch, path
):
    """C2: the first step fails (the prefill, out of device memory): the stream had sent nothing, so
    the answer is a 500 in OpenAI's shape, not a 200 carrying an error event; the SDK raises its
    InternalServerError before iterating. The request counts as an error, and the server carries on."""
    import openai

    calls = failing_steps(monkeypatch, served_state.engine.runner, {1})
    body = {"model": "tiny", "max_tokens": 5, "stream": True, "temperature": 0}
    body |= {"messages": HI} if path.endswith("chat/completions") else {"prompt": "Hi"}
    async with client_for(served_state) as c:
        r = await c.post(path, json=body)
    assert r.status_code == 500 and r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert error["type"] == "server_error" and "out of memory" in error["message"]
    assert [row["requests"]["error"] for row in served_state.tenants.usage.report()] == [1]

    calls["n"] = 0
    sdk = sdk_for(served_state)
    create = sdk.chat.completions.create if path.endswith("chat/completions") else sdk.completions.create
    with pytest.raises(openai.InternalServerError, match="out of memory"):
        await create(**body)
    async with client_for(served_state) as c:  # the engine carries on
        r = await c.post(path, json=body)
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")


@pytest.mark.anyio
async def test_a_stream_whose_first_token_is_slow_opens_with_a_keep_alive(served_state, monkeypatch):
    """A9 with C2: a stream waits for its first token before answering 200, but no longer than the
    keep-alive interval; past it the stream opens with a keep-alive comment. A failure after that is
    an error event."""
    served_state.settings = Settings(keepalive_s=0.05)
    calls = failing_steps(monkeypatch, served_state.engine.runner, set(), delay_s=0.2)
    body = {"model": "tiny", "messages": HI, "max_tokens": 3, "stream": True, "temperature": 0}
    async with client_for(served_state) as c:
        r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200
        lines = [line for line in r.text.split("\n") if line]
        assert lines[0] == ": keep-alive" and '"role":"assistant"' in lines[1]
        assert lines[-1] == "data: [DONE]" and calls["n"] >= 3

        calls = failing_steps(monkeypatch, served_state.engine.runner, {1}, delay_s=0.2)
        r = await c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200  # committed before the failure
    data = [line.removeprefix("data: ") for line in r.text.split("\n") if line.startswith("data: ")]
    assert "out of memory" in json.loads(data[-1])["error"]["message"]


def queued_for_ever():
    """An engine request's event stream that waits for ever (a long queue), and the event that is set
    once it is closed (which is what aborts a request in the engine)."""
    closed = asyncio.Event()

    async def events():
        try:
            await asyncio.sleep(3600)
            yield None
        finally:
            closed.set()

    return events(), closed


@pytest.mark.anyio
async def test_leaving_while_a_stream_waits_for_its_first_event_aborts_it():
    """A client that leaves before the first byte (the route cancels opened()) ends the request's
    event stream, which is what aborts it in the engine."""
    from mygpt.api.chat import opened

    events, closed = queued_for_ever()
    waiting = asyncio.ensure_future(opened(events, wait_s=3600))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert closed.is_set()


@pytest.mark.anyio
async def test_once_a_first_event_came_the_other_choices_get_a_short_grace():
    """Choices whose first tokens do not come together (a list of prompts prefilled in several steps,
    the naive engine's choices one after another) cannot hold the stream back for the keep-alive
    interval: it opens with what came, FIRST_EVENTS_GRACE_S after the first."""
    import time

    from mygpt.api.chat import FIRST_EVENTS_GRACE_S, opened
    from mygpt.engine.types import TokenEvent

    async def events():
        yield TokenEvent("r", 0, [5], "a")
        await asyncio.sleep(30)  # choice 1, much later
        yield TokenEvent("r", 1, [6], "b")

    t0 = time.monotonic()
    stream, waited = await opened(events(), wait_s=3600, choices=2)
    assert not waited and time.monotonic() - t0 < FIRST_EVENTS_GRACE_S + 5
    assert (await anext(stream)).text == "a"
    await stream.aclose()


@pytest.mark.anyio
async def test_an_event_stream_that_fails_before_its_first_event_is_a_500():
    """C2: the event stream itself raising (a merged stream of several prompts passes its streams'
    errors on) before anything was sent is a real 500, not a 200 that carries an error."""
    from mygpt.api.chat import opened
    from mygpt.api.errors import APIError

    async def events():
        raise RuntimeError("a stream broke")
        yield None

    with pytest.raises(APIError) as err:
        await opened(events(), wait_s=5)
    assert err.value.status == 500 and "a stream broke" in err.value.info.message


@pytest.mark.anyio
@pytest.mark.parametrize("stuck", ["the response's start", "the keep-alive"])
async def test_a_stream_the_client_leaves_before_its_body_began_aborts_the_request(stuck):
    """The wait for the first event ran out, the stream opened, and the client left while the first
    bytes were still being sent (a stuck socket): the payloads were never read, and closing them
    still ends the request's event stream, which is what aborts it in the engine."""
    from mygpt.api.chat import opened, stream_payloads
    from mygpt.api.routes import _EventStream
    from mygpt.engine.types import GenerationRequest, SamplingParams

    events, closed = queued_for_ever()
    replayed, waited = await opened(events, wait_s=0.01)
    assert waited
    gen = GenerationRequest("r", [1, 2], SamplingParams(max_tokens=4))
    response = _EventStream(stream_payloads(gen, replayed, [], None, None, waited), sep="\n", ping=3600)
    sent = []

    async def send(message):
        sent.append(message["type"])
        if stuck == "the response's start" or message.get("body"):
            await asyncio.sleep(3600)

    async def receive():
        await asyncio.sleep(0.05)
        return {"type": "http.disconnect"}

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "method": "POST",
        "headers": [],
    }
    await asyncio.wait_for(response(scope, receive, send), 10)
    assert closed.is_set() and sent[0] == "http.response.start"


@pytest.mark.anyio
async def test_every_response_carries_a_request_id(served_state, monkeypatch, caplog):
    """As OpenAI's: X-Request-Id on every answer (200, stream, 4xx, an unexpected 500), the client's
    own when usable, else a new one; the log lines written while handling it name it."""
    import logging

    from mygpt.api.request_ids import RequestIdLogFilter

    body = {"model": "tiny", "messages": HI, "max_tokens": 2}
    async with client_for(served_state) as c:
        answers = [
            await c.get("/live"),
            await c.post("/v1/chat/completions", json=body),
            await c.post("/v1/chat/completions", json={**body, "stream": True}),
            await c.post("/v1/chat/completions", json={**body, "max_tokens": -1}),
            await c.get("/nowhere"),
        ]
        assert [r.status_code for r in answers] == [200, 200, 200, 400, 404]
        ids = [r.headers["x-request-id"] for r in answers]
        assert all(i.startswith("req_") for i in ids) and len(set(ids)) == len(ids)
        r = await c.get("/live", headers={"X-Request-Id": "trace-42.a:b"})
        assert r.headers["x-request-id"] == "trace-42.a:b"
        for unusable in ("two words", "x" * 129, "bad\tid"):  # never copied into headers or the log
            r = await c.get("/live", headers={"X-Request-Id": unusable})
            assert r.headers["x-request-id"].startswith("req_")

        def broken(*args, **kw):
            raise RuntimeError("a bug")

    monkeypatch.setattr(served_state.chat, "prepare", broken)
    caplog.handler.addFilter(RequestIdLogFilter())
    caplog.handler.setFormatter(logging.Formatter("%(name)s%(request)s: %(message)s"))
    # Starlette answers the 500, then raises the error on to the server (which logs it too)
    transport = httpx.ASGITransport(
        app=build_app(served_state.settings, served_state), raise_app_exceptions=False
    )
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        with caplog.at_level(logging.ERROR):
            r = await c.post("/v1/chat/completions", json=body, headers={"X-Request-Id": "trace-500"})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert r.headers["x-request-id"] == "trace-500"
    assert "mygpt.api.errors [trace-500]: unhandled error" in caplog.text


@pytest.mark.anyio
async def test_fine_tuning_routes_when_off_or_starting():
    off = ServerState(Settings(finetune=False), Tenants(load_tenancy(None)))
    async with client_for(off) as c:
        r = await c.get("/v1/fine_tuning/jobs")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_available"
    starting = ServerState(Settings(), Tenants(load_tenancy(None)))
    async with client_for(starting) as c:
        r = await c.get("/v1/files")
        assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "not_ready"


def test_the_openapi_document_says_what_the_server_answers():
    """No 422 (validation errors are 400s in OpenAI's shape), an error schema on every operation, and
    the chat and text completions' 200 as JSON or server-sent events."""
    spec = build_app(Settings(), ServerState(Settings(), Tenants(load_tenancy(None)))).openapi()
    text = json.dumps(spec)
    assert "422" not in spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "HTTPValidationError" not in text
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            assert op["responses"]["default"]["content"]["application/json"]["schema"] == error, (
                method,
                path,
            )
    assert set(spec["components"]["schemas"]["ErrorInfo"]["properties"]) == {
        "message",
        "type",
        "param",
        "code",
    }
    for path, model in (("/v1/chat/completions", "ChatCompletion"), ("/v1/completions", "Completion")):
        content = spec["paths"][path]["post"]["responses"]["200"]["content"]
        assert content["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model}"}
        assert "text/event-stream" in content
    assert list(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]


def script_model(monkeypatch, runner, token_ids: list[int]) -> None:
    """The runner's logits make the model write exactly token_ids (one request, one choice), then EOS."""
    real, step = runner.step, {"k": 0}

    def scripted(decode, chunks, invariant=False):
        decode_logits, chunk_logits = real(decode, chunks, invariant)
        token = token_ids[step["k"]] if step["k"] < len(token_ids) else SCRIPT_EOS
        step["k"] += 1

        def only(logits: torch.Tensor) -> torch.Tensor:
            out = torch.full_like(logits, -1e9)
            out[..., token] = 0.0
            return out

        return only(decode_logits), [only(x) for x in chunk_logits]

    monkeypatch.setattr(runner, "step", scripted)


SCRIPT_EOS = 2  # the test tokenizer's <|im_end|>
GET_TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
async def test_auto_takes_hermes_tagged_calls_and_text(served_state, tokenizer, monkeypatch, stream):
    """tool_choice "auto" with a model that writes Hermes/Qwen <tool_call> blocks: two blocks are two
    calls (streamed: one delta, indexes 0 and 1); a text that starts like a tag but is not one is text."""
    assert tokenizer.eos_token_id == SCRIPT_EOS
    blocks = [
        f'<tool_call>\n{{"name": "get_time", "arguments": {{"city": "{c}"}}}}\n</tool_call>'
        for c in ("Paris", "Oslo")
    ]
    for written, want in (("\n".join(blocks), ["Paris", "Oslo"]), ("<table> is HTML.", None)):
        script_model(
            monkeypatch, served_state.engine.runner, tokenizer.encode(written, add_special_tokens=False)
        )
        body = {"model": "tiny", "messages": HI, "tools": [GET_TIME], "max_tokens": 80, "stream": stream}
        async with client_for(served_state) as c:
            r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        if stream:
            chunks = [
                json.loads(x.removeprefix("data: ")) for x in r.text.split("\n") if x.startswith("data: {")
            ]
            deltas = [ch["choices"][0] for ch in chunks if ch["choices"]]
            calls = [d["delta"]["tool_calls"] for d in deltas if d["delta"].get("tool_calls")]
            text = "".join(d["delta"].get("content") or "" for d in deltas)
            finish = deltas[-1]["finish_reason"]
            if want:
                assert len(calls) == 1 and [c["index"] for c in calls[0]] == [0, 1] and not text
                calls = calls[0]
        else:
            choice = r.json()["choices"][0]
            calls, text, finish = (
                choice["message"].get("tool_calls"),
                choice["message"]["content"],
                choice["finish_reason"],
            )
        if want:
            assert (
                finish == "tool_calls"
                and [json.loads(c["function"]["arguments"])["city"] for c in calls] == want
            )
            assert all(c["function"]["name"] == "get_time" and c["id"].startswith("call_") for c in calls)
        else:
            assert finish == "stop" and text == written and not calls


@pytest.mark.anyio
async def test_token_ids_past_the_logits_are_a_400(served_state, tokenizer):
    """A tokenizer with tokens past the model's logits (added, never trained): a logit_bias key or a
    prompt token id there is the request's fault, not an index error that fails the batch."""
    from mygpt.engine.guided import Grammars

    logits = len(tokenizer) - 10
    chat = served_state.chat
    served_state.chat = ChatService(
        chat.engine,
        tokenizer,
        "tiny",
        ChatLimits(512, 4, 4),
        served_state.tenants,
        None,
        Grammars(tokenizer, logits),
    )
    async with client_for(served_state) as c:
        body = {"model": "tiny", "messages": HI, "max_tokens": 2, "logit_bias": {str(logits + 1): 5}}
        r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"
        r = await c.post(
            "/v1/completions", json={"model": "tiny", "prompt": [1, logits + 1], "max_tokens": 2}
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        body["logit_bias"] = {str(logits - 1): 5}
        assert (await c.post("/v1/chat/completions", json=body)).status_code == 200


@pytest.mark.anyio
async def test_ready_turns_503_while_a_step_stalls_and_200_after(served_state, monkeypatch):
    """G1: one engine step running longer than stall_timeout_s (a hung kernel, say) takes the replica
    out of the load balancer; it comes back once the engine makes progress again."""
    import asyncio
    import threading

    served_state.settings = Settings(stall_timeout_s=0.2)
    runner, release = served_state.engine.runner, threading.Event()
    real = runner.step

    def hung(*args, **kw):
        release.wait(10)
        return real(*args, **kw)

    monkeypatch.setattr(runner, "step", hung)
    async with client_for(served_state) as c:
        assert (await c.get("/ready")).status_code == 200
        answer = asyncio.ensure_future(
            c.post("/v1/chat/completions", json={"model": "tiny", "messages": HI, "max_tokens": 2})
        )
        await asyncio.sleep(0.5)
        r = await c.get("/ready")
        assert r.status_code == 503 and "no progress" in r.json()["error"]["message"]
        release.set()
        assert (await answer).status_code == 200
        assert (await c.get("/ready")).status_code == 200


@pytest.mark.anyio
async def test_closed_api_equivalents_price_the_prefix_cache_hits_as_cached_input(served_state):
    """The usage ledger's closed-API figure: prompt tokens that our prefix cache reused are priced as
    the provider's cached input (here free), the rest as input."""
    from mygpt.cost import CostModel
    from mygpt.metrics import Metrics

    tenants = Tenants(load_tenancy(None), Metrics(CostModel(prices={"x/caching": (1.0, 0.0, 0.0)})))
    chat = served_state.chat
    served_state.tenants = tenants
    served_state.chat = ChatService(chat.engine, chat.tokenizer, "tiny", ChatLimits(512, 4, 4), tenants)
    long = [{"role": "user", "content": " ".join(f"word{i}" for i in range(60))}]
    body = {"model": "tiny", "messages": long, "max_tokens": 2, "temperature": 0}
    async with client_for(served_state) as c:
        usages = [(await c.post("/v1/chat/completions", json=body)).json()["usage"] for _ in range(2)]
        ledger = (await c.get("/v1/usage")).json()["data"][0]
    prompt, cached = usages[0]["prompt_tokens"], usages[1]["prompt_tokens_details"]["cached_tokens"]
    assert usages[0]["prompt_tokens_details"]["cached_tokens"] == 0 and cached >= 64
    assert ledger["closed_api_equivalent_usd"]["x/caching"] == pytest.approx((2 * prompt - cached) / 1e6)


def test_a_request_ended_by_shutdown_before_any_output_is_a_503_to_retry():
    """G2 with C2: a request the engine ends because it stops (the shutdown timeout passed), before
    anything was sent, gets the 503 with Retry-After that new requests get, not a 500: nothing is
    wrong with it, another replica can take it. Other failures stay 500s, and 4xx name the parameter."""
    from mygpt.api.chat import failure
    from mygpt.engine.types import SHUTTING_DOWN, FinishReason, TokenEvent

    def ended(**kw):
        return failure(TokenEvent("r", 0, [], "", FinishReason.ERROR, **kw))

    e = ended(error=SHUTTING_DOWN)
    assert (e.status, e.headers["Retry-After"], e.info.code) == (503, "5", "not_ready")
    assert ended(error="engine error: RuntimeError: boom").status == 500
    e = ended(error="schema", error_param="response_format")
    assert (e.status, e.info.param) == (400, "response_format")


@pytest.mark.anyio
@pytest.mark.parametrize("origins", ["", "https://chat.example.com, https://other.example.com", "*"])
async def test_browser_pages_of_the_allowed_origins_may_call_the_api(origins):
    """CORS (--cors-allow-origins): a browser's preflight and the headers its page may read, for the
    allowed origins only; none by default, where a page of another origin cannot read an answer."""
    settings = Settings(cors_allow_origins=origins)
    app = build_app(settings, ServerState(settings, Tenants(load_tenancy(None))))
    page = "https://chat.example.com"
    preflight = {"Origin": page, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}  # fmt: skip
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        r = await c.options("/v1/chat/completions", headers=preflight)
        live = await c.get("/live", headers={"Origin": page})
        stranger = await c.get("/live", headers={"Origin": "https://evil.example.net"})
    if not origins:
        assert r.status_code == 405 and "access-control-allow-origin" not in live.headers
        return
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] in (page, "*")
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    assert live.headers["access-control-allow-origin"] in (page, "*")
    assert "x-request-id" in live.headers["access-control-expose-headers"]
    assert "access-control-allow-credentials" not in live.headers  # keys, not cookies
    assert ("access-control-allow-origin" in stranger.headers) == (origins == "*")
