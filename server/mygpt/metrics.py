"""Prometheus metrics (names follow vLLM's, prefixed mygpt_) and the record_* helpers that fill them.

The engine calls record_step at its step boundaries and record_prefix_cache when it admits a request;
the API layer calls record_request when a request ends and record_rejected when one is refused; the
adapter cache calls record_adapter_load.
Nothing else talks to prometheus-client. Labels are bounded: `tenant` takes configured tenants only
(and "admin"); `adapter` the first `max_adapter_labels` adapter names seen, then "other"; the base
model is adapter="(base)".
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from mygpt.cost import CostModel

BASE_LABEL = "(base)"  # parentheses cannot occur in adapter names
OTHER_LABEL = "other"

# LLM-sized buckets: from a few milliseconds to tens of seconds (vLLM's, trimmed)
TTFT_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
ITL_BUCKETS = (
    0.002,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
)
E2E_BUCKETS = (
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    300.0,
)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LENGTH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256)


class Metrics:
    """One registry per server (tests build several in one process)."""

    def __init__(self, cost: CostModel, max_adapter_labels: int = 50):
        self.cost = cost
        disable_created_metrics()  # no `_created` series next to every counter and histogram
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes, cpu seconds, open fds
        PlatformCollector(registry=r)
        self._max_adapters = max_adapter_labels
        self._adapters: set[str] = set()
        self._lock = threading.Lock()
        ta = ["tenant", "adapter"]
        self.ttft = Histogram(
            "mygpt_time_to_first_token_seconds",
            "Time from the request's arrival to its first token.",
            ta,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "mygpt_inter_token_latency_seconds",
            "Time between two tokens of one choice.",
            ta,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "mygpt_e2e_request_latency_seconds",
            "Time from the request's arrival to its last token.",
            ta,
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "mygpt_request_queue_time_seconds",
            "Time a request waited for a batch slot.",
            ta,
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.prompt_len = Histogram(
            "mygpt_request_prompt_tokens",
            "Prompt tokens per request.",
            ta,
            buckets=LENGTH_BUCKETS,
            registry=r,
        )
        self.gen_len = Histogram(
            "mygpt_request_generation_tokens",
            "Completion tokens per request (all choices).",
            ta,
            buckets=LENGTH_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "mygpt_prompt_tokens", "Prompt tokens of finished requests.", ta, registry=r
        )
        self.gen_tokens = Counter(
            "mygpt_generation_tokens", "Completion tokens of finished requests.", ta, registry=r
        )
        self.requests = Counter(
            "mygpt_requests",
            "Requests by outcome: stop, length, cancelled, rejected, error.",
            [*ta, "outcome"],
            registry=r,
        )
        self.cost_usd = Counter(
            "mygpt_cost_usd",
            "Cost of the requests' share of engine busy time at the configured hourly price.",
            ta,
            registry=r,
        )
        self.closed_usd = Counter(
            "mygpt_closed_api_equivalent_usd",
            "What the same prompt and completion tokens would cost on a closed API; kind: generation "
            "(chat and text completions, on chat models) or embeddings (on embedding models).",
            ["tenant", "provider_model", "kind"],
            registry=r,
        )
        self.embedding_cost_usd = Counter(
            "mygpt_embedding_cost_usd",
            "The part of mygpt_cost_usd that /v1/embeddings requests took.",
            ta,
            registry=r,
        )
        self.embedding_inputs = Counter(
            "mygpt_embedding_inputs", "Inputs of finished /v1/embeddings requests.", ta, registry=r
        )
        self.embedding_e2e = Histogram(
            "mygpt_embedding_request_latency_seconds",
            "Time from an embeddings request's arrival to its last vector.",
            ta,
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.running = Gauge(
            "mygpt_num_requests_running",
            "Requests in the running batch (prefilling or decoding).",
            registry=r,
        )
        self.waiting = Gauge("mygpt_num_requests_waiting", "Requests waiting for a batch slot.", registry=r)
        self.batch = Histogram(
            "mygpt_batch_size", "Rows (choices) in one engine step.", buckets=BATCH_BUCKETS, registry=r
        )
        self.step_tokens = Counter(
            "mygpt_engine_step_tokens",
            "Tokens computed by engine steps (prompt chunks + decoded rows).",
            registry=r,
        )
        self.busy = Counter("mygpt_engine_busy_seconds", "Time the engine spent in steps.", registry=r)
        self.prefix_queried = Counter(
            "mygpt_prefix_cache_queried_tokens",
            "Prompt tokens of admitted requests that looked in the prefix cache.",
            registry=r,
        )
        self.prefix_hits = Counter(
            "mygpt_prefix_cache_hit_tokens",
            "Prompt tokens found in the prefix cache (their KV reused, not computed).",
            registry=r,
        )
        self.load_s = Histogram(
            "mygpt_lora_load_duration_seconds",
            "Copying one adapter into a device slot.",
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.hourly = Gauge("mygpt_cost_per_hour_usd", "The server's configured cost per hour.", registry=r)
        self.hourly.set(cost.per_hour_usd)
        self._cache_stats: Callable[[], tuple[object, dict, int]] | None = None
        self._device_memory: Callable[[], dict[str, int]] | None = None
        self._background: Callable[[], Background] | None = None
        r.register(_Collected(self))

    # ------------------------------------------------------------------ labels
    def adapter_label(self, adapter: str | None) -> str:
        if adapter is None:
            return BASE_LABEL
        with self._lock:
            if adapter in self._adapters:
                return adapter
            if len(self._adapters) < self._max_adapters:
                self._adapters.add(adapter)
                return adapter
        return OTHER_LABEL

    # ------------------------------------------------------------------ record_* helpers
    def record_step(self, running: int, waiting: int, rows: int, tokens: int, seconds: float) -> None:
        """Engine thread, after each step."""
        self.running.set(running)
        self.waiting.set(waiting)
        if rows:
            self.batch.observe(rows)
        self.step_tokens.inc(tokens)
        self.busy.inc(seconds)

    def record_prefix_cache(self, prompt_tokens: int, cached_tokens: int) -> None:
        """Engine thread, when a request is admitted."""
        self.prefix_queried.inc(prompt_tokens)
        self.prefix_hits.inc(cached_tokens)

    def record_request(
        self, tenant: str, adapter: str | None, outcome: str, prompt_tokens: int, completion_tokens: int,
        engine_s: float = 0.0, queue_s: float | None = None, ttft_s: float | None = None,
        e2e_s: float | None = None, token_gaps: list[float] = (), cached_tokens: int = 0,
        embedding_inputs: int | None = None,
    ) -> tuple[float, dict[str, float]]:  # fmt: skip
        """A request ended (any outcome but rejected). Returns (cost, closed-API equivalents) in USD.
        An embeddings request (embedding_inputs: how many) has its own latency histogram and is priced
        on the closed embedding models; the generation histograms leave it out."""
        labels = (tenant, self.adapter_label(adapter))
        self.requests.labels(*labels, outcome).inc()
        self.prompt_tokens.labels(*labels).inc(prompt_tokens)
        if queue_s is not None:
            self.queue.labels(*labels).observe(queue_s)
        cost = self.cost.serving_usd(engine_s)
        self.cost_usd.labels(*labels).inc(cost)
        kind = "generation" if embedding_inputs is None else "embeddings"
        if embedding_inputs is not None:
            self.embedding_inputs.labels(*labels).inc(embedding_inputs)
            self.embedding_cost_usd.labels(*labels).inc(cost)
            if e2e_s is not None:
                self.embedding_e2e.labels(*labels).observe(e2e_s)
            closed = self.cost.closed_embedding_usd(prompt_tokens)
        else:
            self._record_generation(labels, prompt_tokens, completion_tokens, ttft_s, e2e_s, token_gaps)
            closed = self.cost.closed_api_usd(prompt_tokens, completion_tokens, cached_tokens)
        for provider_model, usd in closed.items():
            self.closed_usd.labels(tenant, provider_model, kind).inc(usd)
        return cost, closed

    def _record_generation(
        self, labels: tuple[str, str], prompt_tokens: int, completion_tokens: int, ttft_s: float | None,
        e2e_s: float | None, token_gaps: list[float],
    ) -> None:  # fmt: skip
        self.gen_tokens.labels(*labels).inc(completion_tokens)
        self.prompt_len.labels(*labels).observe(prompt_tokens)
        self.gen_len.labels(*labels).observe(completion_tokens)
        if ttft_s is not None:
            self.ttft.labels(*labels).observe(ttft_s)
        if e2e_s is not None:
            self.e2e.labels(*labels).observe(e2e_s)
        itl = self.itl.labels(*labels)
        for gap in token_gaps:
            itl.observe(gap)

    def record_rejected(self, tenant: str, adapter: str | None) -> None:
        self.requests.labels(tenant, self.adapter_label(adapter), "rejected").inc()

    def record_adapter_load(self, seconds: float) -> None:
        self.load_s.observe(seconds)

    def watch_adapter_cache(self, snapshot: Callable[[], tuple[object, dict, int]]) -> None:
        """`snapshot()` -> (CacheStats, {key: {"pinned": bool, ...}}, the registry's read failures), read
        at scrape time."""
        self._cache_stats = snapshot

    def watch_device_memory(self, read: Callable[[], dict[str, int]]) -> None:
        self._device_memory = read

    def watch_background(self, read: Callable[[], Background]) -> None:
        """`read()`: the fine-tuning and batch work, read at scrape time (Background)."""
        self._background = read

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class Background:
    """Fine-tuning and batch work: open jobs and batches in the store by (tenant, status), the same on
    every replica sharing the store (dashboards take the max over replicas); tokens trained by this
    replica's trainer, by tenant. Configured tenants only, each with every open status (zeros too)."""

    jobs: dict[tuple[str, str], int]
    batches: dict[tuple[str, str], int]
    trained_tokens: dict[str, int]
    trainers: int = 0  # servers that train jobs for this base model, seen in the store lately


class _Collected:
    """Values read at scrape time: the adapter cache's counters and gauges, device memory, background
    work."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        m = self.metrics
        if m._cache_stats is not None:
            stats, resident, read_failures = m._cache_stats()
            for name, doc in [
                ("loads", "Adapters copied into a device slot."),
                ("load_failures", "Adapter loads that failed: files refused when read (a request's, an admin's) or a copy into a slot."),
                ("evictions", "Adapters evicted from a device slot."), ("hits", "Requests whose adapter was resident."),
                ("misses", "Requests whose adapter had to be loaded."),
            ]:  # fmt: skip
                value = getattr(stats, name) + (read_failures if name == "load_failures" else 0)
                yield CounterMetricFamily(f"mygpt_lora_{name}", doc, value=value)
            yield GaugeMetricFamily(
                "mygpt_lora_resident_adapters", "Adapter versions in device slots.", value=len(resident)
            )
            pinned = sum(1 for v in resident.values() if v["pinned"])
            yield GaugeMetricFamily(
                "mygpt_lora_pinned_adapters", "Adapters pinned in device slots.", value=pinned
            )
            in_use = sum(1 for v in resident.values() if v["in_use"])
            yield GaugeMetricFamily(
                "mygpt_lora_in_use_adapters", "Adapters used by running requests.", value=in_use
            )
        if m._device_memory is not None:
            g = GaugeMetricFamily(
                "mygpt_device_memory_bytes", "Accelerator memory (torch allocator).", labels=["kind"]
            )
            for kind, value in m._device_memory().items():
                g.add_metric([kind], value)
            yield g
        if m._background is not None:
            work = m._background()
            for name, doc, counts in [
                ("mygpt_finetune_jobs", "Fine-tuning jobs queued, running or paused, in the store (every replica "
                 "sharing it reports the same).", work.jobs),
                ("mygpt_batches", "Batches not ended, in the store (every replica sharing it reports the "
                 "same).", work.batches),
            ]:  # fmt: skip
                g = GaugeMetricFamily(name, doc, labels=["tenant", "status"])
                for (tenant, status), n in sorted(counts.items()):
                    g.add_metric([tenant, status], n)
                yield g
            c = CounterMetricFamily(
                "mygpt_finetune_trained_tokens",
                "Assistant tokens trained by this replica.",
                labels=["tenant"],
            )
            for tenant, n in sorted(work.trained_tokens.items()):
                c.add_metric([tenant], n)
            yield c
            yield GaugeMetricFamily(
                "mygpt_finetune_trainers",
                "Servers that train fine-tuning jobs for this base model, seen in the store in the last 30 s "
                "(every replica sharing it reports the same; 0 with queued jobs: they wait).",
                value=work.trainers,
            )
