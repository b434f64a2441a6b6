"""CUDA graph capture and replay of static decode steps (skipped without a CUDA device)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mygpt.engine.graphs import StaticDecoder
from mygpt.engine.runner import ModelRunner

pytestmark = pytest.mark.gpu


def model(nf4: bool = False, hidden: int = 128):
    """A tiny random Llama on the GPU (the same seed: the same model), its projections bitsandbytes NF4
    layers (float32 compute) with nf4; hidden 256: input widths the NF4 kernel takes."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    m = LlamaForCausalLM(config).eval().cuda()
    if nf4:
        import bitsandbytes as bnb

        for layer in m.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, lin in list(parent.named_children()):
                    if isinstance(lin, torch.nn.Linear):
                        q = bnb.nn.Linear4bit(
                            lin.in_features, lin.out_features, bias=False, compute_dtype=torch.float32,
                            quant_type="nf4", compress_statistics=True, device="meta",
                        )  # fmt: skip
                        q.weight = bnb.nn.Params4bit(
                            lin.weight.data.cpu(),
                            requires_grad=False,
                            quant_type="nf4",
                            compress_statistics=True,
                        ).cuda()
                        setattr(parent, name, q)
    return m


def runners(
    nf4: bool = False, graph_prompt_tokens: int = 0, lora_kernel: bool = False, compiled: bool = False
):
    """The same model and adapters under an eager runner and a graph runner (compiled: its layers
    through torch.compile, with the NF4 kernel too)."""
    out = []
    for graphs in (False, True):
        r = ModelRunner(
            model(nf4), num_slots=8, max_len=300, dtype=torch.float32, max_loras=3, cuda_graphs=graphs,
            graph_prompt_tokens=graph_prompt_tokens if graphs else 0, lora_kernel=lora_kernel and graphs,
            compile_layers=compiled and graphs, nf4_kernel=compiled and graphs,
        )  # fmt: skip
        g = torch.Generator().manual_seed(1)
        for slot in range(3):
            for layer in r.lora_layers.values():
                a = torch.randn(8, layer.in_features, generator=g) * 0.1
                b = torch.randn(layer.out_features, 8, generator=g) * 0.1
                layer.set_slot(slot, a.cuda(), b.cuda())
        out.append(r)
    return out


@pytest.mark.parametrize(
    ("nf4", "lora_kernel", "compiled"),
    [
        (False, False, False),
        (True, False, False),
        (False, True, False),
        (True, True, False),
        pytest.param(True, True, True, marks=pytest.mark.compile),
    ],
)
def test_graph_replay_equals_eager_steps(nf4, lora_kernel, compiled):
    """Captured and replayed decode steps give the eager steps' logits and cache: plain and NF4 layers,
    and with the LoRA kernels (kernels/lora.py) in the graphs, whose steps on adapters replay graphs
    captured at start-up with every row on the base model (the kernels read the rows' slots); and with
    torch.compile's layers calling both kernels (NF4 and LoRA) as ops inside the graphs."""
    if nf4:
        pytest.importorskip("bitsandbytes")
    eager, graphs = runners(nf4, lora_kernel=lora_kernel, compiled=compiled)
    assert graphs.decoder is not None and graphs.decoder.capture and graphs.lora_kernel == lora_kernel
    assert graphs.compiled == compiled
    if compiled:  # every product's kernel checked in its three configurations before compiling
        assert graphs._nf4_products() and all(p.compiled_ok for p in graphs._nf4_products())
    precaptured = graphs.decoder.precapture() if lora_kernel else 0
    prompts = {0: [5, 6, 7], 3: [9] * 40, 5: [1, 2], 6: list(range(30, 90))}
    loras = {0: 0, 3: -1, 5: 2, 6: 1}
    for r in (eager, graphs):
        for slot, p in prompts.items():
            r.prefill(slot, p, 0, loras[slot])
    slots = list(prompts)
    positions = [len(p) for p in prompts.values()]
    tokens = [11, 12, 13, 14]
    for step in range(6):  # steps 0-1: 4 rows; then 3 rows (a row left); same bucket: replays
        if step == 2:
            slots, positions, tokens = slots[:3], positions[:3], tokens[:3]
        lo = [loras[s] for s in slots]
        want = eager.decode(slots, tokens, positions, lo)
        got = graphs.decode(slots, tokens, positions, lo)
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
        tokens = want.argmax(-1).tolist()
        positions = [p + 1 for p in positions]
    stats = graphs.decoder.stats
    assert stats.captures >= 1 and stats.replays - precaptured == 6 and stats.eager == 0
    assert stats.captures - precaptured < 6  # buckets were reused
    if lora_kernel:
        assert stats.captures == precaptured  # every step replayed a start-up graph
    for k_e, k_g in zip(eager.k_cache, graphs.k_cache, strict=True):
        torch.testing.assert_close(k_g[:8], k_e[:8], atol=2e-3, rtol=2e-3)
    assert graphs.compiled == compiled  # no compiled step failed


def test_least_recently_used_graphs_are_dropped():
    _, graphs = runners()
    graphs.decoder = StaticDecoder(graphs, capture=True, kv_block=16, max_graphs=2)
    for slot in range(3):
        graphs.prefill(slot, [1] * 10, 0)
    for n in (1, 2, 3, 1):  # buckets 1, 2, 4, 1: the third capture drops the first
        graphs.decode(list(range(n)), [3] * n, [10] * n)
    stats = graphs.decoder.stats
    assert stats.captures == 4 and stats.evictions == 2 and len(graphs.decoder._graphs) == 2


def test_precaptured_graphs_replay_base_rows_without_a_new_capture():
    eager, graphs = runners()
    n = graphs.decoder.precapture()
    stats = graphs.decoder.stats
    assert (
        n == stats.captures == len(graphs.decoder.batch_sizes) * 2 and stats.failures == 0
    )  # spans 256, 300
    for r in (eager, graphs):
        for slot in range(3):
            r.prefill(slot, [4 + slot] * 20, 0)
    want = eager.decode([0, 1, 2], [7, 8, 9], [20, 20, 20])
    got = graphs.decode([0, 1, 2], [7, 8, 9], [20, 20, 20])
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    assert stats.captures == n and stats.replays >= 1  # bucket 4 at span 256 was there already


class _Tok:  # the engine detokenizes; random ids need no real text
    def decode(self, ids, **kw):
        return " ".join(map(str, ids))


def test_engine_with_overlapped_steps_gives_the_same_tokens():
    from mygpt.engine.engine import Engine
    from test_engine import Collector

    _, graphs = runners()
    results, stats = [], []
    for overlap in (False, True):
        engine = Engine(graphs, _Tok(), [], max_num_batched_tokens=256, overlap=overlap)
        engine.start()
        c = Collector()
        for i in range(6):  # one length for all: every launched step is used whole
            c.submit(engine, f"r{i}", [3 + i, 7, 11 + i], temperature=0.0, max_tokens=24)
        c.wait()
        engine.stop()
        results.append({rid: c.tokens(rid) for rid in c.events})
        stats.append(engine.stats)
    assert results[1] == results[0]
    assert stats[1].ahead_used > 0 and stats[0].ahead_used == 0


def test_prefix_cache_hits_under_graphs_give_the_uncached_tokens():
    """The prefix cache on the GPU path (freed slot taken, running row copied, prefill from a chunk
    start past 0, graphed decode steps)."""
    from test_static_decode import prefix_cache_workload

    _, graphs = runners()
    prefix_cache_workload(graphs, _Tok())
    assert graphs.decoder.stats.replays > 0


@pytest.mark.parametrize("nf4", [False, True])
def test_prompt_chunks_as_graphed_rows_equal_the_eager_step(nf4):
    """graph_prompt_tokens: short prompt chunks beside decode rows in one captured step (each prompt
    token a row), with adapters, from position 0 and from a cached prefix; the eager step's logits."""
    from mygpt.engine.runner import DecodeRow, PrefillChunk

    eager, graphs = runners(nf4, graph_prompt_tokens=24)
    steps = [
        ([], [PrefillChunk(0, [5, 6, 7, 8, 9], 0, 0), PrefillChunk(1, [3, 4, 5], 0, -1),
              PrefillChunk(3, [9, 8, 7, 6], 0, 2)]),
        ([DecodeRow(0, 11, 5, 0), DecodeRow(1, 12, 3)], [PrefillChunk(2, list(range(30, 50)), 0, 1)]),
        ([DecodeRow(0, 13, 6, 0), DecodeRow(1, 14, 4), DecodeRow(2, 15, 20, 1)],
         [PrefillChunk(3, [7, 8], 4, 2, all_logits=True)]),  # the rest of slot 3's prompt
    ]  # fmt: skip
    for _ in range(2):  # the first run of each bucket captures its graph, the second replays it
        for decode, chunks in steps:
            (want_d, want_c), (got_d, got_c) = eager.step(decode, chunks), graphs.step(decode, chunks)
            torch.testing.assert_close(got_d, want_d, atol=2e-3, rtol=2e-3)  # TF32 may differ
            for g, w in zip(got_c, want_c, strict=True):
                torch.testing.assert_close(g, w, atol=2e-3, rtol=2e-3)
    st = graphs.decoder.stats
    assert st.prompt_steps == 6 and st.replays >= 6 and st.failures == 0 and st.eager == 0


def test_embedding_chunks_run_eagerly_beside_graphed_decode_and_match_hf():
    """An embedding's chunks never enter the graphs (which give logits only): with graph_prompt_tokens
    on, a step of decode rows and an embedding chunk still pools the model's own last_hidden_state."""
    from mygpt.engine.runner import DecodeRow, PrefillChunk

    r = ModelRunner(model(nf4=True), num_slots=8, max_len=300, dtype=torch.float32, cuda_graphs=True,
                    graph_prompt_tokens=64)  # fmt: skip
    r.step([], [PrefillChunk(0, list(range(10, 30)), 0)])
    prompt = list(range(40, 90))
    _, (pooled,) = r.step([DecodeRow(0, 7, 20)], [PrefillChunk(1, prompt, 0, pool="sum")])
    with torch.inference_mode():
        want = r.model.model(torch.tensor([prompt], device="cuda")).last_hidden_state[0].float().sum(0)
    assert pooled.shape == (1, r.model.config.hidden_size)
    assert torch.allclose(pooled[0], want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_cuda_a_steps_chunks_attend_packed_as_one_by_one(dtype):
    """On a GPU the packed chunk attention is on (its start-up check passed), and a step of embedding
    and prompt chunks, one after a prefix, beside a decode row, gives the one-by-one step's results."""
    from mygpt.engine.runner import DecodeRow, PrefillChunk

    m = model().to(dtype)
    results = []
    for pack in (True, False):
        r = ModelRunner(m, num_slots=6, max_len=300, dtype=dtype)
        assert r.pack_chunks
        r.pack_chunks = pack
        r.prefill(1, list(range(10, 40)), 0)
        r.prefill(0, list(range(50, 55)), 0)
        chunks = [
            PrefillChunk(1, list(range(60, 90)), 30),
            PrefillChunk(2, list(range(100, 103)), 0, all_logits=True),
            PrefillChunk(3, list(range(110, 150)), 0, pool="sum"),
        ]
        dec, outs = r.step([DecodeRow(0, 7, 5)], chunks)
        results.append([dec, *outs])
    for x, y in zip(*results, strict=True):  # relative L2: bf16 rounds the padded call differently
        assert float((x.float() - y.float()).norm() / y.float().norm()) < (
            1e-5 if dtype == torch.float32 else 2e-2
        )
