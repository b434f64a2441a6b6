"""The official openai SDK against `mygpt serve` running the real default model (A, B, C of the contract)."""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field
from test_wire import metric_value

MODEL = "SmolLM2-135M-Instruct"
ASK = [{"role": "user", "content": "Name three colors of the rainbow."}]


@pytest.fixture(scope="module")
def client(default_server):
    return openai.OpenAI(base_url=default_server.base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture
async def aclient(default_server):
    async with openai.AsyncOpenAI(
        base_url=default_server.base_url + "/v1", api_key="unused", max_retries=0
    ) as c:
        yield c


def test_models_lists_the_base_model(client):
    models = client.models.list()
    assert models.data[0].id == MODEL  # then the adapters make serve ships (adapters/default/)
    assert {m.id for m in models.data[1:]} == {"pirate", "json"}
    assert all(m.model_extra["parent"] == MODEL for m in models.data[1:])
    assert client.models.retrieve(MODEL).id == MODEL


def test_non_streaming_answer_is_real_text(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=40)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == MODEL
    assert choice.message.role == "assistant" and len(choice.message.content) > 10
    assert choice.finish_reason in ("stop", "length")
    u = r.usage
    assert (
        u.prompt_tokens > 5
        and 0 < u.completion_tokens <= 40
        and u.total_tokens == u.prompt_tokens + u.completion_tokens
    )


def test_streaming_chunks_follow_the_contract(client):
    """A2-A4 and A6 (with include_usage), through the SDK's own parser."""
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=ASK, temperature=0, max_tokens=12, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    body, last = chunks[:-1], chunks[-1]
    assert body[0].choices[0].delta.role == "assistant"  # A2
    assert {c.id for c in chunks} == {chunks[0].id} and {c.created for c in chunks} == {
        chunks[0].created
    }  # A3
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL for c in chunks)
    reasons = [c.choices[0].finish_reason for c in body]
    assert reasons[:-1] == [None] * (len(reasons) - 1) and reasons[-1] == "length"  # A4, A5
    assert last.choices == [] and last.usage.completion_tokens == 12  # A6
    assert all(c.usage is None for c in body)


def test_without_include_usage_no_chunk_has_usage(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, stream=True))
    assert chunks and all(c.usage is None for c in chunks) and all(c.choices for c in chunks)


def test_max_completion_tokens_wins_over_max_tokens(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, temperature=0, max_tokens=20, max_completion_tokens=3
    )
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_streamed_greedy_equals_non_streamed(client):
    """A7: same text, same usage (but for the prompt tokens the second found in the prefix cache)."""
    kw = dict(model=MODEL, messages=ASK, temperature=0, max_tokens=48)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content
    details = {"prompt_tokens_details"}
    assert chunks[-1].usage.model_dump(exclude=details) == full.usage.model_dump(exclude=details)


SYSTEM = {  # long enough (over 64 tokens) for the prefix cache to keep
    "role": "system",
    "content": "You are a patient teacher for children. Answer in short, plain sentences, one idea per "
    "sentence, without lists or headings. Prefer everyday words to technical ones, and when a "
    "technical word is needed, explain it right away. Never mention that you are an AI model. "
    "If a question is unclear, answer the most likely meaning and say which one you chose.",
}


def test_the_next_chat_turn_is_read_from_the_prefix_cache(client, default_server):
    """The conversation's earlier prompt is cached: the next turn computes less, says so in its usage
    (OpenAI's prompt_tokens_details.cached_tokens), and answers as it did the first time."""
    kw = dict(model=MODEL, temperature=0, max_tokens=24)
    first = client.chat.completions.create(messages=[SYSTEM, *ASK], **kw)
    turn2 = [SYSTEM, *ASK, first.choices[0].message.model_dump(include={"role", "content"})]
    turn2.append({"role": "user", "content": "Now name three animals."})

    def hits() -> float:
        assert (
            "mygpt_prefix_cache_queried_tokens_total" in httpx.get(default_server.base_url + "/metrics").text
        )
        return metric_value(default_server, "mygpt_prefix_cache_hit_tokens_total")

    before = hits()
    second = client.chat.completions.create(messages=turn2, **kw)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 64 <= cached <= first.usage.prompt_tokens and cached % 64 == 0  # the first turn's prompt
    assert hits() - before == cached
    again = client.chat.completions.create(
        messages=turn2, **kw, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(again)
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == second.choices[0].message.content
    )
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == (second.usage.prompt_tokens - 1) // 64 * 64


def test_stop_string_spanning_tokens_stops_and_never_leaks(client):
    """A8: pick a stop string from the greedy answer that crosses a token boundary."""
    kw = dict(model=MODEL, messages=ASK, temperature=0, max_tokens=48)
    text = client.chat.completions.create(**kw).choices[0].message.content
    words = text.split()
    stop = next(
        f"{a[-2:]} {b[:2]}" for a, b in zip(words[1:], words[2:], strict=False) if len(a) > 1 and len(b) > 1
    )
    cut = text.index(stop)
    chunks = list(client.chat.completions.create(**kw, stop=[stop, "zzzz"], stream=True))
    deltas = [c.choices[0].delta.content or "" for c in chunks]
    assert "".join(deltas) == text[:cut]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert not any(stop in d for d in deltas)
    r = client.chat.completions.create(**kw, stop=stop)
    assert r.choices[0].message.content == text[:cut] and r.choices[0].finish_reason == "stop"


@pytest.mark.anyio
async def test_async_client_streams_concurrently(aclient):
    async def one(i: int) -> str:
        stream = await aclient.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Count to {i + 3}."}],
            max_tokens=10,
            stream=True,
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    texts = await asyncio.gather(*(one(i) for i in range(6)))
    assert all(texts)
    r = await aclient.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5)
    assert r.choices[0].message.content


@pytest.mark.anyio
async def test_same_seed_same_output_alone_or_in_a_busy_batch(aclient):
    """B5, and E1 for the base model: greedy and seeded outputs do not depend on the batch."""
    seeded = dict(model=MODEL, messages=ASK, temperature=0.9, seed=1234, max_tokens=24)
    greedy = dict(model=MODEL, messages=ASK, temperature=0, max_tokens=24)
    # over 64 tokens: the second run would find the first's prompt in the prefix cache, but a seeded
    # request computes its whole prompt (reused keys and values equal recomputed ones up to rounding)
    long_seeded = dict(model=MODEL, messages=[SYSTEM, *ASK], temperature=0.9, seed=99, max_tokens=24)
    alone_seeded = (await aclient.chat.completions.create(**seeded)).choices[0].message.content
    alone_greedy = (await aclient.chat.completions.create(**greedy)).choices[0].message.content
    alone_long = (await aclient.chat.completions.create(**long_seeded)).choices[0].message.content
    noise = [
        aclient.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Tell me about the number {i}."}],
            max_tokens=32,
        )
        for i in range(10)
    ]
    results = await asyncio.gather(
        *noise,
        aclient.chat.completions.create(**seeded),
        aclient.chat.completions.create(**greedy),
        aclient.chat.completions.create(**long_seeded),
    )
    assert results[-3].choices[0].message.content == alone_seeded
    assert results[-2].choices[0].message.content == alone_greedy
    assert results[-1].choices[0].message.content == alone_long
    assert results[-1].usage.prompt_tokens_details.cached_tokens == 0


def test_n_choices(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, n=3, temperature=1.0, seed=5, max_tokens=12)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens <= 3 * 12 and r.usage.completion_tokens >= 3
    assert len({c.message.content for c in r.choices}) > 1
    # a question with a long answer, seeded: "three colors" can end on EOS within 6 tokens ("stop",
    # seen in CI with unseeded sampling)
    long = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=long, n=2, max_tokens=6, seed=7, stream=True)
    )
    for i in range(2):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason == "length"


def test_logprobs_are_returned(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for lp in content:
        assert lp.logprob <= 0 and len(lp.top_logprobs) == 3
        assert lp.top_logprobs[0].logprob >= lp.logprob - 1e-6  # greedy picks the best


def test_logprobs_end_where_a_stop_string_cuts_the_text(client):
    """The answer's logprobs are its tokens' (their bytes join into the content), not those of the
    stop string that ended it, streamed or not; the legacy completions' text offsets stay in the text."""
    kw = {"model": MODEL, "messages": ASK, "temperature": 0, "max_tokens": 30, "logprobs": True}
    tokens = [bytes(lp.bytes) for lp in client.chat.completions.create(**kw).choices[0].logprobs.content]
    full = b"".join(tokens).decode()
    k = next(  # a stop string of three whole tokens that first occurs where they stand
        k
        for k in range(3, len(tokens) - 3)
        if full.find(b"".join(tokens[k : k + 3]).decode()) == len(b"".join(tokens[:k]).decode())
    )
    stop = b"".join(tokens[k : k + 3]).decode()
    r = client.chat.completions.create(**kw, stop=[stop]).choices[0]
    assert r.finish_reason == "stop" and r.message.content == b"".join(tokens[:k]).decode()
    assert [bytes(lp.bytes) for lp in r.logprobs.content] == tokens[:k]
    chunks = list(client.chat.completions.create(**kw, stop=[stop], stream=True))
    lps = [lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert [bytes(lp.bytes) for lp in lps] == tokens[:k]
    prompt = "The colors of the rainbow are"
    legacy = {"model": MODEL, "prompt": prompt, "temperature": 0, "max_tokens": 20, "logprobs": 1}
    text = client.completions.create(**legacy).choices[0].text
    stop = text[len(text) // 2 :]
    cut = client.completions.create(**legacy, stop=[stop]).choices[0]
    assert cut.text == text[: text.find(stop)] != ""
    assert max(cut.logprobs.text_offset) < len(cut.text)  # each token starts in the text


def test_penalties_and_logit_bias_are_honoured(client, tokenizer):
    kw = dict(model=MODEL, messages=ASK, temperature=0, max_tokens=30)
    plain = client.chat.completions.create(**kw).choices[0].message.content
    penalised = client.chat.completions.create(**kw, frequency_penalty=2.0, presence_penalty=2.0)
    assert penalised.choices[0].message.content != plain
    (banana,) = tokenizer.encode(" banana", add_special_tokens=False)
    forced = client.chat.completions.create(**{**kw, "max_tokens": 3}, logit_bias={str(banana): 100})
    assert forced.choices[0].message.content == " banana" * 3


def test_vllms_sampling_extras_are_honoured(client):
    """top_k, min_p and repetition_penalty (vLLM's, which Open WebUI and LiteLLM send in extra_body):
    top_k 1 and min_p 1 keep only the likeliest token, so they draw the greedy answer at temperature
    1.5; repetition_penalty changes the greedy answer; the completions endpoint takes them too."""
    kw = dict(model=MODEL, messages=ASK, max_tokens=30)
    greedy = client.chat.completions.create(**kw, temperature=0).choices[0].message.content
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        drawn = client.chat.completions.create(**kw, temperature=1.5, seed=3, extra_body=extra)
        assert drawn.choices[0].message.content == greedy, extra
    wild = client.chat.completions.create(**kw, temperature=1.5, seed=3).choices[0].message.content
    assert wild != greedy  # what the two above would have drawn without them
    repeated = client.chat.completions.create(**kw, temperature=0, extra_body={"repetition_penalty": 1.5})
    assert repeated.choices[0].message.content != greedy
    text = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    top1 = client.completions.create(
        model=MODEL,
        prompt="The capital of France is",
        max_tokens=8,
        temperature=1.5,
        seed=3,
        extra_body={"top_k": 1},
    )
    assert top1.choices[0].text == text.choices[0].text


def test_vllms_ending_extras_are_honoured(client, tokenizer):
    """ignore_eos (vLLM's benchmarks send it), min_tokens and stop_token_ids, with EOS or a word made the
    only likely token by logit_bias; min_tokens over max_tokens is a 400 naming it."""
    eos = tokenizer.eos_token_id
    kw = dict(model=MODEL, messages=ASK, temperature=0, max_tokens=6, logit_bias={str(eos): 100})

    def ends(**extra):
        r = client.chat.completions.create(**kw, extra_body=extra)
        return r.usage.completion_tokens, r.choices[0].finish_reason, r.choices[0].message.content

    assert ends() == (1, "stop", "")
    assert ends(ignore_eos=True)[:2] == (6, "length")
    assert ends(min_tokens=3)[:2] == (4, "stop")  # three other tokens, then EOS
    (banana,) = tokenizer.encode(" banana", add_special_tokens=False)
    word = {**kw, "logit_bias": {str(banana): 100}}
    r = client.chat.completions.create(**word, extra_body={"stop_token_ids": [banana]})
    assert (r.usage.completion_tokens, r.choices[0].finish_reason, r.choices[0].message.content) == (
        1,
        "stop",
        "",
    )
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**kw, extra_body={"min_tokens": 7})
    assert err.value.body["param"] == "min_tokens"


def test_unknown_fields_are_ignored(default_server):
    """B1: at the top level and inside messages."""
    body = {
        "model": MODEL, "max_tokens": 3, "some_future_field": {"x": 1},
        "messages": [{"role": "user", "content": "Hi", "weird": True}],
    }  # fmt: skip
    r = httpx.post(default_server.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert "tool_calls" not in r.json()["choices"][0]["message"]  # left out, as OpenAI does (not null)


class Rainbow(BaseModel):
    colors: list[Literal["red", "orange", "yellow", "green", "blue", "indigo", "violet"]] = Field(
        max_length=3
    )


def test_structured_output_parses_into_the_callers_model(client):
    """response_format json_schema, as the SDK's parse() sends it (strict, from a pydantic model)."""
    r = client.chat.completions.parse(
        model=MODEL, messages=ASK, response_format=Rainbow, temperature=0, max_completion_tokens=120
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(choice.message.parsed, Rainbow) and choice.message.parsed.colors


def test_json_mode_streams_one_json_object(client):
    ask = [
        {"role": "user", "content": "Give me a JSON object with two keys, name and age, for Tom who is 3."}
    ]
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=ask, temperature=0, max_tokens=120, stream=True,
            response_format={"type": "json_object"},
        )
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop", text
    assert isinstance(json.loads(text), dict) and text.startswith("{")  # no ```json fence, no prose


def test_an_invalid_schema_is_a_400_naming_response_format(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "objekt"}}}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=ASK, response_format=fmt)
    assert err.value.body["param"] == "response_format" and "objekt" in err.value.body["message"]


TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                       "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "Current time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                       "required": ["city"], "additionalProperties": False}}},
]  # fmt: skip
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_a_forced_tool_call_comes_back_as_tool_calls(client):
    """tool_choice "required" (any tool) or a named function: one call, its arguments valid for the
    tool's parameters, finish_reason "tool_calls"; then the conversation goes on with the result."""
    r = client.chat.completions.create(
        model=MODEL, messages=WEATHER, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=80
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    args = json.loads(call.function.arguments)
    assert call.function.name in ("get_weather", "get_time") and call.id.startswith("call_")
    assert isinstance(args["city"], str) and len(args["city"]) <= 30
    named = {"type": "function", "function": {"name": "get_time"}}
    r = client.chat.completions.create(
        model=MODEL, messages=WEATHER, tools=TOOLS, tool_choice=named, temperature=0, max_tokens=80
    )
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "get_time" and set(json.loads(call.function.arguments)) == {"city"}
    follow = [
        *WEATHER,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "It is 14:05 in Paris."},
    ]
    r = client.chat.completions.create(model=MODEL, messages=follow, temperature=0, max_tokens=20)
    assert r.choices[0].message.content and r.choices[0].message.tool_calls is None


def test_the_deprecated_function_calling_is_served(client):
    """functions / function_call, which older clients still send (LangChain's OpenAI-functions agents):
    a named call comes back as message.function_call with finish_reason "function_call" (no tool_calls);
    the conversation goes on with the assistant's function_call and a role "function" result; "auto"
    answers with one call or with text; streamed, the call arrives whole in one delta."""
    functions = [t["function"] for t in TOOLS]
    named = {"name": "get_time"}
    r = client.chat.completions.create(
        model=MODEL, messages=WEATHER, functions=functions, function_call=named, temperature=0, max_tokens=80
    )
    choice = r.choices[0]
    assert choice.finish_reason == "function_call" and choice.message.content is None
    assert choice.message.tool_calls is None
    call = choice.message.function_call
    assert call.name == "get_time" and set(json.loads(call.arguments)) == {"city"}
    follow = [
        *WEATHER,
        {"role": "assistant", "content": None, "function_call": call.model_dump()},
        {"role": "function", "name": "get_time", "content": "It is 14:05 in Paris."},
    ]
    r = client.chat.completions.create(
        model=MODEL, messages=follow, functions=functions, function_call="none", temperature=0, max_tokens=20
    )
    assert r.choices[0].message.content and r.choices[0].message.function_call is None
    assert r.choices[0].finish_reason in ("stop", "length")
    r = client.chat.completions.create(
        model=MODEL, messages=WEATHER, functions=functions, temperature=0, max_tokens=60
    )  # "auto" by default
    auto = r.choices[0]
    assert auto.message.tool_calls is None
    assert (auto.finish_reason == "function_call") == (auto.message.function_call is not None)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=WEATHER,
            functions=functions,
            function_call=named,
            temperature=0,
            max_tokens=80,
            stream=True,
        )  # fmt: skip
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [d.function_call for d in deltas if d.function_call]
    assert len(calls) == 1 and calls[0].name == "get_time" and calls[0].arguments == call.arguments
    assert not any(d.tool_calls for d in deltas) and chunks[-1].choices[0].finish_reason == "function_call"


def test_a_streamed_tool_call_arrives_whole_in_one_delta(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=WEATHER, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=80,
            stream=True,
        )
    )  # fmt: skip
    calls = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(calls) == 1 and chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)  # the call is not also text
    json.loads(calls[0][0].function.arguments)


def test_a_tool_call_cut_by_max_tokens_comes_back_as_a_cut_call(client):
    """As OpenAI returns it: tool_calls with the arguments as far as they came and finish_reason
    "length", streamed or not; never the call's wrapper as the message's text."""
    ask = {"model": MODEL, "messages": WEATHER, "tools": TOOLS, "tool_choice": "required", "temperature": 0}
    [whole] = client.chat.completions.create(**ask, max_tokens=80).choices[0].message.tool_calls
    cut = client.chat.completions.create(**ask, max_tokens=12).choices[0]
    assert cut.finish_reason == "length" and cut.message.content is None
    [call] = cut.message.tool_calls
    assert call.function.name == whole.function.name and call.id.startswith("call_")
    assert call.function.arguments and whole.function.arguments.startswith(call.function.arguments)
    assert len(call.function.arguments) < len(whole.function.arguments)
    chunks = list(client.chat.completions.create(**ask, max_tokens=12, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not any(d.content for d in deltas) and chunks[-1].choices[0].finish_reason == "length"
    [[streamed]] = [d.tool_calls for d in deltas if d.tool_calls]
    assert streamed.function.arguments == call.function.arguments
    legacy = client.chat.completions.create(
        model=MODEL, messages=WEATHER, functions=[t["function"] for t in TOOLS], temperature=0,
        function_call={"name": whole.function.name}, max_tokens=12,
    ).choices[0]  # fmt: skip
    assert legacy.finish_reason == "length" and legacy.message.function_call.name == whole.function.name


def test_tools_with_a_response_format_answer_with_a_call_or_json_of_it(client, tokenizer):
    """OpenAI takes both (the Agents SDK sends both for an agent with tools and an output type): "auto"
    answers with a call or with JSON of the format, streamed or not; a forced call is the answer, and
    stop strings, which would cut it, are left out; the Responses API takes tools and text.format."""
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}}
    # steered into the format's answer: its first tokens ('{"', 'city') favoured
    answer = dict.fromkeys(tokenizer.encode('{"city', add_special_tokens=False), 100)
    ask = {"model": MODEL, "messages": WEATHER, "tools": TOOLS, "response_format": fmt, "temperature": 0}
    for bias in (None, answer):
        choice = client.chat.completions.create(**ask, max_tokens=150, logit_bias=bias).choices[0]
        assert bias is None or choice.message.content  # the steered one: the format's answer
        if choice.message.tool_calls:  # (tagged blocks, one after another, may run to max_tokens)
            assert choice.finish_reason in ("tool_calls", "length") and choice.message.content is None
            json.loads(choice.message.tool_calls[0].function.arguments)
        else:  # the format's JSON, and nothing else
            assert choice.finish_reason == "stop" and set(json.loads(choice.message.content)) == {"city"}
        chunks = list(client.chat.completions.create(**ask, max_tokens=150, logit_bias=bias, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(d.content or "" for d in deltas) == (choice.message.content or "")
        assert [c.function.arguments for d in deltas for c in d.tool_calls or []] == [
            c.function.arguments for c in choice.message.tool_calls or []
        ]
    forced = client.chat.completions.create(
        **ask, tool_choice="required", stop=["}", ","], max_tokens=80
    ).choices[0]  # (with stop strings that every call holds)
    assert forced.finish_reason == "tool_calls" and json.loads(
        forced.message.tool_calls[0].function.arguments
    )
    r = client.responses.create(
        model=MODEL, input="What is the weather in Paris?", max_output_tokens=60, temperature=0,
        tools=[{"type": "function", **{k: v for k, v in t["function"].items()}} for t in TOOLS],
        text={"format": {"type": "json_schema", "name": "place", "schema": schema, "strict": True}},
    )  # fmt: skip
    assert r.output[-1].type in ("function_call", "message")  # (incomplete: calls up to max tokens)


def answer_kind(choice) -> str:
    """ "call" or "text", after checking the choice is wholly one of them."""
    if choice.message.tool_calls:
        [call] = choice.message.tool_calls
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert call.function.name in ("get_weather", "get_time")
        assert isinstance(json.loads(call.function.arguments)["city"], str)
        return "call"
    assert choice.message.content and choice.finish_reason in ("stop", "length")
    return "text"


def test_tool_choice_auto_answers_with_a_call_or_with_text(client, tokenizer):
    """tools without tool_choice ("auto"): the model chooses; its first character decides. A logit_bias
    on its first token steers the choice both ways; each way comes back whole and in its own shape."""
    r = client.chat.completions.create(
        model=MODEL, messages=WEATHER, tools=TOOLS, temperature=0, max_tokens=60
    )
    assert answer_kind(r.choices[0]) in ("call", "text")
    brace, the = tokenizer.convert_tokens_to_ids("{"), tokenizer.encode("The", add_special_tokens=False)[0]
    for bias, want in (({brace: 100}, "call"), ({the: 100}, "text")):
        r = client.chat.completions.create(
            model=MODEL, messages=WEATHER, tools=TOOLS, tool_choice="auto", temperature=0, max_tokens=60,
            logit_bias=bias,
        )  # fmt: skip
        assert answer_kind(r.choices[0]) == want
        chunks = list(
            client.chat.completions.create(
                model=MODEL, messages=WEATHER, tools=TOOLS, temperature=0, max_tokens=60, logit_bias=bias,
                stream=True,
            )
        )  # fmt: skip
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        calls = [d.tool_calls for d in deltas if d.tool_calls]
        text = "".join(d.content or "" for d in deltas)
        if want == "call":  # held back, then one delta with the whole call, and no text
            assert len(calls) == 1 and not text and chunks[-1].choices[0].finish_reason == "tool_calls"
            assert calls[0][0].function.arguments == r.choices[0].message.tool_calls[0].function.arguments
        else:  # text streams as it comes
            assert not calls and text == r.choices[0].message.content
            assert sum(bool(d.content) for d in deltas) > 1


def test_stray_tool_messages_are_400s(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "tool", "tool_call_id": "x", "content": "hi"}], max_tokens=5
        )
    assert err.value.body["param"] == "messages.[0].role"
    r = client.chat.completions.create(
        model=MODEL, messages=WEATHER, tools=TOOLS, tool_choice="none", max_tokens=5
    )
    assert r.choices[0].message.content and r.choices[0].message.tool_calls is None


def test_the_responses_api_on_a_real_server(client):
    """client.responses (what the Agents SDK and newer clients call): an answer, a conversation
    continued by previous_response_id, and the stream the SDK accumulates, on the default model."""
    r = client.responses.create(
        model=MODEL, instructions="You are a helpful assistant.", input="What is the capital of France?",
        max_output_tokens=60, temperature=0,
    )  # fmt: skip
    assert r.status == "completed" and "Paris" in r.output_text
    chat = client.chat.completions.create(
        model=MODEL, max_tokens=60, temperature=0,
        messages=[{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "What is the capital of France?"}],
    )  # fmt: skip
    assert r.output_text == chat.choices[0].message.content
    follow = client.responses.create(
        model=MODEL, previous_response_id=r.id, input="And of Italy?", max_output_tokens=40, temperature=0
    )
    assert follow.status == "completed" and follow.output_text
    with client.responses.stream(model=MODEL, input="What is the capital of France?", max_output_tokens=60,
                                 temperature=0) as stream:  # fmt: skip
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text and final.usage.output_tokens > 0
