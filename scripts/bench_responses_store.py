#!/usr/bin/env python3
"""What storing a Responses API response costs: the in-memory store against the server's SQLite store
(WAL, on this disk), one tenant at its bound of 1,024 responses, a ~2.5 KB conversation each, in one
process. Times one put (after each answer: off the event loop) and one get (previous_response_id).

    PYTHONPATH=server .venv/bin/python scripts/bench_responses_store.py [--n 1500]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from mygpt.api.responses import ResponseStore, SharedResponses
from mygpt.finetune.store import Store


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1500)
    args = parser.parse_args()
    messages = [{"role": "user", "content": "x" * 1500}, {"role": "assistant", "content": "y" * 500}]
    with tempfile.TemporaryDirectory() as tmp:
        for name, store in (("memory", ResponseStore()), ("sqlite", SharedResponses(Store(Path(tmp))))):
            put, get = [], []
            for i in range(args.n):
                t = time.perf_counter()
                store.put("acme", {"id": f"resp_{i}", "output": "z" * 300}, messages, [{"id": "item"}])
                put.append(time.perf_counter() - t)
                t = time.perf_counter()
                assert store.get("acme", f"resp_{i}") is not None
                get.append(time.perf_counter() - t)
            p99 = int(len(put) * 0.99)
            print(f"{name:6} put p50 {statistics.median(put) * 1e3:.3f} ms, p99 {sorted(put)[p99] * 1e3:.3f} ms; "
                  f"get p50 {statistics.median(get) * 1e3:.3f} ms, p99 {sorted(get)[p99] * 1e3:.3f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
