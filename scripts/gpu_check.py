#!/usr/bin/env python3
"""One prepared GPU check: an 8B-shaped Llama (random weights) in NF4, random rank-16 adapters on all
projections, the naive peft path and mygpt's engine measured in one run, plus greedy parity.

    PYTHONPATH=server python3 scripts/gpu_check.py --out DIR          # on the GPU machine
    PYTHONPATH=server python3 scripts/gpu_check.py --tiny --out DIR   # the same code path on a CPU, small

Prints one table last and writes DIR/gpu-check.json. Run through scripts/gpu-check (which installs the
carried bitsandbytes wheel first).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_base(tiny: bool, device: str, dtype: torch.dtype):
    """A Llama with random weights, every decoder projection replaced by a bitsandbytes NF4 layer."""
    import bitsandbytes as bnb
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        config = LlamaConfig(
            vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        )  # fmt: skip
    else:  # Llama-3.1-8B's shape
        config = LlamaConfig(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
        )  # fmt: skip
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(default)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in ALL:
                lin = getattr(parent, name, None)
                if lin is None:
                    continue
                q = bnb.nn.Linear4bit(
                    lin.in_features, lin.out_features, bias=False, compute_dtype=dtype, quant_type="nf4",
                    compress_statistics=True, device="meta",
                )  # fmt: skip
                q.weight = bnb.nn.Params4bit(
                    lin.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True
                )
                q.weight = q.weight.to(device) if device != "cpu" else q.weight._quantize("cpu")
                setattr(parent, name, q)
                del lin
    if device == "cuda":
        torch.cuda.empty_cache()
    return model, config


def add_peft_adapters(model, n: int, rank: int):
    """n random rank-r LoRA adapters on all projections, through peft itself (the reference)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=ALL, init_lora_weights=False)
    peft_model = get_peft_model(model, cfg, adapter_name="ad0").eval()
    for i in range(1, n):
        peft_model.add_adapter(f"ad{i}", cfg)
    g = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                std = 0.02 if "lora_A" in name else 0.01
                p.copy_((torch.randn(p.shape, generator=g) * std).to(p.device, p.dtype))
    return peft_model


def export_adapters(peft_model, n: int, rank: int):
    """peft's adapters as mygpt LoRAWeights (the same tensors)."""
    from mygpt.lora.weights import LoRAWeights, ModuleLoRA

    out = {}
    for i in range(n):
        name = f"ad{i}"
        modules = {}
        for path, mod in peft_model.base_model.model.named_modules():
            if hasattr(mod, "lora_A") and name in mod.lora_A:
                a = mod.lora_A[name].weight.detach().float().cpu()
                b = mod.lora_B[name].weight.detach().float().cpu() * mod.scaling[name]
                modules[path] = ModuleLoRA(a=a, b=b)
        out[name] = LoRAWeights(name=name, path=Path("."), rank=rank, modules=modules, base_model=None)
    return out


def timed_generate(model, ids, max_new: int, **kw) -> tuple[float, torch.Tensor]:
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, min_new_tokens=max_new,
            do_sample=False, pad_token_id=0, **kw,
        )  # fmt: skip
    sync()
    return time.perf_counter() - t0, out[:, ids.shape[1] :]


def engine_run(engine, prompts, adapters, max_new: int, weights: dict) -> tuple[float, dict]:
    """Submits every prompt at once; returns (seconds, request id -> tokens)."""
    import threading

    from mygpt.engine.types import AdapterRef, GenerationRequest, SamplingParams

    done, lock, tokens = threading.Event(), threading.Lock(), {}
    left = [len(prompts)]

    def on_event(ev):
        with lock:
            tokens.setdefault(ev.request_id, []).extend(ev.token_ids)
            if ev.finish_reason is not None:
                left[0] -= 1
                if ev.error:
                    print("error:", ev.error)
                if left[0] == 0:
                    done.set()

    t0 = time.perf_counter()
    for i, (p, a) in enumerate(zip(prompts, adapters, strict=True)):
        params = SamplingParams(max_tokens=max_new, temperature=0.0)
        ref = AdapterRef(a, weights[a]) if a else None
        engine.submit(GenerationRequest(f"r{i}", p, params, adapter=ref), on_event)
    assert done.wait(600), "engine run timed out"
    return time.perf_counter() - t0, tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default="gpu-check-out")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--profile", action="store_true", help="time and profile bare decode steps too")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows: list[tuple[str, str]] = []
    report: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    new = args.new_tokens

    t0 = time.perf_counter()
    model, config = build_base(args.tiny, device, dtype)
    report["build_s"] = time.perf_counter() - t0
    rows.append(("build + NF4 quantize base", f"{report['build_s']:.1f} s"))
    if device == "cuda":
        rows.append(("GPU memory after base", f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB"))

    n_adapters = 32
    peft_model = add_peft_adapters(model, n_adapters, 16)
    g = torch.Generator().manual_seed(3)
    prompts = [
        torch.randint(10, config.vocab_size, (args.prompt_len,), generator=g).tolist() for _ in range(32)
    ]

    # (1) the naive baseline: peft generate()
    peft_model.set_adapter("ad0")
    ids1 = torch.tensor([prompts[0]], device=device)
    timed_generate(peft_model, ids1, 4)  # warm-up
    dt, ref0 = timed_generate(peft_model, ids1, new)
    report["naive_1_stream_tok_s"] = new / dt
    rows.append(("naive peft generate, 1 stream + adapter", f"{new / dt:.1f} tok/s"))
    ids32 = torch.tensor(prompts, device=device)
    names8 = [f"ad{i % 8}" for i in range(32)]
    dt, _ = timed_generate(peft_model, ids32, new, adapter_names=names8)
    report["naive_32x8_tok_s"] = 32 * new / dt
    rows.append(("naive peft generate, 32 streams / 8 adapters", f"{32 * new / dt:.1f} tok/s"))
    refs, ref_logits = {}, {}
    for k in (1, 2, 3):  # peft's greedy reference per adapter, alone, and its prompt logits
        peft_model.set_adapter(f"ad{k}")
        refs[k] = timed_generate(peft_model, torch.tensor([prompts[k]], device=device), 16)[1][0].tolist()
        with torch.inference_mode():
            ref_logits[k] = peft_model(torch.tensor([prompts[k]], device=device)).logits[0, -1].float()

    # (2) mygpt's engine on the same base and the same adapter tensors
    weights = export_adapters(peft_model, n_adapters, 16)
    base = peft_model.unload()  # peft's LoRA layers out, the NF4 base as it was
    del peft_model
    from mygpt.engine.engine import Engine
    from mygpt.engine.runner import ModelRunner
    from mygpt.lora.cache import AdapterCache

    class Tok:  # the engine detokenizes; random ids need no real text here
        def decode(self, ids, **kw):
            return " ".join(map(str, ids))

    runner = ModelRunner(base, num_slots=32, max_len=args.prompt_len + new + 8, dtype=dtype, max_loras=32)
    cache = AdapterCache(runner.lora_layers, 32)
    sync()
    t0 = time.perf_counter()
    cache.acquire("ad0", weights["ad0"])
    sync()
    report["adapter_load_ms"] = (time.perf_counter() - t0) * 1e3
    cache.release("ad0")
    rows.append(("cold adapter load into a slot (host -> device)", f"{report['adapter_load_ms']:.1f} ms"))
    engine = Engine(runner, Tok(), [], max_num_batched_tokens=2048, adapters=cache)
    engine.start()
    engine_run(engine, prompts[:2], ["ad0", None], 4, weights)  # warm-up
    for label, ps, ads in [
        ("mygpt engine, 1 stream + adapter", prompts[:1], ["ad0"]),
        ("mygpt engine, 32 streams / 1 adapter", prompts, ["ad0"] * 32),
        ("mygpt engine, 32 streams / 32 adapters", prompts, [f"ad{i}" for i in range(32)]),
    ]:
        dt, _ = engine_run(engine, ps, ads, new, weights)
        tps = len(ps) * new / dt
        report[label] = tps
        rows.append((label, f"{tps:.1f} tok/s"))

    # (3) parity: greedy tokens of the engine vs peft's reference, alone and inside a mixed batch
    _, alone = engine_run(engine, [prompts[k] for k in (1, 2, 3)], ["ad1", "ad2", "ad3"], 16, weights)
    matches = []
    for j, k in enumerate((1, 2, 3)):
        got, ref = alone[f"r{j}"], refs[k]
        same = next((i for i, (x, y) in enumerate(zip(got, ref, strict=False)) if x != y), len(ref))
        matches.append(same)
    report["parity_prefix_tokens"] = matches
    rows.append(("greedy parity vs peft (matching prefix of 16)", ", ".join(map(str, matches))))
    engine.stop()  # the runner is ours alone from here
    errs = []
    for j, k in enumerate((1, 2, 3)):  # last-prompt-position logits, mygpt vs peft: relative L2
        lora = cache.acquire(f"ad{k}", weights[f"ad{k}"])
        got = runner.prefill(20 + j, prompts[k], 0, lora).float()
        cache.release(f"ad{k}")
        errs.append(float((got - ref_logits[k]).norm() / ref_logits[k].norm()))
    report["logits_rel_err"] = errs
    rows.append(("prompt logits vs peft, relative L2", ", ".join(f"{e:.1e}" for e in errs)))
    with torch.inference_mode():  # the base alone: HF's own forward vs the runner, same weights
        hf = base(torch.tensor([prompts[4]], device=device)).logits[0, -1].float()
    got = runner.prefill(24, prompts[4], 0).float()
    report["base_logits_rel_err"] = float((got - hf).norm() / hf.norm())
    rows.append(("base prompt logits vs HF forward, relative L2", f"{report['base_logits_rel_err']:.1e}"))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for b in (1, 32):
            slots = list(range(b))
            loras = [cache.acquire(f"ad{i % 32}", weights[f"ad{i % 32}"]) for i in range(b)]
            for _ in range(3):
                runner.decode(slots, [5] * b, [args.prompt_len] * b, loras)
            sync()
            t0 = time.perf_counter()
            for _ in range(10):
                runner.decode(slots, [5] * b, [args.prompt_len] * b, loras)
            sync()
            step_ms = (time.perf_counter() - t0) / 10 * 1e3
            rows.append((f"decode step, batch {b} (runner only)", f"{step_ms:.1f} ms"))
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    runner.decode(slots, [5] * b, [args.prompt_len] * b, loras)
                sync()
            table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
            table_cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
            (out_dir / f"profile-b{b}.txt").write_text(table + "\n\n" + table_cpu)
            for name in [f"ad{i % 32}" for i in range(b)]:
                cache.release(name)

    report["rows"] = rows
    (out_dir / "gpu-check.json").write_text(json.dumps(report, indent=2, default=str))
    print()
    width = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
