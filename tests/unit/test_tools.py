"""Forced tool calls (api/tools.py): what a call may be, and which requests are refused before any work."""

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
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tool_choice": "required", "stop": ["}"]}, "stop"),  # would cut the call
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
    merged = tools.with_tools([{"role": "system", "content": "Be brief."}, *HI], get.tools)
    assert (
        len(merged) == 2 and merged[0]["content"].startswith("Be brief.") and '"get"' in merged[0]["content"]
    )
    assert tools.with_tools(list(HI), get.tools)[0]["role"] == "system"


def test_a_call_with_a_non_json_number_is_no_call():
    assert tools.parse_call('{"name": "get", "arguments": {"x": 1e999}}') is None
    call = tools.parse_call('{"name": "get", "arguments": {"x": 1}}')
    assert call.function.name == "get" and json.loads(call.function.arguments) == {"x": 1}
