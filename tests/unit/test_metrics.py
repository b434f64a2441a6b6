"""Metrics and the cost model without a server: bounded labels, cost attribution, price tables."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mygpt.cost import CLOSED_API_PRICES, CLOSED_EMBEDDING_PRICES, CostModel, load_price_table
from mygpt.metrics import BASE_LABEL, OTHER_LABEL, Metrics


def samples(metrics: Metrics) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def test_adapter_labels_fold_into_other_past_the_bound():
    m = Metrics(CostModel(), max_adapter_labels=2)
    for name in ["a", "b", "c", "d", None, "a"]:
        m.record_request("t", name, "stop", 3, 2)
    labels = {s.labels["adapter"] for s in samples(m)["mygpt_requests_total"]}
    assert labels == {"a", "b", OTHER_LABEL, BASE_LABEL}
    other = next(s for s in samples(m)["mygpt_requests_total"] if s.labels["adapter"] == OTHER_LABEL)
    assert other.value == 2


def test_request_records_tokens_latencies_cost_and_closed_api_equivalents():
    m = Metrics(CostModel(per_hour_usd=36.0, prices={"x/cheap": (1.0, 2.0)}))
    cost, closed = m.record_request(
        "t",
        None,
        "length",
        1000,
        500,
        engine_s=10.0,
        queue_s=0.01,
        ttft_s=0.2,
        e2e_s=1.0,
        token_gaps=[0.02] * 4,
    )
    assert cost == pytest.approx(0.1) and closed == {"x/cheap": pytest.approx((1000 * 1.0 + 500 * 2.0) / 1e6)}
    s = samples(m)
    assert (
        s["mygpt_prompt_tokens_total"][0].value == 1000 and s["mygpt_generation_tokens_total"][0].value == 500
    )
    assert next(x for x in s["mygpt_inter_token_latency_seconds_count"]).value == 4
    assert next(x for x in s["mygpt_time_to_first_token_seconds_sum"]).value == pytest.approx(0.2)
    assert s["mygpt_cost_usd_total"][0].value == pytest.approx(0.1)
    assert s["mygpt_closed_api_equivalent_usd_total"][0].labels == {
        "tenant": "t",
        "provider_model": "x/cheap",
        "kind": "generation",
    }
    assert s["mygpt_cost_per_hour_usd"][0].value == 36.0
    m.record_rejected("t", "ad")
    rejected = [x for x in samples(m)["mygpt_requests_total"] if x.labels["outcome"] == "rejected"]
    assert rejected[0].labels["adapter"] == "ad" and rejected[0].value == 1


def test_step_and_scrape_time_values():
    from mygpt.lora.cache import CacheStats

    m = Metrics(CostModel())
    m.record_step(running=3, waiting=2, rows=3, tokens=40, seconds=0.05)
    m.watch_adapter_cache(
        lambda: (
            CacheStats(hits=5, loads=2, load_failures=1),
            {"a@1": {"pinned": True, "in_use": 1}, "b@1": {"pinned": False, "in_use": 0}},
            3,  # the registry's: files refused when read
        )
    )
    m.watch_device_memory(lambda: {"kv_cache": 1024})
    s = samples(m)
    assert s["mygpt_num_requests_running"][0].value == 3 and s["mygpt_num_requests_waiting"][0].value == 2
    assert s["mygpt_engine_busy_seconds_total"][0].value == pytest.approx(0.05)
    assert s["mygpt_lora_hits_total"][0].value == 5 and s["mygpt_lora_loads_total"][0].value == 2
    assert s["mygpt_lora_load_failures_total"][0].value == 4
    assert s["mygpt_lora_resident_adapters"][0].value == 2 and s["mygpt_lora_pinned_adapters"][0].value == 1
    assert s["mygpt_device_memory_bytes"][0].labels == {"kind": "kv_cache"}
    assert "process_resident_memory_bytes" in s


def test_price_tables(tmp_path):
    assert CLOSED_API_PRICES["openai/gpt-4o"] == (2.50, 10.00, 1.25)
    path = tmp_path / "prices.yaml"
    path.write_text(
        "acme/model: {input: 1.5, output: 3}\nacme/cache: {input: 2, output: 4, cached_input: 0.5}\n"
    )
    chat = {"acme/model": (1.5, 3.0), "acme/cache": (2.0, 4.0, 0.5)}
    assert load_price_table(path) == (chat, CLOSED_EMBEDDING_PRICES)  # no embedding model: the shipped
    path.write_text(path.read_text() + "acme/embed: {embedding: 0.01}\n")
    assert load_price_table(path) == (chat, {"acme/embed": 0.01})
    path.write_text("acme/model: {input: 1.5}\n")
    with pytest.raises(ValueError, match="output"):
        load_price_table(path)


def test_an_embeddings_request_is_priced_on_the_embedding_models_and_kept_out_of_generation_metrics():
    m = Metrics(
        CostModel(per_hour_usd=3600.0, prices={"x/chat": (1.0, 2.0)}, embedding_prices={"x/emb": 0.5})
    )
    cost, closed = m.record_request(
        "t", None, "stop", 2_000_000, 0, engine_s=0.25, e2e_s=0.3, embedding_inputs=7
    )
    assert cost == pytest.approx(0.25) and closed == {"x/emb": pytest.approx(1.0)}
    text = m.exposition().decode()
    assert 'mygpt_embedding_inputs_total{adapter="(base)",tenant="t"} 7.0' in text
    assert 'mygpt_embedding_request_latency_seconds_count{adapter="(base)",tenant="t"} 1.0' in text
    assert (
        'mygpt_closed_api_equivalent_usd_total{kind="embeddings",provider_model="x/emb",tenant="t"} 1.0'
        in text
    )
    assert 'mygpt_embedding_cost_usd_total{adapter="(base)",tenant="t"} 0.25' in text
    assert 'mygpt_prompt_tokens_total{adapter="(base)",tenant="t"} 2e+06' in text
    assert "x/chat" not in text  # not priced as chat tokens
    assert 'mygpt_e2e_request_latency_seconds_count{adapter="(base)",tenant="t"}' not in text
    assert 'mygpt_request_prompt_tokens_count{adapter="(base)",tenant="t"}' not in text


def test_prompt_tokens_from_the_prefix_cache_are_priced_as_cached_input_where_a_provider_has_one():
    cost = CostModel(prices={"x/caches": (2.0, 4.0, 0.5), "x/does-not": (2.0, 4.0)})
    full = cost.closed_api_usd(1_000_000, 0)
    cached = cost.closed_api_usd(1_000_000, 0, cached_tokens=600_000)
    assert full == {"x/caches": 2.0, "x/does-not": 2.0}
    assert cached == {"x/caches": pytest.approx(0.4 * 2.0 + 0.6 * 0.5), "x/does-not": 2.0}
    m = Metrics(cost)
    _, closed = m.record_request("t", None, "stop", 1_000_000, 0, cached_tokens=600_000)
    assert closed == cached
