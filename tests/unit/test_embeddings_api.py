"""POST /v1/embeddings in process (the openai SDK over the ASGI app, a real engine on the tiny model):
the wire shapes, bad input, a full waiting queue, a client that leaves, a failing engine."""

from __future__ import annotations

import asyncio
import base64
import struct
import time

import pytest
import torch
from test_app import client_for, sdk_for

from mygpt.api.chat import ChatLimits, ChatService
from mygpt.api.embeddings import EmbeddingService
from mygpt.config import Settings
from mygpt.cost import CostModel
from mygpt.engine.async_engine import AsyncEngine
from mygpt.engine.engine import Engine
from mygpt.engine.runner import ModelRunner
from mygpt.metrics import Metrics
from mygpt.state import ServerState
from mygpt.tenancy.config import load_tenancy
from mygpt.tenancy.tenants import Tenants

TEXTS = ["The cat sat on the mat.", "Quarterly revenue rose five percent.", "How do I reset my password?"]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture
def make_state(model, tokenizer):
    engines = []

    def make(slots: int = 4, max_waiting: int = 256, window: int = 4) -> ServerState:
        runner = ModelRunner(model, slots, 128, torch.float32, exact_attention=True)
        engine = Engine(
            runner, tokenizer, [tokenizer.eos_token_id], max_num_batched_tokens=32, max_waiting=max_waiting
        )
        engine.start()
        engines.append(engine)
        state = ServerState(Settings(), Tenants(load_tenancy(None), Metrics(CostModel())))
        state.engine = engine
        state.chat = ChatService(AsyncEngine(engine), tokenizer, "tiny", ChatLimits(128, 4, 4), state.tenants)
        state.embeddings = EmbeddingService(state.chat, "mean", model.config.hidden_size, window)
        state.ready = True
        return state

    yield make
    for e in engines:
        e.stop()


async def until_idle(state: ServerState) -> None:
    """Until every admitted request's accounting has ended (tickets end from the engine thread)."""
    for _ in range(500):
        if state.tenants.in_flight == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{state.tenants.in_flight} requests still in flight")


@pytest.mark.anyio
async def test_the_sdks_base64_default_and_floats_give_the_same_vectors(make_state, tokenizer, model):
    state = make_state()
    async with sdk_for(state) as sdk:
        packed = await sdk.embeddings.create(model="tiny", input=TEXTS)  # the SDK asks for base64
        floats = await sdk.embeddings.create(model="tiny", input=TEXTS, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2] and floats.model == "tiny" and floats.object == "list"
    for a, b in zip(packed.data, floats.data, strict=True):
        assert len(a.embedding) == model.config.hidden_size
        # base64 carries float32: equal to the float32 rounding of the JSON floats
        assert a.embedding == [struct.unpack("<f", struct.pack("<f", x))[0] for x in b.embedding]
    tokens = sum(len(tokenizer(t)["input_ids"]) for t in TEXTS)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == tokens
    norms = [sum(x * x for x in d.embedding) ** 0.5 for d in floats.data]
    assert all(abs(n - 1) < 1e-5 for n in norms)


@pytest.mark.anyio
async def test_raw_base64_is_little_endian_float32(make_state):
    state = make_state()
    async with client_for(state) as c:
        body = {"model": "tiny", "input": "hello", "encoding_format": "base64"}
        packed = (await c.post("/v1/embeddings", json=body)).json()["data"][0]["embedding"]
        floats = (await c.post("/v1/embeddings", json={**body, "encoding_format": "float"})).json()
    raw = base64.b64decode(packed)
    vector = floats["data"][0]["embedding"]
    assert len(raw) == 4 * len(vector)
    assert list(struct.unpack(f"<{len(vector)}f", raw)) == pytest.approx(vector, abs=1e-7)


@pytest.mark.anyio
async def test_token_ids_embed_as_their_text(make_state, tokenizer):
    state = make_state()
    ids = [tokenizer(t)["input_ids"] for t in TEXTS]
    async with sdk_for(state) as sdk:
        text = await sdk.embeddings.create(model="tiny", input=TEXTS, encoding_format="float")
        tokens = await sdk.embeddings.create(model="tiny", input=ids, encoding_format="float")
        one = await sdk.embeddings.create(model="tiny", input=ids[1], encoding_format="float")
    for a, b in zip(text.data, tokens.data, strict=True):
        assert a.embedding == pytest.approx(b.embedding, abs=2e-5)
    assert one.data[0].embedding == pytest.approx(text.data[1].embedding, abs=2e-5)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("body", "status", "param", "says"),
    [
        ({"input": ""}, 400, "input", "input[0] is empty"),
        ({"input": []}, 400, "input", "input is empty"),
        ({"input": ["a", ""]}, 400, "input", "input[1] is empty"),
        ({"input": [5, 10**7]}, 400, "input", "check_embedding_ctx_length=False"),
        ({"input": [1] * 129}, 400, "input", "context of 128 tokens"),
        ({"input": ["x"] * 2049}, 400, "input", "at most 2048"),
        ({"input": "a", "dimensions": 8}, 400, "dimensions", "dimensions"),
        ({"input": "a", "encoding_format": "int8"}, 400, "encoding_format", ""),
        ({"input": [True, 1]}, 400, "input", ""),
        ({"input": "a", "model": "nope"}, 404, "model", "does not exist"),
    ],
)
async def test_bad_input_is_a_clear_error_and_not_usage(make_state, body, status, param, says):
    state = make_state()
    async with client_for(state) as c:
        r = await c.post("/v1/embeddings", json={"model": "tiny", **body})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"]
    assert state.tenants.usage.report() == [] and state.tenants.in_flight == 0


@pytest.mark.anyio
async def test_a_full_waiting_queue_is_a_429_before_any_input_ran(make_state, monkeypatch):
    state = make_state(slots=1, max_waiting=2)
    engine = state.engine
    step = engine.runner.step

    def slow(*args, **kw):  # the running completion holds the one slot for seconds
        time.sleep(0.05)
        return step(*args, **kw)

    monkeypatch.setattr(engine.runner, "step", slow)
    async with client_for(state) as c:
        long = {"model": "tiny", "prompt": "hi", "max_tokens": 100, "temperature": 0, "ignore_eos": True}
        tasks = []
        for running, waiting in ((1, 0), (1, 1), (1, 2)):  # one running, two waiting: the queue is full
            tasks.append(asyncio.ensure_future(c.post("/v1/completions", json=long)))
            for _ in range(500):
                await asyncio.sleep(0.01)
                if (engine.num_running, engine.num_waiting) == (running, waiting):
                    break
        assert engine.num_waiting == 2
        r = await c.post("/v1/embeddings", json={"model": "tiny", "input": TEXTS})
        assert r.status_code == 429 and r.headers["retry-after"]
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        monkeypatch.setattr(engine.runner, "step", step)
        await asyncio.gather(*tasks)
    rows = {row["model"]: row for row in state.tenants.usage.report()}
    assert rows["tiny"]["requests"]["rejected"] == 1


@pytest.mark.anyio
async def test_inputs_past_a_full_queue_wait_for_room_once_the_request_was_accepted(make_state):
    """12 inputs, a window of 8, a waiting queue of 2 behind 1 slot: the queue is full at the third
    input, but the request was accepted, so the rest wait for room; every input comes back."""
    state = make_state(slots=1, max_waiting=2, window=8)
    inputs = [f"sentence number {i}" for i in range(12)]
    async with sdk_for(state) as sdk:
        r = await sdk.embeddings.create(model="tiny", input=inputs, encoding_format="float")
        alone = await sdk.embeddings.create(model="tiny", input=inputs[7], encoding_format="float")
    assert [d.index for d in r.data] == list(range(12))
    assert r.data[7].embedding == pytest.approx(alone.data[0].embedding, abs=2e-5)
    await until_idle(state)
    (row,) = state.tenants.usage.report()
    assert row["requests"]["stop"] == 2 and state.tenants.in_flight == 0


@pytest.mark.anyio
async def test_a_client_that_leaves_aborts_the_inputs_still_running(make_state):
    state = make_state(slots=2, window=2)
    service, engine = state.embeddings, state.engine
    from mygpt.api.protocol import EmbeddingRequest
    from mygpt.tenancy.auth import Principal

    long = [list(range(100, 227))] * 40  # 127 tokens each, four chunks: ~1 s of work in all
    task = asyncio.ensure_future(
        service.embed(Principal(tenant="default"), EmbeddingRequest(model="tiny", input=long))
    )
    for _ in range(300):
        await asyncio.sleep(0.01)
        if engine.stats.prompt_tokens > 0:
            break
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(300):
        if engine.num_running == 0 and engine.num_waiting == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.num_running == 0 and engine.num_waiting == 0
    assert engine.stats.prompt_tokens < 40 * 127  # it stopped part way
    await until_idle(state)
    (row,) = state.tenants.usage.report()
    assert row["requests"]["cancelled"] == 1 and state.tenants.in_flight == 0
    # the usage is the inputs the engine was given (not all 40), their engine time the cost
    assert 0 < row["prompt_tokens"] < 40 * 127 and row["prompt_tokens"] % 127 == 0
    assert row["cost_usd"] > 0


@pytest.mark.anyio
async def test_an_engine_failure_is_a_500_and_counted(make_state, monkeypatch):
    state = make_state()

    def fails(*args, **kw):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(state.engine.runner, "step", fails)
    async with client_for(state) as c:
        r = await c.post("/v1/embeddings", json={"model": "tiny", "input": TEXTS})
    assert r.status_code == 500 and "out of memory" in r.json()["error"]["message"]
    await until_idle(state)  # the request's accounting ends with the engine's last final event
    (row,) = state.tenants.usage.report()
    assert row["requests"]["error"] == 1 and state.tenants.in_flight == 0


@pytest.mark.anyio
async def test_tenant_limits_count_one_request_and_every_input_token(make_state, tmp_path):
    state = make_state()
    config = tmp_path / "tenants.yaml"
    config.write_text(
        "tenants:\n  acme:\n    keys: [sk-acme-0123456789abcdef]\n"
        "    limits: {requests_per_minute: 2, tokens_per_minute: 10000}\n"
    )
    state.tenants.reload(load_tenancy(config))
    async with client_for(state) as c:
        headers = {"Authorization": "Bearer sk-acme-0123456789abcdef"}
        r = await c.post("/v1/embeddings", json={"model": "tiny", "input": TEXTS * 4}, headers=headers)
        assert r.status_code == 200
        assert r.headers["x-ratelimit-remaining-requests"] == "1"
        used = r.json()["usage"]["prompt_tokens"]
        # (the bucket refills ~167 tokens a second while the request runs)
        assert 10_000 - used <= int(r.headers["x-ratelimit-remaining-tokens"]) <= 10_000 - used + 50
        assert (
            await c.post("/v1/embeddings", json={"model": "tiny", "input": "a"}, headers=headers)
        ).status_code == 200
        r = await c.post("/v1/embeddings", json={"model": "tiny", "input": "a"}, headers=headers)
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"


@pytest.mark.anyio
async def test_null_encoding_format_is_floats(make_state):
    """LiteLLM sends encoding_format null when its caller gave none: OpenAI answers floats."""
    state = make_state()
    async with client_for(state) as c:
        r = await c.post("/v1/embeddings", json={"model": "tiny", "input": "a", "encoding_format": None})
    assert r.status_code == 200 and isinstance(r.json()["data"][0]["embedding"], list)


@pytest.mark.anyio
async def test_a_request_of_too_many_tokens_in_all_is_refused(make_state, monkeypatch):
    import mygpt.api.embeddings

    monkeypatch.setattr(mygpt.api.embeddings, "MAX_TOKENS", 20)
    state = make_state()
    async with client_for(state) as c:
        r = await c.post("/v1/embeddings", json={"model": "tiny", "input": [[5] * 15, [6] * 10]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input" and "at most 20" in r.text
    assert state.tenants.usage.report() == [] and state.tenants.in_flight == 0


@pytest.mark.anyio
async def test_the_naive_engine_serves_embeddings_and_ends_their_accounting(model, tokenizer):
    from mygpt.engine.naive import NaiveEngine

    engine = NaiveEngine(model, tokenizer, [tokenizer.eos_token_id], max_len=128)
    engine.start()
    try:
        state = ServerState(Settings(), Tenants(load_tenancy(None)))
        state.engine = engine
        state.chat = ChatService(AsyncEngine(engine), tokenizer, "tiny", ChatLimits(128, 4, 4), state.tenants)
        state.embeddings = EmbeddingService(state.chat, "mean", model.config.hidden_size, 4)
        state.ready = True
        async with sdk_for(state) as sdk:
            r = await sdk.embeddings.create(model="tiny", input=TEXTS)
        assert len(r.data) == 3 and len(r.data[0].embedding) == model.config.hidden_size
        await until_idle(state)
        (row,) = state.tenants.usage.report()
        assert row["requests"]["stop"] == 1 and row["prompt_tokens"] == r.usage.prompt_tokens
        assert state.tenants.in_flight == 0
    finally:
        engine.stop()


@pytest.mark.anyio
async def test_a_request_refused_at_its_first_input_is_a_429_that_runs_nothing(make_state, monkeypatch):
    """The queue is full for the first input only (the engine freed room just after): the request is
    a 429 all the same, and none of its inputs runs or is charged (a client retries it whole)."""
    from mygpt.engine.types import EngineOverloaded

    state = make_state()
    real, calls = state.chat.engine.submit, {"n": 0}

    def full_once(gen, on_done=None):
        calls["n"] += 1
        if calls["n"] == 1:
            raise EngineOverloaded(retry_after_s=1.0)
        return real(gen, on_done)

    monkeypatch.setattr(state.chat.engine, "submit", full_once)
    async with client_for(state) as c:
        r = await c.post("/v1/embeddings", json={"model": "tiny", "input": TEXTS})
    assert r.status_code == 429
    await until_idle(state)
    assert calls["n"] == 1 and state.engine.stats.prompt_tokens == 0
    (row,) = state.tenants.usage.report()
    assert row["requests"]["rejected"] == 1 and row["prompt_tokens"] == 0


@pytest.mark.anyio
async def test_prompt_pooling_embeds_each_input_inside_the_instruction(make_state, model, tokenizer):
    """ "prompt" (the server's default): the engine embeds the instruction around the input, last
    token; a text and its token ids embed the same; usage and context count the input's own tokens."""
    from mygpt.api.embeddings import PROMPT

    state = make_state()
    state.embeddings = EmbeddingService(state.chat, "prompt", model.config.hidden_size, 4)
    before, after = state.embeddings.wrap
    text = "The cat sat on the mat."
    own = tokenizer(text, add_special_tokens=False)["input_ids"]
    async with sdk_for(state) as sdk:
        r = await sdk.embeddings.create(model="tiny", input=text, encoding_format="float")
        by_ids = await sdk.embeddings.create(model="tiny", input=own, encoding_format="float")
    assert r.usage.prompt_tokens == by_ids.usage.prompt_tokens == len(own)
    assert r.data[0].embedding == pytest.approx(by_ids.data[0].embedding, abs=2e-5)
    with torch.inference_mode():  # transformers' own: the wrapped ids' last state
        ids = torch.tensor([before + own + after])
        want = torch.nn.functional.normalize(model.model(ids).last_hidden_state[0, -1], dim=0)
    assert torch.allclose(torch.tensor(r.data[0].embedding), want, atol=1e-5)
    assert tokenizer.decode(before + own + after) == PROMPT[0] + text + PROMPT[1]
    room = 128 - len(before) - len(after)
    async with client_for(state) as c:
        fits = await c.post("/v1/embeddings", json={"model": "tiny", "input": [5] * room})
        over = await c.post("/v1/embeddings", json={"model": "tiny", "input": [5] * (room + 1)})
    assert fits.status_code == 200 and over.status_code == 400
    assert f"at most {room} fit" in over.json()["error"]["message"]


def test_prompt_pooling_with_a_tokenizer_that_adds_bos_and_eos(tokenizer):
    """A Llama-style tokenizer adds a BOS (and some an EOS) to a text: the instruction opens with the
    BOS once and ends on its own last token; a token-id input that carries them (from /tokenize)
    embeds as its text does, and counts as many tokens."""
    from types import SimpleNamespace

    BOS, EOS = 1, 2

    def tok(text, add_special_tokens=True):
        def one(t):
            ids = tokenizer(t, add_special_tokens=False)["input_ids"]
            return [BOS, *ids, EOS] if add_special_tokens else ids

        return {"input_ids": [one(t) for t in text] if isinstance(text, list) else one(text)}

    chat = SimpleNamespace(tokenizer=tok, limits=SimpleNamespace(context_len=128), vocab_size=len(tokenizer))
    service = EmbeddingService(chat, "prompt", 8, 4)
    before, after = service.wrap
    assert before[0] == BOS and BOS not in before[1:] and after[-1] != EOS
    text = "The cat sat on the mat."
    from_text, from_ids = service._tokenize([text, tok(text)["input_ids"]])[0]
    assert from_text == from_ids and from_text.count(BOS) == 1 and EOS not in from_text
    (_, own) = service._tokenize([text, tok(text)["input_ids"]])
    assert own[0] == own[1] == len(tokenizer(text, add_special_tokens=False)["input_ids"])
    with pytest.raises(Exception, match="empty"):
        service._tokenize([[BOS, EOS]])
