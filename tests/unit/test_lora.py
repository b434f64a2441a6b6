"""Per-row LoRA: matches peft's reference, mixes adapters in one batch, evicts without side effects."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from mygpt.engine.runner import ModelRunner
from mygpt.lora.cache import AdapterCache
from mygpt.lora.layers import MIN_ROWS, LoRABatch, LoRALinear, set_rows
from mygpt.lora.registry import AdapterRegistry
from mygpt.lora.synthetic import make_adapter
from mygpt.lora.weights import AdapterError

SPECS = {  # name: (rank, target modules) - mixed ranks and targets
    "attn8": (8, ["q_proj", "v_proj"]),
    "all16": (16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "mlp4": (4, ["gate_proj", "up_proj", "down_proj"]),
}


TENANT = "t"


@pytest.fixture(scope="session")
def adapter_root(tiny_model_dir, tmp_path_factory):
    """A store with one tenant "t" holding the SPECS adapters."""
    root = tmp_path_factory.mktemp("adapters")
    for i, (name, (rank, targets)) in enumerate(SPECS.items()):
        make_adapter(tiny_model_dir, root / TENANT / name, rank, targets, seed=100 + i)
    return root


def load_base(tiny_model_dir, quant: bool):
    """The tiny model, float32 or with NF4 projections (float32 compute)."""
    kwargs = {"dtype": torch.float32}
    if quant:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, **kwargs).eval()


def runner_with_cache(tiny_model_dir, adapter_root, slots=4, quant=False):
    model = load_base(tiny_model_dir, quant)
    runner = ModelRunner(
        model, num_slots=8, max_len=128, dtype=torch.float32, max_loras=slots, max_lora_rank=16
    )
    shapes = {p: (m.in_features, m.out_features) for p, m in runner.lora_layers.items()}
    registry = AdapterRegistry(adapter_root, [TENANT], shapes, max_rank=16)
    return runner, NamedCache(runner.lora_layers, slots, registry), registry


class NamedCache(AdapterCache):
    """The cache with adapters of tenant "t" addressed by name (the engine passes key and weights)."""

    def __init__(self, layers, slots, registry):
        super().__init__(layers, slots)
        self.registry = registry

    def acquire(self, name, weights=None):
        return super().acquire(name, weights or self.registry.weights(self.registry.get(TENANT, name))[1])


def peft_reference(tiny_model_dir, adapter_root, name, ids, quant=False):
    from peft import PeftModel

    base = load_base(tiny_model_dir, quant)
    model = PeftModel.from_pretrained(base, adapter_root / TENANT / name).eval() if name else base.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("quant", [False, True], ids=["fp32-base", "nf4-base"])
def test_mixed_batch_matches_peft_reference(tiny_model_dir, adapter_root, quant):
    """E3: one decode step with rows on three adapters (mixed ranks and targets) and the base."""
    runner, cache, _ = runner_with_cache(tiny_model_dir, adapter_root, quant=quant)
    prompts = {"attn8": [5, 6, 7, 8], "all16": [9, 10, 11], "mlp4": [12, 13, 14, 15, 16], None: [17, 18]}
    nxt = 21
    rows = []
    for row, (name, ids) in enumerate(prompts.items()):
        lora = cache.acquire(name) if name else -1
        logits = runner.prefill(row, ids, 0, lora)
        ref = peft_reference(tiny_model_dir, adapter_root, name, ids + [nxt], quant)
        torch.testing.assert_close(logits, ref[len(ids) - 1], atol=2e-4, rtol=1e-3)
        rows.append((row, len(ids), lora, ref[len(ids)]))
    out = runner.decode([r[0] for r in rows], [nxt] * len(rows), [r[1] for r in rows], [r[2] for r in rows])
    for i, (*_, ref) in enumerate(rows):
        torch.testing.assert_close(out[i], ref, atol=2e-4, rtol=1e-3)
    # the adapters really change the output (the test would pass vacuously otherwise)
    base = peft_reference(tiny_model_dir, adapter_root, None, prompts["all16"] + [nxt], quant)
    assert (rows[1][3] - base[len(prompts["all16"])]).abs().max() > 1e-2


def test_lru_eviction_pins_and_base_unchanged(tiny_model_dir, adapter_root, tmp_path):
    """D6/E2: two slots, LRU unpinned evicted first, pinned never; base output identical after 20 loads."""
    root = tmp_path / "store"
    shutil.copytree(adapter_root, root)
    for i in range(20):
        shutil.copytree(root / TENANT / "attn8", root / TENANT / f"copy{i}")
    runner, cache, _ = runner_with_cache(tiny_model_dir, root, slots=2)
    before = runner.prefill(0, [3, 4, 5], 0).clone()
    a = cache.acquire("attn8")
    cache.acquire("mlp4")
    cache.release("mlp4")
    assert cache.resident == ["attn8", "mlp4"]
    cache.acquire("all16")  # evicts mlp4 (unpinned), never attn8 (pinned)
    assert set(cache.resident) == {"attn8", "all16"} and cache.stats.evictions == 1
    cache.release("all16")
    for i in range(20):
        cache.acquire(f"copy{i}")
        cache.release(f"copy{i}")
    assert cache.resident[0] == "attn8" and cache._slot["attn8"] == a
    assert cache.stats.loads == 23 and cache.stats.evictions == 21 and cache.stats.hits == 0
    cache.release("attn8")
    after = runner.prefill(0, [3, 4, 5], 0)
    assert torch.equal(before, after)


def test_all_slots_pinned_means_wait(tiny_model_dir, adapter_root):
    _, cache, _ = runner_with_cache(tiny_model_dir, adapter_root, slots=1)
    cache.acquire("attn8")
    assert not cache.can_acquire("mlp4") and cache.can_acquire("attn8")
    cache.release("attn8")
    assert cache.can_acquire("mlp4")


def _broken(adapter_root, tmp_path, name, mutate):
    root = tmp_path / "store"
    (root / TENANT).mkdir(parents=True, exist_ok=True)
    shutil.copytree(adapter_root / TENANT / "attn8", root / TENANT / name)
    mutate(root / TENANT / name)
    return root


def _replace_dir(path):
    path.unlink()
    path.mkdir()


def _retensor(d, change):
    from safetensors.torch import load_file, save_file

    file = d / "adapter_model.safetensors"
    save_file({k: change(k, t).contiguous() for k, t in load_file(str(file)).items()}, str(file))


def _edit_config(**changes):
    def mutate(d):
        config = json.loads((d / "adapter_config.json").read_text())
        config.update(changes)
        (d / "adapter_config.json").write_text(json.dumps(config))

    return mutate


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_edit_config(modules_to_save=["lm_head"]), "modules_to_save"),
        (_edit_config(use_dora=True), "DoRA"),
        (_edit_config(peft_type="IA3"), "IA3"),
        (lambda d: (d / "adapter_model.safetensors").write_bytes(b"garbage"), "corrupt"),
        (lambda d: (d / "adapter_config.json").write_text("{"), "not valid JSON"),
        (lambda d: (d / "adapter_model.safetensors").rename(d / "adapter_model.bin"), "pickle"),
        (lambda d: (d / "adapter_model.safetensors").unlink(), "missing"),
        # configs and tensors of the wrong kind: a 400 naming the problem, never a 500 (which clients retry)
        (lambda d: (d / "adapter_config.json").write_text("[]"), "not a JSON object"),
        (_edit_config(lora_alpha=None), "lora_alpha None is not a usable number"),
        (_edit_config(lora_alpha="16"), "lora_alpha '16' is not a usable number"),
        (_edit_config(lora_alpha=10**400), "lora_alpha 1000000000.* is not a usable number"),
        (lambda d: _retensor(d, lambda k, t: t[:0] if "lora_A" in k else t[:, :0]), "rank 1 or more"),
        (lambda d: _retensor(d, lambda k, t: t.sum() if "lora_A" in k else t), "rank 1 or more"),
    ],
)
def test_bad_adapters_are_refused_with_the_reason(tiny_model_dir, adapter_root, tmp_path, mutate, message):
    root = _broken(adapter_root, tmp_path, "bad", mutate)
    _, _, registry = runner_with_cache(tiny_model_dir, root)
    with pytest.raises(AdapterError, match=message):
        registry.load(TENANT, "bad")
    assert registry.get(TENANT, "bad") is not None  # found in the store: its requests get the 400


def test_a_config_that_is_a_directory_is_refused(tiny_model_dir, adapter_root, tmp_path):
    root = _broken(adapter_root, tmp_path, "bad", lambda d: _replace_dir(d / "adapter_config.json"))
    _, _, registry = runner_with_cache(tiny_model_dir, root)
    with pytest.raises(AdapterError, match="cannot be read"):
        registry.load(TENANT, "bad")
    assert registry.get(TENANT, "bad") is None  # not an adapter of the store: a 404


def test_rank_over_maximum_and_foreign_base_are_refused(tiny_model_dir, adapter_root, tmp_path, tokenizer):
    runner, _, _ = runner_with_cache(tiny_model_dir, adapter_root)
    shapes = {p: (m.in_features, m.out_features) for p, m in runner.lora_layers.items()}
    with pytest.raises(AdapterError, match="exceeds"):
        AdapterRegistry(adapter_root, [TENANT], shapes, max_rank=8).load(TENANT, "all16")
    wrong = {p: (i + 1, o) for p, (i, o) in shapes.items()}
    with pytest.raises(AdapterError, match="base model mismatch"):
        AdapterRegistry(adapter_root, [TENANT], wrong, max_rank=16).load(TENANT, "attn8")
    fewer = {p: s for p, s in shapes.items() if "layers.1." not in p}
    with pytest.raises(AdapterError, match="does not exist"):
        AdapterRegistry(adapter_root, [TENANT], fewer, max_rank=16).load(TENANT, "attn8")


def test_paths_outside_the_store_are_refused(tiny_model_dir, adapter_root, tmp_path):
    root = tmp_path / "store"
    (root / TENANT).mkdir(parents=True)
    (root / "u").mkdir()
    shutil.copytree(adapter_root / TENANT / "attn8", root / "u" / "theirs")
    os.symlink(adapter_root / TENANT / "attn8", root / TENANT / "escape")  # a symlink out of the store
    os.symlink(root / "u" / "theirs", root / TENANT / "borrowed")  # into another tenant's store
    (root / TENANT / "linked").mkdir()
    shutil.copy(adapter_root / TENANT / "attn8" / "adapter_config.json", root / TENANT / "linked")
    os.symlink(
        adapter_root / TENANT / "attn8" / "adapter_model.safetensors",
        root / TENANT / "linked" / "adapter_model.safetensors",
    )
    _, _, registry = runner_with_cache(tiny_model_dir, root)
    registry.tenants = [TENANT, "u"]
    for name in ("escape", "borrowed"):
        with pytest.raises(AdapterError, match="outside"):
            registry.load(TENANT, name)
        # found with its problem, never read: a request on it is a 400 saying so, the admin list says why
        entry = registry.get(TENANT, name)
        assert "outside" in registry.problem(entry) and name in [e.name for e in registry.list(TENANT)]
        with pytest.raises(AdapterError, match="outside"):
            registry.weights(entry)
    with pytest.raises(AdapterError, match="links outside"):
        registry.weights(registry.get(TENANT, "linked"))
    for path in ("../u/theirs", str(root / "u" / "theirs"), "/etc", "../../x"):
        with pytest.raises(AdapterError, match="outside"):
            registry.load(TENANT, "x", path=path)
    for name in ("../attn8", "a/b", ".."):
        with pytest.raises(AdapterError, match="invalid adapter name"):
            registry.load(TENANT, name)
        assert registry.get(TENANT, name) is None


@pytest.mark.parametrize(
    "slots",
    [
        [0] * 6,
        [0, 0, 1, 1, 2, 2],
        [2, 0, 1, 0, 2, 1],
        [1, -1, 1, 3, -1, 0],
        [-1, -1, 2],
        [0, 0, 0, 1],
        [0, 0, 0, 0, -1],
    ],
    ids=[
        "one-adapter",
        "sorted-equal",
        "shuffled",
        "mixed-with-base",
        "base-and-one",
        "uneven",
        "four-and-base",
    ],
)
def test_grouped_lora_equals_each_token_alone(slots):
    """Every grouping layout (identity, padding, base tokens) gives each token exactly its own
    adapter's x @ A^T @ B^T, computed here token by token."""
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10)
    batch = LoRABatch()
    layer = LoRALinear(base, batch, num_slots=4, max_rank=4, dtype=torch.float32, device="cpu")
    ab = {s: (torch.randn(3 if s % 2 else 4, 12), torch.randn(10, 3 if s % 2 else 4)) for s in range(4)}
    for s, (a, b) in ab.items():
        layer.set_slot(s, a, b)
    x = torch.randn(1, len(slots), 12)
    set_rows(batch, slots, 4, torch.float32, "cpu")
    with torch.no_grad():
        got = layer(x)[0]
        for t, s in enumerate(slots):
            want = base(x[0, t])
            if s >= 0:
                want = want + x[0, t] @ ab[s][0].T @ ab[s][1].T
            torch.testing.assert_close(got[t], want, atol=1e-5, rtol=1e-5)
    identity = (
        slots == sorted(slots) and -1 not in slots and len(set(slots.count(s) for s in set(slots))) == 1
    )
    assert (batch.gather is None) == (identity and max(slots) + 1 == len(set(slots)))
    set_rows(batch, slots, 4, torch.float32, "cpu", max_slots=4, invariant=True)  # the B5 layout
    assert batch.valid.shape[0] >= 2 and batch.valid.shape[1] >= MIN_ROWS
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[0], got, atol=1e-5, rtol=1e-5)
    if max(slots) == 0:  # one adapter slot in all (max_loras 1): whole blocks of MIN_ROWS rows
        set_rows(batch, slots, 4, torch.float32, "cpu", max_slots=1, invariant=True)
        assert batch.valid.shape[0] == 1 and batch.valid.shape[1] % MIN_ROWS == 0
        with torch.no_grad():
            torch.testing.assert_close(layer(x)[0], got, atol=1e-5, rtol=1e-5)
