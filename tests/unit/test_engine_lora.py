"""E1 at the engine level: greedy output per adapter is the same alone and in a busy mixed batch."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from mygpt.engine.engine import Engine
from mygpt.engine.runner import ModelRunner
from mygpt.engine.types import AdapterRef, FinishReason
from mygpt.lora.cache import AdapterCache
from mygpt.lora.registry import AdapterRegistry
from mygpt.lora.synthetic import make_adapter
from mygpt.lora.weights import ModuleLoRA
from test_engine import PROMPTS, Collector


@pytest.fixture(scope="module")
def lora_engine(tiny_model_dir, tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-adapters")
    make_adapter(tiny_model_dir, root / "t" / "a", 8, ["q_proj", "v_proj", "down_proj"], seed=1)
    make_adapter(
        tiny_model_dir, root / "t" / "b", 16, ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"], seed=2
    )
    make_adapter(tiny_model_dir, root / "t" / "c", 4, ["gate_proj"], seed=3)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    runner = ModelRunner(model, num_slots=32, max_len=256, dtype=torch.float32, max_loras=2, max_lora_rank=16)
    shapes = {p: (m.in_features, m.out_features) for p, m in runner.lora_layers.items()}
    registry = AdapterRegistry(root, ["t"], shapes, 16)
    cache = AdapterCache(runner.lora_layers, 2)
    engine = Engine(runner, tokenizer, [], max_num_batched_tokens=32, adapters=cache)
    engine.refs = {n: AdapterRef(n, registry.weights(registry.get("t", n))[1]) for n in "abc"}
    engine.refs[None] = None
    engine.start()
    yield engine
    engine.stop()


def test_adapters_alone_equal_adapters_in_a_32_row_mixed_batch(lora_engine):
    names = ["a", "b", None, "c"]  # c needs a third slot: it waits for one, then evicts
    alone = Collector()
    for name in names:
        for i, p in enumerate(PROMPTS[:4]):
            alone.submit(
                lora_engine, f"{name}-{i}", p, temperature=0.0, max_tokens=10, adapter=lora_engine.refs[name]
            )
            alone.wait()
    outputs = {rid: alone.tokens(rid) for rid in alone.events}
    assert outputs["a-0"] != outputs["b-0"] != outputs["None-0"]  # adapters really differ
    busy = Collector()
    for rep in range(2):
        for i in range(4):
            for name in names:
                busy.submit(
                    lora_engine,
                    f"{rep}/{name}-{i}",
                    PROMPTS[i],
                    temperature=0.0,
                    max_tokens=10,
                    adapter=lora_engine.refs[name],
                )
    busy.wait()
    for rep in range(2):
        for name in names:
            for i in range(4):
                assert busy.tokens(f"{rep}/{name}-{i}") == outputs[f"{name}-{i}"], (rep, name, i)
    stats = lora_engine.adapters.stats
    assert stats.evictions >= 1 and stats.loads >= 3
    assert all(lora_engine.adapters.pinned(n) == 0 for n in "abc")


def test_unknown_adapter_fails_only_its_request(lora_engine):
    c = Collector()
    good = lora_engine.refs["a"].weights
    too_wide = {
        k: ModuleLoRA(torch.zeros(17, m.a.shape[1]), torch.zeros(m.b.shape[0], 17))
        for k, m in good.modules.items()
    }
    bad = AdapterRef("nope", dataclasses.replace(good, modules=too_wide))  # rank 17 > the slots' 16
    c.submit(lora_engine, "bad", PROMPTS[0], max_tokens=4, adapter=bad)
    c.submit(lora_engine, "good", PROMPTS[0], max_tokens=4, adapter=lora_engine.refs["a"])
    c.wait()
    assert c.finish("bad") == FinishReason.ERROR and "nope" in c.events["bad"][-1].error
    assert c.finish("good") == FinishReason.LENGTH
    assert "nope" not in lora_engine.adapters.resident and lora_engine.adapters.stats.load_failures == 1


def test_the_last_adapter_slot_cannot_be_pinned(lora_engine):
    """With every slot pinned, a request for any other adapter would wait forever, and every request
    queued behind it too (the engine admits in order). So one slot always stays unpinned."""
    import threading

    def pin(ref):
        done, result = threading.Event(), []
        lora_engine.pin_adapter(ref, lambda err: (result.append(err), done.set()))
        assert done.wait(30)
        return result[0]

    pinned = AdapterRef("a@pinned", lora_engine.refs["a"].weights)  # a key of its own: retired below
    assert pin(pinned) is None  # 1 of the 2 slots
    error = pin(lora_engine.refs["b"])
    assert error is not None and "at most 1 of the 2 adapter slots" in str(error)
    c = Collector()  # b and c still take turns in the slot that stays unpinned
    for name in "bc":
        c.submit(lora_engine, name, PROMPTS[0], max_tokens=4, adapter=lora_engine.refs[name])
    c.submit(lora_engine, "base", PROMPTS[1], max_tokens=4)
    c.wait(timeout=60)
    assert {c.finish(r) for r in ("b", "c", "base")} == {FinishReason.LENGTH}
    lora_engine.retire_adapter(pinned.key)  # unpinned (unloaded) for the other tests
    retired = AdapterRef("a@pinned-again", pinned.weights)
    lora_engine.retire_adapter(retired.key)  # replaced before its pin reached the engine: refused
    assert "replaced or unloaded" in str(pin(retired))


def test_base_requests_pass_a_request_waiting_for_an_adapter_slot(lora_engine):
    """Both adapter slots busy: a request for a third adapter waits for one, and the base-model
    request behind it goes first (it needs no adapter slot); a request for a resident adapter does
    not (it would keep that slot in use, and the waiting one could wait for good)."""
    c = Collector()
    refs = lora_engine.refs
    c.submit(lora_engine, "a-long", PROMPTS[0], temperature=0.0, max_tokens=150, adapter=refs["a"])
    c.submit(lora_engine, "b-long", PROMPTS[1], temperature=0.0, max_tokens=150, adapter=refs["b"])
    c.submit(lora_engine, "c", PROMPTS[2], temperature=0.0, max_tokens=4, adapter=refs["c"])
    c.submit(lora_engine, "base", PROMPTS[3], temperature=0.0, max_tokens=4)
    c.submit(lora_engine, "a-again", PROMPTS[3], temperature=0.0, max_tokens=4, adapter=refs["a"])
    c.wait()
    t = {rid: [ev.timings for ev in evs if ev.timings is not None][0] for rid, evs in c.events.items()}
    assert all(c.finish(rid) == FinishReason.LENGTH for rid in t)
    assert t["base"].finished < t["c"].admitted  # went first
    assert t["c"].admitted >= min(t["a-long"].finished, t["b-long"].finished)  # waited for a slot
    assert t["a-again"].admitted >= t["c"].admitted  # did not pass it


def test_a_version_retired_while_requests_wait_for_it_goes_after_them(lora_engine):
    """Unloaded (or replaced) while two requests still wait to load it: both run on it, one after
    the other if need be, and it does not stay in a slot afterwards as if it were routable."""
    c = Collector()
    refs, cache = lora_engine.refs, lora_engine.adapters
    old = AdapterRef("c@old", refs["c"].weights)  # keys are never reused once retired
    for name in "ab":  # both slots busy: the c requests wait
        c.submit(lora_engine, f"{name}-long", PROMPTS[0], temperature=0.0, max_tokens=100, adapter=refs[name])
    for i in range(2):
        c.submit(lora_engine, f"c-{i}", PROMPTS[1], temperature=0.0, max_tokens=4, adapter=old, n=1)
    lora_engine.retire_adapter(old.key)
    c.wait()
    assert all(c.finish(rid) == FinishReason.LENGTH for rid in c.events)
    assert c.tokens("c-0") == c.tokens("c-1")
    assert old.key not in cache.resident


def test_a_version_retired_before_its_request_reached_the_engine_leaves_after_it(lora_engine):
    """The request read its adapter's weights, then the adapter was unloaded, then the request was
    submitted: it runs on them (it was accepted), and the version does not stay in a slot after."""
    ref = AdapterRef("b@unloaded", lora_engine.refs["b"].weights)
    lora_engine.retire_adapter(ref.key)  # the unload's retire reaches the engine first
    c = Collector()
    c.submit(lora_engine, "late", PROMPTS[2], temperature=0.0, max_tokens=4, adapter=ref)
    c.wait()
    assert c.finish("late") == FinishReason.LENGTH
    assert ref.key not in lora_engine.adapters.resident
    alone = Collector()
    alone.submit(lora_engine, "b", PROMPTS[2], temperature=0.0, max_tokens=4, adapter=lora_engine.refs["b"])
    alone.wait()
    assert c.tokens("late") == alone.tokens("b")  # on the adapter's weights, not the base model's


def test_cached_prompts_are_reused_for_the_same_adapter_version_only(lora_engine):
    """The prefix cache is keyed by the adapter version: the same prompt on another adapter, the base
    model or a new version of the same adapter (a new key, even with the same files) computes whole."""
    refs = lora_engine.refs
    prompt = list(range(300, 380))  # 80 tokens: 64 reusable
    v2 = AdapterRef("a@2", refs["a"].weights)

    def cached(rid, ref):
        c = Collector()
        c.submit(lora_engine, rid, prompt, temperature=0.0, max_tokens=2, adapter=ref)
        c.wait()
        return c.events[rid][0].cached_tokens

    assert cached("first", refs["a"]) == 0
    assert [cached("b", refs["b"]), cached("base", None), cached("v2", v2)] == [0, 0, 0]
    assert cached("again", refs["a"]) == 64
