"""The adapter registry (load, replace, unload, versions, single flight) and the cache's retire/pin."""

from __future__ import annotations

import os
import shutil
import threading
import time

import pytest
import torch

from mygpt.engine.engine import Engine
from mygpt.engine.runner import ModelRunner
from mygpt.engine.types import AdapterRef, FinishReason
from mygpt.lora.cache import AdapterCache
from mygpt.lora.registry import AdapterConflict, AdapterRegistry
from mygpt.lora.synthetic import make_adapter
from mygpt.lora.weights import AdapterChanging, AdapterError
from test_engine import PROMPTS, Collector


@pytest.fixture(scope="module")
def tiny_runner(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return ModelRunner(model, num_slots=8, max_len=256, dtype=torch.float32, max_loras=2, max_lora_rank=16)


@pytest.fixture
def store(tiny_model_dir, tmp_path):
    for i, name in enumerate(["one", "two", "three"]):
        make_adapter(tiny_model_dir, tmp_path / "t" / name, 8, ["q_proj", "v_proj"], seed=40 + i)
    (tmp_path / "u").mkdir()
    return tmp_path


@pytest.fixture
def registry(store, tiny_runner):
    shapes = {p: (m.in_features, m.out_features) for p, m in tiny_runner.lora_layers.items()}
    reg = AdapterRegistry(store, ["t", "u"], shapes, max_rank=16)
    reg.retired = []
    reg.on_retire = reg.retired.append
    return reg


def test_an_adapter_named_like_the_base_model_is_refused(registry, store):
    """Requests naming the base model get the base model: an adapter of that name could never be
    reached (it was loaded, listed twice, and never served)."""
    registry.base_name = "tiny"
    with pytest.raises(AdapterError, match="is the base model's"):
        registry.load("t", "tiny", str(store / "t" / "one"))
    shutil.copytree(store / "t" / "one", store / "t" / "tiny")  # copied into the store: its problem
    assert "is the base model's" in registry.problem(registry.get("t", "tiny"))


def test_found_in_the_store_and_scoped_by_tenant(registry, store):
    assert [e.name for e in registry.list("t")] == ["one", "three", "two"]
    assert registry.list("u") == [] and registry.get("u", "one") is None
    assert registry.get("nobody", "one") is None
    shutil.copytree(store / "t" / "one", store / "u" / "mine")  # appears without a reload
    assert [(e.tenant, e.name) for e in registry.list()] == [
        ("t", "one"),
        ("t", "three"),
        ("t", "two"),
        ("u", "mine"),
    ]


def test_a_fine_tuned_adapter_deleted_from_the_store_stops_routing(registry, store):
    """A replica sharing the store deleted it (models.delete there): this one stops routing it too."""
    shutil.copytree(store / "t" / "one", store / "t" / "ft:tiny:t:ft:ftjob-1")
    entry, _ = registry.load("t", "ft:tiny:t:ft:ftjob-1", source="finetune")
    assert registry.get("t", entry.name) is entry
    shutil.rmtree(store / "t" / entry.name)
    assert registry.get("t", entry.name) is None and registry.retired[-1] == entry.key


def test_problem_is_what_a_load_would_refuse_without_reading_tensors(
    registry, store, tiny_model_dir, monkeypatch
):
    """registry.problem: None for servable files, else the AdapterError message a load gives; from
    the files' headers (no tensor read), checked again only once the files change."""
    from safetensors.torch import load_file, save_file

    from mygpt.lora import registry as registry_module
    from mygpt.lora import weights

    t = store / "t"
    shutil.copytree(t / "one", t / "corrupt")
    (t / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    shutil.copytree(t / "one", t / "truncated")
    data = (t / "one" / "adapter_model.safetensors").read_bytes()
    (t / "truncated" / "adapter_model.safetensors").write_bytes(data[:-8])
    shutil.copytree(t / "one", t / "pickled")
    (t / "pickled" / "adapter_model.safetensors").rename(t / "pickled" / "adapter_model.bin")
    make_adapter(tiny_model_dir, t / "wide", 32, ["q_proj"], seed=3)
    shutil.copytree(t / "one", t / "elsewhere")
    file = t / "elsewhere" / "adapter_model.safetensors"
    save_file({k.replace("layers.0.", "layers.9."): v for k, v in load_file(file).items()}, file)
    bad = ["corrupt", "elsewhere", "pickled", "truncated", "wide"]
    wanted = {}
    for name in bad:  # what a load says
        with pytest.raises(AdapterError) as err:
            registry.weights(registry.get("t", name))
        wanted[name] = str(err.value)
    fresh = AdapterRegistry(store, ["t"], registry.module_shapes, max_rank=16)

    def no_tensors(*args):
        raise AssertionError("problem() read the tensors")

    monkeypatch.setattr(weights, "_read_tensors", no_tensors)
    checks = []
    check = registry_module.check_adapter
    monkeypatch.setattr(
        registry_module, "check_adapter", lambda *a, **kw: checks.append(a[0]) or check(*a, **kw)
    )
    problems = {e.name: fresh.problem(e) for e in fresh.list("t")}
    assert problems == {"one": None, "two": None, "three": None} | wanted
    assert "corrupt" in wanted["truncated"] and "rank 32 exceeds" in wanted["wide"]
    assert "layers.9" in wanted["elsewhere"] and "pickle" in wanted["pickled"]
    assert sorted(checks) == sorted(problems)
    for e in fresh.list("t"):  # kept until the files change
        fresh.problem(e)
    assert len(checks) == len(problems)
    # good files copied over, keeping the old modification time (as cp -p or rsync -a would)
    file = t / "corrupt" / "adapter_model.safetensors"
    before = file.stat()
    shutil.copy(t / "one" / "adapter_model.safetensors", file)
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert file.stat().st_mtime_ns == before.st_mtime_ns
    assert fresh.problem(fresh.get("t", "corrupt")) is None and checks[-1] == "corrupt"
    assert len(checks) == len(problems) + 1


def test_load_replace_unload_and_versions(registry, store, tiny_model_dir):
    entry, changed = registry.load("t", "one")
    assert not changed and entry.version == 1 and entry.weights is not None  # found already: validated only
    w1 = entry.weights
    make_adapter(tiny_model_dir, store / "t" / "one-v2", 8, ["q_proj", "v_proj"], seed=99)
    with pytest.raises(AdapterConflict, match="replace"):
        registry.load("t", "one", path="one-v2")
    again, changed = registry.load("t", "one", path=str(store / "t" / "one"))  # same name and path: no-op
    assert not changed and again is entry
    v2, changed = registry.load("t", "one", path="one-v2", replace=True)
    assert changed and v2.version == 2 and v2.key == "t/one@2" and registry.retired == ["t/one@1"]
    module = next(iter(w1.modules))
    assert registry.get("t", "one") is v2 and not torch.equal(
        v2.weights.modules[module].a, w1.modules[module].a
    )
    assert registry.unload("t", "one") is v2 and registry.retired[-1] == "t/one@2"
    assert registry.get("t", "one") is None and "one" not in [e.name for e in registry.list("t")]
    assert registry.unload("t", "one") is None
    back, changed = registry.load("t", "one")  # loaded again, explicitly
    assert changed and registry.get("t", "one") is back
    assert back.key == "t/one@3"  # a key is never reused: the engine may still hold t/one@1 or @2


def test_changed_files_make_a_new_version(registry, store, tiny_model_dir):
    entry, w1 = registry.weights(registry.get("t", "two"))
    time.sleep(0.01)
    make_adapter(tiny_model_dir, store / "new", 8, ["q_proj", "v_proj"], seed=7)
    for file in (store / "new").iterdir():  # a new version copied over the old files, in place
        shutil.copy(file, store / "t" / "two" / file.name)
    newer, w2 = registry.weights(registry.get("t", "two"))
    assert newer.version == entry.version + 1 and w2 is not w1 and registry.retired == [entry.key]


def _copy_over(tiny_model_dir, store, seed: int) -> None:
    """A new adapter copied over t/two's files, in place (as an external tool would write it)."""
    time.sleep(0.01)  # a later modification time
    make_adapter(tiny_model_dir, store / "t" / f"new{seed}", 8, ["q_proj", "v_proj"], seed=seed)
    for file in (store / "t" / f"new{seed}").iterdir():
        shutil.copy(file, store / "t" / "two" / file.name)


def _same(w1, w2) -> bool:
    return w1.modules.keys() == w2.modules.keys() and all(
        torch.equal(m.a, w2.modules[p].a) and torch.equal(m.b, w2.modules[p].b) for p, m in w1.modules.items()
    )


def test_files_changed_during_a_read_never_go_under_the_old_version(
    registry, store, tiny_model_dir, monkeypatch
):
    """A version's weights are read again after the host cache dropped them, and the files are replaced
    while that read runs: the new files make a new version (the old key never maps to new weights: a
    prefix cached under it, or its device copy, would disagree with them)."""
    entry, w1 = registry.weights(registry.get("t", "two"))
    entry.weights = None  # dropped from the host cache (the device copy is the engine's)
    real, calls = registry._read, []

    def read_while_copied(*args):
        calls.append(args)
        if len(calls) == 1:
            _copy_over(tiny_model_dir, store, seed=9)
        return real(*args)

    monkeypatch.setattr(registry, "_read", read_while_copied)
    newer, w2 = registry.weights(entry)
    fresh = real("t", "new9", store / "t" / "new9")
    assert newer.version == entry.version + 1 and registry.retired == [entry.key]
    assert _same(w2, fresh) and not _same(w2, w1)
    assert len(calls) == 2  # read again once the files stood still


def test_a_load_records_the_files_it_read(registry, store, tiny_model_dir, monkeypatch):
    """Files replaced right after a replacing load() read them: the load reads again once they stand
    still, so its version holds the new files under their own stamp (before, it kept the old weights
    under the new files' stamp, and served them for good)."""
    real, calls = registry._read, []

    def read_then_copied(*args):
        calls.append(args)
        weights = real(*args)
        if len(calls) == 1:
            _copy_over(tiny_model_dir, store, seed=11)
        return weights

    monkeypatch.setattr(registry, "_read", read_then_copied)
    entry, _ = registry.load("t", "two", replace=True)
    fresh = real("t", "new11", store / "t" / "new11")
    current, weights = registry.weights(registry.get("t", "two"))
    assert _same(weights, fresh)
    assert current is entry and len(calls) == 2


def test_a_torn_read_of_a_copy_in_progress_is_read_again(registry, store, tiny_model_dir, monkeypatch):
    """The first read meets a half-written file (an AdapterError) while the copy goes on: the files
    changed under it, so it is read again once they stand still, not refused with a 400; files that
    did not change under a failed read are bad files, refused at once."""
    from mygpt.lora import registry as registry_module

    monkeypatch.setattr(registry_module, "READ_WAIT_S", 0.001)
    real, calls = registry._read, []

    def torn(*args):
        calls.append(args)
        if len(calls) == 1:
            _copy_over(tiny_model_dir, store, seed=13)
            raise AdapterError("adapter_model.safetensors is corrupt (incomplete metadata)")
        return real(*args)

    monkeypatch.setattr(registry, "_read", torn)
    _, weights = registry.weights(registry.get("t", "two"))
    assert _same(weights, real("t", "new13", store / "t" / "new13")) and len(calls) == 2

    def bad(*args):
        calls.append(args)
        raise AdapterError("adapter_config.json: no target modules")

    calls.clear()
    monkeypatch.setattr(registry, "_read", bad)
    with pytest.raises(AdapterError, match="no target modules"):
        registry.weights(registry.get("t", "three"))
    assert len(calls) == 1
    assert registry.read_failures == 1  # (metrics: mygpt_lora_load_failures_total; the torn read: none)


def test_files_that_keep_changing_are_a_moment_to_retry_not_a_bad_adapter(
    registry, store, tiny_model_dir, monkeypatch
):
    """Every read meets a copy in progress: AdapterChanging, which the API answers with a 503 and
    Retry-After (clients retry it) where a bad adapter is a 400."""
    from mygpt.api.errors import adapter_changing
    from mygpt.lora import registry as registry_module

    monkeypatch.setattr(registry_module, "READ_WAIT_S", 0.001)
    real, seeds = registry._read, iter(range(20, 40))

    def copied_meanwhile(*args):
        weights = real(*args)
        _copy_over(tiny_model_dir, store, seed=next(seeds))
        return weights

    monkeypatch.setattr(registry, "_read", copied_meanwhile)
    with pytest.raises(AdapterChanging, match="kept changing") as err:
        registry.weights(registry.get("t", "two"))
    answer = adapter_changing(err.value)
    assert answer.status == 503 and answer.headers["Retry-After"] and answer.info.code == "adapter_changing"


def test_concurrent_loads_of_one_adapter_make_one_read(registry, monkeypatch):
    reads = []
    real = registry._read

    def slow_read(*args):
        reads.append(args)
        time.sleep(0.2)
        return real(*args)

    monkeypatch.setattr(registry, "_read", slow_read)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(registry.weights(registry.get("t", "three"))))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(reads) == 1 and len({id(w) for _, w in results}) == 1


def test_unknown_tenant_and_bad_names(registry):
    with pytest.raises(AdapterError, match="unknown tenant"):
        registry.load("nobody", "one")
    with pytest.raises(AdapterError, match="not found"):
        registry.load("t", "ghost")
    with pytest.raises(AdapterError):  # the name pattern ended in $, which let a trailing newline in
        registry.load("t", "one\n", path="one")
    for path in ("one\x00", "x" * 256, "/\ud800"):  # a NUL, a name too long, no UTF-8: were 500s
        with pytest.raises(AdapterError, match="not a usable file system path"):
            registry.load("t", "fresh", path=path)


def test_retire_evicts_once_unused_and_pins_hold(tiny_runner, registry):
    w = {n: registry.weights(registry.get("t", n))[1] for n in ("one", "two", "three")}
    cache = AdapterCache(tiny_runner.lora_layers, 2)
    cache.pin("one", w["one"])
    cache.acquire("two", w["two"])
    assert not cache.can_acquire("three")  # one pinned for good, two in use
    cache.retire("two")
    assert "two" in cache.resident  # still in use: stays
    cache.release("two")
    assert cache.resident == ["one"]  # evicted at its last release
    cache.acquire("three", w["three"])
    cache.release("three")
    cache.acquire("two", w["two"])  # evicts three (LRU, unpinned), never the pinned one
    assert set(cache.resident) == {"one", "two"}
    assert cache.snapshot()["one"] == {"slot": cache._slot["one"], "in_use": 0, "pinned": True}
    cache.release("two")
    cache.retire("one")  # unloading a pinned adapter unpins it
    assert cache.resident == ["two"]


def test_requests_finish_on_the_version_they_started_with(
    tiny_runner, tokenizer, registry, store, tiny_model_dir
):
    """D4: replacing an adapter while a request uses it: that request ends on the old weights."""
    engine = Engine(
        tiny_runner,
        tokenizer,
        [],
        max_num_batched_tokens=64,
        adapters=AdapterCache(tiny_runner.lora_layers, 2),
    )
    registry.on_retire = engine.retire_adapter
    engine.start()
    try:
        v1, w1 = registry.weights(registry.get("t", "one"))
        alone = Collector()
        alone.submit(
            engine, "alone", PROMPTS[0], temperature=0.0, max_tokens=60, adapter=AdapterRef(v1.key, w1)
        )
        alone.wait()
        make_adapter(tiny_model_dir, store / "t" / "one-v2", 8, ["q_proj", "v_proj"], seed=5)
        c = Collector()
        c.submit(engine, "old", PROMPTS[0], temperature=0.0, max_tokens=60, adapter=AdapterRef(v1.key, w1))
        while not c.events.get("old"):
            time.sleep(0.001)
        v2, _ = registry.load("t", "one", path="one-v2", replace=True)  # retires t/one@1 mid-request
        _, w2 = registry.weights(v2)
        c.submit(engine, "new", PROMPTS[0], temperature=0.0, max_tokens=60, adapter=AdapterRef(v2.key, w2))
        c.wait()
        assert c.finish("old") == FinishReason.LENGTH and c.tokens("old") == alone.tokens("alone")
        assert c.tokens("new") != alone.tokens("alone")
        time.sleep(0.05)
        assert v1.key not in engine.adapters.resident and v2.key in engine.adapters.resident
    finally:
        engine.stop()
