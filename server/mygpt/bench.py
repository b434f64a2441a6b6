"""`mygpt bench`: a load generator on the openai async client against any OpenAI-compatible server.

Reports aggregate output tokens/s, time to first token and inter-token latency (p50/p95/p99) and
writes the results as JSON. The same harness measures mygpt and the baselines, in the same run.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

TOPICS = ["the sea", "a city at night", "coffee", "mountains", "a robot", "the moon", "autumn", "trains"]


@dataclass
class RequestResult:
    ttft_s: float
    itl_s: list[float]
    e2e_s: float
    completion_tokens: int
    prompt_tokens: int
    model: str


@dataclass
class BenchResult:
    label: str
    concurrency: int
    requests: int
    models: list[str]
    max_tokens: int
    wall_s: float
    output_tokens: int
    tokens_per_s: float
    ttft_p50: float
    ttft_p95: float
    ttft_p99: float
    itl_p50: float
    itl_p95: float
    itl_p99: float
    errors: int = 0
    extra: dict = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def prompt_for(i: int, prompt_words: int) -> list[dict]:
    rng = random.Random(i)
    filler = " ".join(rng.choice(TOPICS).split()[-1] for _ in range(max(0, prompt_words - 12)))
    text = f"Write a long story about {TOPICS[i % len(TOPICS)]}. {filler}".strip()
    return [{"role": "user", "content": text}]


async def _one(
    client, model: str, i: int, max_tokens: int, prompt_words: int, extra_body: dict
) -> RequestResult:
    t0 = time.perf_counter()
    stamps: list[float] = []
    usage = None
    stream = await client.chat.completions.create(
        model=model, messages=prompt_for(i, prompt_words), max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=extra_body,
    )  # fmt: skip
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
    t1 = time.perf_counter()
    if not stamps:
        stamps = [t1]
    tokens = usage.completion_tokens if usage else len(stamps)
    # chunks may carry several tokens: spread the gaps over the tokens they carry
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    per_token = (stamps[-1] - stamps[0]) / max(tokens - 1, 1)
    itl = gaps if len(gaps) == tokens - 1 else [per_token] * max(tokens - 1, 0)
    return RequestResult(stamps[0] - t0, itl, t1 - t0, tokens, usage.prompt_tokens if usage else 0, model)


async def run_bench(
    base_url: str,
    models: list[str],
    concurrency: int,
    requests: int,
    max_tokens: int,
    prompt_words: int = 32,
    label: str = "mygpt",
    api_key: str = "unused",
    extra_body: dict | None = None,
) -> BenchResult:
    import openai

    results: list[RequestResult] = []
    errors = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    async with openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600) as client:

        async def worker() -> None:
            nonlocal errors
            while not queue.empty():
                i = queue.get_nowait()
                try:
                    model = models[i % len(models)]
                    results.append(await _one(client, model, i, max_tokens, prompt_words, extra_body or {}))
                except Exception as exc:  # counted and reported, never hidden
                    errors += 1
                    print(f"request {i} failed: {exc}")

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ttft = [r.ttft_s for r in results]
    itl = [g for r in results for g in r.itl_s]
    out = sum(r.completion_tokens for r in results)
    return BenchResult(
        label=label, concurrency=concurrency, requests=requests, models=models, max_tokens=max_tokens,
        wall_s=wall, output_tokens=out, tokens_per_s=out / wall if wall else 0.0,
        ttft_p50=percentile(ttft, 0.5), ttft_p95=percentile(ttft, 0.95), ttft_p99=percentile(ttft, 0.99),
        itl_p50=percentile(itl, 0.5), itl_p95=percentile(itl, 0.95), itl_p99=percentile(itl, 0.99), errors=errors,
    )  # fmt: skip


@dataclass
class EmbedResult:
    """An embeddings load: requests of `inputs` texts each, `concurrency` at a time."""

    label: str
    concurrency: int
    requests: int
    inputs: int  # per request
    wall_s: float
    prompt_tokens: int
    inputs_per_s: float
    tokens_per_s: float
    latency_p50: float
    latency_p95: float
    latency_p99: float
    errors: int = 0


async def run_embed_bench(
    base_url: str, model: str, concurrency: int, requests: int, inputs: int, words: int, label: str = "mygpt",
    api_key: str = "unused",
) -> EmbedResult:  # fmt: skip
    """`requests` embeddings requests of `inputs` texts of about `words` words, `concurrency` at a time."""
    import openai

    latencies: list[float] = []
    tokens, errors = 0, 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)

    def texts(i: int) -> list[str]:
        rng = random.Random(i)
        return [" ".join(rng.choice(TOPICS).split()[-1] for _ in range(words)) for _ in range(inputs)]

    async with openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600) as client:

        async def worker() -> None:
            nonlocal tokens, errors
            while not queue.empty():
                i = queue.get_nowait()
                t0 = time.perf_counter()
                try:
                    r = await client.embeddings.create(model=model, input=texts(i))
                except Exception as exc:  # counted and reported, never hidden
                    errors += 1
                    print(f"request {i} failed: {exc}")
                    continue
                latencies.append(time.perf_counter() - t0)
                tokens += r.usage.prompt_tokens

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    done = len(latencies)
    return EmbedResult(
        label=label, concurrency=concurrency, requests=requests, inputs=inputs, wall_s=wall, prompt_tokens=tokens,
        inputs_per_s=done * inputs / wall if wall else 0.0, tokens_per_s=tokens / wall if wall else 0.0,
        latency_p50=percentile(latencies, 0.5), latency_p95=percentile(latencies, 0.95),
        latency_p99=percentile(latencies, 0.99), errors=errors,
    )  # fmt: skip


def format_embed_table(results: list[EmbedResult]) -> str:
    head = f"{'label':<28} {'conc':>4} {'inputs':>6} {'inputs/s':>9} {'tok/s':>8} {'p50':>8} {'p95':>8} {'p99':>8} {'err':>3}"
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(
            f"{r.label:<28} {r.concurrency:>4} {r.inputs:>6} {r.inputs_per_s:>9.1f} {r.tokens_per_s:>8.0f} "
            f"{r.latency_p50 * 1e3:>6.0f}ms {r.latency_p95 * 1e3:>6.0f}ms {r.latency_p99 * 1e3:>6.0f}ms {r.errors:>3}"
        )
    return "\n".join(rows)


def format_table(results: list[BenchResult]) -> str:
    head = f"{'label':<28} {'conc':>4} {'models':>6} {'tok/s':>8} {'TTFT p50':>9} {'p95':>7} {'ITL p50':>8} {'p95':>7} {'p99':>7} {'err':>3}"
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(
            f"{r.label:<28} {r.concurrency:>4} {len(set(r.models)):>6} {r.tokens_per_s:>8.1f} "
            f"{r.ttft_p50 * 1e3:>7.0f}ms {r.ttft_p95 * 1e3:>5.0f}ms {r.itl_p50 * 1e3:>6.1f}ms "
            f"{r.itl_p95 * 1e3:>5.1f}ms {r.itl_p99 * 1e3:>5.1f}ms {r.errors:>3}"
        )
    return "\n".join(rows)


def save(results: list[BenchResult] | list[EmbedResult], path: Path, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=2))


def median_of(runs: list[BenchResult]) -> BenchResult:
    """The run with the median throughput (machines are noisy: repeat, report the median)."""
    return sorted(runs, key=lambda r: r.tokens_per_s)[len(runs) // 2]


def main(args) -> None:
    """Each concurrency level --repeat times, the median run reported: chat streams, or with
    --embeddings N, embeddings requests of N texts."""
    models = args.models.split(",")
    if args.embeddings:
        run, rate, table = (
            lambda conc: run_embed_bench(
                args.base_url, models[0], conc, args.requests or max(conc * 2, 4), args.embeddings,
                args.prompt_words, args.label,
            ),
            lambda r: r.inputs_per_s,
            format_embed_table,
        )  # fmt: skip
    else:
        extra_body = json.loads(args.extra_body) if args.extra_body else None
        run, rate, table = (
            lambda conc: run_bench(
                args.base_url, models, conc, args.requests or max(conc * 2, 4), args.max_tokens,
                args.prompt_words, args.label, extra_body=extra_body,
            ),
            lambda r: r.tokens_per_s,
            format_table,
        )  # fmt: skip
    results = []
    for conc in args.concurrency:  # (the CLI's list of whole numbers of at least 1)
        runs = sorted((asyncio.run(run(conc)) for _ in range(args.repeat)), key=rate)
        results.append(runs[len(runs) // 2])  # (machines are noisy: the median run)
        print(table(results[-1:]))
    print()
    print(table(results))
    if args.out:
        save(results, Path(args.out), {"base_url": args.base_url, "date": time.strftime("%Y-%m-%d %H:%M")})
    if any(rate(r) == 0 and r.errors for r in results):  # every request of a level failed: say so, exit 1
        sys.exit(f"mygpt bench: every request failed at some level (is the server at {args.base_url}?)")


def plot(results: list[BenchResult], path: Path, title: str) -> None:
    """Throughput and inter-token latency per scenario as a PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    labels = [f"{r.label}\nx{r.concurrency}" for r in results]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, len(results) * 1.1), 8), sharex=True)
    ax1.bar(labels, [r.tokens_per_s for r in results], color="tab:blue")
    ax1.set_ylabel("output tokens/s (aggregate)")
    ax1.set_title(title)
    x = range(len(results))
    ax2.bar([i - 0.2 for i in x], [r.itl_p50 * 1e3 for r in results], width=0.4, label="ITL p50")
    ax2.bar([i + 0.2 for i in x], [r.itl_p95 * 1e3 for r in results], width=0.4, label="ITL p95")
    ax2.set_ylabel("inter-token latency (ms)")
    ax2.legend()
    plt.setp(ax2.get_xticklabels(), rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
