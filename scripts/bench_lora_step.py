#!/usr/bin/env python3
"""One decode step of 16 rows on the default model (NF4, CPU): base, 1 adapter, 4 adapters, 16
adapters; the grouped-bmm LoRA against the dense-mask formulation it replaced, in one run.

    .venv/bin/python scripts/bench_lora_step.py
"""

from __future__ import annotations

import statistics
import time

import torch

from mygpt.config import Settings
from mygpt.engine.loader import load_model
from mygpt.engine.runner import ModelRunner
from mygpt.lora import layers
from mygpt.lora.synthetic import make_adapter
from mygpt.lora.weights import read_adapter

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


SLOTS: list[int] = []  # the rows' adapter slots of the step being timed (for the dense formulation)


def dense_forward(self, x):  # the first formulation: every token against every slot, then a mask
    y = self.base(x)
    if not self.batch.slots:
        return y
    n = self.batch.slots * self.rank
    owner = torch.arange(n) // self.rank
    mask = (owner[None, :] == torch.tensor(SLOTS)[:, None]).to(self.lora_a.dtype)
    h = torch.nn.functional.linear(x.to(self.lora_a.dtype), self.lora_a[:n]) * mask
    return y + torch.matmul(h, self.lora_bt[:n]).to(y.dtype)


def main() -> None:
    torch.set_grad_enabled(False)
    settings = Settings(cache_dir="test-artifacts/cache")
    lm = load_model(settings)
    runner = ModelRunner(
        lm.model, 16, 512, lm.dtype, 16, 16, lm_head_dtype=torch.bfloat16, exact_attention=True
    )
    shapes = {p: (m.in_features, m.out_features) for p, m in runner.lora_layers.items()}
    from mygpt.engine.loader import convert_gguf, default_gguf_path

    ckpt = convert_gguf(default_gguf_path(), settings.cache_dir)
    for s in range(16):
        path = make_adapter(
            ckpt, __import__("pathlib").Path(f"test-artifacts/bench-adapters/lora-step/a{s}"), 16, ALL, seed=s
        )
        w = read_adapter(f"a{s}", path, shapes, 16)
        for name, layer in runner.lora_layers.items():
            m = w.modules.get(name)
            layer.set_slot(s, m.a if m else None, m.b if m else None)
    for row in range(16):
        runner.prefill(row, list(range(100, 140)), 0)
    cases = {  # rows sorted by slot, as the engine sends them; "uneven": 10/3/2/1 rows on 4 adapters
        "base": [-1] * 16, "1 adapter": [0] * 16, "4 adapters": sorted(i % 4 for i in range(16)),
        "uneven": [0] * 10 + [1] * 3 + [2] * 2 + [3], "16 adapters": list(range(16)),
    }  # fmt: skip
    grouped = layers.LoRALinear.forward
    print(f"{'rows on':<12} {'grouped bmm ms':>15} {'dense mask ms':>14}")
    global SLOTS
    for label, slots in cases.items():
        SLOTS = slots
        out = []
        for impl in (grouped, dense_forward):
            layers.LoRALinear.forward = impl
            times = []
            for _ in range(3 + 20):
                t0 = time.perf_counter()
                runner.decode(list(range(16)), [5] * 16, [40] * 16, slots)
                times.append(time.perf_counter() - t0)
            out.append(statistics.median(times[3:]) * 1e3)
        layers.LoRALinear.forward = grouped
        print(f"{label:<12} {out[0]:>15.1f} {out[1]:>14.1f}")


if __name__ == "__main__":
    main()
