#!/usr/bin/env python3
"""What a top_p draw costs on the CPU: 16 rows of the default model's real next-token logits (49,152
tokens each), the CPU's row-by-row draw from a top-k head against one sort of every row (the path the
GPU takes), in one process, median of 30 calls each, at 2 threads as the server runs.

    .venv/bin/python scripts/bench_sampling.py
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mygpt.engine.loader import convert_gguf, default_gguf_path
from mygpt.engine.sampling import RowSampler, _sample_random
from mygpt.engine.types import SamplingParams

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    torch.set_num_threads(2)
    path = convert_gguf(default_gguf_path(), ROOT / "test-artifacts" / "cache")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a short story about a dragon."}],
        add_generation_prompt=True, return_tensors="pt", return_dict=False,
    )  # fmt: skip
    with torch.no_grad():  # 16 real next-token distributions along a sampled answer
        out = model.generate(
            ids, max_new_tokens=16, do_sample=True, temperature=1.0, output_scores=True,
            return_dict_in_generate=True,
        )  # fmt: skip
    logits = torch.stack([s[0].float() for s in out.scores])
    result = {}
    for top_p in (1.0, 0.95, 0.9):
        for name, batched in (("row by row (CPU)", False), ("one sort (GPU path)", True)):
            rows = [RowSampler(SamplingParams(max_tokens=8, top_p=top_p), i) for i in range(16)]
            _sample_random(logits, rows, batched_sort=batched)
            times = []
            for _ in range(30):
                t0 = time.perf_counter()
                _sample_random(logits, rows, batched_sort=batched)
                times.append(time.perf_counter() - t0)
            result[f"top_p {top_p}, {name}"] = round(statistics.median(times) * 1e3, 2)
            print(f"top_p {top_p:<4} {name:20s} {result[f'top_p {top_p}, {name}']:6.2f} ms", flush=True)
    print(json.dumps({"ms_per_16_rows": result, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}))


if __name__ == "__main__":
    main()
