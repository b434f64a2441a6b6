"""Tool calls (api/tools.py): what a call may be, "auto"'s choice between a call and text, and which
requests are refused before any work."""

from __future__ import annotations

import json

import openai
import pytest
from pydantic import BaseModel

from mygpt.api import tools
from mygpt.api.errors import APIError
from mygpt.api.protocol import ChatCompletionRequest
from mygpt.engine.guided import Grammars

HI = [{"role": "user", "content": "hi"}]


class Loc(BaseModel):
    city: str
    country: str


class GetWeather(BaseModel):
    """The weather at a place."""

    where: Loc  # nested: the SDK's schema refers to "#/$defs/Loc"
    days: int


def request(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=HI, **kw)


def test_nested_parameters_keep_their_references(tokenizer):
    """The parameters move under the call's "arguments": their "#/$defs/..." must move with them
    (a 400 'Pointer does not exist' for any nested pydantic model before)."""
    tool = openai.pydantic_function_tool(GetWeather)
    other = {
        "type": "function",
        "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}},
    }
    grammars = Grammars(tokenizer, len(tokenizer))
    for choice, listed in (("required", [tool]), ("required", [tool, other])):
        plan = tools.plan(request(tools=listed, tool_choice=choice))
        schema = plan.schema()
        assert "#/$defs/Loc" not in json.dumps(schema)
        grammars.json(schema)  # compiles


@pytest.mark.parametrize(
    "kw, param",
    [
        ({"tool_choice": {"type": "function", "function": "get"}}, "tool_choice"),  # was a 500
        ({"tool_choice": {"type": "function", "function": None}}, "tool_choice"),  # was a 500
        ({"tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
    ],
)
def test_bad_tool_requests_are_400s(kw, param):
    get = {
        "type": "function",
        "function": {"name": "get", "parameters": {"type": "object", "properties": {}}},
    }
    with pytest.raises(APIError) as err:
        tools.plan(request(tools=[get], **kw))
    assert err.value.status == 400 and err.value.info.param == param


def test_allowed_tools_choose_among_some_of_the_tools():
    """tool_choice {"type": "allowed_tools", ...}: the mode over the tools it lists; other shapes and
    types are 400s that say what is supported (it said "names no tool" before)."""
    go = {"type": "function", "function": {"name": "go"}}
    allowed = {"mode": "required", "tools": [{"type": "function", "function": {"name": "go"}}]}
    plan = tools.plan(
        request(tools=[GET, go], tool_choice={"type": "allowed_tools", "allowed_tools": allowed})
    )
    assert not plan.auto and [t.function.name for t in plan.tools] == ["go"]
    auto = tools.plan(
        request(
            tools=[GET, go],
            tool_choice={"type": "allowed_tools", "allowed_tools": {**allowed, "mode": "auto"}},
        )
    )
    assert auto.auto and [t.function.name for t in auto.tools] == ["go"]
    for bad, param in (
        ({**allowed, "mode": "any"}, "tool_choice.allowed_tools"),
        ({**allowed, "tools": []}, "tool_choice.allowed_tools"),
        (
            {**allowed, "tools": [{"type": "function", "function": {"name": "nope"}}]},
            "tool_choice.allowed_tools.tools.[0]",
        ),
    ):
        with pytest.raises(APIError) as err:
            tools.plan(request(tools=[GET, go], tool_choice={"type": "allowed_tools", "allowed_tools": bad}))
        assert err.value.info.param == param
    from mygpt.api.responses import _param, _tool_choice  # the Responses API's shape of the same

    assert _param("tool_choice.allowed_tools.tools.[0]") == "tool_choice.tools[0]"  # its own names

    responses = {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "go"}]}
    assert _tool_choice(responses) == {"type": "allowed_tools", "allowed_tools": allowed}
    for choice in ("any", {"type": "custom", "custom": {"name": "x"}}):
        with pytest.raises(APIError, match="is not supported") as err:
            tools.plan(request(tools=[GET], tool_choice=choice))
        assert err.value.info.param == "tool_choice"


def test_tools_must_be_distinct_objects():
    get = {"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}
    with pytest.raises(APIError, match="different names"):
        tools.plan(request(tools=[get, get], tool_choice="required"))
    scalar = {"type": "function", "function": {"name": "s", "parameters": {"type": "string"}}}
    with pytest.raises(APIError) as err:
        tools.plan(request(tools=[scalar], tool_choice="required"))
    assert err.value.info.param == "tools.[0].function.parameters"


def test_the_tools_join_the_clients_own_system_message():
    """Templates that take one system message at the start (or none) keep working."""
    get = tools.ToolPlan([request(tools=[{"type": "function", "function": {"name": "get"}}]).tools[0]])
    merged = tools.with_tools([{"role": "system", "content": "Be brief."}, *HI], get)
    assert (
        len(merged) == 2 and merged[0]["content"].startswith("Be brief.") and '"get"' in merged[0]["content"]
    )
    assert tools.with_tools(list(HI), get)[0]["role"] == "system"
    assert "plain text" not in merged[0]["content"]  # forced: a call is the only answer
    auto = tools.ToolPlan(get.tools, auto=True)
    assert "plain text" in tools.with_tools(list(HI), auto)[0]["content"]


def test_a_call_with_a_non_json_number_is_no_call():
    assert tools.parse_call('{"name": "get", "arguments": {"x": 1e999}}') is None
    call = tools.parse_call('{"name": "get", "arguments": {"x": 1}}')
    assert call.function.name == "get" and json.loads(call.function.arguments) == {"x": 1}


GET = {"type": "function", "function": {"name": "get", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("choice", [None, "auto"])
def test_auto_is_the_default_with_tools_and_takes_stop_strings(choice):
    kw = {} if choice is None else {"tool_choice": choice}
    plan = tools.plan(request(tools=[GET], stop=["\n\n"], **kw))
    assert plan.auto and [t.function.name for t in plan.tools] == ["get"]
    assert not tools.plan(request(tools=[GET], tool_choice="required")).auto
    assert tools.plan(request(tools=[GET], tool_choice="none")) is None


def test_auto_answers_are_calls_or_text_by_how_they_start():
    plan = tools.ToolPlan(request(tools=[GET]).tools, auto=True)
    [call], finish = tools.answer(plan, '{"name": "get", "arguments": {}}', "stop")
    assert finish == "tool_calls" and call.function.name == "get"
    tagged = '<tool_call>\n{"name": "get", "arguments": {}}\n</tool_call>\n<tool_call>{"name": "get", "arguments": {"a": "}"}}</tool_call>'
    calls, finish = tools.answer(plan, tagged, "stop")  # Hermes/Qwen blocks: two calls
    assert finish == "tool_calls" and [json.loads(c.function.arguments) for c in calls] == [{}, {"a": "}"}]
    assert len({c.id for c in calls}) == 2
    assert tools.answer(plan, "It is sunny.", "stop") == (None, "stop")
    assert tools.answer(plan, "It is", "length") == (None, "length")
    assert tools.answer(plan, "It is {", "length") == (None, "length")


def test_auto_with_a_response_format_answers_with_calls_or_json_of_it(tokenizer):
    """As OpenAI (and the Agents SDK's agents with tools and an output type): the model calls a tool or
    answers in the format. A forced call is the answer (the format holds for a later turn), and stop
    strings, which would cut it, are left out (chat.py) rather than refused."""
    fmt = {"type": "json_schema", "json_schema": {"name": "out", "schema": {
        "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}}  # fmt: skip
    plan = tools.plan(request(tools=[GET], response_format=fmt))
    assert plan.auto and plan.structured
    for choice in ("required", {"type": "function", "function": {"name": "get"}}):
        forced = tools.plan(request(tools=[GET], tool_choice=choice, response_format=fmt, stop=["}"]))
        assert not forced.auto and not forced.structured
    # calls come in their tags only: a bare one and the format's answer would both start with '{' (and the
    # grammar could finish a call's start as an answer of a loose format: arguments out of the schema)
    starts = ("", "<tool", "<tool_call>", "{", '{"name": "get", "arguments": ', "<table>")
    assert [plan.is_call(t) for t in starts] == [None, None, True, False, False, False]
    assert tools.answer(plan, '{"name": "Bob"}', "stop") == (None, "stop")  # the format's answer: text
    tagged = '<tool_call>{"name": "get", "arguments": {}}</tool_call>'
    assert tools.answer(plan, tagged, "stop")[1] == "tool_calls"
    assert "<tool_call>" in tools.with_tools(list(HI), plan)[0]["content"]  # how the model is told
    for answer in (fmt["json_schema"]["schema"], {"type": "object"}):  # json_schema, json_object
        grammar = Grammars(tokenizer, len(tokenizer)).json_or_text(plan.schema(), tools.TAGS, answer=answer)

        def follow(text: str, grammar=grammar):
            guide = grammar.start()
            return all(guide.advance(t) for t in tokenizer.encode(text, add_special_tokens=False)), guide

        for whole in ('{"name": "Bob"}', tagged):
            ok, guide = follow(whole)
            assert ok and guide.accepting, whole
        assert not follow("Bob")[0]  # no text
        assert not follow('<tool_call>{"name": "get", "arguments": 5}')[0]  # a call holds to its schema
    grammar = Grammars(tokenizer, len(tokenizer)).json_or_text(
        plan.schema(), tools.TAGS, answer=fmt["json_schema"]["schema"]
    )
    guide = grammar.start()
    bare = '{"name": "get", "arguments": {}}'  # not the format's answer (its keys), and no bare call
    assert not all(guide.advance(t) for t in tokenizer.encode(bare, add_special_tokens=False))


def test_calls_cut_by_max_tokens_come_back_as_far_as_written():
    """As OpenAI returns them: finish_reason "length", the arguments cut, never the call's wrapper as
    text."""
    two = tools.ToolPlan(request(tools=[GET, {**GET, "function": {"name": "go"}}]).tools)
    for plan in (tools.ToolPlan(two.tools[:1]), tools.ToolPlan(two.tools[:1], auto=True), two):
        calls, finish = tools.answer(plan, '{"name": "get", "arguments": {"city": "Os', "length")
        assert finish == "length" and [(c.function.name, c.function.arguments) for c in calls] == [
            ("get", '{"city": "Os')
        ]
        calls, finish = tools.answer(plan, '{"name": "get", "arguments": {}', "length")  # all but the "}"
        assert finish == "length" and calls[0].function.arguments == "{}"
    for text in ('{"name": "g', '{"na', "{"):  # the name cut: the one tool it can be
        [call], _ = tools.answer(tools.ToolPlan(two.tools[:1]), text, "length")
        assert (call.function.name, call.function.arguments) == ("get", "")
    assert tools.answer(two, '{"name": "ge', "length")[0][0].function.name == "get"
    assert tools.answer(two, '{"name": "g', "length") == (None, "length")  # get or go: none made up
    tagged = '<tool_call>\n{"name": "get", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "go", "arguments": {"a'
    calls, finish = tools.answer(two, tagged, "length")
    assert finish == "length" and [(c.function.name, c.function.arguments) for c in calls] == [
        ("get", "{}"),
        ("go", '{"a'),
    ]
    [call], _ = tools.answer(two, tagged[:50], "length")  # a whole block only
    assert call.function.name == "get" and call.function.arguments == "{}"
    whole = '{"name": "go", "arguments": {}}'  # written whole as max_tokens ran out: a call
    assert tools.answer(two, whole, "length")[1] == "tool_calls"
    starts = ("", " \n", "\nHi", "{", "<tool", "<tool_call>", "<table>", " <tool_call>")
    assert [tools.is_call(t) for t in starts] == [None, None, False, True, None, True, False, False]
    forced = tools.ToolPlan(plan.tools)  # forced: a call is a call whatever it starts with
    assert tools.answer(forced, '{"name": "get", "arguments": {}}', "stop")[1] == "tool_calls"


def test_the_auto_grammar_takes_calls_or_text_and_nothing_between(tokenizer):
    schema = tools.ToolPlan(request(tools=[GET]).tools).schema()
    grammar = Grammars(tokenizer, len(tokenizer)).json_or_text(schema, tools.TAGS)
    eos = tokenizer.eos_token_id

    def follow(text: str):
        guide = grammar.start()
        ok = all(guide.advance(t) for t in tokenizer.encode(text, add_special_tokens=False))
        return ok, guide

    ok, guide = follow('{"name": "get", "arguments": {}}')
    assert ok and guide.done  # a whole call ends the answer
    ok, guide = follow("Hello, no call is needed {here}.")
    assert ok and not guide.done and guide.accepting  # text goes on until the model ends it
    assert follow('{"name": "other"')[0] is False  # a call of no listed tool
    assert follow('{"name": "get", "arguments": {"type": "object"}}')[0] is False  # no undeclared key
    assert follow(' {"name": "get"')[0] is False  # text may not start like a call
    ok, tagged = follow('<tool_call>\n{"name": "get", "arguments": {}}\n</tool_call>\n<tool_call>')
    assert ok and not tagged.accepting  # a second block begun must be finished
    assert follow('<tool_call>\n{"name": "get", "arguments": {}}\n</tool_call>')[1].accepting
    assert follow("<tool_call>I think")[0] is False  # the tag holds the call to the schema
    assert follow(" <tool_call>")[0] is False and follow("<tool")[1].accepting  # text "<tool" may end
    assert follow("<table> is HTML")[0]
    start = grammar.start()
    assert not start.accepting and not start.allowed([eos])[eos // 8] >> (eos % 8) & 1  # no empty answer
    other = 5  # an end-of-sequence id the grammar's tokenizer does not know: allowed once it may end
    assert guide.allowed([other])[other // 8] >> (other % 8) & 1
    assert not grammar.start().allowed([other])[other // 8] >> (other % 8) & 1


def test_parallel_tool_calls_false_allows_one_call(tokenizer):
    plan = tools.plan(request(tools=[GET], parallel_tool_calls=False))
    assert plan.auto and not plan.many and tools.plan(request(tools=[GET])).many
    grammar = Grammars(tokenizer, len(tokenizer)).json_or_text(plan.schema(), tools.TAGS, many=plan.many)
    guide = grammar.start()
    block = '<tool_call>\n{"name": "get", "arguments": {}}\n</tool_call>'
    assert all(guide.advance(t) for t in tokenizer.encode(block, add_special_tokens=False))
    assert guide.accepting and guide.done  # nothing may follow: no second block


def test_a_malformed_text_part_is_named_whatever_comes_before_it(tokenizer):
    """The 400 names the part that is wrong: a text part without its text after an image part said the
    image part needed a string 'image_url' (review)."""
    from mygpt.api.chat import ChatLimits, ChatService

    chat = ChatService(None, tokenizer, "m", ChatLimits(512, 1, 4), None)
    parts = [{"type": "image_url", "image_url": {"url": "x"}}, {"type": "text"}]
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": parts}])
    with pytest.raises(APIError, match="type 'text' needs a string 'text'"):
        chat._messages(req.messages)
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": parts[:1]}])
    with pytest.raises(APIError, match="'image_url' is not supported"):
        chat._messages(req.messages)
