#!/usr/bin/env python3
"""Writes the Grafana dashboard (deploy/grafana/dashboards/mygpt.json and the Helm chart's copy).

    .venv/bin/python scripts/make_dashboard.py        # after changing a panel here

Every query uses the `tenant` variable; tests/integration/test_prometheus.py runs each one against a
real Prometheus that scraped a real server.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = [ROOT / "deploy/grafana/dashboards/mygpt.json", ROOT / "helm/mygpt/dashboards/mygpt.json"]
DS = {"type": "prometheus", "uid": "${datasource}"}
T = 'tenant=~"$tenant"'
RI = "$__rate_interval"


def q(expr: str, legend: str = "") -> dict:
    return {"expr": expr, "legendFormat": legend, "datasource": DS}


def quantiles(metric: str) -> list[dict]:
    return [
        q(f"histogram_quantile({p}, sum by (le) (rate({metric}_bucket{{{T}}}[{RI}])))", f"p{int(p * 100)}")
        for p in (0.5, 0.95, 0.99)
    ]


def panel(
    title: str, targets: list[dict], unit: str = "short", kind: str = "timeseries", desc: str = ""
) -> dict:
    p = {
        "type": kind, "title": title, "description": desc, "datasource": DS, "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []}, "options": {},
    }  # fmt: skip
    if kind == "stat":
        p["options"] = {
            "reduceOptions": {"calcs": ["lastNotNull"]},
            "colorMode": "value",
            "graphMode": "area",
        }
    if kind == "bargauge":
        p["options"] = {
            "reduceOptions": {"calcs": ["lastNotNull"]},
            "displayMode": "basic",
            "orientation": "horizontal",
        }
    return p


ROWS = {
    "Throughput": [
        panel(
            "Tokens per second",
            [
                q(f"sum(rate(mygpt_generation_tokens_total{{{T}}}[{RI}]))", "generated"),
                q(f"sum(rate(mygpt_prompt_tokens_total{{{T}}}[{RI}]))", "prompt"),
            ],
        ),
        panel(
            "Generated tokens per second by tenant",
            [
                q(f"sum by (tenant) (rate(mygpt_generation_tokens_total{{{T}}}[{RI}]))", "{{tenant}}"),
            ],
        ),
        panel(
            "Requests per second by outcome",
            [
                q(f"sum by (outcome) (rate(mygpt_requests_total{{{T}}}[{RI}]))", "{{outcome}}"),
            ],
            "reqps",
        ),
    ],
    "Latency": [
        panel("Time to first token", quantiles("mygpt_time_to_first_token_seconds"), "s"),
        panel("Inter-token latency", quantiles("mygpt_inter_token_latency_seconds"), "s"),
        panel("End-to-end request latency", quantiles("mygpt_e2e_request_latency_seconds"), "s"),
    ],
    "Queue and batch": [
        panel(
            "Requests running and waiting",
            [
                q("sum(mygpt_num_requests_running)", "running"),
                q("sum(mygpt_num_requests_waiting)", "waiting"),
            ],
        ),
        panel(
            "Mean batch size (rows per engine step)",
            [
                q(f"sum(rate(mygpt_batch_size_sum[{RI}])) / sum(rate(mygpt_batch_size_count[{RI}]))", "rows"),
            ],
        ),
        panel("Queue time", quantiles("mygpt_request_queue_time_seconds"), "s"),
        panel(
            "Engine busy (fraction of time in steps)",
            [
                q(f"sum(rate(mygpt_engine_busy_seconds_total[{RI}]))", "busy"),
            ],
            "percentunit",
        ),
        panel(
            "Prefix cache hit rate (prompt tokens)",
            [
                q(
                    f"sum(rate(mygpt_prefix_cache_hit_tokens_total[{RI}])) / sum(rate(mygpt_prefix_cache_queried_tokens_total[{RI}]))",
                    "hit rate",
                ),
            ],
            "percentunit",
            desc="Prompt tokens whose KV came from the prefix cache instead of being computed.",
        ),
    ],
    "Adapters": [
        panel(
            "Adapters on the device",
            [
                q("sum(mygpt_lora_resident_adapters)", "resident"),
                q("sum(mygpt_lora_pinned_adapters)", "pinned"),
                q("sum(mygpt_lora_in_use_adapters)", "in use"),
            ],
        ),
        panel(
            "Adapter cache events per second",
            [
                q(f"sum(rate(mygpt_lora_hits_total[{RI}]))", "hits"),
                q(f"sum(rate(mygpt_lora_misses_total[{RI}]))", "misses"),
                q(f"sum(rate(mygpt_lora_loads_total[{RI}]))", "loads"),
                q(f"sum(rate(mygpt_lora_evictions_total[{RI}]))", "evictions"),
                q(f"sum(rate(mygpt_lora_load_failures_total[{RI}]))", "load failures"),
            ],
        ),
        panel(
            "Adapter load time (p95)",
            [
                q(
                    f"histogram_quantile(0.95, sum by (le) (rate(mygpt_lora_load_duration_seconds_bucket[{RI}])))",
                    "p95",
                ),
            ],
            "s",
        ),
    ],
    "Cost": [
        panel(
            "$ per 1M tokens now (busy time)",
            [
                q(
                    f"sum(rate(mygpt_cost_usd_total{{{T}}}[5m])) / (sum(rate(mygpt_prompt_tokens_total{{{T}}}[5m])) + sum(rate(mygpt_generation_tokens_total{{{T}}}[5m]))) * 1e6",
                    "USD / 1M tokens",
                ),
            ],
            "currencyUSD",
            "stat",
            "The tokens' share of engine busy time at the configured hourly price.",
        ),
        panel(
            "$ per 1M tokens all-in (hourly price / tokens served)",
            [
                q(
                    "max(mygpt_cost_per_hour_usd) / 3600 / (sum(rate(mygpt_prompt_tokens_total[5m])) + sum(rate(mygpt_generation_tokens_total[5m]))) * 1e6",
                    "USD / 1M tokens",
                ),
            ],
            "currencyUSD",
            "stat",
            "Idle time included: what the server costs per hour over the tokens it served.",
        ),
        panel(
            "Cost by tenant (dashboard range)",
            [
                q(f"sum by (tenant) (increase(mygpt_cost_usd_total{{{T}}}[$__range]))", "{{tenant}}"),
            ],
            "currencyUSD",
            "bargauge",
        ),
        panel(
            "The same tokens on closed APIs (dashboard range)",
            [
                q(
                    f"sum by (provider_model) (increase(mygpt_closed_api_equivalent_usd_total{{{T}}}[$__range]))",
                    "{{provider_model}}",
                ),
            ],
            "currencyUSD",
            "bargauge",
        ),
        panel(
            "Savings against each closed API (dashboard range)",
            [
                q(
                    f'sum by (provider_model) (increase(mygpt_closed_api_equivalent_usd_total{{{T},kind="generation"}}[$__range])) - scalar(sum(increase(mygpt_cost_usd_total{{{T}}}[$__range])) - (sum(increase(mygpt_embedding_cost_usd_total{{{T}}}[$__range])) or vector(0)))',
                    "{{provider_model}}",
                ),
                q(
                    f'sum by (provider_model) (increase(mygpt_closed_api_equivalent_usd_total{{{T},kind="embeddings"}}[$__range])) - scalar(sum(increase(mygpt_embedding_cost_usd_total{{{T}}}[$__range])))',
                    "{{provider_model}}",
                ),
            ],
            "currencyUSD",
            "bargauge",
            "Closed-API price of the same tokens minus our busy-time cost: chat models against the chat and "
            "text completions' cost, embedding models against the embeddings' cost.",
        ),
    ],
    "Embeddings": [
        panel(
            "Embedding inputs per second by tenant",
            [q(f"sum by (tenant) (rate(mygpt_embedding_inputs_total{{{T}}}[{RI}]))", "{{tenant}}")],
        ),
        panel(
            "Embeddings request latency",
            quantiles("mygpt_embedding_request_latency_seconds"),
            "s",
            desc="From an embeddings request's arrival to its last vector.",
        ),
    ],
    "Fine-tuning and batches": [
        panel(
            "Fine-tuning jobs",
            [q(f"sum by (status) (max by (tenant, status) (mygpt_finetune_jobs{{{T}}}))", "{{status}}")],
            desc="Queued and running jobs in the store (replicas sharing it report the same: max over them).",
        ),
        panel(
            "Fine-tuning: tokens trained per second by tenant",
            [q(f"sum by (tenant) (rate(mygpt_finetune_trained_tokens_total{{{T}}}[{RI}]))", "{{tenant}}")],
        ),
        panel(
            "Batches",
            [q(f"sum by (status) (max by (tenant, status) (mygpt_batches{{{T}}}))", "{{status}}")],
            desc="Batches not ended, in the store (replicas sharing it report the same: max over them).",
        ),
    ],
    "Memory": [
        panel("Process resident memory", [q("sum(process_resident_memory_bytes)", "RSS")], "bytes"),
        panel("Device memory", [q("sum by (kind) (mygpt_device_memory_bytes)", "{{kind}}")], "bytes"),
    ],
}


def dashboard() -> dict:
    panels, y, pid = [], 0, 1
    for title, row in ROWS.items():
        panels.append(
            {
                "type": "row",
                "title": title,
                "id": pid,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "collapsed": False,
                "panels": [],
            }
        )
        pid, y = pid + 1, y + 1
        width = 24 // len(row) if len(row) <= 4 else 8
        for i, p in enumerate(row):
            p = {
                **p,
                "id": pid,
                "gridPos": {"h": 8, "w": width, "x": (i * width) % 24, "y": y + (i * width) // 24 * 8},
            }
            panels.append(p)
            pid += 1
        y += 8 * ((len(row) * width + 23) // 24)
    return {
        "title": "mygpt",
        "uid": "mygpt-overview",
        "description": "Throughput, latency, queue and batch, adapters, and the cost of every token next to closed APIs.",
        "tags": ["mygpt", "llm"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                },
                {
                    "name": "tenant",
                    "label": "Tenant",
                    "type": "query",
                    "datasource": DS,
                    "query": {"query": "label_values(mygpt_requests_total, tenant)", "refId": "tenants"},
                    "definition": "label_values(mygpt_requests_total, tenant)",
                    "includeAll": True,
                    "allValue": ".*",
                    "multi": True,
                    "current": {"text": "All", "value": "$__all"},
                    "refresh": 2,
                },
            ]
        },
        "panels": panels,
    }


def main() -> None:
    text = json.dumps(dashboard(), indent=2) + "\n"
    for path in OUT:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
