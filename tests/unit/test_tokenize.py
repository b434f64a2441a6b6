"""vLLM's /tokenize and /detokenize: the counts a request's usage will show, errors in OpenAI's shape."""

from __future__ import annotations

import pytest
from test_app import client_for, sdk_for, served_state  # noqa: F401 - served_state: the fixture

pytestmark = pytest.mark.anyio
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object",
          "properties": {"city": {"type": "string"}}}}}]  # fmt: skip
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"}]


async def test_a_prompt_tokenizes_as_the_tokenizer_does_and_back(served_state, tokenizer):  # noqa: F811
    async with client_for(served_state) as c:
        r = (
            await c.post(
                "/tokenize", json={"model": "tiny", "prompt": "Hello world", "return_token_strs": True}
            )
        ).json()
        ids = tokenizer("Hello world")["input_ids"]
        assert r == {
            "count": len(ids),
            "max_model_len": 512,
            "tokens": ids,
            "token_strs": ["Hello", " world"],
        }
        back = (await c.post("/detokenize", json={"model": "tiny", "tokens": ids})).json()
    assert back == {"prompt": "Hello world"}


@pytest.mark.parametrize(
    "tools",
    [
        {},
        {"tools": TOOLS},
        {"tools": TOOLS, "tool_choice": "none"},
        {"tools": TOOLS, "tool_choice": "required"},
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "weather"}}},
        {"functions": [TOOLS[0]["function"]]},
        {"functions": [TOOLS[0]["function"]], "function_call": {"name": "weather"}},
    ],
)
async def test_messages_count_what_a_chat_completion_is_charged(served_state, tools):  # noqa: F811
    """Rendered as the chat request renders them: its tools as tool_choice (or the deprecated
    functions) decide."""
    async with client_for(served_state) as c:
        body = {"model": "tiny", "messages": CHAT} | tools
        counted = (await c.post("/tokenize", json=body)).json()
        without = (await c.post("/tokenize", json={**body, "add_generation_prompt": False})).json()
    async with sdk_for(served_state) as sdk:
        r = await sdk.chat.completions.create(max_tokens=1, **body)
    assert counted["count"] == r.usage.prompt_tokens == len(counted["tokens"])
    assert without["count"] < counted["count"] and counted["tokens"][: without["count"]] == without["tokens"]
    assert counted["token_strs"] is None


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {"prompt": "a", "messages": CHAT}, 400, "messages"),
        ("/tokenize", {}, 400, "prompt"),
        ("/tokenize", {"messages": []}, 400, "messages"),
        (
            "/tokenize",
            {"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]},
            400,
            "messages.[0].role",
        ),
        ("/tokenize", {"prompt": "a", "model": "nope"}, 404, "model"),
        ("/detokenize", {"tokens": [1, 10**8]}, 400, "tokens"),
        ("/detokenize", {"tokens": ["a"]}, 400, "tokens.0"),
        ("/detokenize", {"tokens": [1], "model": "nope"}, 404, "model"),
    ],
)
async def test_bad_requests_are_errors_naming_the_parameter(served_state, path, body, status, param):  # noqa: F811
    async with client_for(served_state) as c:
        r = await c.post(path, json={"model": "tiny", **body})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


async def test_messages_render_with_the_templates_arguments(served_state, tokenizer, monkeypatch):  # noqa: F811
    """chat_template_kwargs and reasoning_effort reach the template as a chat request's do: the count is
    what that request is charged."""
    template = (
        "{% for m in messages %}{{ m.content }}{% endfor %}"
        "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
    )
    monkeypatch.setattr(tokenizer, "chat_template", template)
    async with client_for(served_state) as c:
        base = (await c.post("/tokenize", json={"model": "tiny", "messages": CHAT})).json()
        off = {"model": "tiny", "messages": CHAT, "chat_template_kwargs": {"enable_thinking": False}}
        counted = (await c.post("/tokenize", json=off)).json()
        effort = (
            await c.post("/tokenize", json={"model": "tiny", "messages": CHAT, "reasoning_effort": "none"})
        ).json()
        refused = await c.post("/tokenize", json={**off, "chat_template_kwargs": {"tokenize": False}})
    async with sdk_for(served_state) as sdk:
        r = await sdk.chat.completions.create(
            model="tiny",
            messages=CHAT,
            max_tokens=1,
            extra_body={"chat_template_kwargs": {"enable_thinking": False}},
        )
    assert counted["count"] == effort["count"] == r.usage.prompt_tokens > base["count"]
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "chat_template_kwargs.tokenize"
