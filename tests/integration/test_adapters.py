"""Adapters through the real server and the openai SDK, on the real default model."""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import openai
import pytest

from conftest import ServerProcess
from mygpt.lora.synthetic import make_adapter

BASE = "SmolLM2-135M-Instruct"
ASK = [{"role": "user", "content": "What is the capital of France?"}]
ADMIN = "sk-adapters-admin-0123456789"
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def adapter_server(default_checkpoint, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    root = store / "default"  # the open tenant's adapters
    make_adapter(default_checkpoint, root / "style-a", 8, ["q_proj", "v_proj"], seed=11)
    make_adapter(default_checkpoint, root / "style-b", 16, ALL, seed=12)
    shutil.copytree(root / "style-a", root / "broken")
    (root / "broken" / "adapter_model.safetensors").write_bytes(b"not a tensor file")
    server = ServerProcess(
        "--adapter-dir", str(store), "--max-loras", "2", "--admin-key", ADMIN, name="adapters"
    ).wait_ready()  # fmt: skip
    server.root = root
    yield server
    server.stop()


@pytest.fixture
async def aclient(adapter_server):
    async with openai.AsyncOpenAI(base_url=adapter_server.base_url + "/v1", api_key="x", max_retries=0) as c:
        yield c


@pytest.mark.anyio
async def test_models_lists_adapters_with_their_parent(aclient, adapter_server):
    """B3: adapters appear with parent/root = the base; one added at runtime appears at once."""
    models = {m.id: m for m in (await aclient.models.list()).data}
    assert {BASE, "style-a", "style-b"} <= set(models)
    assert "broken" not in models  # its weights are corrupt: a request gets a 400, the list leaves it out
    assert models["style-a"].model_extra["parent"] == BASE and models["style-a"].model_extra["root"] == BASE
    shutil.copytree(adapter_server.root / "style-a", adapter_server.root / "style-c")
    assert "style-c" in {m.id for m in (await aclient.models.list()).data}


@pytest.mark.anyio
async def test_adapters_alone_and_in_32_interleaved_requests(aclient):
    """E1 over HTTP: greedy outputs for two adapters and the base, alone vs 32 interleaved requests."""

    async def ask(model: str, i: int) -> str:
        messages = [{"role": "user", "content": f"Give me fact number {i} about France."}]
        r = await aclient.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=16
        )
        assert r.model == model
        return r.choices[0].message.content

    models = ["style-a", "style-b", BASE]
    alone = {(m, i): await ask(m, i) for m in models for i in range(3)}
    assert len({alone[(m, 0)] for m in models}) == 3  # the adapters change the answer
    jobs = [(models[k % 3], k % 3) for k in range(32)]
    busy = await asyncio.gather(*(ask(m, i) for m, i in jobs))
    for (m, i), text in zip(jobs, busy, strict=True):
        assert text == alone[(m, i)], (m, i)


@pytest.mark.anyio
async def test_same_seed_same_output_with_an_adapter_alone_or_in_a_busy_batch(aclient):
    """B5 with an adapter: a seeded sample on style-b is the same alone and among requests for the
    other adapter and the base model."""
    seeded = dict(model="style-b", messages=ASK, temperature=1.0, seed=7, max_tokens=24)
    alone = (await aclient.chat.completions.create(**seeded)).choices[0].message.content
    noise = [
        aclient.chat.completions.create(
            model=m, messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=24, seed=i
        )
        for i, m in enumerate(["style-a", BASE] * 4)
    ]
    results = await asyncio.gather(*noise, aclient.chat.completions.create(**seeded))
    assert results[-1].choices[0].message.content == alone


def test_a_stream_for_an_adapter_names_it_in_every_chunk(adapter_server):
    """A3/A4 on the wire: every chunk names the adapter as the request did (not the base), one id and
    one created; finish_reason is JSON null (present, not missing) until the last choice chunk."""
    body = {"model": "style-a", "messages": ASK, "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", adapter_server.base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        data = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert {c["model"] for c in chunks} == {"style-a"}
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert all("finish_reason" in c["choices"][0] for c in chunks if c["choices"])
    assert reasons[:-1] == [None] * (len(reasons) - 1) and reasons[-1] == "length"


def test_unknown_and_broken_adapters(adapter_server):
    """D3: unknown -> 404; D2: a corrupt adapter -> 400 naming the problem; others carry on."""
    url = adapter_server.base_url + "/v1/chat/completions"
    r = httpx.post(url, json={"model": "style-z", "messages": ASK}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(url, json={"model": "../style-a", "messages": ASK}, timeout=60)
    assert r.status_code == 404
    r = httpx.post(url, json={"model": "broken", "messages": ASK, "stream": True}, timeout=60)
    assert r.status_code == 400 and "corrupt" in r.json()["error"]["message"]
    r = httpx.post(url, json={"model": "style-a", "messages": ASK, "max_tokens": 3}, timeout=60)
    assert r.status_code == 200


def test_the_last_slot_is_never_pinned(adapter_server):
    """With 2 slots, 1 can be pinned: pinning a second is a 400 that leaves it loaded and unpinned
    (before, every slot pinned made any other adapter's request wait for ever, and the whole queue
    behind it)."""
    admin, key = adapter_server.base_url + "/v1/admin/adapters", {"Authorization": f"Bearer {ADMIN}"}
    body = {"tenant": "default", "name": "style-a", "pinned": True}
    r = httpx.post(admin, json=body, headers=key, timeout=60)
    assert r.status_code == 200, r.text
    r = httpx.post(admin, json={**body, "name": "style-b"}, headers=key, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_slots_full"
    assert "loaded, not pinned" in r.json()["error"]["message"]
    listed = {a["name"]: a for a in httpx.get(admin, headers=key, timeout=30).json()["data"]}
    assert listed["style-a"]["pinned"] and not listed["style-b"]["pinned"]
    url = adapter_server.base_url + "/v1/chat/completions"
    for model in ("style-b", BASE):  # the unpinned slot still serves every other adapter
        r = httpx.post(url, json={"model": model, "messages": ASK, "max_tokens": 3}, timeout=60)
        assert r.status_code == 200, r.text
