#!/usr/bin/env python3
"""One prepared GPU check (issue 8): an 8B-shaped Llama (random weights) in NF4, 32 random rank-16
adapters on all projections, and in one run:

  1. the naive baseline: peft generate(), 1 stream with an adapter, and 32 streams over 8 adapters
  2. mygpt's engine, eager and with CUDA graphs: 1 stream + adapter, 32 streams over 1 adapter,
     32 streams over 32 adapters; the cold load of one adapter into a device slot
  3. parity: greedy tokens of the engine (eager and graphs) against peft's on a float32 model of four
     8B-shaped layers (bf16 on 32 random layers is too noisy for token equality), and prompt logits
     of the 8B model against peft's
  4. end to end: `mygpt serve` on a random 1B-shaped checkpoint written here, `mygpt bench` over HTTP

    bash scripts/gpu-check                                            # the GPU machine (installs wheels)
    PYTHONPATH=server python3 scripts/gpu_check.py --cpu --out DIR    # the same code paths, tiny, on a CPU

Prints one table last and writes DIR/gpu-check.json, DIR/<tag>-bench.json for each server end to end
(e2e, e2e-1, ...; its log DIR/<tag>-server.log only where it failed: the device tool brings back at most
8 files) and, with --profile, the profiler tables.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import faulthandler
import importlib.metadata
import json
import statistics
import threading
import time
import traceback
from pathlib import Path

import torch

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_base(tiny: bool, device: str, dtype: torch.dtype, layers: int | None = None):
    """A Llama with random weights, every decoder projection replaced by a bitsandbytes NF4 layer
    (`layers`: fewer decoder layers than the shape's)."""
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
    if layers is not None:
        config.num_hidden_layers = layers
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
    device = next(p.device for name, p in peft_model.named_parameters() if "lora_" in name)
    g = torch.Generator(device=device).manual_seed(1)  # drawn where the weights live: 1.3B numbers at 8B
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                std = 0.02 if "lora_A" in name else 0.01
                p.copy_(torch.randn(p.shape, generator=g, device=device) * std)
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


def engine_run(
    engine, prompts, adapters, max_new: int, weights: dict, times: dict | None = None
) -> tuple[float, dict]:
    """Starts the engine, submits every prompt at once (its first step sees them all, so two runs of the
    same requests take the same steps and their greedy tokens can be compared; "over N steps" in the rows
    shows it: one prefill step and new - 1 decode steps); returns (seconds, request id -> tokens) and stops
    the engine. times: gets "first" (seconds to the last stream's first token: the prompts' steps) and
    "end"."""
    import sys
    import threading

    from mygpt.engine.types import AdapterRef, GenerationRequest, SamplingParams

    done, lock, tokens = threading.Event(), threading.Lock(), {}
    left = [len(prompts)]

    firsts: dict[str, float] = {}

    def on_event(ev):
        with lock:
            if ev.token_ids and ev.request_id not in firsts:
                firsts[ev.request_id] = time.perf_counter()
            tokens.setdefault(ev.request_id, []).extend(ev.token_ids)
            if ev.finish_reason is not None:
                left[0] -= 1
                if ev.error:
                    print("error:", ev.error)
                if left[0] == 0:
                    done.set()

    engine.start()
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1.0)  # this thread keeps the interpreter until it waits: the engine's thread
    t0 = time.perf_counter()  # wakes to find every request queued
    for i, (p, a) in enumerate(zip(prompts, adapters, strict=True)):
        params = SamplingParams(max_tokens=max_new, temperature=0.0)
        ref = AdapterRef(a, weights[a]) if a else None
        engine.submit(GenerationRequest(f"r{i}", p, params, adapter=ref), on_event)
    sys.setswitchinterval(switch)
    try:
        assert done.wait(180), "engine run timed out"
    finally:
        engine.stop()
    end = time.perf_counter()
    if times is not None:
        times.update(first=max(firsts.values(), default=t0) - t0, end=end - t0)
    return end - t0, tokens


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens two streams share before they differ."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


TARGETS_8 = {  # issue 8's targets on the H100; checked only on the full shape on a GPU
    "32 streams / 32 adapters (tok/s)": 2500.0,
    "32 adapters vs 1 adapter": 0.90,
    "1 stream + adapter (tok/s)": 150.0,
    "cold adapter load (ms, median of 8; at most)": 50.0,
}


class _Tok:  # the engine detokenizes; random ids need no real text here
    def decode(self, ids, **kw):
        return " ".join(map(str, ids))


# an engine mode's options (mode_flags): short prompts as graph rows, the overlapped launch, torch.compile
# of the layers, the LoRA kernels, the NF4 products' measured paths
MODE_OPTIONS = ("rows", "overlap", "compile", "lora", "nf4")


def check_modes(modes: str | None, static: str) -> None:
    """--modes, before anything runs: each name an engine mode of this device ("graphs-..." on a GPU,
    "static-..." on a CPU) with known options, "eager", "embed" or "nf4 bench"; else exits saying which
    (a typo was a mode quietly skipped or run under its name without the option)."""
    for mode in (modes or "").split(",") if modes else []:
        if mode in ("eager", "embed", "nf4 bench"):
            continue
        if mode.split("-")[0] != static:
            raise SystemExit(f"--modes: {mode!r}: the engine modes on this device start with {static!r}")
        try:
            mode_flags(mode)
        except ValueError as exc:
            raise SystemExit(f"--modes: {exc}") from None


def mode_flags(mode: str) -> set[str]:
    """An engine mode's options, in any order after its base: "graphs-compile-lora-overlap" -> {compile,
    lora, overlap} (MODE_OPTIONS; another word is an error)."""
    flags = set(mode.split("-")[1:])
    if unknown := flags - set(MODE_OPTIONS):
        raise ValueError(
            f"engine mode {mode!r}: no option {', '.join(sorted(unknown))} ({', '.join(MODE_OPTIONS)})"
        )
    return flags


def measure_engine(runner, cache, weights, prompts, new: int, rows: list, report: dict, mode: str) -> dict:
    """Throughput of the engine on one runner; `mode` labels the rows (eager / graphs / graphs-overlap:
    each decode step launched before the last one's tokens are read)."""
    from mygpt.engine.engine import Engine

    overlap = "overlap" in mode_flags(mode)

    def engine() -> Engine:  # one per run (engine_run stops it): the same state, no prefix cached
        return Engine(runner, _Tok(), [], max_num_batched_tokens=2048, adapters=cache, overlap=overlap)

    # warm-up: the timed runs' shapes once each (their first steps' graphs captured, kernels loaded)
    engine_run(engine(), prompts[:1], ["ad0"], 4, weights)
    engine_run(engine(), prompts, ["ad0"] * 32, 4, weights)
    engine_run(engine(), prompts, [f"ad{i}" for i in range(32)], 4, weights)
    out = {}
    for label, ps, ads in [
        ("1 stream + adapter", prompts[:1], ["ad0"]),
        ("32 streams / 1 adapter", prompts, ["ad0"] * 32),
        ("32 streams / 32 adapters", prompts, [f"ad{i}" for i in range(32)]),
    ]:
        eng, times = engine(), {}
        dt, got = engine_run(eng, ps, ads, new, weights, times)
        out[label] = len(ps) * new / dt
        # the decode steps alone: from the last stream's first token (the prompts' steps done) to the end
        out[f"{label}: decode tok/s"] = len(ps) * (new - 1) / max(times["end"] - times["first"], 1e-9)
        out[f"{label}: prompt step ms"] = times["first"] * 1e3  # submission to the last first token
        report.setdefault("_tokens", {})[f"{mode}: {label}"] = got  # compared across modes, not written
        st = eng.stats
        steps = max(st.steps, 1)
        fwd, smp, step = (x * 1e3 / steps for x in (st.forward_s, st.sample_s, st.step_s))
        out[f"{label}: ms per step (forward call, sampling, rest)"] = [fwd, smp, step - fwd - smp]
        if overlap:
            out[f"{label}: steps launched ahead / used"] = [st.ahead_launched, st.ahead_used]
        rows.append((
            f"mygpt engine ({mode}), {label}",
            f"{out[label]:.1f} tok/s (decode steps alone: {out[f'{label}: decode tok/s']:.1f}; "
            f"prompts' step {out[f'{label}: prompt step ms']:.0f} ms)",
        ))  # fmt: skip
        rows.append((
            f"  ms per step: forward call / sampling (waits for the device) / rest, over {steps} steps",
            f"{fwd:.2f} / {smp:.2f} / {step - fwd - smp:.2f}",
        ))  # fmt: skip
    out["32 adapters vs 1 adapter"] = out["32 streams / 32 adapters"] / out["32 streams / 1 adapter"]
    rows.append((f"mygpt engine ({mode}), 32 adapters / 1 adapter", f"{out['32 adapters vs 1 adapter']:.2f}"))
    report[f"engine_{mode}"] = out
    return out


def embed_bench(runner, rows: list, report: dict, out_dir: Path, inputs: int = 256, streams: int = 8) -> None:
    """/v1/embeddings' engine path on this shape (scripts/bench_embeddings.py's, random token ids):
    throughput against transformers' sorted, padded batches of 32 (sentence-transformers' way), at the
    server's step budget (512) and at 2,048; what one eager step of embedding chunks costs (wall, device
    time, kernels; the top ops to profile-embed-step.txt); and `streams` greedy streams' inter-token
    latency alone and beside a bulk embedding job in each of bench_embeddings.BESIDE's modes (a token
    cap per step, a share of the time)."""
    import random

    import bench_embeddings as be

    from mygpt.engine.engine import Engine
    from mygpt.engine.runner import PrefillChunk

    model = runner.model  # the base, its LoRA layers wrapped (no adapter: the base's products)
    rng = random.Random(0)
    vocab, longest = runner.shape.vocab_size, min(128, runner.max_len - 1)
    ids = [[rng.randrange(10, vocab) for _ in range(rng.randint(16, longest))] for _ in range(inputs)]
    tokens = sum(map(len, ids))
    out: dict = {"inputs": inputs, "tokens": tokens}
    report["embeddings"] = out

    def throughput(budget: int, pack: bool = True) -> list[torch.Tensor]:
        """The engine's time for the inputs at this step budget (pack False: each step's chunks attend
        one by one, as before runner._Packed)."""
        engine = Engine(runner, _Tok(), [], max_num_batched_tokens=budget, max_waiting=100_000)
        key, packs = f"engine_{budget}" + ("" if pack else "_one_by_one"), runner.pack_chunks
        runner.pack_chunks = packs and pack
        engine.start()
        try:
            be.engine_embed(engine, ids[:32], "warm")
            sync()
            before = dataclasses.replace(engine.stats)
            t0 = time.perf_counter()
            vectors = be.engine_embed(engine, ids, f"e{budget}")
            out[f"{key}_s"] = time.perf_counter() - t0
            st = engine.stats  # where the engine's time went: its forward calls, the rest of its steps
            out[f"{key}_steps"] = {
                "steps": st.steps - before.steps,
                "forward_s": st.forward_s - before.forward_s,
                "step_s": st.step_s - before.step_s,
            }
            return vectors
        finally:
            engine.stop()
            runner.pack_chunks = packs

    got = throughput(512)
    be.hf_padded(model, ids[:32], 32, 0)
    sync()
    t0 = time.perf_counter()
    want = be.hf_padded(model, ids, 32, 0)
    sync()
    out["hf-padded_s"] = time.perf_counter() - t0
    out["min_cosine"] = min(float(a @ b.cpu()) for a, b in zip(got, want, strict=True))
    throughput(512, pack=False)
    throughput(2048)
    rate = {
        k: inputs / out[f"{k}_s"] for k in ("engine_512", "engine_512_one_by_one", "engine_2048", "hf-padded")
    }
    rows.append((
        f"embeddings, {inputs} inputs ({tokens} tokens), inputs/s: engine at 512 (chunks one by one) / 2048 "
        "tokens a step; transformers padded",
        f"{rate['engine_512']:.0f} ({rate['engine_512_one_by_one']:.0f}) / {rate['engine_2048']:.0f}; "
        f"{rate['hf-padded']:.0f} (min cosine {out['min_cosine']:.5f}; packed attention "
        f"{'on' if runner.pack_chunks else 'off: failed its check'})",
    ))  # fmt: skip

    # one eager step of embedding chunks (no engine running: slots 0.. are free), 512 and 2048 tokens
    for budget in (512, 2048):
        chunks, n = [], 0
        for i, p in enumerate(ids):
            if n + len(p) > budget or i >= runner.num_slots:
                break
            chunks.append(PrefillChunk(i, p, 0, pool="sum"))
            n += len(p)

        def timed(times: list, chunks: list = chunks) -> None:
            for _ in range(5):
                sync()
                t0 = time.perf_counter()
                runner.step([], chunks)
                sync()
                times.append(time.perf_counter() - t0)

        runner.step([], chunks)
        here, there, alone = [], [], []
        timed(here)
        worker = threading.Thread(target=timed, args=(there,))  # as the engine's thread runs it
        worker.start()
        worker.join()
        packs, runner.pack_chunks = runner.pack_chunks, False
        runner.step([], chunks)
        timed(alone)
        runner.pack_chunks = packs
        wall, in_thread = statistics.median(here) * 1e3, statistics.median(there) * 1e3
        one_by_one = statistics.median(alone) * 1e3
        line = f"{wall:.1f} ms wall ({in_thread:.1f} in another thread; chunks one by one {one_by_one:.1f})"
        if torch.cuda.is_available():
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                runner.step([], chunks)
                sync()
            events = prof.key_averages()
            device_ms = sum(e.self_device_time_total for e in events) / 1e3
            kernels = sum(e.count for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
            line += f", {device_ms:.1f} ms on the device, {kernels} device ops"
            with open(out_dir / "profile-embed-step.txt", "a") as f:
                f.write(f"== one step, {n} tokens in {len(chunks)} embedding chunks: {line}\n")
                f.write(events.table(sort_by="self_device_time_total", row_limit=15) + "\n")
                f.write(events.table(sort_by="self_cpu_time_total", row_limit=15) + "\n")
            out[f"eager_step_{budget}"] = {"wall_ms": wall, "device_ms": device_ms, "device_ops": kernels}
        else:
            out[f"eager_step_{budget}"] = {"wall_ms": wall}
        out[f"eager_step_{budget}"].update(thread_wall_ms=in_thread, one_by_one_wall_ms=one_by_one)
        rows.append((f"one eager step: {n} tokens in {len(chunks)} embedding chunks", line))

    engine = Engine(runner, _Tok(), [], max_num_batched_tokens=512, max_waiting=100_000)
    engine.start()
    try:
        be.engine_embed(engine, ids[:32], "warm")
        chat = [[rng.randrange(10, vocab) for _ in range(32)] for _ in range(streams)]
        new = min(64, runner.max_len - 33)  # (the runner's context: prompt, new tokens and a spare)
        cap, cells = engine.embed_chunk, []
        for mode in ("alone", *be.BESIDE):
            embeds = be.beside(engine, mode, cap)
            gaps, wall = be.chat_gaps(engine, chat, new, f"c{mode}", ids if embeds else None)
            out[f"itl_{mode}_ms"] = [
                be.pct(gaps, 0.5) * 1e3,
                be.pct(gaps, 0.99) * 1e3,
                statistics.fmean(gaps) * 1e3,
            ]
            cell = "{:.1f}/{:.1f}/{:.1f}".format(*out[f"itl_{mode}_ms"])
            if embeds:
                out[f"embed_wall_{mode}_s"] = wall
                cell += f" ({wall:.1f} s)"
            cells.append((mode, cell))
        be.beside(engine, "alone", cap)
        for mode, cell in cells:
            rows.append((
                f"{streams} streams' ITL p50/p99/mean ms (embedding wall), {mode} (cap {cap})",
                cell,
            ))  # fmt: skip
    finally:
        engine.stop()


def profile_engine(runner, cache, weights, prompts, out_dir: Path, mode: str) -> None:
    """Where the host's time goes in the engine: one stream + adapter, 16 tokens, under the torch
    profiler (host and device); the ops by host time, to profile-engine-<mode>.txt."""
    from torch.profiler import ProfilerActivity, profile

    from mygpt.engine.engine import Engine

    engine = Engine(runner, _Tok(), [], max_num_batched_tokens=2048, adapters=cache)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    # the profiler records the thread that starts it: it runs in the engine's own thread, from its first
    # step to the one that leaves it idle (a profiler started here saw none of the engine's ops)
    prof, real_step = profile(activities=activities), engine.step

    def step() -> None:
        if prof.profiler is None:
            prof.__enter__()
        real_step()
        if not (engine._waiting or engine._prefilling or engine._running):
            prof.__exit__(None, None, None)

    engine.step = step
    engine_run(engine, prompts[:1], ["ad0"], 16, weights)
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=45, max_name_column_width=70)
    (out_dir / f"profile-engine-{mode}.txt").write_text(table)


PROMPT_ROWS = 64  # graph_prompt_tokens of the "-rows" engine modes (the server's default: 0, off)


def mixed_step_ms(runner, prompt: list[int], n: int = 5) -> dict:
    """A step of 31 decode rows and a 64-token prompt chunk (the engine takes one such step for every
    request that arrives while others run), median of n: eager, with the compiled pieces (where
    runner.compile_layers is on), and through the static decoder with the prompt tokens as rows
    (runner.graph_prompt_tokens: a graph on a GPU)."""
    from mygpt.engine.runner import DecodeRow, PrefillChunk

    at = min(64, runner.max_len - 1)  # positions within the cache whatever --prompt-len and --new-tokens
    rows = [DecodeRow(s, 1, at, -1) for s in range(31)]
    chunk = [PrefillChunk(31, (prompt * 64)[:at], 0, -1)]
    out, saved = {}, (runner._compiled_qkv, runner._compiled_rest, runner.graph_prompt_tokens)
    labels = ["compiled pieces"] if runner.compiled else []
    labels += ["eager", "graphed rows"] if runner.decoder is not None else ["eager"]
    for label in labels:
        runner.graph_prompt_tokens = saved[2] if label == "graphed rows" else 0
        if label == "eager":
            runner._compiled_qkv = runner._compiled_rest = None
        times = []
        for _ in range(n + 1):  # the first: warm-up (and the capture)
            sync()
            t0 = time.perf_counter()
            runner.step(rows, chunk)
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        out[label] = sorted(times[1:])[n // 2]
    runner.graph_prompt_tokens = saved[2]
    if runner.compiled:  # (a failing compiled step turns compiling off: leave it off)
        runner._compiled_qkv, runner._compiled_rest = saved[:2]
    return out


def static_mode(device: str) -> str:
    """The label of the static decoder's rows: CUDA graphs on a GPU, the uncaptured static step on a CPU."""
    return "graphs" if device == "cuda" else "static"


def use_graphs(runner, on: bool) -> None:
    """Switches the runner between eager decode steps and the static decoder (graphs on a GPU)."""
    from mygpt.engine.graphs import StaticDecoder

    runner.decoder = StaticDecoder(runner, capture=runner.device.type == "cuda") if on else None


def parity(args, device: str, rows: list, report: dict) -> None:
    """Greedy tokens: peft's reference vs the engine, eager, static and compiled, on a float32 model."""
    from mygpt.engine.runner import ModelRunner
    from mygpt.lora.cache import AdapterCache

    model, config = build_base(args.tiny, device, torch.float32, layers=4)
    peft_model = add_peft_adapters(model, 4, 16)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(10, config.vocab_size, (24,), generator=g).tolist() for _ in range(3)]
    refs = {}
    for k in (1, 2, 3):
        peft_model.set_adapter(f"ad{k}")
        ids = torch.tensor([prompts[k - 1]], device=device)
        refs[k] = timed_generate(peft_model, ids, 16)[1][0].tolist()
    weights = export_adapters(peft_model, 4, 16)
    base = peft_model.unload()
    # the three prompts' first step (72 tokens) runs in the static decoder, its tokens as rows
    runner = ModelRunner(
        base, num_slots=4, max_len=48, dtype=torch.float32, max_loras=4, graph_prompt_tokens=96
    )
    cache = AdapterCache(runner.lora_layers, 4)
    from mygpt.engine.engine import Engine

    result = {}
    for mode in ("eager", static_mode(device), f"{static_mode(device)}-compile"):
        use_graphs(runner, mode != "eager")
        runner.compile_layers(mode.endswith("-compile"))
        engine = Engine(runner, _Tok(), [], max_num_batched_tokens=256, adapters=cache)
        _, got = engine_run(engine, prompts, ["ad1", "ad2", "ad3"], 16, weights)
        result[mode] = [got[f"r{j}"] == refs[k] for j, k in enumerate((1, 2, 3))]
        rows.append((f"greedy tokens = peft's, float32, 3 adapters ({mode})", str(result[mode])))
    report["parity_float32"] = result
    del runner, cache, base, peft_model, model
    if device == "cuda":
        torch.cuda.empty_cache()


def write_served_model(path: Path, tiny: bool, device: str = "cpu") -> None:
    """A random Llama checkpoint with a byte-level tokenizer (every byte a token, then filler tokens:
    any text, JSON for the structured-output probe included) and a chat template: no download."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab_size = 512 if tiny else 32000
    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    words = specials + sorted(pre_tokenizers.ByteLevel.alphabet())
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(words)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    if tiny:
        shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    else:  # Llama-3.2-1B's width and depth
        shape = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32)
    config = LlamaConfig(
        vocab_size=vocab_size, num_key_value_heads=shape["num_attention_heads"] // 4,
        max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0, **shape,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):  # 1.2B random numbers: drawn on the GPU where there is one
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(path)
    del model
    tokenizer.save_pretrained(path)


def engine_metrics(base: str) -> dict:
    """The server's engine counters from /metrics: its steps, busy seconds and tokens, so a slow server
    shows whether its engine steps were slow or the time went elsewhere (queues, HTTP, the host)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    samples = {
        s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels
    }
    steps = samples.get("mygpt_batch_size_count", 0.0)
    busy = samples.get("mygpt_engine_busy_seconds_total", 0.0)
    tokens = samples.get("mygpt_engine_step_tokens_total", 0.0)
    return {
        "steps": steps, "busy_s": busy, "tokens": tokens,
        "step_ms": busy / steps * 1e3 if steps else 0.0, "tokens_per_step": tokens / steps if steps else 0.0,
    }  # fmt: skip


PROBE_SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999}, "ok": {"type": "boolean"}},
    "required": ["id", "ok"],
    "additionalProperties": False,
}


def structured_probe(base: str) -> str:
    """A guided request over HTTP: the grammar masks and the batched top_p draw on the device (the
    random model writes no JSON unguided)."""
    import urllib.request

    body = {
        "model": "e2e", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64, "n": 4,
        "temperature": 1.0, "top_p": 0.9, "seed": 1,
        "response_format": {"type": "json_schema", "json_schema": {"name": "probe", "schema": PROBE_SCHEMA}},
    }  # fmt: skip
    request = urllib.request.Request(
        base + "/v1/chat/completions", json.dumps(body).encode(), {"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as r:
        choices = json.loads(r.read())["choices"]

    def valid(choice: dict) -> bool:
        try:
            value = json.loads(choice["message"]["content"])
        except ValueError:
            return False
        return (
            choice["finish_reason"] == "stop" and set(value) == {"id", "ok"} and isinstance(value["ok"], bool)
            and isinstance(value["id"], int) and 0 <= value["id"] <= 999
        )  # fmt: skip

    bad = [c["message"]["content"] for c in choices if not valid(c)]
    return f"{len(choices)} of {len(choices)} valid" if not bad else f"INVALID: {bad[0][:80]!r}"


def end_to_end(
    args, device: str, out_dir: Path, rows: list, report: dict, flags: tuple[str, ...] = (), tag: str = "e2e"
) -> None:
    """mygpt serve on a random checkpoint + mygpt bench over HTTP, 1 and 32 concurrent streams; flags:
    more serve flags (an opt-in variant, its rows and files named by tag)."""
    import os
    import shutil
    import socket
    import subprocess
    import sys
    import tempfile
    import urllib.request

    # the checkpoint (2 GB on the full shape) and the server's dirs stay out of DIR, which comes back
    work = Path(tempfile.mkdtemp(prefix="mygpt-gpu-check-"))
    model_dir = work / "e2e-model"
    write_served_model(model_dir, args.tiny, device)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent / "server")] + sys.path),
    }
    log_path = work / f"{tag}-server.log"  # into DIR only where the server fails (below)
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    serve = [
        sys.executable, "-m", "mygpt", "serve", "--model", str(model_dir), "--served-model-name", "e2e",
        "--port", str(port), "--device", device, "--max-num-seqs", "32", "--max-loras", "0", "--no-finetune",
        "--adapter-dir", str(work / "e2e-adapters"), "--cache-dir", str(work / "e2e-cache"), *flags,
    ]  # fmt: skip
    t0 = time.perf_counter()
    server = subprocess.Popen(serve, stdout=log, stderr=subprocess.STDOUT, env=env)
    ok = False
    try:
        base = f"http://127.0.0.1:{port}"
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"mygpt serve exited with {server.returncode}; see {tag}-server.log")
            try:
                if urllib.request.urlopen(base + "/ready", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
            if time.perf_counter() - t0 > 180:
                raise TimeoutError("mygpt serve not ready after 180 s")
        report[f"{tag}_ready_s"] = time.perf_counter() - t0
        rows.append((f"{tag}: serve flags", " ".join(flags) or "(the defaults)"))
        rows.append((f"{tag}: mygpt serve ready (load, NF4, warm-up)", f"{report[f'{tag}_ready_s']:.1f} s"))
        bench = [
            sys.executable, "-m", "mygpt", "bench", "--base-url", base + "/v1", "--models", "e2e",
            "--concurrency", "1,32",  # requests: 4 at concurrency 1, 64 at 32 (mygpt bench's default)
            "--max-tokens", str(args.new_tokens), "--out", str(out_dir / f"{tag}-bench.json"),
        ]  # fmt: skip
        subprocess.run(bench, check=True, env=env, timeout=240)
        results = json.loads((out_dir / f"{tag}-bench.json").read_text())["results"]
        report[f"{tag}_bench"] = results
        for r in results:
            rows.append((
                f"{tag}: HTTP, {r['concurrency']} concurrent streams: tok/s, TTFT p95, inter-token p50 / p95",
                f"{r['tokens_per_s']:.1f}, {r['ttft_p95'] * 1e3:.0f} ms, "
                f"{r['itl_p50'] * 1e3:.1f} / {r['itl_p95'] * 1e3:.1f} ms",
            ))  # fmt: skip
        report[f"{tag}_engine"] = engine_metrics(base)
        e = report[f"{tag}_engine"]
        rows.append((
            f"{tag}: engine since start (warm-up and bench): steps, busy s, mean step ms, tokens a step",
            f"{e['steps']:.0f}, {e['busy_s']:.1f}, {e['step_ms']:.1f}, {e['tokens_per_step']:.1f}",
        ))  # fmt: skip
        report[f"{tag}_structured"] = structured_probe(base)
        rows.append((f"{tag}: json_schema, 4 sampled choices, top_p 0.9", report[f"{tag}_structured"]))
        ok = True
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        if not ok:
            shutil.copy(log_path, out_dir / log_path.name)
        shutil.rmtree(work, ignore_errors=True)


class Rows(list):
    """The table's rows, each printed as it comes: a run cut short still shows what it measured."""

    def append(self, row: tuple[str, str]) -> None:
        super().append(row)
        print(f"| {row[0]} | {row[1]} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true", help="on the CPU, tiny shape: the code paths, no figures")
    ap.add_argument("--tiny", action="store_true", help="tiny shape on whatever device there is")
    ap.add_argument("--out", default="gpu-check-out")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--profile", action="store_true", help="time and profile bare decode steps too")
    ap.add_argument("--skip-e2e", action="store_true", help="no mygpt serve + mygpt bench step")
    ap.add_argument(
        "--modes", help="comma-separated engine modes (e.g. graphs,graphs-overlap,graphs-compile): only these"
    )
    ap.add_argument(
        "--e2e", action="append", metavar="FLAGS",
        help="the servers end to end: one per --e2e, each with these serve flags ('' for the defaults); "
        "without it: the defaults, then --compile if the budget leaves 2 minutes",
    )  # fmt: skip
    ap.add_argument(
        "--quick", action="store_true", help="no peft (naive baseline, logits, parity), no eager engine run"
    )
    ap.add_argument(
        "--deadline", type=float, default=0, help="seconds: dump every thread's stack if still running"
    )
    ap.add_argument(
        "--budget", type=float, default=0, help="seconds: skip the optional sections that would start later"
    )
    args = ap.parse_args()
    started = time.perf_counter()
    args.tiny = args.tiny or args.cpu
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.deadline:
        faulthandler.dump_traceback_later(args.deadline, exit=False)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    check_modes(args.modes, static_mode(device))
    if device == "cuda":
        # One CPU thread for torch's own host-side ops, as GPU servers run them (vLLM's workers set
        # OMP_NUM_THREADS=1). Here it is more: this thread builds the model with an OpenMP pool, and a
        # second pool in the engine's thread then makes every CPU op wait on futex wake-ups (libgomp
        # stops spinning once its threads outnumber the cores): measured on the 2-core CPU, small ops
        # in a second thread took 2x as long as in the first (87 vs 178 us) after the first had run
        # parallel work (docs/architecture.md; the server loads in a thread that ends for this reason).
        torch.set_num_threads(1)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows: list[tuple[str, str]] = Rows()
    report: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "shape": "tiny" if args.tiny else "Llama-3.1-8B",
        "errors": {},
    }
    for pkg in ("transformers", "peft", "bitsandbytes"):
        try:
            report[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            report[pkg] = "not installed"
    rows.append(("versions", f"torch {torch.__version__}, transformers {report['transformers']}, "
                 f"peft {report['peft']}, bitsandbytes {report['bitsandbytes']}"))  # fmt: skip
    new = args.new_tokens

    def save() -> None:  # after every section: a later failure keeps what was measured
        report["rows"] = list(rows)
        written = {k: v for k, v in report.items() if not k.startswith("_")}
        (out_dir / "gpu-check.json").write_text(json.dumps(written, indent=2, default=str))

    @contextlib.contextmanager
    def section(name: str):
        """A failing section is recorded and the run goes on with the next one."""
        t0 = time.perf_counter()
        try:
            yield
        except Exception as exc:
            report["errors"][name] = traceback.format_exc()
            traceback.print_exc()
            rows.append((f"{name}", f"FAILED: {exc!r}"[:120]))
        finally:
            report.setdefault("section_s", {})[name] = round(time.perf_counter() - t0, 1)
            save()

    def over_budget(name: str, reserve: float = 0) -> bool:
        """Past --budget seconds (less `reserve`, for a long section), an optional section is skipped
        (recorded) so that the run ends before the wrapper's timeout kills it: what was measured is
        printed and written."""
        if not args.budget or time.perf_counter() - started < args.budget - reserve:
            return False
        report.setdefault("skipped", []).append(name)
        rows.append((name, f"skipped: past the {args.budget:.0f} s budget"))
        return True

    t0 = time.perf_counter()
    model, config = build_base(args.tiny, device, dtype)
    report["build_s"] = time.perf_counter() - t0
    rows.append(("build + NF4 quantize base", f"{report['build_s']:.1f} s"))
    if device == "cuda":
        rows.append(("GPU memory after base", f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB"))

    n_adapters = 32
    g = torch.Generator().manual_seed(3)
    prompts = [
        torch.randint(10, config.vocab_size, (args.prompt_len,), generator=g).tolist() for _ in range(32)
    ]
    ref_logits = {}
    if args.quick:  # no peft: random adapters made directly, no naive baseline, no logits to compare
        base = model
    else:
        t0 = time.perf_counter()
        peft_model = add_peft_adapters(model, n_adapters, 16)
        rows.append((f"{n_adapters} peft adapters created", f"{time.perf_counter() - t0:.1f} s"))

        # (1) the naive baseline: peft generate()
        with section("naive baseline"):
            peft_model.set_adapter("ad0")
            ids1 = torch.tensor([prompts[0]], device=device)
            timed_generate(peft_model, ids1, 4)  # warm-up
            dt, _ = timed_generate(peft_model, ids1, new)
            report["naive_1_stream_tok_s"] = new / dt
            rows.append(("naive peft generate, 1 stream + adapter", f"{new / dt:.1f} tok/s"))
            ids32 = torch.tensor(prompts, device=device)
            names8 = [f"ad{i % 8}" for i in range(32)]
            dt, _ = timed_generate(peft_model, ids32, new, adapter_names=names8)
            report["naive_32x8_tok_s"] = 32 * new / dt
            rows.append(("naive peft generate, 32 streams / 8 adapters", f"{32 * new / dt:.1f} tok/s"))
        with section("peft prompt logits"):
            for k in (1, 2, 3):  # peft's prompt logits per adapter
                peft_model.set_adapter(f"ad{k}")
                with torch.inference_mode():
                    ref_logits[k] = (
                        peft_model(torch.tensor([prompts[k]], device=device)).logits[0, -1].float()
                    )
        weights = export_adapters(peft_model, n_adapters, 16)
        base = peft_model.unload()  # peft's LoRA layers out, the NF4 base as it was
        del peft_model

    # (2) mygpt's engine on the same base and the same adapter tensors, eager then with graphs
    from mygpt.engine.runner import ModelRunner
    from mygpt.kernels import available as kernels_available
    from mygpt.kernels import lora as lora_kernels
    from mygpt.lora.cache import AdapterCache

    runner = ModelRunner(
        base, num_slots=32, max_len=args.prompt_len + new + 8, dtype=dtype, max_loras=32, nf4_kernel=True,
    )  # fmt: skip
    runner.nf4_kernel(False)  # the default: bitsandbytes' products
    cache = AdapterCache(runner.lora_layers, 32)
    if args.quick:
        weights = random_adapters(runner, n_adapters, 16)

    def timed_load(cache, weights, name: str) -> float:
        sync()
        t0 = time.perf_counter()
        cache.acquire(name, weights[name])
        sync()
        cache.release(name)
        return (time.perf_counter() - t0) * 1e3

    with section("adapter loads"):
        # the server packs an adapter (slot dtype, page-locked) when it reads it from disk, off the
        # engine thread; the engine thread's load is then one host-to-device copy and the slot writes
        first = timed_load(cache, weights, "ad0")  # packing included
        names = [f"ad{i}" for i in range(1, 9)]  # eight adapters, each loaded for the first time
        for name in names:
            weights[name].packed(dtype, pin=device == "cuda")
        loads = [timed_load(cache, weights, name) for name in names]
        report["adapter_load_ms"] = loads
        report["adapter_load_with_packing_ms"] = first
        rows.append((
            "cold adapter load into a slot, packed when read: median (min-max of 8)",
            f"{statistics.median(loads):.1f} ({min(loads):.1f}-{max(loads):.1f}) ms",
        ))  # fmt: skip
        rows.append(("cold adapter load, packing on the host included", f"{first:.1f} ms"))
    static = static_mode(device)

    def run_modes(modes: list[str], runner, cache, weights: dict) -> None:
        """The engine's rows in each mode, on the runner above; "nf4 bench" times the NF4 kernel's tiles
        and, where one beats bitsandbytes (or without --quick), adds the engine with it."""
        for mode in modes:
            if over_budget(f"engine {mode}" if mode != "nf4 bench" else "nf4 kernel vs bitsandbytes"):
                continue
            if mode == "embed":
                with section("embeddings"):
                    use_graphs(runner, True)
                    embed_bench(runner, rows, report, out_dir)
                continue
            if mode == "nf4 bench":
                other_paths = False
                with section("nf4 kernel vs bitsandbytes"):
                    other_paths = nf4_bench(runner, rows, report)
                if runner.nf4_kernel(False) and (other_paths or not args.quick):
                    # both kernels called by the compiled layers first (the likeliest to reach issue 8's
                    # targets), then both with plain graphs, then the NF4 kernel alone
                    more = [f"{static}-compile-lora-nf4", f"{static}-lora-nf4", f"{static}-nf4"]
                    modes += [m for m in more if m not in modes]  # (not twice where --modes named one)
                continue
            with section(f"engine {mode}"):
                flags = mode_flags(mode)
                runner.nf4_kernel("nf4" in flags)
                runner.graph_prompt_tokens = PROMPT_ROWS if "rows" in flags else 0  # before the decoder
                runner.lora_kernel = "lora" in flags and kernels_available(runner.device)
                if runner.lora_kernel and not lora_kernels.verified(runner._lora_groups()):
                    runner.lora_kernel = False  # disagreed or failed: the grouped products (a warning)
                use_graphs(runner, mode != "eager")
                if "nf4" in flags:  # the products' paths timed with this mode's decoder, as a server's are
                    plans = runner.choose_nf4_paths()
                    report.setdefault("nf4_paths", {})[mode] = {
                        f"{n} x {k}": p for (n, k), p in plans.items()
                    }
                if runner.compile_layers("compile" in flags):  # compiled before the first request
                    first = "compile_warmup_s" not in report  # a later compiled mode reuses the compiles
                    t0 = time.perf_counter()
                    steps = runner.decoder.warm_compile()
                    took = time.perf_counter() - t0
                    report["compile_warmup_s" if first else f"compile_warmup_s {mode}"] = took
                    rows.append(
                        (f"torch.compile at start-up ({mode}: {steps} warm-up steps)", f"{took:.1f} s")
                    )
                if "rows" in flags and flags <= {"rows", "compile"}:  # a new request's step among rows
                    mixed = mixed_step_ms(runner, prompts[0])
                    report[f"mixed_step_ms {mode}"] = mixed
                    rows.append((
                        f"a step of 31 decode rows + a 64-token prompt ({mode}), ms",
                        ", ".join(f"{k} {v:.1f}" for k, v in mixed.items()),
                    ))  # fmt: skip
                measure_engine(runner, cache, weights, prompts, new, rows, report, mode)
                if args.profile and mode in (static, f"{static}-compile", f"{static}-compile-lora"):
                    profile_engine(runner, cache, weights, prompts, out_dir, mode)
                if runner.decoder is not None:
                    st = runner.decoder.stats
                    report.setdefault("graph_stats", {})[mode] = vars(st)
                    rows.append((
                        f"  {mode}: graphs captured / replayed / run eagerly / failed; steps with prompt rows",
                        f"{st.captures} / {st.replays} / {st.eager} / {st.failures}; {st.prompt_steps}",
                    ))  # fmt: skip
                if "compile" in flags and not runner.compiled:
                    rows.append(("torch.compile", "FAILED: the steps ran uncompiled (see the log)"))
        runner.nf4_kernel(False)
        runner.compile_layers(False)
        runner.graph_prompt_tokens = 0
        runner.lora_kernel = False
        use_graphs(runner, True)

    # In order of what the run is for, so that a run past its --budget skips the least of it: the
    # default (graphs) and the opt-in variants most likely to become the default against it in the same
    # run (short prompts as graphed rows, the overlapped launch, torch.compile of the layers, with and
    # without rows, with the overlapped launch); logits and parity with peft; the
    # server end to end; then the other variants (the eager engine, the NF4 kernel's bench), the profile
    # and the server with --compile.
    first_modes = [
        static,
        f"{static}-rows",
        f"{static}-overlap",
        f"{static}-compile",
        f"{static}-compile-rows",
    ]
    first_modes.append(f"{static}-compile-overlap")
    first_modes.append(f"{static}-lora")  # the LoRA kernels (kernels/lora.py), with the graphs
    first_modes.append(f"{static}-compile-lora")  # the same, called by the compiled layers
    first_modes.append("embed")  # /v1/embeddings' path, and streams beside a bulk embedding job
    picked = args.modes.split(",") if args.modes else None
    # --modes may also name other combinations of the options (mode_flags), in any order: run after these
    known = {*first_modes, "eager", "nf4 bench"}
    extra = [m for m in picked or [] if m not in known]  # (checked at the start: check_modes)
    run_modes([m for m in first_modes if picked is None or m in picked] + extra, runner, cache, weights)
    if ref_logits:
        with section("prompt logits vs peft"):
            errs = []
            for j, k in enumerate((1, 2, 3)):  # last-prompt-position logits, mygpt vs peft: relative L2
                lora = cache.acquire(f"ad{k}", weights[f"ad{k}"])
                got = runner.prefill(20 + j, prompts[k], 0, lora).float()
                cache.release(f"ad{k}")
                errs.append(float((got - ref_logits[k]).norm() / ref_logits[k].norm()))
            report["logits_rel_err"] = errs
            rows.append(
                ("prompt logits vs peft (model dtype), relative L2", ", ".join(f"{e:.1e}" for e in errs))
            )
    # (3) float32 parity, (4) end to end
    if not args.quick and not over_budget("parity"):
        with section("parity"):
            parity(args, device, rows, report)
    if device == "cuda":
        torch.cuda.empty_cache()
    servers = args.e2e or [""]  # each: its serve flags; rows and files tagged e2e, e2e-1, e2e-2, ...
    for i, flags in enumerate(servers):
        tag = "e2e" if i == 0 else f"e2e-{i}"
        if not args.skip_e2e and not over_budget(tag):
            with section(tag):
                end_to_end(args, device, out_dir, rows, report, flags=tuple(flags.split()), tag=tag)
    later = [] if args.quick else ["eager"]
    later += ["nf4 bench"]
    run_modes([m for m in later if picked is None or m in picked], runner, cache, weights)

    tokens = report.pop("_tokens", {})
    variants = dict.fromkeys(  # every variant of the graphs that ran, in the order run
        key.split(": ")[0].removeprefix(f"{static}-") for key in tokens if key.startswith(f"{static}-")
    )
    for variant in variants:
        for label in ("1 stream + adapter", "32 streams / 32 adapters"):
            ref = tokens.get(f"{static}: {label}")
            got = tokens.get(f"{static}-{variant}: {label}")
            if ref is not None and got is not None:
                same = sum(ref[k] == got.get(k) for k in ref)  # request id -> its tokens
                # random weights give near-ties, so bf16 rounding that differs (other kernels) soon
                # picks another token: how far each stream agrees tells that from a wrong step
                agree = statistics.median(_common_prefix(ref[k], got.get(k, [])) for k in ref)
                report.setdefault(f"{variant}_same_tokens", {})[label] = f"{same}/{len(ref)}"
                report.setdefault(f"{variant}_common_prefix", {})[label] = agree
                rows.append((
                    f"{variant}: greedy tokens = those without it, {label}",
                    f"{same} of {len(ref)} streams; the first {agree:g} of {len(next(iter(ref.values())))} "
                    "alike (median)",
                ))  # fmt: skip
    if device == "cuda" and not args.tiny and "engine_graphs" in report and "adapter_load_ms" in report:
        # the default's rows, and the opt-in variant with the most 32 x 32 throughput where it is another
        graphed = [k for k in report if k.startswith("engine_graphs")]
        best = max(graphed, key=lambda k: report[k]["32 streams / 32 adapters"])
        for key in dict.fromkeys(["engine_graphs", best]):
            got = {
                "32 streams / 32 adapters (tok/s)": report[key]["32 streams / 32 adapters"],
                "32 adapters vs 1 adapter": report[key]["32 adapters vs 1 adapter"],
                "1 stream + adapter (tok/s)": report[key]["1 stream + adapter"],
                "cold adapter load (ms, median of 8; at most)": statistics.median(report["adapter_load_ms"]),
            }
            for name, target in TARGETS_8.items():
                ok = got[name] <= target if "at most" in name else got[name] >= target
                rows.append((
                    f"target ({key.removeprefix('engine_')}): {name} {target:g}",
                    f"{got[name]:.2f} {'MET' if ok else 'not met'}",
                ))  # fmt: skip
    save()
    if args.profile and not over_budget("profile"):
        with section("profile"):
            profile_steps(runner, cache, weights, args, device, out_dir, rows)
    del runner, cache, base, model, weights
    if device == "cuda":
        torch.cuda.empty_cache()
    # last, and only with ~2 minutes of the budget left: a second server start (its compiles) and bench
    if not (args.skip_e2e or args.e2e) and device == "cuda" and not over_budget("e2e --compile", reserve=120):
        with section("e2e --compile"):  # the compiled pieces are for this: prompt steps among running rows
            end_to_end(args, device, out_dir, rows, report, flags=("--compile",), tag="e2e-compile")
    faulthandler.cancel_dump_traceback_later()
    print()
    width = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if report["errors"]:
        print("FAILED sections:", ", ".join(report["errors"]))
        raise SystemExit(1)


NF4_TILES = {  # kernels/nf4.py TILES entries nf4_bench tries, (block_n, block_k, warps, stages, programs,
    # lut); the fastest of each kind is kept. gemv: one row; dot: 8 and 32 rows. Chosen without a GPU from
    # scripts/kernel_sass.py: no register spills, few instructions of the K loop per weight. Kept from
    # session 15's H100 sweep: each kind's fastest "shared" tiles (eight others were 6-36% behind; "select",
    # the control, 25-57%). Session 16: "shared8", one gather of the table for the 8 planes, 2 barriers a
    # K step where "shared" has 16 (the dot's: 18 where 32); "global", the table read from memory for each
    # weight, no barrier a plane but more instructions (8.9, 10.1). Session 17: "bytes", one lookup a byte
    # into a table of value pairs and one tl.dot a K step (wgmma), the scale applied to the step's sums:
    # 3.9-4.2 instructions a weight where "shared" takes 6.8-8.1, 5 barriers a step
    "gemv": [
        (32, 256, 4, 3, 264, "shared"), (64, 128, 4, 3, 264, "shared"), (16, 512, 4, 3, 264, "shared"),
        (32, 256, 4, 3, 264, "global"), (32, 256, 4, 3, 264, "shared8"), (64, 128, 4, 3, 264, "shared8"),
        (16, 512, 4, 3, 264, "shared8"), (128, 64, 4, 3, 264, "bytes"), (64, 64, 4, 3, 264, "bytes"),
        (256, 64, 8, 3, 264, "bytes"), (128, 64, 4, 4, 264, "bytes"),
    ],
    "dot": [
        (128, 128, 8, 3, 512, "shared"), (128, 128, 4, 3, 512, "shared"), (128, 128, 8, 3, 132, "shared"),
        (128, 128, 8, 3, 512, "global"), (128, 128, 8, 3, 512, "shared8"), (64, 128, 4, 3, 512, "shared8"),
        (128, 64, 4, 3, 512, "bytes"), (64, 64, 4, 3, 512, "bytes"), (256, 64, 8, 3, 512, "bytes"),
        (128, 64, 4, 4, 512, "bytes"), (128, 64, 4, 3, 264, "bytes"),
    ],
}  # fmt: skip
NF4_ROWS = {"gemv": (1,), "dot": (8, 32)}


def random_adapters(runner, n: int, rank: int) -> dict:
    """n random rank-r adapters on every projection the runner wraps, as mygpt LoRAWeights (--quick:
    no peft; the same scale as add_peft_adapters' weights)."""
    from mygpt.lora.weights import LoRAWeights, ModuleLoRA

    g = torch.Generator(device=runner.device).manual_seed(1)
    out = {}
    for i in range(n):
        modules = {}
        for path, layer in runner.lora_layers.items():
            a = torch.randn(rank, layer.in_features, generator=g, device=runner.device) * 0.02
            b = torch.randn(layer.out_features, rank, generator=g, device=runner.device) * 0.02
            modules[path] = ModuleLoRA(a=a.cpu(), b=b.cpu())
        out[f"ad{i}"] = LoRAWeights(
            name=f"ad{i}", path=Path("."), rank=rank, modules=modules, base_model=None
        )
    return out


def nf4_bench(runner, rows: list, report: dict) -> bool:
    """The first decoder layer's four products (q/k/v, o, gate/up, down) at 1, 8 and 32 rows: the Triton
    NF4 kernel in each NF4_TILES entry (gemv at 1 row, dot at 8 and 32) against bitsandbytes (per layer,
    as without the kernel), each call captured in a CUDA graph and replayed (device time, as in the
    engine's graphed steps: timed from the host, bitsandbytes' ~150 us of Python per call swamped run 2's
    and run 4's figures), median, and bitsandbytes' op once over each product's concatenation ("fused").
    Keeps the fastest entry of each kind (summed over its products), then has the runner measure its
    paths again with those tiles (runner.choose_nf4_paths, as the server does at start-up) and reports
    them. True where that plan takes anything but the layers one by one somewhere (so the engine with
    --nf4-kernel runs other products than without it)."""
    from mygpt.engine.runner import _plan_text
    from mygpt.kernels import nf4

    proj = runner._proj[0]
    products = {
        name: f._fused_base
        for name, f in (("qkv", proj.qkv), ("o", proj.o), ("gate_up", proj.gate_up), ("down", proj.down))
        if f is not None and isinstance(f._fused_base, nf4.NF4Product)
    }
    if not products:
        rows.append(("nf4 kernel", "not used (no Triton, or no GPU and no TRITON_INTERPRET=1)"))
        return False

    def timed(fn) -> float:  # microseconds
        if runner.device.type == "cuda":
            from triton.testing import do_bench_cudagraph

            return do_bench_cudagraph(fn, rep=40, return_mode="median") * 1e3
        times = []  # the interpreter on a CPU (tests): the host's time, median of 3
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times)

    default = {kind: dict(t) for kind, t in nf4.TILES.items()}
    results: dict = {"bnb": {}, "fused": {}, "gemv": {}, "dot": {}, "best": {}}
    g = torch.Generator(device=runner.device).manual_seed(7)
    inputs = {  # (name, rows) -> an input of the product's width
        (name, m): torch.randn(m, p.packed.shape[1] * 2, generator=g, device=runner.device).to(runner.dtype)
        for name, p in products.items()
        for m in (1, 8, 32)
    }
    for (name, m), x in inputs.items():
        results["bnb"][f"{name} m{m}"] = timed(lambda p=products[name], x=x: p._bnb(x))
        if products[name]._fused_ok(x):  # bitsandbytes' op once over the concatenation
            results["fused"][f"{name} m{m}"] = timed(lambda p=products[name], x=x: p._fused(x))
    keys = ("block_n", "block_k", "num_warps", "num_stages", "programs", "lut")
    # what one layer's products must read: the packed weights and the kernel's float32 scales
    layer_bytes = sum(p.packed.numel() + p.scale.numel() * 4 for p in products.values())
    results["layer_bytes"] = layer_bytes
    for kind, tiles in NF4_TILES.items():
        for tile in tiles:
            nf4.TILES[kind].update(zip(keys, tile, strict=True))
            times = {}
            try:
                for (name, m), x in inputs.items():
                    if m not in NF4_ROWS[kind]:
                        continue
                    p = products[name]
                    if not p._kernel_ok(x):
                        raise RuntimeError(f"disagrees with bitsandbytes at {name} m{m}")
                    times[f"{name} m{m}"] = timed(
                        lambda p=p, x=x: nf4.nf4_matmul(x, p.words, p.scale, p.code)
                    )
            except Exception as exc:  # a tile that fails is reported and skipped
                results[kind][str(tile)] = repr(exc)[:200]
                continue
            results[kind][str(tile)] = times
        nf4.TILES[kind].update(default[kind])
    report["nf4_bench"] = results
    won = {}
    for kind in NF4_TILES:
        measured = {t: v for t, v in results[kind].items() if isinstance(v, dict)}
        if not measured:  # this kind stays at its default (bitsandbytes where it fails); the other reports
            rows.append((f"nf4 kernel ({kind})", "every tile failed: bitsandbytes runs"))
            won.update({m: (float("inf"), 0.0) for m in NF4_ROWS[kind]})
            continue
        best = min(measured, key=lambda t: sum(measured[t].values()))
        tile = next(t for t in NF4_TILES[kind] if str(t) == best)
        nf4.TILES[kind].update(zip(keys, tile, strict=True))
        results["best"][kind] = best
        for m in NF4_ROWS[kind]:
            ours = sum(v for k, v in measured[best].items() if k.endswith(f" m{m}"))
            theirs = sum(v for k, v in results["bnb"].items() if k.endswith(f" m{m}"))
            won[m] = (ours, theirs)
            tb_s = [layer_bytes / (us * 1e-6) / 1e12 for us in (ours, theirs)]  # bytes a second, in TB/s
            results.setdefault("tb_per_s", {})[f"m{m}"] = tb_s
            fused = sum(v for k, v in results["fused"].items() if k.endswith(f" m{m}"))
            rows.append((f"one layer's 4-bit products, {m} rows: kernel {kind} {best} vs bitsandbytes",
                         f"{ours:.0f} vs {theirs:.0f} us ({theirs / ours:.2f}x); "
                         f"{tb_s[0]:.2f} vs {tb_s[1]:.2f} TB/s; bitsandbytes once a product {fused:.0f} us"))  # fmt: skip
    # the engine's choice at each row count (runner.choose_nf4_paths), measured again with the tiles kept
    runner.nf4_kernel(True)
    runner.graph_prompt_tokens = 0
    use_graphs(runner, True)  # timed as the server's default decoder runs them (an "eager" mode may precede)
    on_cpu = None if runner.device.type == "cuda" else (lambda fn, rows: timed(fn) / 1e6)  # (tests)
    plans = runner.choose_nf4_paths(timer=on_cpu)
    names = {(p.packed.shape[0], p.packed.shape[1] * 2): name for name, p in products.items()}
    results["paths"] = {names.get(key, str(key)): plan for key, plan in plans.items()}
    # what the plans rest on: each path's microseconds a call, by rows (the first layer's products timed)
    results["path_us"] = {
        name: {m: {way: sec * 1e6 for way, sec in ways.items()} for m, ways in p.timings.items()}
        for name, p in products.items()
    }
    for key, plan in plans.items():
        rows.append(
            (f"  the engine's path for {names.get(key, key)} (measured at start-up)", _plan_text(plan))
        )
    # the prompt step's products (eager: bitsandbytes' Python counts), where the bytes kernel may run too
    at = {
        way: sum(us[nf4.PROMPT_ROWS].get(way, 0.0) for us in results["path_us"].values()) for way in nf4.PATHS
    }
    rows.append((
        f"one layer's 4-bit products, {nf4.PROMPT_ROWS} rows, eager (us)",
        ", ".join(f"{way} {us:.0f}" for way, us in at.items() if us) + f" (kernel: {nf4.TILES['dot']['lut']})",
    ))  # fmt: skip
    return any(way != "layers" for plan in plans.values() for _, way in plan)


def profile_steps(runner, cache, weights, args, device: str, out_dir: Path, rows: list) -> None:
    """Bare decode steps of the runner, eager and static, batch 1 and 32; a kernel table of the eager
    ones."""
    for mode in ("eager", static_mode(device)):
        use_graphs(runner, mode != "eager")
        for b in (1, 32):
            slots = list(range(b))
            loras = [cache.acquire(f"ad{i % 32}", weights[f"ad{i % 32}"]) for i in range(b)]
            try:
                for _ in range(3):
                    runner.decode(slots, [5] * b, [args.prompt_len] * b, loras)
                sync()
                t0 = time.perf_counter()
                for _ in range(10):
                    runner.decode(slots, [5] * b, [args.prompt_len] * b, loras)
                sync()
                step_ms = (time.perf_counter() - t0) / 10 * 1e3
                rows.append((f"decode step ({mode}), batch {b} (runner only)", f"{step_ms:.1f} ms"))
                launch, whole = [], []  # one step at a time, from an idle device: the host's part of it
                for _ in range(5):
                    sync()
                    t0 = time.perf_counter()
                    runner.decode(slots, [5] * b, [args.prompt_len] * b, loras)
                    t1 = time.perf_counter()
                    sync()
                    launch.append((t1 - t0) * 1e3)
                    whole.append((time.perf_counter() - t0) * 1e3)
                launch.sort()
                whole.sort()
                rows.append((
                    f"  one step from idle ({mode}), batch {b}: host returns / device done",
                    f"{launch[2]:.2f} / {whole[2]:.2f} ms",
                ))  # fmt: skip
                if mode == "eager" and device == "cuda":
                    from torch.profiler import ProfilerActivity, profile

                    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                        for _ in range(3):
                            runner.decode(slots, [5] * b, [args.prompt_len] * b, loras)
                        sync()
                    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
                    (out_dir / f"profile-b{b}.txt").write_text(table)
            finally:
                for i in range(b):
                    cache.release(f"ad{i % 32}")


if __name__ == "__main__":
    main()
