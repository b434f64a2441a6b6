"""torch.compile of the decoder layers (ModelRunner.compile_layers) for the static decode steps: the
compiled step equals the uncompiled one, one compiled function serves every layer, and a failing
compile falls back. On the CPU inductor emits C++; on a GPU the same code is traced into Triton kernels
that the decode graphs capture (scripts/gpu-check's graphs-compile rows)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM

from mygpt.engine.runner import DecodeRow, ModelRunner

SLOTS, MAX_LEN = 6, 300  # spans of 256 and 300 positions: two attention buckets


def make_runner(tiny_model_dir, compile_layers: bool, num_slots: int = SLOTS, **kw) -> ModelRunner:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    kw = {"static_decode": True, **kw}
    runner = ModelRunner(
        model, num_slots=num_slots, max_len=MAX_LEN, dtype=torch.float32, max_loras=3, max_lora_rank=8,
        compile_layers=compile_layers, **kw,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    for layer in runner.lora_layers.values():  # the same random adapters in both runners' slots
        for slot in range(3):
            a = torch.randn(8, layer.in_features, generator=gen) * 0.3
            layer.set_slot(slot, a, torch.randn(layer.out_features, 8, generator=gen) * 0.3)
    return runner


@pytest.fixture(scope="module")
def runners(tiny_model_dir):
    torch._dynamo.reset()
    plain, compiled = make_runner(tiny_model_dir, False), make_runner(tiny_model_dir, True)
    for r in (plain, compiled):
        for slot in range(SLOTS):
            r.prefill(slot, [(7 * slot + j) % 90 + 3 for j in range(5 + 40 * slot)], 0, slot % 4 - 1)
    return plain, compiled


def graphs_compiled() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize(
    "rows",
    [
        [(0, -1), (1, -1), (2, -1)],  # base model only
        [(0, 0), (1, 1), (2, 2), (3, -1), (4, 0)],  # three adapters and the base: padding to 8
        [(5, 1)],  # one row with an adapter, the 256+ span
        [(1, 2), (4, 2)],
    ],
)
def test_compiled_decode_step_equals_uncompiled(runners, rows):
    plain, compiled = runners
    assert compiled.compile_layers(True) and compiled._compiled_layer is not None
    decode = [DecodeRow(slot, 11 + slot, 5 + 40 * slot, lora) for slot, lora in rows]
    want, got = plain.step(decode, [])[0], compiled.step(decode, [])[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for k_plain, k_compiled in zip(plain.k_cache, compiled.k_cache, strict=True):  # the same cache writes
        torch.testing.assert_close(k_compiled[:SLOTS], k_plain[:SLOTS], atol=1e-5, rtol=1e-5)
    assert compiled._compiled_layer is not None  # no fallback happened


def test_one_compiled_graph_serves_every_layer_and_size(tiny_model_dir):
    runner = make_runner(tiny_model_dir, True)
    assert len(runner._layers) >= 2
    torch._dynamo.reset()
    breaks, before = sum(counters["graph_break"].values()), graphs_compiled()
    runner.step([DecodeRow(slot, 3, 60 + slot, 1) for slot in range(SLOTS)], [])
    # one graph, whatever the number of layers (nothing layer-specific is guarded), nothing breaks it
    assert graphs_compiled() - before == 1
    assert sum(counters["graph_break"].values()) == breaks
    # other batch sizes, attention spans (256, 300) and adapter groupings: the same graph
    runner.step([DecodeRow(slot, 3, 280, slot % 3) for slot in range(2, 5)], [])
    runner.step([DecodeRow(0, 3, 9, 2), DecodeRow(4, 3, 30, 2)], [])
    assert graphs_compiled() - before == 1


def test_a_failing_compiled_step_runs_uncompiled(tiny_model_dir, caplog):
    plain, broken = make_runner(tiny_model_dir, False), make_runner(tiny_model_dir, True)

    def fails(*args, **kw):
        raise RuntimeError("inductor failed")

    broken._compiled_layer = fails
    for r in (plain, broken):
        r.prefill(0, [5, 6, 7], 0, 0)
    decode = [DecodeRow(0, 9, 3, 0)]
    torch.testing.assert_close(broken.step(decode, [])[0], plain.step(decode, [])[0])
    assert broken._compiled_layer is None and "run uncompiled" in caplog.text


def test_no_compile_without_the_static_decoder(tiny_model_dir):
    runner = make_runner(tiny_model_dir, True, static_decode=False)
    assert runner.decoder is None and not runner.compile_layers(True) and runner._compiled_layer is None
    exact = make_runner(tiny_model_dir, True, exact_attention=True)  # the CPU server's runner
    assert exact.decoder is None and exact._compiled_layer is None


@pytest.mark.parametrize("lora_kernel", [False, True], ids=["grouped-lora", "lora-kernels"])
def test_warm_compile_leaves_nothing_to_compile_for_requests(tiny_model_dir, lora_kernel):
    """After the start-up warm-up, steps of any batch, span and adapter mix compile nothing more."""
    import random

    torch._dynamo.reset()  # nothing compiled by an earlier test counts as warmed
    runner = make_runner(tiny_model_dir, True, lora_kernel=lora_kernel)
    assert runner.lora_kernel == lora_kernel
    assert runner.decoder.warm_compile() > 0
    before, rng = graphs_compiled(), random.Random(0)
    for slot in range(SLOTS):
        runner.prefill(slot, [3] * (5 + 50 * slot), 0)
    for _ in range(12):
        slots = rng.sample(range(SLOTS), rng.randint(1, SLOTS))
        rows = [DecodeRow(s, 4, 5 + 50 * s, rng.choice([-1, 0, 1, 2])) for s in slots]
        runner.step(rows, [])
    assert graphs_compiled() == before


def test_bitsandbytes_nf4_layers_compile_whole(tiny_model_dir):
    """The GPU's 4-bit path, on the CPU: bitsandbytes' Linear4bit in its standard NF4 layout (the one a
    GPU uses; on a CPU bitsandbytes would repack it for its own kernel, which the runner calls through
    ctypes, a graph break) traces into the compiled layer with no graph break and no per-layer guard
    (each layer's quantization state is its own object), and gives the uncompiled step's logits."""
    from bitsandbytes.nn import Linear4bit
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_use_double_quant=True,
    )  # fmt: skip
    runners = []
    for compile_layers in (False, True):
        model = AutoModelForCausalLM.from_pretrained(
            tiny_model_dir, quantization_config=q, dtype=torch.float32, device_map={"": "cpu"}
        )
        layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
        assert layers and all(hasattr(m, "support_avx512bf16_for_cpu") for m in layers)
        for m in layers:
            m.support_avx512bf16_for_cpu = False  # keep the GPU layout (no CPU repacking)
        runners.append(
            ModelRunner(
                model,
                num_slots=4,
                max_len=64,
                dtype=torch.float32,
                max_loras=2,
                static_decode=True,
                compile_layers=compile_layers,
            )  # fmt: skip
        )
        for slot in range(4):
            runners[-1].prefill(slot, [3, 4, 5, 6 + slot], 0, slot % 3 - 1)
    plain, compiled = runners
    torch._dynamo.reset()
    breaks, before = sum(counters["graph_break"].values()), graphs_compiled()
    for n, position in ((4, 4), (3, 5)):
        rows = [DecodeRow(slot, 7, position, slot % 3 - 1) for slot in range(n)]
        torch.testing.assert_close(compiled.step(rows, [])[0], plain.step(rows, [])[0], atol=1e-4, rtol=1e-4)
    assert sum(counters["graph_break"].values()) == breaks
    assert graphs_compiled() - before == 1  # two steps of two layers: one graph
    from mygpt.engine.runner import PrefillChunk

    for length in (5, 9):  # a prompt step: the compiled pieces, whole too (one graph each)
        chunk = [PrefillChunk(0, [3] * length, 6, 1)]
        torch.testing.assert_close(
            compiled.step([], chunk)[1][0], plain.step([], chunk)[1][0], atol=1e-4, rtol=1e-4
        )
    assert sum(counters["graph_break"].values()) == breaks
    assert graphs_compiled() - before == 3
    assert compiled.compiled


def test_warm_compile_warms_the_eager_pieces_with_prompt_rows_on(tiny_model_dir):
    """With graph_prompt_tokens, warm_compile's short chunk steps would run as graph rows: they run the
    eager step's compiled pieces as meant, and the setting is back after."""
    runner = make_runner(tiny_model_dir, True, graph_prompt_tokens=32)
    calls, rest = [], runner._compiled_rest
    runner._compiled_rest = lambda *args: calls.append(1) or rest(*args)
    assert runner.decoder.warm_compile() > 0
    assert calls and runner.decoder.stats.prompt_steps == 0 and runner.graph_prompt_tokens == 32


def test_warm_compile_fits_a_one_slot_server(tiny_model_dir):
    """max_num_seqs 1: the LoRA grouping buffers hold 2 rows per adapter slot; the warm-up stays in them
    (it asked for 4, and the start-up capture failed)."""
    runner = make_runner(tiny_model_dir, True, num_slots=1)
    assert runner.decoder.warm_compile() > 0
    before = graphs_compiled()
    runner.prefill(0, [3, 4, 5], 0, 2)
    runner.step([DecodeRow(0, 6, 3, 2)], [])
    assert graphs_compiled() == before and runner.compiled


def test_warm_compile_covers_steps_longer_than_a_short_context(tiny_model_dir):
    """A 64-position context with the LoRA kernels: a step of three requests' chunks passes the
    kernels' 128 tokens (the grouped products then) though no one chunk can; the warm-up makes such
    a step of several chunks, so it compiles nothing in a request."""
    from mygpt.engine.runner import LORA_KERNEL_TOKENS, PrefillChunk

    torch._dynamo.reset()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    runner = ModelRunner(model, num_slots=3, max_len=64, dtype=torch.float32, max_loras=3, max_lora_rank=8,
                         static_decode=True, compile_layers=True, lora_kernel=True)  # fmt: skip
    assert runner.lora_kernel and runner.decoder.warm_compile() > 0
    before = graphs_compiled()
    chunks = [PrefillChunk(slot, [5] * 50, 0, slot) for slot in range(3)]
    assert sum(len(c.token_ids) for c in chunks) > LORA_KERNEL_TOKENS
    runner.step([], chunks)
    assert graphs_compiled() == before and runner.compiled


@pytest.mark.parametrize("lora_kernel", [False, True], ids=["grouped-lora", "lora-kernels"])
def test_steps_with_prompt_chunks_run_compiled_pieces_with_the_same_results(tiny_model_dir, lora_kernel):
    """With compile_layers, a step with prompt chunks (and decode rows beside them) runs the projections
    and MLP compiled and the attention eager: the same logits and cache writes, one compile for any
    chunk lengths, counts and adapter mixes. With the LoRA kernels: their op in the compiled pieces up
    to LORA_KERNEL_TOKENS tokens, the grouped products past them (a compile of its own, warmed too)."""
    from mygpt.engine.runner import LORA_KERNEL_TOKENS, PrefillChunk

    torch._dynamo.reset()  # nothing compiled by an earlier test counts as warmed
    plain = make_runner(tiny_model_dir, False)
    compiled = make_runner(tiny_model_dir, True, lora_kernel=lora_kernel)
    assert compiled.lora_kernel == lora_kernel
    assert compiled.decoder.warm_compile() > 0
    before, calls, rest = graphs_compiled(), [], compiled._compiled_rest
    compiled._compiled_rest = lambda *args: calls.append(1) or rest(*args)  # counts the compiled pieces
    steps = [
        ([], [PrefillChunk(0, list(range(3, 40)), 0, 1)]),
        ([], [PrefillChunk(1, [5, 6, 7], 0, -1), PrefillChunk(2, list(range(9, 30)), 0, 2, all_logits=True)]),
        ([DecodeRow(0, 7, 37, 1)], [PrefillChunk(3, list(range(50, 61)), 0, 0)]),
        ([DecodeRow(0, 8, 38, 1), DecodeRow(1, 9, 3, -1)], [PrefillChunk(2, [4] * 5, 21, 2)]),
        ([], [PrefillChunk(4, [5] * (LORA_KERNEL_TOKENS + 12), 0, 2)]),
    ]
    for decode, chunks in steps:
        want, got = plain.step(decode, chunks), compiled.step(decode, chunks)
        torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
        for g, w in zip(got[1], want[1], strict=True):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    tol = 1e-4 if lora_kernel else 1e-5  # the kernels' float32 sums, in another order than the bmm's
    for k_plain, k_compiled in zip(plain.k_cache, compiled.k_cache, strict=True):
        torch.testing.assert_close(k_compiled[:SLOTS], k_plain[:SLOTS], atol=tol, rtol=tol)
    assert graphs_compiled() == before and compiled.compiled  # all warmed at start-up, none failed
    assert len(calls) == len(steps) * len(compiled._layers)  # every layer of every step, compiled


def test_a_failing_compiled_piece_runs_the_step_uncompiled(tiny_model_dir, caplog):
    from mygpt.engine.runner import PrefillChunk

    plain, broken = make_runner(tiny_model_dir, False), make_runner(tiny_model_dir, True)

    def fails(*args, **kw):
        raise RuntimeError("inductor failed")

    broken._compiled_rest = fails
    chunk = [PrefillChunk(0, [5, 6, 7, 8], 0, 1)]
    torch.testing.assert_close(broken.step([], chunk)[1][0], plain.step([], chunk)[1][0])
    assert not broken.compiled and "run uncompiled" in caplog.text


def test_the_lora_kernels_run_in_compiled_decode_steps(tiny_model_dir, monkeypatch):
    """lora_kernel with compile_layers: the compiled layer calls the kernels as one opaque op (new
    outputs, kernels/lora.py lora_added) with each row's slot, for any adapter mix; the logits and cache
    writes of the uncompiled static steps with the same kernels, and no graph break."""
    from mygpt.kernels import lora

    calls, add_lora = [], lora.add_lora

    def counted(x, at_all, bts, outs, rows, into=None):  # True: into new outputs (the op)
        calls.append(into is not None)
        add_lora(x, at_all, bts, outs, rows, into)

    monkeypatch.setattr(lora, "add_lora", counted)
    plain = make_runner(tiny_model_dir, False, lora_kernel=True)
    compiled = make_runner(tiny_model_dir, True, lora_kernel=True)
    assert plain.lora_kernel and compiled.lora_kernel and compiled.decoder._lora_kernel()
    for r in (plain, compiled):
        for slot in range(SLOTS):
            r.prefill(slot, [(5 * slot + j) % 90 + 3 for j in range(4 + 30 * slot)], 0, slot % 4 - 1)
    torch._dynamo.reset()
    breaks = sum(counters["graph_break"].values())
    calls.clear()
    for rows in ([(0, 0), (1, 1), (2, 2), (3, -1), (4, 0)], [(5, 1)], [(1, 2), (4, 2), (2, -1)]):
        decode = [DecodeRow(slot, 11 + slot, 4 + 30 * slot, lo) for slot, lo in rows]
        want, got = plain.step(decode, [])[0], compiled.step(decode, [])[0]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for k_plain, k_compiled in zip(plain.k_cache, compiled.k_cache, strict=True):
        torch.testing.assert_close(k_compiled[:SLOTS], k_plain[:SLOTS], atol=1e-5, rtol=1e-5)
    assert sum(counters["graph_break"].values()) == breaks and compiled.compiled
    # 4 groups a layer, each step: in place (uncompiled), into new outputs (the compiled op)
    per_step = 4 * len(plain._layers)
    assert calls.count(True) == calls.count(False) == 3 * per_step
