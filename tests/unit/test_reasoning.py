"""A reasoning model's <think>...</think> apart from its answer (api/reasoning.py): whole, and streamed
in pieces cut anywhere (a tag in pieces is held back until the text after it decides)."""

from __future__ import annotations

import json
import random

import pytest

from mygpt.api.reasoning import Splitter, opens_in_reasoning, split

CASES = [  # (text, the prompt left <think> open, reasoning, answer)
    ("<think>\nLet me see.\n</think>\n\nThe answer is 4.", False, "Let me see.", "The answer is 4."),
    ("Let me see.\n</think>\n\nFour.", True, "Let me see.", "Four."),  # R1: the prompt opened it
    ("\nLet me see.\n</think>\n\nFour.", True, "Let me see.", "Four."),
    ("Plain answer <thi not a tag", False, None, "Plain answer <thi not a tag"),
    ("  <think>x</think>y", False, "x", "y"),
    ("<think>cut by the token limit", False, "cut by the token limit", ""),
    ("<think>a\n\nb\n</think>\n", False, "a\n\nb", ""),
    ("<think></think>Hi", False, "", "Hi"),
    ("<th", False, None, "<th"),
    ("4 < 5 </think", True, "4 < 5 </think", ""),
    ("An answer that mentions </think> late", False, None, "An answer that mentions </think> late"),
]


@pytest.mark.parametrize(("text", "opened", "reasoning", "answer"), CASES)
def test_thinking_and_answer_split_whole_and_in_any_pieces(text, opened, reasoning, answer):
    assert split(text, opened) == (reasoning, answer)
    rng = random.Random(text)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 8))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        splitter, got = Splitter(opened), ["", ""]
        for k, piece in enumerate(pieces):
            r, a = splitter.feed(piece, final=k == len(pieces) - 1)
            got = [got[0] + r, got[1] + a]
        assert got == [reasoning or "", answer], pieces


def test_the_prompt_says_whether_the_model_starts_inside_its_thinking():
    assert opens_in_reasoning("<|im_start|>assistant\n<think>\n")  # DeepSeek-R1 distills
    assert not opens_in_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # Qwen3, no thinking
    assert not opens_in_reasoning("<|im_start|>assistant\n")


# ------------------------------------------------------------------ through the API (the tiny model)
from test_app import GET_TIME, HI, client_for, script_model, sdk_for, served_state  # noqa: E402, F401 - a fixture

THOUGHT, ANSWER = "I add 2 and 2.", "The answer is 4."
WRITTEN = f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}"


@pytest.mark.anyio
async def test_a_reasoning_models_thinking_comes_apart_streamed_or_not(served_state, tokenizer, monkeypatch):  # noqa: F811
    """The model writes <think>...</think> then its answer: `content` holds the answer alone, and the
    thinking is in `reasoning` and `reasoning_content` (both names clients read), in the message and,
    streamed, in deltas that never carry a tag; the same usage both ways. Without the parser, the text
    is as the model wrote it."""
    written = tokenizer.encode(WRITTEN, add_special_tokens=False)
    sdk = sdk_for(served_state)
    body = {"model": "tiny", "messages": HI, "max_tokens": 80}
    served_state.chat.reasoning = False
    script_model(monkeypatch, served_state.engine.runner, written)
    plain = await sdk.chat.completions.create(**body)
    assert plain.choices[0].message.content == WRITTEN
    assert getattr(plain.choices[0].message, "reasoning", None) is None
    served_state.chat.reasoning = True  # as --reasoning-parser think, or auto with a template that thinks
    script_model(monkeypatch, served_state.engine.runner, written)
    whole = await sdk.chat.completions.create(**body)
    message = whole.choices[0].message
    assert (message.content, message.reasoning, message.reasoning_content) == (ANSWER, THOUGHT, THOUGHT)
    assert whole.usage.completion_tokens == plain.usage.completion_tokens == len(written) + 1  # and EOS
    # the thinking's tokens: up to the one that completes </think>
    thinking = next(k for k in range(len(written) + 1) if "</think>" in tokenizer.decode(written[:k]))
    assert whole.usage.completion_tokens_details.reasoning_tokens == thinking
    assert plain.usage.completion_tokens_details is None
    script_model(monkeypatch, served_state.engine.runner, written)
    stream = await sdk.chat.completions.create(**body, stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == thinking
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == ANSWER
    assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == THOUGHT
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == THOUGHT
    assert not any("think>" in ((d.content or "") + (getattr(d, "reasoning", None) or "")) for d in deltas)
    assert len([d for d in deltas if getattr(d, "reasoning", None)]) > 1  # the thinking streams too


@pytest.mark.anyio
async def test_chat_template_kwargs_and_reasoning_effort_reach_the_template(
    served_state,  # noqa: F811
    tokenizer,
    monkeypatch,
):
    """chat_template_kwargs (vLLM's: Qwen3's enable_thinking) and reasoning_effort "none" reach the chat
    template; one that closes the thinking in the prompt has nothing split from the answer; the
    template's running arguments are refused by name; an assistant's earlier reasoning_content (or
    reasoning) reaches the template."""
    from mygpt.api.protocol import ChatCompletionRequest

    template = (
        "{% for m in messages %}<{{ m.role }}>{% if m.reasoning_content %}[{{ m.reasoning_content }}]{% endif %}"
        "{{ m.content }}{% endfor %}<assistant>"
        "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
    )
    monkeypatch.setattr(tokenizer, "chat_template", template)
    chat = served_state.chat

    def rendered(**extra) -> str:
        req = ChatCompletionRequest.model_validate({"model": "tiny", "messages": HI, **extra})
        return tokenizer.decode(chat.renderer(req)())

    assert rendered().endswith("<assistant>")
    off = "<assistant><think>\n\n</think>\n\n"
    assert rendered(chat_template_kwargs={"enable_thinking": False}).endswith(off)
    assert rendered(reasoning_effort="none").endswith(off)
    assert rendered(reasoning_effort="high").endswith("<assistant>")
    assert rendered(reasoning_effort="none", chat_template_kwargs={"enable_thinking": True}).endswith(
        "<assistant>"
    )
    earlier = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "4", "reasoning": "2+2"}]
    assert "<assistant>[2+2]4" in rendered(messages=[*earlier, {"role": "user", "content": "Sure?"}])

    chat.reasoning = True
    script_model(monkeypatch, served_state.engine.runner, tokenizer.encode(ANSWER, add_special_tokens=False))
    sdk = sdk_for(served_state)
    done = await sdk.chat.completions.create(
        model="tiny",
        messages=HI,
        max_tokens=40,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert (done.choices[0].message.content, getattr(done.choices[0].message, "reasoning", None)) == (
        ANSWER,
        None,
    )
    async with client_for(served_state) as c:
        r = await c.post(
            "/v1/chat/completions",
            json={"model": "tiny", "messages": HI, "chat_template_kwargs": {"tokenize": False}},
        )
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs.tokenize"


def test_auto_finds_a_reasoning_model_by_its_template(tokenizer, monkeypatch):
    from mygpt.api.reasoning import template_thinks

    assert not template_thinks(tokenizer)  # the test model's template
    monkeypatch.setattr(tokenizer, "chat_template", "{{ messages }}{% if think %}<think>{% endif %}</think>")
    assert template_thinks(tokenizer)


# ------------------------------------------------------------------ a grammar after the thinking
@pytest.fixture(scope="module")
def thinking_model(default_checkpoint, tmp_path_factory):
    """The test tokenizer with <think> and </think> as one token each (as Qwen3's), and a tiny model
    over it."""
    from transformers import AutoTokenizer

    from conftest import build_tiny_model

    tok = AutoTokenizer.from_pretrained(default_checkpoint)
    tok.add_tokens(["<think>", "</think>"])
    return tok, build_tiny_model(tmp_path_factory.mktemp("thinking") / "model", tok)


@pytest.fixture
def thinking_state(thinking_model):
    import torch
    from transformers import AutoModelForCausalLM

    from mygpt.api.chat import ChatLimits, ChatService
    from mygpt.config import Settings
    from mygpt.engine.async_engine import AsyncEngine
    from mygpt.engine.engine import Engine
    from mygpt.engine.runner import ModelRunner
    from mygpt.state import ServerState
    from mygpt.tenancy.config import load_tenancy
    from mygpt.tenancy.tenants import Tenants

    tok, path = thinking_model
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = Engine(ModelRunner(model, 4, 512, torch.float32), tok, [tok.eos_token_id])
    engine.start()
    state = ServerState(Settings(), Tenants(load_tenancy(None)))
    state.engine, state.ready = engine, True
    limits = ChatLimits(512, 4, 4)
    state.chat = ChatService(
        AsyncEngine(engine), tok, "tiny", limits, state.tenants, reasoning_parser="think"
    )
    yield state
    engine.stop()


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("what", ["required", "auto", "json_schema"])
async def test_a_grammar_holds_from_the_end_of_the_thinking(
    thinking_model, thinking_state, monkeypatch, stream, what
):
    """Tools or a json_schema with a reasoning model whose tags are one token each: the model thinks
    first, freely, and the grammar holds from after </think> and the blank after it (the scripted
    tokens pass only if the masks let them). The call or the JSON comes apart from the thinking."""
    tok, _ = thinking_model
    open_id, close_id = thinking_state.chat.think_ids
    assert tok.decode([open_id]) == "<think>" and tok.decode([close_id]) == "</think>"
    call = '{"name": "get_time", "arguments": {"city": "Oslo"}}'
    answer = call if what != "json_schema" else '{"city": "Oslo"}'
    written = [open_id, *tok.encode("I need the time.", add_special_tokens=False), close_id]
    written += tok.encode("\n\n" + answer, add_special_tokens=False)
    script_model(monkeypatch, thinking_state.engine.runner, written)
    body: dict = {"model": "tiny", "messages": HI, "max_tokens": 120, "stream": stream}
    body |= {"stream_options": {"include_usage": True}} if stream else {}
    if what == "json_schema":
        schema = GET_TIME["function"]["parameters"]
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}
    else:
        body |= {"tools": [GET_TIME], "tool_choice": what}
    async with client_for(thinking_state) as c:
        r = await c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    thinking = 2 + len(tok.encode("I need the time.", add_special_tokens=False))  # and the tags
    if stream:
        chunks = [json.loads(x.removeprefix("data: ")) for x in r.text.split("\n") if x.startswith("data: {")]
        deltas = [ch["choices"][0]["delta"] for ch in chunks if ch["choices"]]
        thought = "".join(d.get("reasoning") or "" for d in deltas)
        content = "".join(d.get("content") or "" for d in deltas)
        calls = [c for d in deltas for c in d.get("tool_calls") or []]
        usage = chunks[-1]["usage"]
    else:
        message = r.json()["choices"][0]["message"]
        thought, content, calls = (
            message["reasoning"],
            message["content"] or "",
            message.get("tool_calls") or [],
        )
        usage = r.json()["usage"]
    assert usage["completion_tokens_details"] == {"reasoning_tokens": thinking}
    assert thought == "I need the time."
    if what == "json_schema":
        assert json.loads(content) == {"city": "Oslo"} and not calls
    else:
        assert not content and len(calls) == 1
        assert calls[0]["function"]["name"] == "get_time"
        assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
async def test_the_responses_api_gives_the_answer_and_counts_the_thinking(
    served_state,  # noqa: F811
    tokenizer,
    monkeypatch,
    stream,
):
    """/v1/responses with a reasoning model: a `reasoning` item (its text as reasoning_text) before the
    answer's message, streamed as response.reasoning_text.delta events; output_text is the answer
    alone; the thinking's tokens are usage.output_tokens_details.reasoning_tokens. The response is
    stored, and a next turn continues it (previous_response_id), or replays its items as input."""
    written = tokenizer.encode(WRITTEN, add_special_tokens=False)
    thinking = next(k for k in range(len(written) + 1) if "</think>" in tokenizer.decode(written[:k]))
    served_state.chat.reasoning = True
    script_model(monkeypatch, served_state.engine.runner, written)
    sdk = sdk_for(served_state)
    if stream:
        async with sdk.responses.stream(model="tiny", input="Hi", max_output_tokens=80) as events:
            kinds = [e.type async for e in events]
            response = await events.get_final_response()
        assert kinds.index("response.reasoning_text.delta") < kinds.index("response.output_text.delta")
    else:
        response = await sdk.responses.create(model="tiny", input="Hi", max_output_tokens=80)
    assert response.output_text == ANSWER
    assert response.usage.output_tokens_details.reasoning_tokens == thinking
    item, message = response.output
    assert item.type == "reasoning" and [c.text for c in item.content] == [THOUGHT]
    assert message.type == "message" and (await sdk.responses.retrieve(response.id)).output_text == ANSWER
    script_model(monkeypatch, served_state.engine.runner, written)
    later = await sdk.responses.create(model="tiny", input="Sure?", previous_response_id=response.id,
                                       max_output_tokens=80)  # fmt: skip
    assert later.output_text == ANSWER
    script_model(monkeypatch, served_state.engine.runner, written)
    replayed = [{"role": "user", "content": "Hi"}, *(i.model_dump() for i in response.output)]
    again = await sdk.responses.create(
        model="tiny", input=[*replayed, {"role": "user", "content": "Sure?"}], max_output_tokens=80
    )
    assert again.output_text == ANSWER


def test_a_replayed_reasoning_item_goes_to_the_next_assistant_turn():
    """Responses input items as a client replays them: a reasoning item's text goes with the assistant
    turn after it (a message or a function call) to the chat template."""
    from mygpt.api.errors import APIError
    from mygpt.api.responses import _input_messages

    thought = {
        "type": "reasoning",
        "id": "rs_1",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": "t"}],
    }
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    got = _input_messages(
        [
            {"role": "user", "content": "Hi"},
            thought,
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "a"}]},
            {**thought, "content": [{"type": "reasoning_text", "text": "u"}]},
            call,
            {"type": "function_call_output", "call_id": "c1", "output": "1"},
        ],
        [],
    )
    assert [m.get("reasoning_content") for m in got] == [None, "t", "u", None]
    # one before a user's turn went with no assistant turn: it does not pass to a later one
    got = _input_messages(
        [thought, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a"}], []
    )
    assert [m.get("reasoning_content") for m in got] == [None, None]
    with pytest.raises(APIError) as err:  # a text that is no string: a 400 naming it, not a 500
        _input_messages([{**thought, "content": [{"type": "reasoning_text", "text": None}]}], [])
    assert err.value.info.param == "input[0].content"


def test_the_guide_lets_no_end_into_the_thinking_and_only_line_breaks_after_it(thinking_model):
    """ThinkFirst's guide: <think> or the grammar's first token at the start; inside the thinking every
    token but the ends (a guided answer must come); after </think> line breaks (what the answer's
    splitter trims), not a space the grammar would not take; then the grammar. A row whose prompt ends
    in <think> starts inside; a <think> earlier in the prompt (a user's message) does not count."""
    from mygpt.engine.guided import Grammars, ThinkFirst

    tok, _ = thinking_model
    grammars = Grammars(tok, len(tok))
    open_id, close_id = tok.convert_tokens_to_ids(["<think>", "</think>"])
    eos, space, newline = (
        tok.eos_token_id,
        tok.encode(" ", add_special_tokens=False),
        tok.encode("\n\n", add_special_tokens=False),
    )
    assert len(space) == len(newline) == 1
    grammar = grammars.json({"type": "object"})
    spec = ThinkFirst(grammar, open_id, close_id, grammars.blank_mask())
    assert len(spec.blank) == len(grammar.start().allowed())  # the thinking's mask is llguidance's width

    def has(mask: bytes, t: int) -> bool:
        return bool(mask[t // 8] >> (t % 8) & 1)

    guide = spec.start([5, 6, 7])
    first = guide.allowed([eos])
    assert has(first, open_id) and has(first, tok.encode("{", add_special_tokens=False)[0])
    assert guide.advance(open_id) and guide.state == "thinking"
    inside = guide.allowed([eos])
    assert not has(inside, eos) and has(inside, space[0]) and not guide.accepting
    assert guide.advance(space[0]) and guide.advance(close_id) and guide.state == "gap"
    gap = guide.allowed([eos])
    assert has(gap, newline[0]) and not has(gap, space[0])
    assert guide.advance(newline[0]) and guide.state == "gap"
    assert guide.advance(tok.encode("{", add_special_tokens=False)[0]) and guide.state == "grammar"
    assert spec.start([9, open_id, newline[0]]).state == "thinking"  # R1: the prompt opened it
    assert spec.start([open_id, *range(10, 20)]).state == "start"  # a user's <think>, long before


@pytest.mark.anyio
async def test_a_response_cut_while_thinking_has_its_thinking_and_an_empty_message(
    served_state,  # noqa: F811
    tokenizer,
    monkeypatch,
):
    """Cut by max_output_tokens inside the thinking: streamed or not, the output is the reasoning item
    and an empty, incomplete message (a later turn continues from an assistant turn)."""
    served_state.chat.reasoning = True
    sdk = sdk_for(served_state)
    written = tokenizer.encode("<think>\nA long thought that goes on and on", add_special_tokens=False)
    outputs = []
    for stream in (False, True):
        script_model(monkeypatch, served_state.engine.runner, written)
        if stream:
            async with sdk.responses.stream(model="tiny", input="Hi", max_output_tokens=6) as events:
                last = [e async for e in events][
                    -1
                ]  # (response.incomplete: get_final_response wants completed)
            assert last.type == "response.incomplete"
            response = last.response
        else:
            response = await sdk.responses.create(model="tiny", input="Hi", max_output_tokens=6)
        outputs.append([(i.type, getattr(i, "status", None)) for i in response.output])
        assert response.status == "incomplete" and response.output_text == ""
    assert outputs[0] == outputs[1] == [("reasoning", "completed"), ("message", "incomplete")]
