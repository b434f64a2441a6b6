"""Several prompts in one /v1/completions request against the tenant's limits and a full queue: a
batch the limits can never admit is a 400 (not a 429 retried for ever), and a batch refused half way
leaves no usage and no budget taken behind."""

from __future__ import annotations

import asyncio

import pytest

from mygpt.api import completions
from mygpt.api.chat import ChatLimits, ChatService
from mygpt.api.errors import APIError
from mygpt.api.protocol import CompletionRequest
from mygpt.engine.async_engine import AsyncEngine
from mygpt.engine.engine import Engine
from mygpt.tenancy.auth import Principal
from mygpt.tenancy.config import load_tenancy
from mygpt.tenancy.tenants import Tenants


def tenants(tmp_path, limits: str) -> Tenants:
    config = tmp_path / "tenancy.yaml"
    config.write_text(f"tenants:\n  acme:\n    keys: [key-acme-0123456789]\n    limits: {{{limits}}}\n")
    return Tenants(load_tenancy(config))


def test_more_prompts_than_the_limits_ever_admit_is_a_400(tmp_path, tokenizer):
    ten = tenants(tmp_path, "max_concurrent: 4, requests_per_minute: 60")
    chat = ChatService(None, tokenizer, "m", ChatLimits(2048, 8, 4, 32), ten)
    req = CompletionRequest(model="m", prompt=["a", "b", "c", "d", "e"])
    for _ in range(3):  # before, each retry got a 429 again and took 4 of the 60 requests
        with pytest.raises(APIError) as err:
            asyncio.run(completions.prepare(chat, Principal("acme"), req))
        assert err.value.status == 400 and err.value.info.param == "prompt" and "at most 4" in str(err.value)
    limiter = ten.limiters["acme"]
    assert limiter.active == 0 and limiter._requests.wait_for(60) == 0


class _Runner:
    num_slots, max_len = 4, 2048


def test_a_batch_refused_half_way_is_no_usage_and_gives_its_budget_back(tmp_path, tokenizer):
    """The queue holds 2: the third prompt is refused (429), the first two are withdrawn."""
    ten = tenants(tmp_path, "requests_per_minute: 10, tokens_per_minute: 1000")
    engine = Engine(_Runner(), tokenizer, [2], max_waiting=2)
    engine._admit = lambda: None  # a busy server: nothing leaves the queue
    engine.start()
    chat = ChatService(AsyncEngine(engine), tokenizer, "m", ChatLimits(2048, 8, 4, 32), ten)
    req = CompletionRequest(model="m", prompt=["one two three four", "five six seven", "eight nine"])

    async def run() -> APIError:
        batch = await completions.prepare(chat, Principal("acme"), req)
        with pytest.raises(APIError) as err:
            await completions.complete(chat, req, batch)
        await asyncio.sleep(0.5)  # the engine's final events for the two aborted prompts
        return err.value

    try:
        err = asyncio.run(run())
    finally:
        engine.stop()
    assert err.status == 429
    [row] = ten.usage.report("acme")  # the client got one 429: one rejected request, no tokens
    assert (
        row["prompt_tokens"] == 0 and row["requests"]["rejected"] == 1 and row["requests"]["cancelled"] == 0
    )
    limiter = ten.limiters["acme"]
    assert limiter.active == 0 and ten.in_flight == 0
    assert limiter._requests.wait_for(9) == 0  # only the refused prompt's request is spent
    assert limiter._tokens.wait_for(999) == 0
