#!/usr/bin/env python3
"""CPU benchmark: mygpt (nf4 and float32) and llama-cpp-python's server on the same GGUF, same harness,
same run, one server at a time. Prints a table and writes docs/bench/cpu.json.

    .venv/bin/python scripts/bench_cpu.py [--llama-cpp-python /path/to/venv/bin/python] [--repeat 3]
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

from mygpt.bench import format_table, median_of, run_bench, save
from mygpt.engine.loader import default_gguf_path

ROOT = Path(__file__).resolve().parents[1]
NO_EOS = {"logit_bias": {"2": -100}}  # <|im_end|> banned: every request runs to max_tokens


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


def bench(label: str, base_url: str, model: str, levels: list[int], args) -> list:
    out = []
    for conc in levels:
        runs = [
            asyncio.run(
                run_bench(
                    base_url, [model], conc, max(conc * 2, 4), args.max_tokens, 32, label, extra_body=NO_EOS
                )
            )
            for _ in range(args.repeat)
        ]
        out.append(median_of(runs))
        print(format_table(out[-1:]), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--llama-cpp-python", help="python of a venv with llama-cpp-python[server]")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--levels", default="1,16")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench" / "cpu.json"))
    args = p.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    logs = ROOT / "test-artifacts"
    logs.mkdir(exist_ok=True)
    results = []
    for quant in ("nf4", "none"):
        port = 8301
        cmd = [sys.executable, "-m", "mygpt", "serve", "--port", str(port), "--quantization", quant]
        proc = start(cmd, f"http://127.0.0.1:{port}/ready", logs / f"bench-mygpt-{quant}.log")
        try:
            results += bench(
                f"mygpt {quant}", f"http://127.0.0.1:{port}/v1", "SmolLM2-135M-Instruct", levels, args
            )
        finally:
            stop(proc)
    if args.llama_cpp_python:
        port = 8302
        gguf = str(default_gguf_path())
        cmd = [
            args.llama_cpp_python, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port),
            "--n_threads", str(os.cpu_count()), "--n_ctx", "8192",
        ]  # fmt: skip
        proc = start(cmd, f"http://127.0.0.1:{port}/v1/models", logs / "bench-llama-cpp.log")
        try:
            results += bench("llama-cpp-python (Q4_1)", f"http://127.0.0.1:{port}/v1", gguf, levels, args)
        finally:
            stop(proc)
    print()
    print(format_table(results))
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "max_tokens": args.max_tokens, "repeat": args.repeat, "command": " ".join(sys.argv),
    }  # fmt: skip
    save(results, Path(args.out), meta)


if __name__ == "__main__":
    main()
