"""/v1/embeddings through the official openai SDK against `mygpt serve` on the real default model:
vectors that retrieve, the SDK's base64 default, adapters, the metrics."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

MODEL = "SmolLM2-135M-Instruct"
DOCS = [
    "The cat sat on the mat.",
    "Quarterly revenue rose five percent.",
    "How do I reset my password?",
    "The weather tomorrow will be sunny and warm.",
    "Python is a programming language.",
]
QUERIES = [
    "A kitten is lying on a rug.",
    "Sales grew by 5% this quarter.",
    "I forgot my login credentials.",
    "Will it rain tomorrow?",
    "Which language should I learn to code?",
]


@pytest.fixture(scope="module")
def client(default_server):
    return openai.OpenAI(base_url=default_server.base_url + "/v1", api_key="unused", max_retries=0)


def vectors(response) -> np.ndarray:
    return np.array([d.embedding for d in response.data])


def test_each_query_retrieves_its_paraphrase_first(client):
    """The default chat model's vectors (the default "prompt" pooling) retrieve: each query's nearest
    document is its paraphrase."""
    r = client.embeddings.create(model=MODEL, input=DOCS + QUERIES)
    assert [d.index for d in r.data] == list(range(10)) and r.model == MODEL
    e = vectors(r)
    assert e.shape == (10, 576) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    similarity = e[5:] @ e[:5].T
    assert list(similarity.argmax(1)) == list(range(5)), similarity.round(3)


def test_base64_and_floats_and_token_ids_agree(client, tokenizer):
    packed = client.embeddings.create(model=MODEL, input=DOCS[:2])  # the SDK's default: base64
    floats = client.embeddings.create(model=MODEL, input=DOCS[:2], encoding_format="float")
    ids = client.embeddings.create(
        model=MODEL, input=[tokenizer(d)["input_ids"] for d in DOCS[:2]], encoding_format="float"
    )
    assert np.allclose(vectors(packed), vectors(floats), atol=1e-7)
    assert np.allclose(vectors(ids), vectors(floats), atol=1e-4)
    assert floats.usage.prompt_tokens == sum(len(tokenizer(d)["input_ids"]) for d in DOCS[:2])


def test_an_adapter_embeds_with_its_own_weights(client):
    base = client.embeddings.create(model=MODEL, input=DOCS[0], encoding_format="float")
    pirate = client.embeddings.create(model="pirate", input=DOCS[0], encoding_format="float")
    cosine = float(vectors(base)[0] @ vectors(pirate)[0])
    assert 0.5 < cosine < 0.9999, cosine  # the same text, moved by the adapter
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="someone-elses", input="x")


def test_bad_input_is_a_400_naming_it(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=MODEL, input="x", dimensions=256)
    assert e.value.body["param"] == "dimensions"
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=MODEL, input=["fine", ""])
    assert e.value.body["param"] == "input" and "input[1]" in e.value.body["message"]


def sample(server, name: str, labels: dict[str, str]) -> float:
    """A labelled sample of the server's /metrics; 0 if absent."""
    text = httpx.get(server.base_url + "/metrics").text
    samples = (s for family in text_string_to_metric_families(text) for s in family.samples)
    return next((s.value for s in samples if s.name == name and s.labels == labels), 0.0)


def test_the_metrics_count_inputs_and_price_them_as_embeddings(client, default_server):
    inputs = {"tenant": "default", "adapter": "(base)"}
    small = {"tenant": "default", "provider_model": "openai/text-embedding-3-small", "kind": "embeddings"}
    before = sample(default_server, "mygpt_embedding_inputs_total", inputs)
    priced = sample(default_server, "mygpt_closed_api_equivalent_usd_total", small)
    r = client.embeddings.create(model=MODEL, input=DOCS)
    assert sample(default_server, "mygpt_embedding_inputs_total", inputs) == before + len(DOCS)
    now = sample(default_server, "mygpt_closed_api_equivalent_usd_total", small)
    assert now - priced == pytest.approx(r.usage.prompt_tokens * 0.02 / 1e6)


def test_mygpt_bench_loads_embeddings(tiny_server, tmp_path):
    """`mygpt bench --embeddings N`: requests of N texts, each level's inputs/s and latency, as JSON."""
    import json
    import subprocess
    import sys

    out = tmp_path / "embed.json"
    cmd = [sys.executable, "-m", "mygpt", "bench", "--base-url", tiny_server.base_url + "/v1", "--models", "tiny",
           "--embeddings", "8", "--concurrency", "1,4", "--requests", "8", "--prompt-words", "12", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "inputs/s" in done.stdout
    results = json.loads(out.read_text())["results"]
    assert [r["concurrency"] for r in results] == [1, 4]
    for r in results:
        assert r["errors"] == 0 and r["inputs"] == 8 and r["inputs_per_s"] > 0
        assert r["prompt_tokens"] >= 8 * 8 * 12 and r["latency_p50"] > 0
