#!/usr/bin/env python3
"""CPU benchmark of the default model, every server through the same harness (`mygpt bench`), in one
run: mygpt (NF4 and float32; base, 1 adapter, 4 adapters), the naive baseline (transformers
generate() + peft, one request at a time, same NF4 base and adapters) and llama-cpp-python's OpenAI
server on the same GGUF. The run goes in rounds: each round starts every server (all up at once,
idle unless measured) and runs each scenario once, one at a time. Each figure is the median of its
rounds; issue 3's ratios are taken per round (mygpt over the same round's baseline), and their
median is reported. Prints a table, writes docs/bench/cpu.json and docs/bench/cpu.png.

    .venv/bin/python scripts/bench_cpu.py --llama-cpp-python /path/to/venv/bin/python
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from mygpt.bench import BenchResult, format_table, median_of, plot, run_bench, save
from mygpt.engine.loader import DEFAULT_SERVED_NAME, convert_gguf, default_gguf_path
from mygpt.lora.synthetic import make_adapter

ROOT = Path(__file__).resolve().parents[1]
ART = ROOT / "test-artifacts"
NO_EOS = {"logit_bias": {"2": -100}}  # <|im_end|> banned: every request runs to max_tokens
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def start(cmd: list[str], url: str, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


@dataclass
class Scenario:
    label: str
    url: str
    models: list[str]
    concurrency: int
    requests: int
    runs: list[BenchResult] = field(default_factory=list)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--llama-cpp-python", help="python of a venv with llama-cpp-python[server]")
    p.add_argument("--repeat", type=int, default=3, help="rounds: every scenario runs once per round")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench" / "cpu.json"))
    p.add_argument(
        "--only", action="append", help="run only the scenarios whose label contains this (repeatable)"
    )
    args = p.parse_args()
    ART.mkdir(exist_ok=True)
    checkpoint = convert_gguf(default_gguf_path(), ART / "cache")
    store = ART / "bench-adapters"
    adapters = [f"bench-{i}" for i in range(4)]
    for i, name in enumerate(adapters):
        make_adapter(checkpoint, store / "default" / name, 16, ALL, seed=1000 + i)  # the open tenant's
    serve = [
        sys.executable,
        "-m",
        "mygpt",
        "serve",
        "--cache-dir",
        str(ART / "cache"),
        "--adapter-dir",
        str(store),
    ]
    # name: (command, port, readiness path); every server is up for the whole round, idle when not measured
    servers = {
        "mygpt nf4": ([*serve, "--port", "8301", "--quantization", "nf4"], 8301, "/ready"),
        "mygpt f32": ([*serve, "--port", "8303", "--quantization", "none"], 8303, "/ready"),
    }
    if not args.skip_naive:
        servers["naive nf4"] = (
            [*serve, "--port", "8304", "--quantization", "nf4", "--engine", "naive"],
            8304,
            "/ready",
        )
    gguf = str(default_gguf_path())
    if args.llama_cpp_python:
        servers["llama-cpp-python Q4_1"] = (
            [
                args.llama_cpp_python, "-m", "llama_cpp.server", "--model", gguf, "--port", "8302",
                "--n_threads", str(os.cpu_count()), "--n_ctx", "8192", "--interrupt_requests", "False",
            ],
            8302, "/v1/models",
        )  # fmt: skip
    base, one, four = [DEFAULT_SERVED_NAME], adapters[:1], adapters

    def v1(name: str) -> str:
        return f"http://127.0.0.1:{servers[name][1]}/v1"

    scenarios = [
        Scenario(f"mygpt nf4 {tag}", v1("mygpt nf4"), models, conc, conc * 2)
        for models, conc, tag in [
            (base, 1, "base"), (one, 1, "1 adapter(s)"), (base, 16, "base"), (one, 16, "1 adapter(s)"),
            (four, 16, "4 adapter(s)"),
        ]
    ] + [
        Scenario(f"mygpt f32 {tag}", v1("mygpt f32"), models, conc, conc * 2)
        for models, conc, tag in [(base, 1, "base"), (base, 16, "base"), (four, 16, "4 adapter(s)")]
    ]  # fmt: skip
    if "naive nf4" in servers:  # serial by construction: 16 requests a run
        scenarios.append(Scenario("naive nf4 4 adapter(s)", v1("naive nf4"), four, 16, 16))
    if "llama-cpp-python Q4_1" in servers:
        for conc in (1, 16):
            scenarios.append(
                Scenario("llama-cpp-python Q4_1", v1("llama-cpp-python Q4_1"), [gguf], conc, conc * 2)
            )
    if args.only:
        scenarios = [sc for sc in scenarios if any(o in sc.label for o in args.only)]
    servers = {name: spec for name, spec in servers.items() if any(sc.url == v1(name) for sc in scenarios)}
    # rounds, not one scenario after another: the machine's speed drifts over minutes, and a baseline
    # measured in the same round as what it is compared with drifts with it. Every round starts the
    # servers afresh: one process can run 10-20% slower than the next on this machine, for its life
    for r in range(args.repeat):
        procs = []
        try:
            for name, (cmd, port, ready) in servers.items():
                log = ART / f"bench-{name.replace(' ', '-')}.log"
                procs.append(start(cmd, f"http://127.0.0.1:{port}{ready}", log))
            for sc in scenarios:
                result = asyncio.run(
                    run_bench(sc.url, sc.models, sc.concurrency, sc.requests, args.max_tokens, 32, sc.label, extra_body=NO_EOS)
                )  # fmt: skip
                sc.runs.append(result)
                print(f"round {r + 1}: {format_table([result]).splitlines()[-1]}", flush=True)
        finally:
            for proc in procs:
                stop(proc)
    results = []
    for sc in scenarios:
        result = median_of(sc.runs)
        result.extra["runs_tokens_per_s"] = [round(x.tokens_per_s, 1) for x in sc.runs]
        results.append(result)
    ratios = paired_ratios(scenarios)
    print()
    print(format_table(results))
    for name, values in ratios.items():
        print(
            f"{name}: median {values['median']:.2f} (per round: {', '.join(f'{v:.2f}' for v in values['rounds'])})"
        )
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "max_tokens": args.max_tokens, "repeat": args.repeat, "command": " ".join(sys.argv),
        "paired_ratios": ratios,
    }  # fmt: skip
    save(results, Path(args.out), meta)
    plot(results, Path(args.out).with_suffix(".png"), "mygpt vs baselines, default model, 2-core CPU")


def paired_ratios(scenarios: list[Scenario]) -> dict[str, dict]:
    """Issue 3's ratios, each round's mygpt figure over the same round's baseline; their median."""
    by = {(sc.label, sc.concurrency): sc.runs for sc in scenarios}
    four = by.get(("mygpt nf4 4 adapter(s)", 16))
    pairs = {
        "16 streams over 4 adapters / naive": by.get(("naive nf4 4 adapter(s)", 16)),
        "16 streams over 4 adapters / 1 adapter": by.get(("mygpt nf4 1 adapter(s)", 16)),
        "16 streams over 4 adapters / llama-cpp-python 16 streams": by.get(("llama-cpp-python Q4_1", 16)),
    }
    out = {}
    for name, baseline in pairs.items():
        if four and baseline:
            rounds = [a.tokens_per_s / b.tokens_per_s for a, b in zip(four, baseline, strict=True)]
            out[name] = {
                "rounds": [round(x, 3) for x in rounds],
                "median": round(statistics.median(rounds), 3),
            }
    return out


if __name__ == "__main__":
    main()
