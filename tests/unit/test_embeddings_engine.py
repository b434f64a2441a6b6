"""Embeddings in the engine: the prompt's final hidden states pooled, equal to the HF model's own, the
same alone and in a busy batch, with adapters, and across chunked prefill."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from mygpt.engine.engine import Engine
from mygpt.engine.runner import ModelRunner
from mygpt.engine.types import AdapterRef, FinishReason, GenerationRequest, SamplingParams
from mygpt.lora.cache import AdapterCache
from mygpt.lora.registry import AdapterRegistry
from mygpt.lora.synthetic import make_adapter
from test_engine import PROMPTS, Collector

LONG = list(range(200, 270))  # 70 tokens: five chunks at a budget of 16


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("embed-adapters")
    make_adapter(tiny_model_dir, root / "t" / "a", 8, ["q_proj", "v_proj", "up_proj", "down_proj"], seed=5)
    return root


@pytest.fixture(scope="module")
def engine(model, tokenizer, adapter_dir):
    runner = ModelRunner(
        model,
        num_slots=8,
        max_len=256,
        dtype=torch.float32,
        max_loras=2,
        max_lora_rank=16,
        exact_attention=True,
    )  # as served on the CPU
    shapes = {p: (m.in_features, m.out_features) for p, m in runner.lora_layers.items()}
    registry = AdapterRegistry(adapter_dir, ["t"], shapes, 16)
    engine = Engine(
        runner, tokenizer, [], max_num_batched_tokens=16, adapters=AdapterCache(runner.lora_layers, 2)
    )
    engine.ref = AdapterRef("t/a@1", registry.weights(registry.get("t", "a"))[1])
    engine.start()
    yield engine
    engine.stop()


def embed(engine, collector, rid, prompt, pooling="mean", adapter=None, group=None):
    request = GenerationRequest(
        rid, prompt, SamplingParams(max_tokens=0), adapter=adapter, group=group, embed=pooling
    )
    collector._done[rid] = 1
    engine.submit(request, collector._on_event)
    return rid


def vector(collector, rid) -> torch.Tensor:
    (event,) = collector.events[rid]
    assert event.finish_reason == FinishReason.STOP and event.token_ids == [] and event.completion_tokens == 0
    return torch.tensor(event.embedding)


def reference(hf_model, prompt, pooling="mean") -> torch.Tensor:
    """transformers' own: the decoder's last_hidden_state (after the final norm), pooled, normalized."""
    with torch.inference_mode():
        hidden = hf_model.model(torch.tensor([prompt])).last_hidden_state[0]
    return F.normalize(hidden.mean(0) if pooling == "mean" else hidden[-1], dim=0)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_embeddings_equal_the_hf_models_last_hidden_state_pooled(engine, model, pooling):
    c = Collector()
    for i, p in enumerate([PROMPTS[0], PROMPTS[2], LONG]):  # LONG: prefilled in five chunks
        embed(engine, c, f"e{i}", p, pooling)
    c.wait()
    for i, p in enumerate([PROMPTS[0], PROMPTS[2], LONG]):
        got, want = vector(c, f"e{i}"), reference(model, p, pooling)
        assert got.shape == (model.config.hidden_size,)
        assert torch.allclose(got, want, atol=1e-5), (i, (got - want).abs().max())
        assert abs(got.norm().item() - 1) < 1e-5
    assert not torch.allclose(vector(c, "e0"), vector(c, "e1"), atol=1e-2)  # inputs really differ


def test_an_embedding_is_the_same_alone_and_in_a_busy_batch(engine):
    alone = Collector()
    for i, p in enumerate([PROMPTS[1], LONG]):
        embed(engine, alone, f"alone{i}", p)
        alone.wait()
    busy = Collector()
    for i, p in enumerate(PROMPTS[:4]):  # generation rows decoding and prefilling beside it
        busy.submit(engine, f"gen{i}", p, temperature=0.0, max_tokens=12)
    busy.submit(engine, "gen-a", PROMPTS[4], temperature=0.0, max_tokens=12, adapter=engine.ref)
    for i, p in enumerate([PROMPTS[1], LONG]):
        embed(engine, busy, f"busy{i}", p)
    embed(engine, busy, "other", PROMPTS[5], adapter=engine.ref)
    busy.wait()
    for i in range(2):
        # up to rounding: a matrix product's rows round with its row count (MKL: ~5e-6 in float32)
        assert torch.allclose(vector(alone, f"alone{i}"), vector(busy, f"busy{i}"), atol=2e-5), i
    assert all(busy.finish(f"gen{i}") == FinishReason.LENGTH for i in range(4))


def test_an_adapters_embedding_equals_pefts(engine, tiny_model_dir, adapter_dir):
    from peft import PeftModel

    c = Collector()
    embed(engine, c, "base", PROMPTS[2])
    embed(engine, c, "lora", PROMPTS[2], adapter=engine.ref)
    c.wait()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(base, adapter_dir / "t" / "a").eval()
    want = reference(peft_model.get_base_model(), PROMPTS[2])
    assert torch.allclose(vector(c, "lora"), want, atol=1e-5)
    assert not torch.allclose(vector(c, "base"), want, atol=1e-3)  # the adapter changed it
    assert engine.adapters.pinned("t/a@1") == 0  # its pin went back with the request


def test_an_embedding_neither_reads_nor_evicts_the_prefix_cache(engine):
    """Computed whole (a mean needs every position); and its slot is freed holding nothing, so a
    stream of embedding inputs, more than the batch has slots, leaves the chats' cached prefixes."""
    prompt = list(range(300, 380))  # 80 tokens, ends past a cache block
    c = Collector()
    c.submit(engine, "chat", prompt, temperature=0.0, max_tokens=2, group="g")
    c.wait()
    cached_before = engine.stats.cached_tokens
    embed(engine, c, "emb", prompt, group="g")
    c.wait()
    assert engine.stats.cached_tokens == cached_before
    for i in range(12):  # one after the other: each takes a free slot
        embed(engine, c, f"other{i}", list(range(400 + i, 470 + i)), group="g")
        c.wait()
    c.submit(engine, "again", prompt + [5, 6], temperature=0.0, max_tokens=2, group="g")
    c.wait()
    assert c.events["again"][0].cached_tokens == 80


def test_an_embedding_request_is_refused_with_generation_parameters(engine):
    bad = GenerationRequest("x", [1, 2], SamplingParams(max_tokens=4), embed="mean")
    with pytest.raises(ValueError, match="max_tokens=0"):
        engine.submit(bad, lambda ev: None)


def test_a_waiting_embedding_can_be_aborted(tiny_model_dir, model, tokenizer):
    runner = ModelRunner(model, num_slots=1, max_len=256, dtype=torch.float32)
    engine = Engine(runner, tokenizer, [], max_num_batched_tokens=16)
    engine.start()
    try:
        c = Collector()
        c.submit(engine, "long", PROMPTS[0], temperature=0.0, max_tokens=40)  # holds the only slot
        embed(engine, c, "waits", PROMPTS[1])
        engine.abort("waits")
        c.wait()
        assert c.finish("waits") == FinishReason.ABORT and c.events["waits"][-1].embedding is None
        assert c.finish("long") == FinishReason.LENGTH
    finally:
        engine.stop()


def test_the_naive_engine_embeds_as_the_batched_one(engine, model, tokenizer):
    from mygpt.engine.naive import NaiveEngine

    naive = NaiveEngine(model, tokenizer, [], max_len=256)
    naive.start()
    try:
        for pooling in ("mean", "last"):
            a, b = Collector(), Collector()
            embed(naive, a, "n", LONG, pooling)
            embed(engine, b, "b", LONG, pooling)
            a.wait(), b.wait()
            assert torch.allclose(vector(a, "n"), vector(b, "b"), atol=1e-5), pooling
    finally:
        naive.stop()


def streaming(engine, max_tokens: int) -> Collector:
    """A greedy stream ("stream") submitted, once it decodes (its first token came)."""
    c = Collector()
    c.submit(engine, "stream", PROMPTS[0], temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    while not c.events.get("stream"):
        time.sleep(0.005)
    return c


def test_while_streams_decode_a_step_takes_few_embedding_tokens_and_chat_prompts_go_first(model, tokenizer):
    """Embeddings are bulk work: while rows decode, a step takes at most embed_chunk of their tokens
    (the streams' next token waits for the whole step), and a chat prompt behind them is not held back."""
    runner = ModelRunner(model, num_slots=8, max_len=256, dtype=torch.float32, exact_attention=True)
    engine = Engine(runner, tokenizer, [], max_num_batched_tokens=64)  # embed_chunk: 16
    steps = []
    real = runner.step

    def spy(decode, chunks, invariant=False):
        steps.append((len(decode), [(c.pool, len(c.token_ids)) for c in chunks]))
        return real(decode, chunks, invariant)

    runner.step = spy
    engine.start()
    try:
        assert engine.embed_chunk == 16
        alone = Collector()
        embed(engine, alone, "alone", LONG)
        alone.wait()
        assert max(n for _, chunks in steps for _, n in chunks) == 16  # cut at 16 even alone
        c = streaming(engine, max_tokens=60)
        steps.clear()
        for i in range(4):
            embed(engine, c, f"e{i}", LONG)
        c.submit(engine, "chat", PROMPTS[2], temperature=0.0, max_tokens=2)  # 60 tokens, behind them
        c.wait()
        decoding = [chunks for d, chunks in steps if d]
        assert decoding and all(sum(n for pool, n in chunks if pool) <= 16 for chunks in decoding)
        chat_step = next(i for i, (_, chunks) in enumerate(steps) if any(p is None for p, _ in chunks))
        assert chat_step <= 1  # planned at once, not after the embeddings' 20 chunks
        assert torch.allclose(vector(c, "e3"), vector(alone, "alone"), atol=2e-5)
    finally:
        engine.stop()


@pytest.mark.parametrize("share", [0.5, 1.0])
def test_while_streams_decode_embedding_steps_take_at_most_their_share_of_the_time(model, tokenizer, share):
    """On a GPU a step that carries an embedding chunk runs eagerly, several decode steps' time whatever
    its tokens (here: 40 ms, against 5 for a decode step). While rows decode, such steps take at most embed_share of the
    engine's time (one step's time over, at most), and decode-only steps come between them; at 1,
    every step carries some while any wait."""
    runner = ModelRunner(model, num_slots=8, max_len=256, dtype=torch.float32, exact_attention=True)
    engine = Engine(runner, tokenizer, [], max_num_batched_tokens=64, embed_share=share)  # embed_chunk: 16
    real, charged = runner.step, []

    def eager_embeddings(decode, chunks, invariant=False):
        time.sleep(0.04 if any(c.pool is not None for c in chunks) else 0.005)
        return real(decode, chunks, invariant)

    def charge(seconds, decoding, embedded, _real=engine._charge):
        if decoding:
            charged.append((seconds, embedded))
        _real(seconds, decoding, embedded)

    runner.step, engine._charge = eager_embeddings, charge
    engine.start()
    try:
        c = streaming(engine, max_tokens=200)
        charged.clear()
        for i in range(2):
            embed(engine, c, f"e{i}", LONG)  # 10 chunks of 16 or fewer tokens
        c.wait()
    finally:
        engine.stop()
    flags = [e for _, e in charged]
    first, last = flags.index(True), len(flags) - 1 - flags[::-1].index(True)
    during = charged[first : last + 1]  # from the first step with an embedding chunk to the last
    assert sum(flags) == 10
    spent, total = sum(s for s, e in during if e), sum(s for s, _ in during)
    if share == 1.0:
        assert all(e for _, e in during)  # every step carried one: the streams waited on each
    else:
        assert spent <= share * total + max(s for s, _ in during)
        assert sum(not e for _, e in during) >= 4 * 9  # decode-only steps between them (~7 each)
    assert len(c.events["stream"][-1].timings.token_gaps) == 199  # the stream ran throughout


def test_with_the_static_decoder_an_embedding_chunk_runs_eagerly_and_matches_hf():
    """The static decoder (CUDA graphs' CPU form) gives logits only: a step with decode rows and an
    embedding chunk must not take it, even where its prompt rows would fit (graph_prompt_tokens)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mygpt.engine.runner import DecodeRow, PrefillChunk

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
    hf = LlamaForCausalLM(config).eval()
    r = ModelRunner(
        hf, num_slots=8, max_len=300, dtype=torch.float32, static_decode=True, graph_prompt_tokens=64
    )
    assert r.decoder is not None
    r.step([], [PrefillChunk(0, list(range(10, 30)), 0)])  # a prompt step through the decoder
    assert r.decoder.stats.prompt_steps == 1
    prompt = list(range(40, 90))
    logits, (pooled,) = r.step([DecodeRow(0, 7, 20)], [PrefillChunk(1, prompt, 0, pool="sum")])
    with torch.inference_mode():
        want = hf.model(torch.tensor([prompt])).last_hidden_state[0].float().sum(0)
    assert logits.shape == (1, 256) and pooled.shape == (1, 128)
    assert torch.allclose(pooled[0], want, atol=1e-4)
    assert r.decoder.stats.prompt_steps == 1  # the embedding's step was not one


def test_an_embedding_chunk_never_passes_the_step_budget(model, tokenizer):
    """embedding_step_tokens above max_num_batched_tokens: refused in the settings, and the engine
    clamps it (a larger chunk would never be planned: the input would wait for good)."""
    from pydantic import ValidationError

    from mygpt.config import Settings

    with pytest.raises(ValidationError, match="embedding_step_tokens"):
        Settings(max_num_batched_tokens=64, embedding_step_tokens=128)
    runner = ModelRunner(model, num_slots=2, max_len=256, dtype=torch.float32)
    engine = Engine(runner, tokenizer, [], max_num_batched_tokens=16, embed_chunk=32)
    assert engine.embed_chunk == 16
    engine.start()
    try:
        c = Collector()
        embed(engine, c, "e", list(range(100, 120)))  # 20 tokens: two chunks of 16 and 4
        c.wait(timeout=30)
        assert vector(c, "e").shape == (model.config.hidden_size,)
    finally:
        engine.stop()
