#!/usr/bin/env python3
"""What structured outputs cost: 16 concurrent streams of 128 tokens on the default model (NF4, CPU, the
server's runner settings), every row guided by a JSON schema against no row guided, alternating in one
process (the machine's speed drifts between processes), median of the rounds.

    .venv/bin/python scripts/bench_guided.py [--rounds 5] [--out docs/bench/guided.json]

EOS is ignored and the schema (an array of at least 1,000 free strings) cannot end, so every row makes
exactly 128 tokens in both modes and the two differ only by the masks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import torch

from mygpt.config import Settings
from mygpt.engine.engine import Engine
from mygpt.engine.guided import Grammars
from mygpt.engine.loader import load_model
from mygpt.engine.runner import ModelRunner
from mygpt.engine.types import GenerationRequest, SamplingParams

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = {"type": "array", "items": {"type": "string"}, "minItems": 1000}  # cannot end in 128 tokens


def run(engine: Engine, prompt: list[int], streams: int, tokens: int, grammar, tag: str) -> float:
    """Seconds until every stream's last token."""
    done = threading.Semaphore(0)

    def on_event(ev):
        if ev.finish_reason is not None:
            done.release()

    t0 = time.perf_counter()
    for i in range(streams):
        params = SamplingParams(max_tokens=tokens, temperature=1.0, seed=i, grammar=grammar)
        engine.submit(GenerationRequest(f"{tag}-{i}", prompt, params), on_event)
    for _ in range(streams):
        assert done.acquire(timeout=600)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    loaded = {}
    # loaded in a thread that exits: a live thread that ran parallel torch work slows the engine's
    # thread pool (libgomp, docs/architecture.md)
    t = threading.Thread(
        target=lambda: loaded.update(
            lm=load_model(Settings(cache_dir=str(ROOT / "test-artifacts" / "cache")))
        )
    )
    t.start()
    t.join()
    lm = loaded["lm"]
    runner = ModelRunner(
        lm.model, args.streams, 1024, lm.dtype, lm_head_dtype=torch.bfloat16, exact_attention=True
    )
    engine = Engine(runner, lm.tokenizer, eos_token_ids=(), max_num_batched_tokens=512)
    engine.start()
    grammar = Grammars(lm.tokenizer, lm.model.config.vocab_size).json(SCHEMA)
    prompt = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "List some colors as a JSON array of strings."}],
        add_generation_prompt=True, tokenize=True, return_dict=False,
    )  # fmt: skip
    run(engine, prompt, args.streams, 16, grammar, "warm")
    times: dict[str, list[float]] = {"plain": [], "guided": []}
    for r in range(args.rounds):
        for mode in ("plain", "guided") if r % 2 == 0 else ("guided", "plain"):
            s = run(
                engine, prompt, args.streams, args.tokens, grammar if mode == "guided" else None, f"{mode}{r}"
            )
            times[mode].append(s)
            print(f"round {r + 1} {mode:6s} {args.streams * args.tokens / s:7.1f} tok/s", flush=True)
    engine.stop()
    tps = {m: statistics.median(args.streams * args.tokens / s for s in v) for m, v in times.items()}
    ratios = [p / g for p, g in zip(times["plain"], times["guided"], strict=True)]
    result = {
        "streams": args.streams, "tokens": args.tokens, "rounds": args.rounds, "schema": SCHEMA,
        "tok_s": tps, "guided_vs_plain_per_round": ratios, "guided_vs_plain_median": statistics.median(ratios),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
