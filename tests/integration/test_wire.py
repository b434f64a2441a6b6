"""Raw HTTP against a real server on a tiny model: SSE framing, keep-alive, limits, errors, disconnects."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from conftest import ServerProcess

MODEL = "tiny"
HI = [{"role": "user", "content": "Hi"}]
F = {"name": "f", "parameters": {"type": "object", "properties": {}}}  # a function of the deprecated API


def post(server, body, **kw):
    return httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=120, **kw)


def assert_openai_error(r: httpx.Response, status: int, param=None, code=None) -> dict:
    """C1: {"error": {message, type, param, code}} and nothing else."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


def sse_lines(server, body) -> tuple[httpx.Response, list[str]]:
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=120) as r:
        raw = r.read().decode()
    return r, raw.split("\n")


def test_sse_framing(tiny_server):
    """A1: text/event-stream, `data: <json>` events separated by blank lines, exactly one [DONE] last."""
    r, lines = sse_lines(tiny_server, {"model": MODEL, "messages": HI, "max_tokens": 5, "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = "\n".join(lines).split("\n\n")
    data = [e.removeprefix("data: ") for e in events if e.startswith("data: ")]
    assert all(e.startswith(("data: ", ":")) or e == "" for e in events)
    assert data[-1] == "[DONE]" and data.count("[DONE]") == 1
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for d in data[:-1]:
        assert json.loads(d)["object"] == "chat.completion.chunk"


def test_without_limits_the_output_runs_to_the_context(tiny_server):
    """A5: neither max_tokens nor max_completion_tokens: the limit is what the context leaves."""
    r = post(
        tiny_server, {"model": MODEL, "messages": HI, "temperature": 0, "logit_bias": {"0": -100, "2": -100}}
    )
    body = r.json()
    assert r.status_code == 200
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["total_tokens"] == 512  # the tiny model's context


def test_context_length_exceeded_names_both_numbers(tiny_server):
    """B4: 400 context_length_exceeded, never a 500."""
    long = [{"role": "user", "content": "hello " * 600}]
    err = assert_openai_error(
        post(tiny_server, {"model": MODEL, "messages": long}), 400, code="context_length_exceeded"
    )
    assert "512" in err["message"]
    r = post(tiny_server, {"model": MODEL, "messages": HI, "max_tokens": 600})
    err = assert_openai_error(r, 400, param="max_tokens", code="context_length_exceeded")
    assert "512" in err["message"] and "600" in err["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"model": MODEL, "messages": HI, "temperature": 2.5}, "temperature"),
        ({"model": MODEL, "messages": HI, "top_p": -1}, "top_p"),
        ({"model": MODEL, "messages": HI, "n": 99}, "n"),
        ({"model": MODEL, "messages": HI, "max_tokens": 0}, "max_tokens"),
        ({"model": MODEL, "messages": HI, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        (  # with tools: the answer's format, checked as without them
            {
                "model": MODEL,
                "messages": HI,
                "tools": [{"type": "function", "function": {"name": "f"}}],  # "auto": the default
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "objekt"}},
                },
            },
            "response_format",
        ),
        (  # (a forced call's answer is the call; the format is still checked)
            {
                "model": MODEL,
                "messages": HI,
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": "required",
                "response_format": {"type": "json_schema"},
            },
            "response_format.json_schema",
        ),
        ({"model": MODEL, "messages": HI, "tool_choice": "required"}, "tool_choice"),  # no tools
        (
            {
                "model": MODEL,
                "messages": HI,
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice",
        ),  # fmt: skip
        ({"model": MODEL, "messages": HI, "response_format": {"type": "yaml"}}, "response_format.type"),
        (
            {"model": MODEL, "messages": HI, "response_format": {"type": "json_schema"}},
            "response_format.json_schema",
        ),
        (
            {
                "model": MODEL,
                "messages": HI,
                "response_format": {"type": "json_schema", "json_schema": {"schema": {}}},
            },
            "response_format.json_schema.name",
        ),
        (
            {
                "model": MODEL,
                "messages": HI,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"minimum": "a"}},
                },
            },
            "response_format",
        ),
        ({"model": MODEL, "messages": HI, "top_logprobs": 2}, "top_logprobs"),
        ({"model": MODEL, "messages": HI, "logit_bias": {"999999999": 1}}, "logit_bias"),
        ({"model": MODEL, "messages": HI, "logit_bias": {"²": 1}}, "logit_bias"),  # int() took it: a 500
        ({"model": MODEL, "messages": HI, "logit_bias": {"--5": 1}}, "logit_bias"),
        ({"model": MODEL, "messages": HI, "seed": 2**64, "n": 2}, "seed"),  # was a stalled server
        ({"model": MODEL, "messages": HI, "n": 9}, "n"),  # more choices than --max-num-seqs 8: was a 500
        (
            {
                "model": MODEL,
                "messages": HI,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "r", "schema": {"$ref": "#"}},
                },
            },
            "response_format",
        ),  # compiles, then no token can start it: was a 500 quoting the parser's state
        (
            {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages.[0].content",
        ),
        ({"model": MODEL, "messages": HI, "presence_penalty": 3}, "presence_penalty"),
        ({"model": MODEL, "messages": HI, "min_p": 1.5}, "min_p"),
        ({"model": MODEL, "messages": HI, "top_k": -2}, "top_k"),
        ({"model": MODEL, "messages": HI, "repetition_penalty": 0}, "repetition_penalty"),
        ({"model": MODEL, "messages": HI, "min_tokens": -1}, "min_tokens"),
        ({"model": MODEL, "messages": HI, "min_tokens": 10**6}, "min_tokens"),  # past the context
        (
            {"model": MODEL, "messages": HI, "ignore_eos": True, "response_format": {"type": "json_object"}},
            "ignore_eos",
        ),
        (
            {"model": MODEL, "messages": HI, "min_tokens": 2, "response_format": {"type": "json_object"}},
            "min_tokens",
        ),
        (
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            },
            "messages.[0].content",
        ),
        ({"model": MODEL, "messages": [{"role": "user"}]}, "messages.[0].content"),  # (OpenAI: required)
        (  # a refusal belongs to an assistant's message
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": [{"type": "refusal", "refusal": "No."}]}],
            },
            "messages.[0].content",
        ),
        (
            {"model": MODEL, "messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]},
            "messages.[0].role",
        ),
        ({"messages": HI}, "model"),
        # the deprecated function calling: served as tools, its own mistakes named by its own params
        (
            {
                "model": MODEL,
                "messages": HI,
                "functions": [F],
                "tools": [{"type": "function", "function": F}],
            },
            "functions",
        ),
        ({"model": MODEL, "messages": HI, "function_call": "auto"}, "function_call"),
        ({"model": MODEL, "messages": HI, "functions": [F], "function_call": {"name": "g"}}, "function_call"),
        ({"model": MODEL, "messages": HI, "functions": [F], "function_call": "always"}, "function_call"),
        (
            {"model": MODEL, "messages": HI, "functions": [{"name": "f", "parameters": {"type": "string"}}]},
            "functions.[0].parameters",
        ),
        (
            {"model": MODEL, "messages": [{"role": "function", "name": "f", "content": "x"}]},
            "messages.[0].role",
        ),
        (
            {
                "model": MODEL,
                "messages": HI,
                "function_call": "auto",
                "tools": [{"type": "function", "function": F}],
            },
            "function_call",
        ),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "x", "function_call": {"name": "f"}}]},
            "messages.[0].function_call",
        ),
        (
            {
                "model": MODEL,
                "messages": [
                    *HI,
                    {"role": "assistant", "function_call": {"name": "f", "arguments": "{oops"}},
                ],
            },
            "messages.[1].function_call",
        ),
        (
            {
                "model": MODEL,
                "messages": [
                    *HI,
                    {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}},
                    {"role": "function", "name": "f", "content": "1"},
                    {"role": "function", "name": "f", "content": "2"},
                ],
            },
            "messages.[3].role",
        ),  # one result a call
        ({"model": MODEL, "messages": HI, "modalities": ["text", "audio"]}, "modalities"),
        ({"model": MODEL, "messages": HI, "audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ],
)
def test_bad_input_is_a_400_naming_the_param(tiny_server, body, param):
    for stream in (False, True):  # C2: a stream that fails before its first byte is a real 400
        assert_openai_error(post(tiny_server, {**body, "stream": stream}), 400, param=param)


def test_an_assistants_refusal_in_the_history_is_taken_as_its_text(tiny_server):
    """As OpenAI takes a replayed conversation: refusal content parts, or the message's refusal where
    its content is empty; the prompt holds the refusal's text either way."""
    said = [
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot help with that."}]},
        {"role": "assistant", "content": None, "refusal": "I cannot help with that."},
        {"role": "assistant", "content": "I cannot help with that."},
    ]
    counts = []
    for turn in said:
        body = {"model": MODEL, "messages": [*HI, turn, *HI], "max_tokens": 1}
        r = post(tiny_server, body)
        assert r.status_code == 200, r.text
        counts.append(r.json()["usage"]["prompt_tokens"])
    assert counts[0] == counts[1] == counts[2]


@pytest.mark.parametrize("value", ["Infinity", "1e309", "NaN"])
def test_a_repetition_penalty_that_is_no_number_is_a_400(tiny_server, value):
    """Python's JSON reader takes Infinity, NaN and 1e309 (inf); a penalty of inf turned a seen token's
    logit of 0 into NaN."""
    body = f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "Hi"}}], "repetition_penalty": {value}}}'
    r = httpx.post(
        tiny_server.base_url + "/v1/chat/completions", content=body,
        headers={"Content-Type": "application/json"}, timeout=60,
    )  # fmt: skip
    assert_openai_error(r, 400, param="repetition_penalty")


def test_stream_options_without_stream_is_a_400(tiny_server):
    """As OpenAI answers: stream_options belongs to a stream; with stream true it is honoured."""
    body = {"model": MODEL, "messages": HI, "max_tokens": 2, "stream_options": {"include_usage": True}}
    assert_openai_error(post(tiny_server, body), 400, param="stream_options")
    prompt = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "stream_options": {"include_usage": True}}
    r = httpx.post(tiny_server.base_url + "/v1/completions", json=prompt, timeout=60)
    assert_openai_error(r, 400, param="stream_options")
    assert post(tiny_server, {**body, "stream": True}).status_code == 200
    assert post(tiny_server, {**body, "modalities": ["text"]}).status_code == 400  # still the stream_options
    assert post(tiny_server, {**body, "stream_options": None, "modalities": ["text"]}).status_code == 200


def test_lone_surrogates_quoted_in_errors_are_no_500(tiny_server):
    """A message that quotes the request cannot hold a lone UTF-16 surrogate in a UTF-8 body (JSON may
    escape one: \\ud800)."""

    def raw(path: str, body: str) -> httpx.Response:
        headers = {"content-type": "application/json"}
        return httpx.post(tiny_server.base_url + path, content=body.encode(), headers=headers, timeout=30)

    r = raw("/v1/chat/completions", '{"model": "x\\ud800", "messages": [{"role": "user", "content": "hi"}]}')
    assert "\\ud800" in assert_openai_error(r, 404, code="model_not_found")["message"]
    assert_openai_error(
        raw("/v1/completions", '{"model": "tiny", "prompt": "a\\udc00"}'), 400, param="prompt"
    )


def test_malformed_json_and_wrong_shapes(tiny_server):
    r = httpx.post(
        tiny_server.base_url + "/v1/chat/completions", content=b'{"model": "tiny", "messages": [',
        headers={"content-type": "application/json"}, timeout=30,
    )  # fmt: skip
    assert "parse the JSON" in assert_openai_error(r, 400)["message"]
    r = httpx.post(tiny_server.base_url + "/v1/chat/completions", content=b"[1, 2]", timeout=30)
    assert_openai_error(r, 400)


def test_routing_errors_keep_the_openai_shape(tiny_server):
    assert_openai_error(httpx.get(tiny_server.base_url + "/v1/nothing"), 404)
    assert_openai_error(httpx.get(tiny_server.base_url + "/v1/chat/completions"), 405)


def test_unknown_model_is_a_404(tiny_server):
    """C3/D3: an unknown model never falls back to the base model."""
    assert_openai_error(
        post(tiny_server, {"model": "gpt-4", "messages": HI}), 404, param="model", code="model_not_found"
    )
    r = httpx.get(tiny_server.base_url + "/v1/models/gpt-4")
    assert_openai_error(r, 404, code="model_not_found")
    client = openai.OpenAI(base_url=tiny_server.base_url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=HI)


def test_server_keeps_serving_after_bad_input(tiny_server):
    for _ in range(3):
        post(tiny_server, {"model": MODEL, "messages": []})
    r = post(tiny_server, {"model": MODEL, "messages": HI, "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def _wait_for_log(server: ServerProcess, needle: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in server.log():
            return True
        time.sleep(0.1)
    return False


def test_client_disconnect_aborts_a_stream(tiny_server):
    """F1: closing a stream mid-way aborts its generation."""
    body = {"model": MODEL, "messages": HI, "max_tokens": 450, "stream": True, "temperature": 0}
    with httpx.stream("POST", tiny_server.base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        next(line for line in lines if line.startswith("data: "))
    request_id = json.loads(first.removeprefix("data: "))["id"]
    assert _wait_for_log(tiny_server, f"request {request_id} aborted")


def test_client_disconnect_aborts_a_non_streaming_request(tiny_server):
    before = tiny_server.log().count("aborted")
    with pytest.raises(httpx.ReadTimeout):
        body = {"model": MODEL, "messages": HI, "max_tokens": 480, "n": 8, "temperature": 1.0}
        httpx.post(tiny_server.base_url + "/v1/chat/completions", json=body, timeout=0.3)
    deadline = time.monotonic() + 10
    while tiny_server.log().count("aborted") == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tiny_server.log().count("aborted") > before
    assert "CancelledError" not in tiny_server.log()  # a client timeout is no server error


@pytest.fixture(scope="module")
def one_slot_server(default_checkpoint):
    """The default model with one batch slot and one waiting place: easy to fill. Keep-alive every 0.2 s."""
    server = ServerProcess(
        "--max-num-seqs", "1", "--max-waiting", "1", name="one-slot", env={"MYGPT_KEEPALIVE_S": "0.2"}
    ).wait_ready()
    yield server
    server.stop()


DEFAULT = "SmolLM2-135M-Instruct"
BLOCKER = {
    "model": DEFAULT,
    "messages": HI,
    "max_tokens": 240,
    "temperature": 0,
    "logit_bias": {"2": -100},
}  # no EOS; still running a second after it started however fast the CPU (60 tokens took 0.6 s here)


def metric_value(server, name: str) -> float:
    """An unlabelled sample of the server's /metrics (prometheus-client's own parser); 0 if absent."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.base_url + "/metrics").text
    samples = (s for family in text_string_to_metric_families(text) for s in family.samples)
    return next((s.value for s in samples if s.name == name and not s.labels), 0.0)


def in_background(server, body, running: int = 1, waiting: int = 0) -> tuple[threading.Thread, list]:
    """Sends body from a thread and returns once the server holds that many running and waiting
    requests (a fixed sleep raced the server's admission on a loaded machine)."""
    results: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: results.append(post(server, body)))
    thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (
        metric_value(server, "mygpt_num_requests_running") >= running
        and metric_value(server, "mygpt_num_requests_waiting") >= waiting
    ):
        time.sleep(0.02)
    return thread, results


def test_keep_alive_comments_while_waiting(one_slot_server):
    """A9: while a stream waits (here: queued behind a running request), SSE comments keep it alive."""
    thread, results = in_background(one_slot_server, BLOCKER)
    body = {"model": DEFAULT, "messages": HI, "max_tokens": 2, "stream": True}
    _, lines = sse_lines(one_slot_server, body)
    thread.join()
    assert ": keep-alive" in lines
    assert lines.index(": keep-alive") < max(i for i, line in enumerate(lines) if '"content":' in line)
    assert results[0].status_code == 200


def test_full_queue_is_a_429_with_retry_after(one_slot_server):
    """C3/F2: past the bounded queue, 429 at once, with Retry-After; accepted requests still finish."""
    running, results_a = in_background(one_slot_server, BLOCKER)
    waiting, results_b = in_background(one_slot_server, BLOCKER, waiting=1)
    t0 = time.monotonic()
    r = post(one_slot_server, {**BLOCKER, "stream": True})
    assert time.monotonic() - t0 < 2
    assert_openai_error(r, 429, code="rate_limit_exceeded")
    assert int(r.headers["retry-after"]) >= 1
    running.join()
    waiting.join()
    assert [x.status_code for x in results_a + results_b] == [200, 200]
