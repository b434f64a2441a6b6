#!/usr/bin/env python3
"""One decode step of 16 rows on the default model (NF4, CPU, the server's runner settings): base, 1
adapter, 4 adapters, uneven, 16 adapters (and one row on one adapter); the runner's fused projections (q/k/v and gate/up as one
product each, lora/layers.py FusedLinear) against every projection called on its own, and the
LoRA products' batch-invariant layout (at least 2 slots x 4 rows, lora/layers.py MIN_ROWS: what a step
with a seeded request takes, B5) against the default one, alternating in one process, median of 20
steps per case and round, median of the rounds.

    .venv/bin/python scripts/bench_lora_step.py [--rounds 5]

(Until 2026-11-26 session 3 this script compared the grouped-bmm LoRA with a dense mask over every
slot; that comparison is in docs/benchmarks.md, second run.)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from mygpt.config import Settings
from mygpt.engine.loader import convert_gguf, default_gguf_path, load_model
from mygpt.engine.runner import ModelRunner, _Projections
from mygpt.lora.synthetic import make_adapter
from mygpt.lora.weights import read_adapter

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROOT = Path(__file__).resolve().parent.parent


class OneByOne:
    """A FusedLinear's interface over layers called one by one (their LoRALinear and Linear4bit)."""

    def __init__(self, *layers):
        self.layers = layers

    def __call__(self, x):
        return [layer(x) for layer in self.layers]

    def joined(self, x):
        return None


def unfused(layer) -> _Projections:
    attn, mlp = layer.self_attn, layer.mlp
    return _Projections(
        OneByOne(attn.q_proj, attn.k_proj, attn.v_proj), OneByOne(attn.o_proj),
        OneByOne(mlp.gate_proj, mlp.up_proj), OneByOne(mlp.down_proj),
    )  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    settings = Settings(cache_dir=str(ROOT / "test-artifacts" / "cache"))
    lm = load_model(settings)
    runner = ModelRunner(
        lm.model, 16, 512, lm.dtype, 16, 16, lm_head_dtype=torch.bfloat16, exact_attention=True
    )
    shapes = {p: (m.in_features, m.out_features) for p, m in runner.lora_layers.items()}
    ckpt = convert_gguf(default_gguf_path(), settings.cache_dir)
    for s in range(16):
        path = make_adapter(
            ckpt, ROOT / "test-artifacts" / "bench-adapters" / "lora-step" / f"a{s}", 16, ALL, seed=s
        )
        w = read_adapter(f"a{s}", path, shapes, 16)
        for name, layer in runner.lora_layers.items():
            m = w.modules.get(name)
            layer.set_slot(s, m.a if m else None, m.b if m else None)
    positions = [45 + 6 * row for row in range(16)]  # ragged lengths, as in a server's batch
    for row in range(16):
        runner.prefill(row, list(range(100, 100 + positions[row])), 0)
    cases = {  # rows sorted by slot, as the engine sends them; "uneven": 10/3/2/1 rows on 4 adapters
        "base": [-1] * 16, "1 adapter": [0] * 16, "4 adapters": sorted(i % 4 for i in range(16)),
        "uneven": [0] * 10 + [1] * 3 + [2] * 2 + [3], "16 adapters": list(range(16)),
        "1 row, 1 adapter": [0],
    }  # fmt: skip
    impls = {
        "fused": (runner._proj, False),
        "one by one": ([unfused(layer) for layer in runner._layers], False),
        "invariant": (runner._proj, True),
    }
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for label, slots in cases.items():
            for impl, (proj, invariant) in impls.items():
                runner._proj = proj
                step = []
                for _ in range(3 + 20):
                    t0 = time.perf_counter()
                    n = len(slots)
                    runner.decode(list(range(n)), [5] * n, positions[:n], slots, invariant)
                    step.append(time.perf_counter() - t0)
                times.setdefault((label, impl), []).append(statistics.median(step[3:]) * 1e3)
    runner._proj = impls["fused"][0]
    head = f"{'rows on':<17} {'fused ms':>9} {'one by one ms':>14} {'ratio':>6} {'invariant ms':>13} {'ratio':>6}"
    print(head)
    for label in cases:
        fused, alone, inv = (statistics.median(times[label, impl]) for impl in impls)
        print(
            f"{label:<17} {fused:>9.1f} {alone:>14.1f} {alone / fused:>6.2f} {inv:>13.1f} {inv / fused:>6.2f}"
        )


if __name__ == "__main__":
    main()
