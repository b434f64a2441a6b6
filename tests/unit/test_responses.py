"""The Responses API through the openai SDK (in process, the tiny model): each answer equals the chat
completion of the same conversation; the stream's events are what the SDK's responses.stream reads;
stored responses continue conversations (previous_response_id); function tools, text.format; what
this server cannot do is a 400 naming it."""

from __future__ import annotations

import json
import sqlite3

import openai
import pytest
from test_app import sdk_for, served_state  # noqa: F401 - served_state: the fixture

from mygpt.api.responses import ResponseStore, SharedResponses
from mygpt.finetune.store import Store

pytestmark = pytest.mark.anyio
TOOLS = [{
    "type": "function", "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
                   "additionalProperties": False},
}]  # fmt: skip


@pytest.fixture
def sdk(served_state):  # noqa: F811
    return sdk_for(served_state)


async def test_an_answer_is_the_chat_completion_of_the_same_conversation(sdk):
    r = await sdk.responses.create(
        model="tiny", instructions="Be brief.", input="Hello there", max_output_tokens=12, temperature=0
    )
    chat = await sdk.chat.completions.create(
        model="tiny", max_tokens=12, temperature=0,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
    )  # fmt: skip
    assert r.object == "response" and r.id.startswith("resp_") and r.model == "tiny"
    assert r.output_text == chat.choices[0].message.content
    assert (r.usage.input_tokens, r.usage.output_tokens) == (
        chat.usage.prompt_tokens,
        chat.usage.completion_tokens,
    )
    assert r.usage.total_tokens == chat.usage.total_tokens
    (message,) = r.output
    assert (
        message.type == "message" and message.role == "assistant" and message.content[0].type == "output_text"
    )
    if chat.choices[0].finish_reason == "length":  # the tiny model's random weights rarely end early
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    else:
        assert r.status == "completed" and r.incomplete_details is None
    assert r.instructions == "Be brief." and r.max_output_tokens == 12 and r.temperature == 0


async def test_the_stream_is_what_the_sdk_accumulates_and_equals_the_answer(sdk):
    whole = await sdk.responses.create(model="tiny", input="Hi", max_output_tokens=40, temperature=0)
    kinds, seqs = [], []
    async with sdk.responses.stream(model="tiny", input="Hi", max_output_tokens=40, temperature=0) as stream:
        async for ev in stream:
            kinds.append(ev.type)
            seqs.append(ev.sequence_number)
        # the SDK's final response is a completed one's; an incomplete one is the last event's
        final = await stream.get_final_response() if ev.type == "response.completed" else ev.response
    assert seqs == list(range(len(seqs)))
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]  # fmt: skip
    assert "response.output_text.delta" in kinds
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed" if whole.status == "completed" else "response.incomplete"]  # fmt: skip
    assert final.status == whole.status and final.output_text == whole.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens


async def test_a_stream_cut_by_max_output_tokens_ends_incomplete(sdk):
    body = {"model": "tiny", "input": "Hi", "max_output_tokens": 3, "temperature": 0, "stream": True}
    events = [ev async for ev in await sdk.responses.create(**body)]
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert events[-1].response.usage.output_tokens == 3


async def test_previous_response_id_continues_the_stored_conversation(sdk):
    first = await sdk.responses.create(model="tiny", input="Hello", max_output_tokens=6, temperature=0)
    second = await sdk.responses.create(
        model="tiny", previous_response_id=first.id, input="And then?", max_output_tokens=6, temperature=0
    )
    chat = await sdk.chat.completions.create(
        model="tiny", max_tokens=6, temperature=0,
        messages=[{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first.output_text},
                  {"role": "user", "content": "And then?"}],
    )  # fmt: skip
    assert second.output_text == chat.choices[0].message.content
    assert second.previous_response_id == first.id
    items = (await sdk.responses.input_items.list(second.id)).data  # its own input, not the history's
    assert [(i.type, i.role, i.content[0].text) for i in items] == [("message", "user", "And then?")]
    assert (await sdk.responses.retrieve(first.id)).output_text == first.output_text
    await sdk.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.retrieve(first.id)
    with pytest.raises(openai.BadRequestError) as err:
        await sdk.responses.create(model="tiny", previous_response_id=first.id, input="x")
    assert err.value.body["param"] == "previous_response_id"
    unstored = await sdk.responses.create(model="tiny", input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.retrieve(unstored.id)


async def test_function_tools_call_and_take_their_output(sdk):
    r = await sdk.responses.create(
        model="tiny",
        input="Weather in Paris?",
        tools=TOOLS,
        tool_choice="required",
        temperature=0,
        max_output_tokens=80,
    )
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id
    assert isinstance(json.loads(call.arguments)["city"], str)
    answer = await sdk.responses.create(
        model="tiny", previous_response_id=r.id, tools=TOOLS, max_output_tokens=5,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}],
    )  # fmt: skip
    assert answer.output[0].type in ("message", "function_call")
    (item,) = (await sdk.responses.input_items.list(answer.id)).data
    assert (item.type, item.call_id, item.output) == ("function_call_output", call.call_id, "sunny, 21 C")
    asked = await sdk.responses.create(
        model="tiny", max_output_tokens=2,
        input=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
               {"type": "function_call", "call_id": "call_9", "name": "get_weather", "arguments": "{}"},
               {"type": "function_call_output", "call_id": "call_9", "output": "rain"}],
    )  # fmt: skip
    items = (await sdk.responses.input_items.list(asked.id, order="asc")).data
    assert [i.type for i in items] == ["message", "message", "function_call", "function_call_output"]
    empty = await sdk.responses.create(
        model="tiny", max_output_tokens=2, input=[{"role": "user", "content": ""}]
    )
    assert [i.content[0].text for i in (await sdk.responses.input_items.list(empty.id)).data] == [""]
    page = await sdk.responses.input_items.list(asked.id, order="asc", limit=2, after=items[0].id)
    assert [i.id for i in page.data] == [items[1].id, items[2].id] and page.has_more
    streamed = [e async for e in await sdk.responses.create(model="tiny", input="Weather?", tools=TOOLS,
                                                            tool_choice="required", stream=True, temperature=0,
                                                            max_output_tokens=80)]  # fmt: skip
    done = [e.item for e in streamed if e.type == "response.output_item.done"]
    assert [i.type for i in done] == ["function_call"] and json.loads(done[0].arguments)
    assert (
        streamed[-1].type == "response.completed"
        and streamed[-1].response.output[0].call_id == done[0].call_id
    )


async def test_text_format_json_schema_is_followed(sdk):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}  # fmt: skip
    r = await sdk.responses.create(
        model="tiny", input="A number", max_output_tokens=40,
        text={"format": {"type": "json_schema", "name": "num", "schema": schema, "strict": True}},
    )  # fmt: skip
    if r.status == "completed":
        assert isinstance(json.loads(r.output_text)["n"], int)
    assert r.text.format.type == "json_schema"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"reasoning": {"effort": "extreme"}}, "reasoning.effort"),
        ({"reasoning": {"generate_summary": "auto"}}, "reasoning.generate_summary"),
        ({"background": True}, "background"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"truncation": "auto"}, "truncation"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        (
            {
                "input": [
                    {"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}
                ]
            },
            "input[0].content[0]",
        ),
        ({"input": [{"type": "file_search_call", "id": "fs_1"}]}, "input[0].type"),
        ({"max_output_tokens": 10**6}, "max_output_tokens"),
        ({"tool_choice": {"type": "function", "name": "nope"}, "tools": TOOLS}, "tool_choice"),
        ({"temperature": 3}, "temperature"),
        ({"text": {"verbosity": "low"}}, "text.verbosity"),
        ({"stream_options": {"include_obfuscation": False}}, "stream_options"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"tools": [{**TOOLS[0], "name": "bad name!"}]}, "tools[0].name"),
        (
            {"input": [{"type": "function_call_output", "call_id": "call_1", "output": "21 C"}]},
            "input[0].call_id",
        ),
        (
            {"input": [{"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{oops"}]},
            "input[0].arguments",
        ),
        ({"input": [{"type": "function_call", "call_id": "call_1", "arguments": "{}"}]}, "input[0].name"),
    ],
)
async def test_what_this_server_cannot_do_is_a_400_naming_it(sdk, body, param):
    with pytest.raises(openai.BadRequestError) as err:
        await sdk.responses.create(**{"model": "tiny", "input": "Hi", **body})
    assert err.value.body["param"] == param, err.value.body


@pytest.mark.parametrize("kind", ["memory", "shared"])
def test_stored_responses_are_per_tenant_and_bounded(kind, tmp_path):
    """Each tenant's newest within a count and a byte budget: one tenant's flood forgets its own
    oldest, never another's; another tenant's id (or an admin's unknown one) is not found. In memory,
    and in the server's SQLite store."""
    if kind == "memory":
        store = ResponseStore(limit=2, budget=10_000)
    else:
        store = SharedResponses(Store(tmp_path), limit=2, budget=10_000)
    store.put("globex", {"id": "resp_g"}, [])
    for i in range(3):
        store.put("acme", {"id": f"resp_{i}"}, [])
    assert store.get("acme", "resp_0") is None and store.get("acme", "resp_2") is not None
    assert store.get("globex", "resp_g") is not None  # acme's flood left it alone
    assert store.get("globex", "resp_2") is None and not store.delete("globex", "resp_2")
    assert not store.delete("", "resp_missing")  # an admin key's space
    assert store.delete("acme", "resp_2") and store.get("acme", "resp_2") is None
    big = [{"role": "user", "content": "x" * 6_000}]
    store.put("acme", {"id": "resp_big1"}, big)
    store.put("acme", {"id": "resp_big2"}, big)  # past the 10,000 bytes: the oldest goes
    assert store.get("acme", "resp_big1") is None and store.get("acme", "resp_big2") is not None


async def test_a_grammar_that_breaks_while_generating_names_text_format_or_tools(sdk, monkeypatch):
    """A 400 found after the request was accepted (the engine's grammar failing at the first token)
    names the Responses parameter, not the chat one it became: text.format, or tools."""
    from mygpt.engine.guided import Guide

    monkeypatch.setattr(Guide, "advance", lambda self, token: False)
    fmt = {"format": {"type": "json_object"}}
    for extra, param in (
        ({"text": fmt}, "text.format"),
        ({"tools": TOOLS, "tool_choice": "required"}, "tools"),
    ):
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as err:
                await sdk.responses.create(
                    model="tiny", input="Hi", max_output_tokens=8, stream=stream, **extra
                )
            assert err.value.body["param"] == param and "response_format" not in err.value.message


async def test_retrieving_a_stored_response_as_a_stream_is_refused(sdk):
    r = await sdk.responses.create(model="tiny", input="Hi", max_output_tokens=2)
    with pytest.raises(openai.BadRequestError) as err:
        await sdk.responses.retrieve(r.id, stream=True)
    assert err.value.body["param"] == "stream"


async def test_a_conversation_goes_on_after_a_restart_with_the_servers_store(served_state, tmp_path):  # noqa: F811
    """With the server's store (fine-tuning on, the default), stored responses are in SQLite: a new
    process (or another replica sharing the store) continues the conversation, lists its input
    items and deletes it."""
    served_state.finetune_store = Store(tmp_path)
    sdk = sdk_for(served_state)
    first = await sdk.responses.create(
        model="tiny", input="Name a colour.", max_output_tokens=4, temperature=0
    )
    served_state.responses = None  # as a restarted server has nothing in memory
    again = await sdk.responses.retrieve(first.id)
    assert again.output_text == first.output_text
    second = await sdk.responses.create(
        model="tiny",
        input="And another one?",
        previous_response_id=first.id,
        max_output_tokens=4,
        temperature=0,
    )
    served_state.responses = None
    items = await sdk.responses.input_items.list(second.id)
    assert [i.content[0].text for i in items.data] == ["And another one?"]
    assert (await sdk.responses.delete(second.id)) is None
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.retrieve(second.id)


async def test_a_store_that_fails_does_not_take_the_answer_with_it(served_state, tmp_path, monkeypatch):  # noqa: F811
    """The store's write fails (a lock held too long, a full disk): the answer still arrives, streamed
    (response.completed) or not, marked store: false."""
    served_state.finetune_store = Store(tmp_path)
    sdk = sdk_for(served_state)

    def broken(*args, **kwargs):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(served_state.finetune_store, "put_response", broken)
    answer = await sdk.responses.create(model="tiny", input="Hi", max_output_tokens=3, temperature=0)
    assert answer.status in ("completed", "incomplete") and answer.store is False
    stream = await sdk.responses.create(
        model="tiny", input="Hi", max_output_tokens=3, temperature=0, stream=True
    )
    events = [e async for e in stream]
    final = events[-1].response  # response.completed, or response.incomplete at max_output_tokens
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert final.store is False and final.output_text == answer.output_text


async def test_before_ready_the_stored_responses_wait_for_the_store(served_state):  # noqa: F811
    """A request while the server starts (its store not open yet) is a 503, and does not leave the
    server on the in-memory store for good."""
    served_state.ready = False
    with pytest.raises(openai.InternalServerError) as err:
        await sdk_for(served_state).responses.retrieve("resp_x")
    assert err.value.status_code == 503 and served_state.responses is None
