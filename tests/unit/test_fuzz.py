"""Fuzzing the chat and admin endpoints (hypothesis) in-process: whatever the body, headers or path,
the answer is never a 5xx, errors keep OpenAI's shape, and a stream never carries an internal error."""

from __future__ import annotations

import json
import urllib.parse

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from mygpt.api.chat import ChatLimits, ChatService
from mygpt.api.embeddings import EmbeddingService
from mygpt.app import build_app
from mygpt.config import Settings
from mygpt.cost import CostModel
from mygpt.engine.async_engine import AsyncEngine
from mygpt.engine.engine import Engine
from mygpt.engine.runner import ModelRunner
from mygpt.lora.cache import AdapterCache
from mygpt.lora.registry import AdapterRegistry
from mygpt.lora.synthetic import make_adapter
from mygpt.metrics import Metrics
from mygpt.state import ServerState
from mygpt.tenancy.config import hash_key, load_tenancy
from mygpt.tenancy.tenants import Tenants

ADMIN, ACME = "sk-fuzz-admin-0123456789", "sk-fuzz-acme-0123456789"
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def client(tiny_model_dir, tokenizer, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("fuzz")
    make_adapter(tiny_model_dir, root / "store" / "acme" / "support", 8, ["q_proj", "v_proj"], seed=1)
    config = {
        "admin_keys": [f"sha256:{hash_key(ADMIN)}"],
        "tenants": {"acme": {"keys": [ACME], "limits": {"requests_per_minute": 100000}}, "globex": {}},
    }
    (root / "mygpt.yaml").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    runner = ModelRunner(model, 4, 96, torch.float32, max_loras=2, max_lora_rank=16)
    metrics = Metrics(CostModel())
    engine = Engine(
        runner,
        tokenizer,
        [tokenizer.eos_token_id],
        adapters=AdapterCache(runner.lora_layers, 2),
        metrics=metrics,
    )
    engine.start()
    state = ServerState(Settings(), Tenants(load_tenancy(root / "mygpt.yaml"), metrics), metrics=metrics)
    shapes = {p: (m.in_features, m.out_features) for p, m in runner.lora_layers.items()}
    state.registry = AdapterRegistry(root / "store", ["acme", "globex"], shapes, 16)
    state.registry.on_retire = engine.retire_adapter
    state.engine = engine
    state.chat = ChatService(
        AsyncEngine(engine), tokenizer, "tiny", ChatLimits(96, 4, 4), state.tenants, state.registry
    )
    state.embeddings = EmbeddingService(state.chat, "mean", model.config.hidden_size, window=4)
    state.ready = True
    with TestClient(build_app(state.settings, state), raise_server_exceptions=False) as c:
        yield c
    engine.stop()


def check(r) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400 and r.headers.get("content-type", "").startswith("application/json"):
        body = r.json()
        assert set(body) == {"error"} and {"message", "type", "param", "code"} == set(body["error"]), body
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        assert "internal_error" not in r.text, r.text[-500:]


json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
junk = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
keyword = st.sampled_from(
    ["type", "properties", "items", "required", "enum", "const", "minimum", "maxLength", "pattern", "anyOf",
     "$ref", "$defs", "additionalProperties", "format", "minItems"]
)  # fmt: skip
json_type = st.sampled_from(["object", "array", "string", "integer", "number", "boolean", "null"])
schema = st.recursive(  # JSON-Schema-like objects, valid or not: response_format json_schema
    st.fixed_dictionaries({}, optional={"type": json_type | junk}),
    lambda inner: st.dictionaries(
        keyword,
        inner
        | json_type
        | st.lists(inner, max_size=2)
        | st.dictionaries(st.text(max_size=4), inner, max_size=2)
        | junk,
        max_size=3,
    ),  # fmt: skip
    max_leaves=6,
)
role = st.sampled_from(["system", "developer", "user", "assistant", "tool", "function"]) | junk
content = (
    st.text(max_size=40)
    | st.lists(
        st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "image_url"]) | junk, "text": st.text(max_size=10) | junk}
        ),
        max_size=2,
    )
    | junk
)
message = (
    st.fixed_dictionaries({"role": role}, optional={"content": content, "name": junk, "tool_calls": junk})
    | junk
)
OPTIONAL = {
    "max_tokens": st.integers(1, 8) | junk,
    "max_completion_tokens": st.integers(1, 8) | junk,
    "temperature": st.floats(0, 2) | junk,
    "top_p": st.floats(0, 1) | junk,
    "n": st.integers(1, 3) | junk,
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=5) | junk,
    "seed": st.integers(-(2**63), 2**63) | junk,
    "stream": st.booleans() | junk,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans() | junk}) | junk,
    "logprobs": st.booleans() | junk,
    "top_logprobs": st.integers(-1, 25) | junk,
    "logit_bias": st.dictionaries(
        st.text(max_size=6) | st.integers(-5, 60000).map(str), st.floats(-100, 100) | junk, max_size=3
    )
    | junk,
    "presence_penalty": st.floats(-3, 3) | junk,
    "frequency_penalty": st.floats(-3, 3) | junk,
    "top_k": st.integers(-3, 300) | junk,
    "min_p": st.floats(-0.5, 1.5) | junk,
    "repetition_penalty": st.floats(-1, 3) | junk,
    "min_tokens": st.integers(-2, 40) | junk,
    "ignore_eos": st.booleans() | junk,
    "stop_token_ids": st.lists(st.integers(-3, 60000), max_size=3) | junk,
    "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"]) | junk})
    | st.fixed_dictionaries(
        {
            "type": st.just("json_schema"),
            "json_schema": st.fixed_dictionaries({"name": st.text(max_size=5) | junk, "schema": schema})
            | junk,
        }
    )
    | junk,
    "tools": junk,
    "tool_choice": junk,
}
chat_body = (
    st.fixed_dictionaries(
        {
            "model": st.sampled_from(["tiny", "support", "acme/support", "../support", "globex/x", ""])
            | junk,
            "messages": st.lists(message, max_size=3) | junk,
        },
        optional=OPTIONAL,
    )
    | junk
)
key = st.sampled_from([ADMIN, ACME, "wrong", ""]) | st.text(
    st.characters(min_codepoint=33, max_codepoint=126), max_size=10
)


@FUZZ
@given(body=chat_body, api_key=key)
def test_chat_completions_never_5xx(client, body, api_key):
    check(generate(client, "/v1/chat/completions", body, api_key))


def generate(client, route: str, body, api_key: str):
    """POSTs a generation request, reading a stream to its end when one is asked for."""
    headers = {"Authorization": f"Bearer {api_key}"}
    if isinstance(body, dict) and body.get("stream") is True:
        with client.stream("POST", route, json=body, headers=headers) as r:
            r.read()
        return r
    return client.post(route, json=body, headers=headers)


prompt = (
    st.text(max_size=40)
    | st.lists(st.integers(-5, 70000), max_size=6)
    | st.lists(st.text(max_size=8) | st.lists(st.integers(-1, 600), max_size=3), max_size=3)
    | junk
)
completion_body = (
    st.fixed_dictionaries(
        {"model": st.sampled_from(["tiny", "support", "globex/x", ""]) | junk, "prompt": prompt},
        optional={
            **{k: v for k, v in OPTIONAL.items() if k not in ("logprobs", "top_logprobs")},
            "logprobs": st.integers(-1, 25) | junk,
            "echo": st.booleans() | junk,
            "suffix": st.text(max_size=4) | junk,
            "best_of": st.integers(0, 4) | junk,
        },
    )
    | junk
)


@FUZZ
@given(body=completion_body, api_key=key)
def test_text_completions_never_5xx(client, body, api_key):
    check(generate(client, "/v1/completions", body, api_key))


embedding_body = (
    st.fixed_dictionaries(
        {"model": st.sampled_from(["tiny", "support", "globex/x", ""]) | junk, "input": prompt},
        optional={
            "encoding_format": st.sampled_from(["float", "base64", None]) | junk,
            "dimensions": st.integers(-1, 200) | junk,
            "user": junk,
        },
    )
    | junk
)


@FUZZ
@given(body=embedding_body, api_key=key)
def test_embeddings_never_5xx(client, body, api_key):
    check(client.post("/v1/embeddings", json=body, headers={"Authorization": f"Bearer {api_key}"}))


tokenize_body = (
    st.fixed_dictionaries(
        {"model": st.sampled_from(["tiny", "support", "globex/x"]) | junk},
        optional={
            "prompt": st.text(max_size=20) | junk,
            "messages": st.lists(message, max_size=3) | junk,
            "tools": junk,
            "add_generation_prompt": st.booleans() | junk,
            "return_token_strs": st.booleans() | junk,
            "tokens": st.lists(st.integers(-5, 70000), max_size=5) | junk,
        },
    )
    | junk
)


@FUZZ
@given(route=st.sampled_from(["/tokenize", "/detokenize"]), body=tokenize_body, api_key=key)
def test_tokenize_never_5xx(client, route, body, api_key):
    check(client.post(route, json=body, headers={"Authorization": f"Bearer {api_key}"}))


name = (
    st.sampled_from(["support", "new", "x" * 130, "a/b", "..", "ft:tiny:acme:s:1"])
    | st.text(max_size=12)
    | junk
)
path = (
    st.sampled_from(["support", "../globex", "/etc", "acme/support", "", "../../..", "nope"])
    | st.text(max_size=12)
    | junk
)
admin_body = (
    st.fixed_dictionaries(
        {"tenant": st.sampled_from(["acme", "globex", "nobody"]) | junk, "name": name},
        optional={"path": path, "replace": st.booleans() | junk, "pinned": st.booleans() | junk},
    )
    | junk
)
vllm_body = (
    st.fixed_dictionaries(
        {"lora_name": name, "lora_path": path}, optional={"load_inplace": junk, "tenant": junk}
    )
    | junk
)


@FUZZ
@given(
    route=st.sampled_from(["/v1/admin/adapters", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"]),
    body=admin_body | vllm_body,
    api_key=st.sampled_from([ADMIN, ADMIN, ACME, "wrong"]),
)
def test_admin_posts_never_5xx(client, route, body, api_key):
    check(client.post(route, json=body, headers={"Authorization": f"Bearer {api_key}"}))


@FUZZ
@given(
    tenant=st.text(max_size=10) | st.just("acme"),
    adapter=st.text(max_size=10) | st.just("support"),
    api_key=st.sampled_from([ADMIN, ACME]),
)
def test_admin_paths_and_reads_never_5xx(client, tenant, adapter, api_key):
    headers = {"Authorization": f"Bearer {api_key}"}
    quoted = f"{urllib.parse.quote(tenant, safe='')}/{urllib.parse.quote(adapter, safe='')}"
    check(client.delete(f"/v1/admin/adapters/{quoted}", headers=headers))
    check(client.get(f"/v1/models/{quoted}", headers=headers))
    check(client.get("/v1/usage", params={"tenant": tenant}, headers=headers))
    check(client.get("/v1/admin/adapters", headers=headers))
    assert (
        client.post(
            "/v1/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            headers={"Authorization": f"Bearer {ACME}"},
        ).status_code
        == 200
    )


def test_label_values_stay_bounded_after_fuzzing(client):
    """Unknown models and failed auth never create label values (runs after the fuzz tests)."""
    from prometheus_client.parser import text_string_to_metric_families

    tenants, adapters = set(), set()
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            tenants |= {sample.labels["tenant"]} if "tenant" in sample.labels else set()
            adapters |= {sample.labels["adapter"]} if "adapter" in sample.labels else set()
    assert tenants and tenants <= {"acme", "admin"}, tenants
    assert adapters and adapters <= {"(base)", "support", "acme/support"}, adapters
