#!/usr/bin/env python3
"""CPU benchmark of the default model, every server through the same harness (`mygpt bench`), one
server at a time, in one run: mygpt (NF4 and float32; base, 1 adapter, 4 adapters), the naive
baseline (transformers generate() + peft, one request at a time, same NF4 base and adapters) and
llama-cpp-python's OpenAI server on the same GGUF. Prints a table, writes docs/bench/cpu.json and
docs/bench/cpu.png.

    .venv/bin/python scripts/bench_cpu.py --llama-cpp-python /path/to/venv/bin/python
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from mygpt.bench import format_table, median_of, plot, run_bench, save
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


def measure(label, url, models, conc, args, repeat=None, requests=None):
    runs = [
        asyncio.run(
            run_bench(url, models, conc, requests or conc * 2, args.max_tokens, 32, label, extra_body=NO_EOS)
        )
        for _ in range(repeat or args.repeat)
    ]
    result = median_of(runs)
    result.extra["runs_tokens_per_s"] = [round(r.tokens_per_s, 1) for r in runs]
    print(format_table([result]), flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--llama-cpp-python", help="python of a venv with llama-cpp-python[server]")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench" / "cpu.json"))
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
    results = []

    def mygpt(label: str, extra: list[str], plan) -> None:
        port = 8301
        proc = start(
            [*serve, "--port", str(port), *extra],
            f"http://127.0.0.1:{port}/ready",
            ART / f"bench-{label}.log",
        )
        try:
            for models, conc, kw in plan:
                tag = "base" if models == [DEFAULT_SERVED_NAME] else f"{len(models)} adapter(s)"
                results.append(
                    measure(f"{label} {tag}", f"http://127.0.0.1:{port}/v1", models, conc, args, **kw)
                )
        finally:
            stop(proc)

    base, one, four = [DEFAULT_SERVED_NAME], adapters[:1], adapters
    mygpt(
        "mygpt nf4",
        ["--quantization", "nf4"],
        [(base, 1, {}), (one, 1, {}), (base, 16, {}), (one, 16, {}), (four, 16, {})],
    )
    mygpt("mygpt f32", ["--quantization", "none"], [(base, 1, {}), (base, 16, {}), (four, 16, {})])
    if not args.skip_naive:  # serial by construction: 16 requests a run, median of --repeat runs too
        mygpt(
            "naive nf4",
            ["--quantization", "nf4", "--engine", "naive"],
            [(four, 16, {"requests": 16})],
        )
    if args.llama_cpp_python:
        port = 8302
        gguf = str(default_gguf_path())
        cmd = [
            args.llama_cpp_python, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port),
            "--n_threads", str(os.cpu_count()), "--n_ctx", "8192", "--interrupt_requests", "False",
        ]  # fmt: skip
        proc = start(cmd, f"http://127.0.0.1:{port}/v1/models", ART / "bench-llama-cpp.log")
        try:
            for conc in (1, 16):
                results.append(
                    measure("llama-cpp-python Q4_1", f"http://127.0.0.1:{port}/v1", [gguf], conc, args)
                )
        finally:
            stop(proc)
    print()
    print(format_table(results))
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "max_tokens": args.max_tokens, "repeat": args.repeat, "command": " ".join(sys.argv),
    }  # fmt: skip
    save(results, Path(args.out), meta)
    plot(results, Path(args.out).with_suffix(".png"), "mygpt vs baselines, default model, 2-core CPU")


if __name__ == "__main__":
    main()
