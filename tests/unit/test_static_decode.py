"""The static (CUDA-graph-shaped) decode step equals the eager one: bucketing, padding rows, the spare
KV slot and the padded LoRA grouping. Runs the static step without capture on the CPU; the capture
itself is tests/gpu/test_cuda_graphs.py."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from mygpt.engine.engine import Engine
from mygpt.engine.graphs import batch_buckets, kv_bucket, plan_lora
from mygpt.engine.runner import DecodeRow, ModelRunner
from mygpt.engine.types import AdapterRef
from mygpt.kernels import available as kernels_available
from mygpt.lora.cache import AdapterCache
from mygpt.lora.layers import LoRABatch, LoRALinear
from mygpt.lora.registry import AdapterRegistry
from mygpt.lora.synthetic import make_adapter
from test_engine import PROMPTS, Collector


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]


def test_kv_buckets_pad_at_most_one_block_or_a_quarter():
    spans = [kv_bucket(end, 256, 100_000) for end in range(1, 20_000)]
    assert spans[0] == spans[255] == 256 and kv_bucket(257, 256, 10**5) == 512
    assert kv_bucket(3000, 256, 10**5) == 3072 and kv_bucket(4097, 256, 10**5) == 5120
    assert all(end <= span <= max(end + 256, 1.25 * end) for end, span in enumerate(spans, start=1))
    assert len(set(spans)) == 21 and kv_bucket(5000, 256, 4100) == 4100  # few buckets; capped


@pytest.mark.parametrize(
    "slots, batch, max_slots",
    [
        ([0], 1, 4),
        ([-1, 2, 2, 0], 4, 4),  # a base row among adapters
        ([1, 1, 1], 4, 4),  # one padding row: needs an empty position
        ([0, 1, 2, 3], 4, 4),  # every position taken, no base row
        ([0, 0, 1, 1], 8, 4),  # S*M == adapted rows and padding rows: M doubles
        ([2, -1, 0, 2, 2, -1, 1], 8, 3),  # S capped by the slot count (not a power of two)
    ],
)
def test_plan_lora_gives_each_row_its_own_adapter(slots, batch, max_slots):
    plan = plan_lora(slots, batch, max_slots)
    assert plan.slots <= max_slots and plan.slots * plan.rows >= sum(s >= 0 for s in slots)
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 6, bias=False)
    layer = LoRALinear(base, LoRABatch(), max_slots, 4, torch.float32, "cpu")
    adapters = [(torch.randn(4, 8), torch.randn(6, 4)) for _ in range(max_slots)]
    for s, (a, b) in enumerate(adapters):
        layer.set_slot(s, a, b)
    x = torch.randn(1, batch, 8)
    layer.batch.slots = plan.slots
    layer.batch.gather = torch.tensor(plan.gather)
    layer.batch.valid = torch.tensor(plan.valid, dtype=torch.float32).view(plan.slots, plan.rows, 1)
    layer.batch.scatter = torch.tensor(plan.scatter)
    y = layer(x)[0]
    for i in range(batch):
        s = slots[i] if i < len(slots) else -1
        want = base(x[0, i])
        if s >= 0:
            a, b = adapters[s]
            want = want + b @ (a @ x[0, i])
        torch.testing.assert_close(y[i], want, atol=1e-5, rtol=1e-5)


def test_plan_lora_without_adapters_is_none():
    assert plan_lora([-1, -1], 4, 2) is None


def runner_pair(tiny_model_dir, root, graph_prompt_tokens: int = 0, lora_kernel: bool = False):
    """Two runners over identical copies of the tiny model, one eager, one static, same adapters."""
    make_adapter(tiny_model_dir, root / "t" / "a", 8, ["q_proj", "v_proj", "down_proj"], seed=1)
    make_adapter(tiny_model_dir, root / "t" / "b", 16, ["q_proj", "k_proj", "o_proj", "up_proj"], seed=2)
    runners = []
    for static in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        runners.append(
            ModelRunner(
                model,
                num_slots=6,
                max_len=96,
                dtype=torch.float32,
                max_loras=3,
                max_lora_rank=16,
                static_decode=static,
                graph_prompt_tokens=graph_prompt_tokens if static else 0,
                lora_kernel=lora_kernel and static,
            )  # fmt: skip
        )
    shapes = {p: (m.in_features, m.out_features) for p, m in runners[0].lora_layers.items()}
    registry = AdapterRegistry(root, ["t"], shapes, 16)
    weights = {n: registry.weights(registry.get("t", n))[1] for n in "ab"}
    return runners, weights


@pytest.mark.parametrize("lora_kernel", [False, True], ids=["grouped-lora", "lora-kernels"])
def test_static_decode_equals_eager_decode(tiny_model_dir, tmp_path, lora_kernel, monkeypatch):
    """The static step (a graph on a GPU) gives the eager step's logits and cache: with the grouped
    LoRA products, or with the LoRA kernels (kernels/lora.py, through Triton's interpreter here), which
    read each row's slot and make one shape for any grouping of the rows by adapter."""
    if lora_kernel:
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    (eager, static), weights = runner_pair(tiny_model_dir, tmp_path, lora_kernel=lora_kernel)
    assert eager.decoder is None and static.decoder is not None
    assert static.lora_kernel == lora_kernel and not eager.lora_kernel
    for r in (eager, static):
        cache = AdapterCache(r.lora_layers, 3)
        assert cache.acquire("a", weights["a"]) == 0 and cache.acquire("b", weights["b"]) == 1
    # five rows (bucket 8: three padding rows) in slots 0..4, two adapters and the base, ragged lengths
    rows = [
        (0, [5, 6, 7], 0),
        (3, [9, 10], -1),
        (1, list(range(20, 60)), 1),
        (4, [3], 0),
        (2, [8, 8, 8, 8], 1),
    ]
    for r in (eager, static):
        for slot, prompt, lora in rows:
            r.prefill(slot, prompt, 0, lora)
    positions = [len(p) for _, p, _ in rows]
    tokens = [11, 12, 13, 14, 15]
    spare = static.num_slots
    spare_before = static.k_cache[0][spare].clone()
    for _ in range(3):
        args = ([s for s, _, _ in rows], tokens, positions, [lo for _, _, lo in rows])
        want, got = eager.decode(*args), static.decode(*args)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        tokens = got.argmax(-1).tolist()
        positions = [p + 1 for p in positions]
    # every real slot's cache is the eager one's; the padding rows wrote only into the spare slot (the
    # kernels' runner also prefilled with them: float32 sums in another order)
    tol = 1e-4 if lora_kernel else 1e-5
    for k_eager, k_static in zip(eager.k_cache, static.k_cache, strict=True):
        torch.testing.assert_close(k_static[:spare], k_eager[:spare], atol=tol, rtol=tol)
    assert not torch.equal(static.k_cache[0][spare], spare_before)
    assert static.decoder.stats.eager == 3
    shape, plan = static.decoder.shape_of([DecodeRow(s, 1, 4, lo) for s, _, lo in rows])
    if lora_kernel:  # one shape whatever the grouping
        assert (shape.lora_slots, shape.lora_rows, plan) == (1, 0, None)
    else:  # S x M groups: 2 slots, rows per slot doubled for the base row's empty position
        assert (shape.lora_slots, shape.lora_rows) == (plan.slots, plan.rows) == (2, 4)
    assert static.lora_batch.rows is None  # reset after the step: the eager steps group as before


@pytest.mark.parametrize("lora_kernel", [False, True], ids=["grouped-lora", "lora-kernels"])
def test_prompt_chunks_as_static_rows_equal_the_eager_step(
    tiny_model_dir, tmp_path, lora_kernel, monkeypatch
):
    """graph_prompt_tokens: a step's short prompt chunks run in the static decoder, each token a row at
    its own position (a graph on a GPU); the same logits and cache as the eager chunk attention, for
    chunks from 0 and from a cached prefix, beside decode rows, with adapters, and with every
    position's logits (prompt logprobs). A step with more prompt tokens runs eagerly."""
    from mygpt.engine.runner import PrefillChunk

    if lora_kernel:
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    (eager, static), weights = runner_pair(
        tiny_model_dir, tmp_path, graph_prompt_tokens=16, lora_kernel=lora_kernel
    )
    assert static.decoder.max_rows == 6 + 16 and static.lora_kernel == lora_kernel
    for r in (eager, static):
        cache = AdapterCache(r.lora_layers, 3)
        assert cache.acquire("a", weights["a"]) == 0 and cache.acquire("b", weights["b"]) == 1
    steps = [  # (decode rows, chunks, runs static)
        ([], [PrefillChunk(0, [5, 6, 7, 8, 9], 0, 0), PrefillChunk(1, [3, 4, 5], 0),
              PrefillChunk(3, [9, 8, 7, 6], 0, 1)], True),
        ([DecodeRow(0, 11, 5, 0), DecodeRow(1, 12, 3)],
         [PrefillChunk(3, [2, 3, 4, 5, 6], 4, 1, all_logits=True), PrefillChunk(2, [7, 7, 8], 0, 0)], True),
        ([DecodeRow(0, 13, 6, 0), DecodeRow(1, 14, 4), DecodeRow(2, 15, 3, 0), DecodeRow(3, 16, 9, 1)],
         [PrefillChunk(4, list(range(20, 37)), 0, 1)], False),  # 17 prompt tokens: eager
        ([DecodeRow(s, 17 + s, p, lo) for s, p, lo in ((0, 7, 0), (1, 5, -1), (2, 4, 0), (3, 10, 1), (4, 17, 1))],
         [PrefillChunk(5, [1], 0)], True),
    ]  # fmt: skip
    for decode, chunks, static_step in steps:
        eager_before = static.decoder.stats.eager
        (want_d, want_c), (got_d, got_c) = eager.step(decode, chunks), static.step(decode, chunks)
        assert (static.decoder.stats.eager == eager_before + 1) == static_step
        torch.testing.assert_close(got_d, want_d, atol=1e-4, rtol=1e-4)
        assert [c.shape for c in got_c] == [c.shape for c in want_c]
        for g, w in zip(got_c, want_c, strict=True):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    assert [c.shape[0] for c in got_c] == [1]
    before = static.decoder.stats.prompt_steps  # a seeded request's step (invariant): eager, as on the CPU
    for r in (eager, static):
        r.step([], [PrefillChunk(5, [2, 3], 1)], invariant=True)
    assert static.decoder.stats.prompt_steps == before
    spare = static.num_slots  # float32: the two attentions differ in the last bits, through the layers
    for k_eager, k_static in zip(eager.k_cache, static.k_cache, strict=True):
        torch.testing.assert_close(k_static[:spare], k_eager[:spare], atol=1e-4, rtol=1e-4)


def test_eager_steps_with_the_lora_kernels_equal_the_grouped_products(tiny_model_dir, tmp_path, monkeypatch):
    """Eager steps (prompt chunks, long and short, beside decode rows on adapters and on the base model)
    with the LoRA kernels give the grouped products' logits and cache; the layers keep no slots after."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from mygpt.engine.runner import PrefillChunk

    (grouped, _), weights = runner_pair(tiny_model_dir, tmp_path / "g")
    (kernels, _), _ = runner_pair(tiny_model_dir, tmp_path / "k")
    kernels.lora_kernel = True  # the eager runner (no static decoder): every step eager
    for r in (grouped, kernels):
        cache = AdapterCache(r.lora_layers, 3)
        assert cache.acquire("a", weights["a"]) == 0 and cache.acquire("b", weights["b"]) == 1
    steps = [
        ([], [PrefillChunk(0, list(range(5, 45)), 0, 0), PrefillChunk(1, [3, 4, 5], 0)]),
        ([DecodeRow(0, 11, 40, 0), DecodeRow(1, 12, 3)], [PrefillChunk(2, [7, 7, 8, 9], 0, 1, all_logits=True)]),
        ([DecodeRow(0, 13, 41, 0), DecodeRow(1, 14, 4), DecodeRow(2, 15, 4, 1)], []),
    ]  # fmt: skip
    from mygpt.engine import runner as runner_module
    from mygpt.kernels import lora

    calls, real = [], lora.add_lora
    monkeypatch.setattr(lora, "add_lora", lambda *args: (calls.append(len(args[-1])), real(*args))[1])
    long_step = ([DecodeRow(0, 16, 42, 0)], [PrefillChunk(3, [2, 3, 4, 5, 6], 0, 1)])  # 6 tokens: over 4
    for decode, chunks in [*steps, long_step]:
        if (decode, chunks) == long_step:  # past the limit: the grouped products (long chunks re-read A, B)
            monkeypatch.setattr(runner_module, "LORA_KERNEL_TOKENS", 4)
        before = len(calls)
        (want_d, want_c), (got_d, got_c) = grouped.step(decode, chunks), kernels.step(decode, chunks)
        torch.testing.assert_close(got_d, want_d, atol=1e-4, rtol=1e-4)
        for g, w in zip(got_c, want_c, strict=True):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
        assert kernels.lora_batch.rows is None and kernels.lora_batch.slots == 0
        tokens = len(decode) + sum(len(c.token_ids) for c in chunks)
        assert (len(calls) > before) == (tokens <= runner_module.LORA_KERNEL_TOKENS)
    for k_g, k_k in zip(grouped.k_cache, kernels.k_cache, strict=True):
        torch.testing.assert_close(k_k, k_g, atol=1e-4, rtol=1e-4)  # float32 sums in another order


def test_a_static_step_clears_what_another_step_left(tiny_model_dir, tmp_path, monkeypatch):
    """A step that failed before its own reset could leave adapter rows or a grouping on the layers: the
    static step clears them before it sets its own, so a base-model step is the base model's."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    (eager, static), _ = runner_pair(tiny_model_dir, tmp_path, lora_kernel=True)
    for r in (eager, static):
        r.prefill(3, [5, 6, 7], 0)
    static.lora_batch.rows = torch.zeros(4, dtype=torch.int32)  # another step's, on slot 0
    static.lora_batch.slots = 1
    torch.testing.assert_close(static.decode([3], [9], [3], [-1]), eager.decode([3], [9], [3], [-1]))


@pytest.fixture(
    scope="module",
    params=[(0, False), (8, False), (8, True)],
    ids=["chunks-eager", "chunks-as-rows", "rows-lora-kernels-overlapped"],
)
def engines(tiny_model_dir, tokenizer, tmp_path_factory, request):
    """An eager engine and a static one: prompt chunks eager or as rows; the last with the LoRA kernels
    (through Triton's interpreter) and each decode step launched before the last one's tokens are read."""
    prompt_rows, kernels = request.param
    if kernels and not kernels_available(torch.device("cpu")):
        pytest.skip("no Triton interpreter here")
    (eager, static), weights = runner_pair(
        tiny_model_dir, tmp_path_factory.mktemp("static-adapters"), graph_prompt_tokens=prompt_rows,
        lora_kernel=kernels,
    )  # fmt: skip
    assert static.lora_kernel == kernels
    out = []
    for runner in (eager, static):
        engine = Engine(
            runner, tokenizer, [], max_num_batched_tokens=32, adapters=AdapterCache(runner.lora_layers, 3),
            overlap=kernels and runner is static,
        )  # fmt: skip
        engine.start()
        out.append(engine)
    refs = {n: AdapterRef(n, weights[n]) for n in "ab"} | {None: None}
    yield out, refs
    for engine in out:
        engine.stop()


def test_engine_with_static_decode_gives_the_eager_tokens(engines):
    (eager, static), refs = engines
    results = []
    for engine in (eager, static):
        c = Collector()
        for i, p in enumerate(PROMPTS[:4]):
            for name in ("a", None, "b"):
                c.submit(engine, f"{name}-{i}", p, temperature=0.0, max_tokens=12, adapter=refs[name])
        c.wait()
        results.append({rid: c.tokens(rid) for rid in c.events})
    assert results[0] == results[1]
    assert results[0]["a-0"] != results[0]["None-0"]  # the adapters really act
    stats = static.runner.decoder.stats
    assert stats.eager > 0 and stats.captures == stats.replays == 0  # CPU: static steps, no capture
    assert (stats.prompt_steps > 0) == (static.runner.graph_prompt_tokens > 0)
    assert static.overlap == static.runner.lora_kernel  # the kernels' variant launches steps ahead
    assert not static.overlap or static.stats.ahead_used > 0


def fake_captures(monkeypatch) -> list:
    """StaticDecoder captures faked (a CPU has none): each is one eager run of the static step, kept as
    the graph's output; returns the list of shapes captured."""
    from mygpt.engine.graphs import StaticDecoder

    captured = []

    class Graph:
        def replay(self):
            pass

    def fake_capture(self, shape):
        captured.append(shape)
        self._graphs[shape] = (Graph(), self._forward(shape))
        self.stats.captures += 1
        return self._graphs[shape]

    monkeypatch.setattr(StaticDecoder, "_capture", fake_capture)
    return captured


def test_precapture_takes_every_batch_bucket_and_writes_only_the_spare_slot(
    tiny_model_dir, tmp_path, monkeypatch
):
    """StaticDecoder.precapture (before the first request, with CUDA graphs): every batch bucket (those
    of steps with prompt rows too) at the spans up to 512 positions, base rows only; its padding rows
    touch no KV slot but the spare one. The
    capture itself is faked here (one eager run of the static step); tests/gpu captures for real."""

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    static = ModelRunner(
        model, num_slots=6, max_len=600, dtype=torch.float32, max_loras=2, static_decode=True,
        graph_prompt_tokens=8,
    )  # fmt: skip
    assert static.decoder.batch_sizes == [1, 2, 4, 6, 14]  # the slots' buckets, then 6 + 8 prompt rows
    static.prefill(0, [5, 6, 7, 8], 0)
    before = [k.clone() for k in static.k_cache]
    captured = fake_captures(monkeypatch)
    decoder = static.decoder
    assert decoder.precapture() == 0  # no capture on a CPU: nothing to do
    decoder.capture = True
    n = decoder.precapture()
    spans = sorted({s.kv_len for s in captured})
    assert spans == [256, 512] and {s.batch for s in captured} == set(decoder.batch_sizes)
    assert [s.batch for s in captured[::2]] == [6, 4, 2, 1, 14]  # decode buckets first, largest first
    assert n == len(captured) == len(decoder.batch_sizes) * 2 and all(s.lora_slots == 0 for s in captured)
    assert decoder.stats.failures == 0 and decoder.capture
    spare = static.num_slots
    for k_before, k_after in zip(before, static.k_cache, strict=True):
        assert torch.equal(k_after[:spare], k_before[:spare])  # real slots untouched
    assert decoder.precapture() == 0  # all there already


def test_precapture_takes_the_adapter_shape_too_with_the_lora_kernels(tiny_model_dir, monkeypatch):
    """With the LoRA kernels, a step with adapters has one shape per batch and span (any grouping): it is
    captured at start-up beside the base model's, and a later step on adapters replays it."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    static = ModelRunner(
        model, num_slots=2, max_len=300, dtype=torch.float32, max_loras=2, static_decode=True, lora_kernel=True
    )  # fmt: skip
    captured = fake_captures(monkeypatch)
    decoder = static.decoder
    decoder.capture = True
    assert decoder.precapture() == len(captured) == len(decoder.batch_sizes) * 2 * 2  # 2 spans, 2 kinds
    assert {(s.lora_slots, s.lora_rows) for s in captured} == {(0, 0), (1, 0)}
    shape, _ = decoder.shape_of([DecodeRow(0, 3, 5, 1), DecodeRow(1, 4, 9, 0)])
    assert shape in decoder._graphs  # replayed, not captured inside a request


def test_precapture_stops_once_capturing_is_turned_off(tiny_model_dir, monkeypatch):
    from mygpt.engine.graphs import StaticDecoder

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    runner = ModelRunner(model, num_slots=6, max_len=600, dtype=torch.float32, static_decode=True)
    calls = []

    def failing_capture(self, shape):
        calls.append(shape)
        raise RuntimeError("capture failed")

    monkeypatch.setattr(StaticDecoder, "_capture", failing_capture)
    runner.decoder.capture = True
    assert runner.decoder.precapture() == 0
    assert len(calls) == 3 and not runner.decoder.capture  # three failures turn capturing off: no more tries
    assert calls[0].batch == max(runner.decoder.batch_sizes)  # the largest bucket first


def run_all(runner, tokenizer, weights, eos=(), overlap=False):
    """Every PROMPT three times (adapters a, b and none), greedy and seeded rows, lengths 4..19: the
    events' tokens, text and finish of each, and the engine's stats."""
    refs = {n: AdapterRef(n, weights[n]) for n in "ab"} | {None: None}
    engine = Engine(
        runner, tokenizer, eos, max_num_batched_tokens=32, adapters=AdapterCache(runner.lora_layers, 3),
        overlap=overlap,
    )  # fmt: skip
    engine.start()
    c = Collector()
    for i, p in enumerate(PROMPTS):
        for name in ("a", None, "b"):
            sampling = {"temperature": 1.0, "seed": i} if i % 2 else {"temperature": 0.0}
            c.submit(engine, f"{name}-{i}", p, adapter=refs[name], max_tokens=4 + 3 * i, **sampling)
    c.submit(engine, "n2", PROMPTS[1], n=2, temperature=1.0, seed=7, max_tokens=10)  # sibling choices
    c.wait()
    engine.stop()
    out = {(rid, i): (c.tokens(rid, i), c.text(rid, i), c.finish(rid, i)) for rid in c.events for i in (0,)}
    out[("n2", 1)] = (c.tokens("n2", 1), c.text("n2", 1), c.finish("n2", 1))
    return out, engine.stats


def test_overlapped_steps_give_the_same_events(tiny_model_dir, tokenizer, tmp_path):
    """Engine overlap: each decode-only step launches the next from the sampled tokens before the host
    reads them. Every request's tokens, text and finish are those of the engine without it, with rows
    ending by length and by EOS (whose step launched ahead is then used for the other rows only)."""
    (_, static), weights = runner_pair(tiny_model_dir, tmp_path)
    first, _ = run_all(static, tokenizer, weights)
    eos = first[("None-0", 0)][0][2]  # a token the greedy base row generates: EOS ends rows early
    plain, plain_stats = run_all(static, tokenizer, weights, eos=[eos])
    ahead, ahead_stats = run_all(static, tokenizer, weights, eos=[eos], overlap=True)
    assert ahead == plain
    assert any(finish == "stop" for _, _, finish in plain.values())  # EOS ended some rows early
    assert plain_stats.ahead_launched == 0
    assert ahead_stats.ahead_used > 0 and ahead_stats.ahead_launched >= ahead_stats.ahead_used
    assert ahead_stats.steps == plain_stats.steps  # no step more or fewer: the same schedule


def prefix_cache_workload(runner: ModelRunner, tokenizer) -> None:
    """Freed slots taken with their prompts, a running row's prompt copied, the rest prefilled from a
    chunk start past 0, then decode steps: the tokens equal an engine's without the cache (also run
    by tests/gpu under CUDA graphs)."""
    prompts = [[3 + i] * 40 + list(range(10, 110)) for i in range(3)]  # 140 tokens: 128 reusable
    results, cached = [], []
    for caching in (False, True):
        engine = Engine(runner, tokenizer, [], max_num_batched_tokens=256, prefix_caching=caching)
        engine.start()
        c = Collector()
        for rep in range(2):  # the second time, each prompt finds the first's freed slot
            for i, p in enumerate(prompts):
                c.submit(engine, f"{rep}-{i}", p, temperature=0.0, max_tokens=16)
            c.wait()
        shared = [90] * 130  # in no freed slot: "copy" can only copy it from "long", running
        c.submit(engine, "long", shared + [1], temperature=0.0, max_tokens=120)
        while not engine._running:
            pass
        c.submit(engine, "copy", shared + [2], temperature=0.0, max_tokens=16)
        c.wait()
        engine.stop()
        results.append({rid: c.tokens(rid) for rid in c.events})
        cached.append({rid: c.events[rid][0].cached_tokens for rid in c.events})
    assert results[1] == results[0]
    assert all(cached[1][f"1-{i}"] == 128 for i in range(3)) and cached[1]["copy"] == 128
    assert not any(cached[0].values())


def test_prefix_cache_hits_with_static_decode_give_the_uncached_tokens(tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    static = ModelRunner(model, num_slots=8, max_len=300, dtype=torch.float32, static_decode=True)
    prefix_cache_workload(static, tokenizer)
    assert static.decoder.stats.eager > 0  # the decode steps went through the static decoder


def test_prompt_rows_only_at_spans_up_to_the_limit_decode_rows_included(tiny_model_dir):
    """Prompt rows gather their slot over the step's span, which the longest row sets: a short chunk
    beside a row past GRAPH_PROMPT_SPAN runs eagerly, as does one that ends past it."""
    from mygpt.engine.runner import GRAPH_PROMPT_SPAN, DecodeRow, PrefillChunk

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    runner = ModelRunner(model, num_slots=2, max_len=GRAPH_PROMPT_SPAN + 64, dtype=torch.float32,
                         static_decode=True, graph_prompt_tokens=16)  # fmt: skip
    fits = runner._prompt_rows_fit
    assert fits([DecodeRow(0, 1, GRAPH_PROMPT_SPAN - 1)], [PrefillChunk(1, [1, 2], 0)])
    assert not fits([DecodeRow(0, 1, GRAPH_PROMPT_SPAN)], [PrefillChunk(1, [1, 2], 0)])
    assert not fits([], [PrefillChunk(1, [1, 2], GRAPH_PROMPT_SPAN - 1)])
    assert not fits([], [PrefillChunk(1, list(range(17)), 0)])  # more prompt tokens than graph_prompt_tokens


def test_warm_up_runs_the_eager_prompt_path_too_when_short_prompts_run_graphed(tiny_model_dir, tokenizer):
    """With graph_prompt_tokens, the start-up warm-up's short prompt runs graphed: a second, longer
    prompt runs the eager prompt step (its first-use costs before /ready, not in a first request)."""
    from mygpt.state import _warm_up

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    runner = ModelRunner(model, num_slots=4, max_len=128, dtype=torch.float32, static_decode=True,
                         graph_prompt_tokens=32)  # fmt: skip
    chunks = []
    step = runner.step

    def spy(decode, chunk_list, invariant=False):
        chunks.extend(len(c.token_ids) for c in chunk_list)
        return step(decode, chunk_list, invariant)

    runner.step = spy
    engine = Engine(runner, tokenizer, [])
    engine.start()
    try:
        _warm_up(engine, tokenizer)
    finally:
        engine.stop()
    assert min(chunks) <= 32 < max(chunks)  # one prompt each way
    assert runner.decoder.stats.prompt_steps == 1
