"""The Triton NF4 kernel (kernels/nf4.py) on the CPU, through Triton's interpreter: the product of
bitsandbytes' own packed weights equals the product with the weights bitsandbytes dequantizes."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
bnb_f = pytest.importorskip("bitsandbytes.functional")


@pytest.fixture(autouse=True)
def interpreter():
    if os.environ.get("TRITON_INTERPRET") != "1":  # conftest sets it without a GPU, before Triton loads
        pytest.skip("Triton's interpreter is off (a GPU is there: tests/gpu runs the kernel)")


def quantized(n: int, k: int, seed: int, nested: bool = True):
    """A random weight [n, k] quantized by bitsandbytes (the GPU/CPU-portable layout, nested absmax)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    packed, qs = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
    return w, packed, qs


class _Weight:  # what nf4_scales reads from a Params4bit
    def __init__(self, qs):
        self.quant_state = qs


@pytest.mark.parametrize("lut", ["shared", "select", "global", "shared8", "bytes"])
@pytest.mark.parametrize(("m", "gemv_rows"), [(1, 1), (3, 4), (5, 1), (16, 1), (32, 1)])
@pytest.mark.parametrize(("n", "k", "programs"), [(96, 256, 1), (64, 1024, 512)])
def test_kernel_equals_the_dequantized_product(m, gemv_rows, n, k, programs, lut, monkeypatch):
    """Both kernels (gemv: multiply and sum; dot: tl.dot), both table readings, with and without
    split-K (programs 1: one program per N block, the output written by the kernel)."""
    from mygpt.kernels import nf4
    from mygpt.kernels.nf4 import nf4_matmul, nf4_scales

    monkeypatch.setattr(nf4, "GEMV_ROWS", gemv_rows)
    for kind in ("gemv", "dot"):
        monkeypatch.setitem(nf4.TILES, kind, {**nf4.TILES[kind], "lut": lut, "programs": programs})
    kind, _, _, _, split = nf4._config(m, n, k, 64)
    assert kind == ("gemv" if m <= gemv_rows else "dot") and (split == 1) == (programs == 1)

    _, packed, qs = quantized(n, k, seed=m + n)
    w = bnb_f.dequantize_4bit(packed, qs).float()  # bitsandbytes' own reading of its bytes
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
    scale = nf4_scales(_Weight(qs))
    got = nf4_matmul(x, packed.view(n, k // 2), scale, qs.code.float())
    want = x @ w.T
    assert got.shape == (m, n) and got.dtype == x.dtype
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("m", [1, 16])
def test_half_precision_input(m):
    """float16 input: the dot kernel (16 rows) multiplies each weight rounded to float16 (bitsandbytes'
    dequantization in the compute dtype), the one-row kernel the float32 weight; the sums are float32,
    the output float16."""
    from mygpt.kernels.nf4 import nf4_matmul, nf4_scales

    n, k = 64, 512
    _, packed, qs = quantized(n, k, seed=5)
    w = bnb_f.dequantize_4bit(packed, qs).float()
    if m > 1:
        w = w.half().float()
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2)).half()
    got = nf4_matmul(x, packed.view(n, k // 2), nf4_scales(_Weight(qs)), qs.code.float())
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), x.float() @ w.T, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("m", [1, 16, 32])
def test_bytes_reading_in_half_precision(m, monkeypatch):
    """The "bytes" reading with a 16-bit input: its table packs each byte's two values in float16 into
    one int32 (the float32 test above takes the int64 pairs of float32 values), and the scale multiplies
    each step's sums. Triton's interpreter multiplies bfloat16 tl.dot operands wrongly (the other dot
    readings fail there too), so bfloat16 is tested on the GPU (tests/gpu/test_nf4_cuda.py)."""
    from mygpt.kernels import nf4

    for kind in ("gemv", "dot"):
        monkeypatch.setitem(nf4.TILES, kind, {**nf4.TILES[kind], "lut": "bytes", "block_k": 64})
    n, k = 96, 512
    _, packed, qs = quantized(n, k, seed=m)
    w = bnb_f.dequantize_4bit(packed, qs).float()
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(3)).half()
    got = nf4.nf4_matmul(x, packed.view(n, k // 2), nf4.nf4_scales(_Weight(qs)), qs.code.float())
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), x.float() @ w.T, rtol=2e-3, atol=3e-3)


def test_bytes_reading_steps_within_a_scale_block(monkeypatch):
    """The bytes reading's K step never spans two scale blocks (one scale a row and step): a tile's
    block_k past the block size is cut to it."""
    from mygpt.kernels import nf4

    monkeypatch.setitem(nf4.TILES, "dot", {**nf4.TILES["dot"], "lut": "bytes", "block_k": 256})
    assert nf4._config(32, 4096, 4096, 64)[3] == 64
    assert nf4._config(32, 4096, 4096, 128)[3] == 128
    n, k = 64, 512
    g = torch.Generator().manual_seed(0)
    packed, qs = bnb_f.quantize_4bit(torch.randn(n, k, generator=g), blocksize=128, quant_type="nf4")
    x = torch.randn(20, k, generator=g)
    got = nf4.nf4_matmul(x, packed.view(n, k // 2), nf4.nf4_scales(_Weight(qs)), qs.code.float())
    torch.testing.assert_close(got, x @ bnb_f.dequantize_4bit(packed, qs).float().T, rtol=1e-4, atol=1e-4)


def test_scales_undo_the_double_quantization_as_bitsandbytes_does():
    from mygpt.kernels.nf4 import nf4_scales

    n, k = 32, 512
    _, packed, qs = quantized(n, k, seed=3)
    assert qs.nested
    w = bnb_f.dequantize_4bit(packed, qs).float()
    scale = nf4_scales(_Weight(qs))
    # every weight is the NF4 value of its nibble times its block's scale: rebuilt from the bytes
    b = packed.view(n, k // 2)
    nibbles = torch.stack([b >> 4, b & 15], dim=-1).view(n, k).long()
    rebuilt = qs.code.float()[nibbles] * scale.repeat_interleave(64, dim=1)
    torch.testing.assert_close(rebuilt, w, rtol=0, atol=1e-6)


def test_product_of_several_layers_and_the_bitsandbytes_fallback(monkeypatch):
    """NF4Product over q/k/v-like layers: the kernel up to MAX_ROWS rows, bitsandbytes beyond; the
    layers keep working on their own with their weights as views of the concatenation."""
    import bitsandbytes as bnb

    from mygpt.kernels import nf4

    monkeypatch.setattr(nf4.NF4Product, "_checked", {})
    torch.manual_seed(0)
    layers = []
    for n in (64, 32, 32):
        lin = torch.nn.Linear(256, n, bias=False)
        q = bnb.nn.Linear4bit(256, n, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4")
        q.weight = q.weight._quantize("cpu")
        layers.append(q)
    dense = [bnb_f.dequantize_4bit(q.weight.data, q.weight.quant_state).float() for q in layers]
    assert nf4.available(torch.device("cpu")) and nf4.supported(layers)
    product = nf4.NF4Product(layers)
    assert all(q.weight.data.data_ptr() >= product.packed.data_ptr() for q in layers)  # views, no copy
    for rows in (3, nf4.MAX_ROWS + 1):
        x = torch.randn(2, rows, 256)
        want = torch.cat([x @ w.T for w in dense], dim=-1)
        torch.testing.assert_close(product(x), want, rtol=1e-4, atol=1e-4)
    assert (
        all(nf4.NF4Product._checked.values()) and nf4.NF4Product._checked
    )  # the kernel was checked and used


def test_a_kernel_that_disagrees_is_not_used(monkeypatch):
    from mygpt.kernels import nf4

    monkeypatch.setattr(nf4.NF4Product, "_checked", {})
    monkeypatch.setattr(nf4, "nf4_matmul", lambda x, *a: torch.zeros(x.shape[0], 64))
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(256, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(torch.randn(64, 256) * 0.05, requires_grad=False, quant_type="nf4")
    q.weight = q.weight._quantize("cpu")
    w = bnb_f.dequantize_4bit(q.weight.data, q.weight.quant_state).float()
    product = nf4.NF4Product([q])
    x = torch.randn(2, 256)
    torch.testing.assert_close(product(x), x @ w.T, rtol=1e-4, atol=1e-4)
    assert list(nf4.NF4Product._checked.values()) == [False]


def nf4_layers(sizes: tuple[int, ...] = (64, 32, 32), k: int = 256) -> list:
    """q/k/v-like bitsandbytes NF4 layers (float32 compute, the GPU layout) over one input width."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layers = []
    for n in sizes:
        q = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(torch.randn(n, k) * 0.05, requires_grad=False, quant_type="nf4")
        q.weight = q.weight._quantize("cpu")
        q.support_avx512bf16_for_cpu = False  # keep the GPU layout (see keep_gpu_layout)
        layers.append(q)
    return layers


def spy_paths(monkeypatch) -> list[str]:
    """Which path each NF4 product call ran, in order (the checks' calls too)."""
    from mygpt.kernels import nf4

    ran: list[str] = []
    kernel, fused, bnb = nf4.nf4_matmul, nf4.NF4Product._fused, nf4.NF4Product._bnb
    monkeypatch.setattr(nf4, "nf4_matmul", lambda x, *a: ran.append("kernel") or kernel(x, *a))
    monkeypatch.setattr(nf4.NF4Product, "_fused", lambda self, x: ran.append("fused") or fused(self, x))
    monkeypatch.setattr(nf4.NF4Product, "_bnb", lambda self, x: ran.append("layers") or bnb(self, x))
    return ran


def scripted_timer(ran: list[str], fastest: dict[int, str]):
    """A timer for NF4Product.choose: runs the call once and says 1 s for the path `fastest` names at
    that many rows, 2 s for the others."""

    def timer(fn, rows: int) -> float:
        ran.clear()
        fn()
        assert len(set(ran)) == 1, ran  # one path a call (on the product and its peers)
        return 1.0 if ran[0] == fastest[rows] else 2.0

    return timer


def test_each_row_count_takes_the_path_measured_fastest(monkeypatch):
    """NF4Product.choose times bitsandbytes' op once over the concatenation ("fused") and the layers
    one by one at each size given and at PROMPT_ROWS, and the kernel up to MAX_ROWS; the plan keeps
    the sizes where the path changes, and a product of m rows takes the path of the next one up (the
    last for every larger m). Every path gives the dequantized product."""
    from mygpt.kernels import nf4

    monkeypatch.setattr(nf4.NF4Product, "_checked", {})
    layers = nf4_layers()
    dense = torch.cat([bnb_f.dequantize_4bit(q.weight.data, q.weight.quant_state).float() for q in layers])
    product = nf4.NF4Product(layers)
    assert [product.path(m) for m in (1, 32, 33)] == ["kernel", "kernel", "layers"]  # before choose()
    ran = spy_paths(monkeypatch)
    fastest = {1: "layers", 2: "layers", 4: "kernel", 8: "kernel", 16: "fused", 32: "fused", 64: "layers",
               512: "layers"}  # fmt: skip
    plan = product.choose(torch.float32, [1, 2, 4, 8, 16, 32, 64], scripted_timer(ran, fastest))
    assert plan == [(2, "layers"), (8, "kernel"), (32, "fused"), (512, "layers")] and product.paths == plan
    assert set(product.timings) == set(fastest)
    assert all(set(product.timings[m]) == {"fused", "layers"} for m in (64, 512))  # past MAX_ROWS
    assert all(set(product.timings[m]) == set(nf4.PATHS) for m in (1, 2, 4, 8, 16, 32))
    for m, way in ((1, "layers"), (3, "kernel"), (8, "kernel"), (9, "fused"), (32, "fused"), (33, "layers"),
                   (600, "layers")):  # fmt: skip
        x = torch.randn(m, 256)
        ran.clear()
        got = product(x)
        assert product.path(m) == way and ran == [way], (m, ran)
        torch.testing.assert_close(got, x @ dense.T, rtol=1e-4, atol=1e-4)
    # the last entry's path for every larger m
    product.paths = nf4.plan_of([(8, "kernel"), (512, "fused")])
    assert [product.path(m) for m in (8, 9, 32, 33, 4096)] == ["kernel", "fused", "fused", "fused", "fused"]
    product.paths = [(8, "kernel")]  # (by hand, not plan_of's: the kernel still never past MAX_ROWS)
    assert [product.path(m) for m in (8, nf4.MAX_ROWS, nf4.MAX_ROWS + 1)] == ["kernel", "kernel", "layers"]
    product.choose(torch.float32, [4], scripted_timer(ran, {4: "layers", 512: "layers"}))
    assert set(product.timings) == {4, 512}  # this plan's sizes only


def test_a_plan_keeps_the_changes_of_path_and_the_kernel_within_its_rows():
    from mygpt.kernels import nf4

    assert nf4.plan_of([(1, "fused"), (8, "fused"), (512, "fused")]) == [(512, "fused")]  # one path: no band
    assert nf4.plan_of([(1, "kernel"), (4, "layers"), (8, "layers"), (512, "fused")]) == [
        (1, "kernel"), (8, "layers"), (512, "fused")
    ]  # fmt: skip
    assert nf4.plan_of([(4, "kernel"), (32, "kernel")]) == [(32, "kernel"), (33, "layers")]
    with pytest.raises(ValueError, match="at most"):
        nf4.plan_of([(4, "fused"), (nf4.MAX_ROWS + 1, "kernel")])


@pytest.mark.parametrize(("m", "programs"), [(65, 1), (150, 512)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bytes_kernel_takes_any_rows_in_blocks(m, programs, dtype, monkeypatch):
    """The bytes kernel's rows go in blocks of BYTES_BLOCK_M (a grid axis), so it takes a prompt
    step's rows too: past MAX_ROWS, with and without split-K (the programs count the row blocks)."""
    from mygpt.kernels import nf4

    monkeypatch.setitem(
        nf4.TILES, "dot", {**nf4.TILES["dot"], "lut": "bytes", "block_k": 64, "programs": programs}
    )
    n, k = 96, 512
    kind, block_m, _, _, split = nf4._config(m, n, k, 64, torch.empty(0, dtype=dtype).element_size())
    full = nf4.BYTES_BLOCK_M if dtype == torch.float16 else nf4.BYTES_BLOCK_M // 2  # float32: half (spills)
    assert (kind, block_m) == ("dot", full) and (split == 1) == (programs == 1)
    _, packed, qs = quantized(n, k, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(4)).to(dtype)
    got = nf4.nf4_matmul(x, packed.view(n, k // 2), nf4.nf4_scales(_Weight(qs)), qs.code.float())
    want = x.float() @ bnb_f.dequantize_4bit(packed, qs).float().T
    tol = 1e-4 if dtype == torch.float32 else 3e-3
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_with_the_bytes_kernel_plans_may_take_it_for_any_rows(monkeypatch):
    """Where the dot tile reads "bytes", the kernel has no row limit (kernel_rows): choose() times it at
    PROMPT_ROWS too, a plan may end with it (every larger m), and without a plan it takes every m."""
    from mygpt.kernels import nf4

    monkeypatch.setattr(nf4.NF4Product, "_checked", {})
    monkeypatch.setitem(nf4.TILES, "dot", {**nf4.TILES["dot"], "lut": "bytes", "block_k": 64})
    assert nf4.kernel_rows() > nf4.PROMPT_ROWS
    assert nf4.plan_of([(4, "layers"), (32, "kernel"), (512, "kernel")]) == [(4, "layers"), (512, "kernel")]
    product = nf4.NF4Product(nf4_layers())
    assert product.path(4096) == "kernel"
    ran = spy_paths(monkeypatch)
    plan = product.choose(
        torch.float32, [1, 32], scripted_timer(ran, {1: "layers", 32: "kernel", 512: "kernel"})
    )
    assert plan == [(1, "layers"), (512, "kernel")] and set(product.timings[512]) == set(nf4.PATHS)
    assert [product.path(m) for m in (1, 2, 600, 5000)] == ["layers", "kernel", "kernel", "kernel"]
    checked = []  # verify(), before compiled layers call the kernel: each configuration's most rows
    monkeypatch.setattr(nf4.NF4Product, "_kernel_ok", lambda self, x: checked.append(len(x)) or True)
    assert product.verify(torch.float32) and product.compiled_ok
    n, k = product.packed.shape[0], product.packed.shape[1] * 2
    assert checked == nf4.configurations_of(n, k, 64, 4) and checked[:5] == [1, 2, 16, 17, 32]
    monkeypatch.setitem(nf4.TILES, "dot", {**nf4.TILES["dot"], "lut": "shared"})  # tiles changed after
    assert [product.path(m) for m in (32, 33)] == ["kernel", "layers"]  # the plane kernels' rows only
    assert not product.compiled_ok  # verified for other settings


@pytest.mark.parametrize("lut", ["shared", "bytes"])
@pytest.mark.parametrize(
    ("n", "k", "itemsize"), [(4096, 4096, 2), (28672, 4096, 2), (6144, 4096, 4), (512, 256, 2)]
)
def test_verify_covers_every_configuration_a_step_takes(n, k, itemsize, lut, monkeypatch):
    """configurations_of (verify's rows): every m a product can take runs a configuration checked at an
    m of the same kind, divisible by 16 or not (Triton compiles the two apart)."""
    from mygpt.kernels import nf4

    for kind in ("gemv", "dot"):
        monkeypatch.setitem(nf4.TILES, kind, {**nf4.TILES[kind], "lut": lut, "block_k": 64})
    rows = nf4.configurations_of(n, k, 64, itemsize)
    covered = {(nf4._config(r, n, k, 64, itemsize), r % 16 == 0) for r in rows}
    for m in range(1, min(nf4.kernel_rows(), 9000) + 1):
        assert (nf4._config(m, n, k, 64, itemsize), m % 16 == 0) in covered, m
    assert len(covered) == len(rows)  # no two rows for one configuration and kind of m
    if lut == "shared":
        assert rows == [1, 2, 16, 17, 32]


def test_the_plane_kernels_refuse_more_rows_than_theirs():
    from mygpt.kernels import nf4

    _, packed, qs = quantized(64, 256, seed=0)
    with pytest.raises(ValueError, match="at most 32 rows"):
        nf4.nf4_matmul(
            torch.randn(33, 256), packed.view(64, 128), nf4.nf4_scales(_Weight(qs)), qs.code.float()
        )


def test_a_path_that_disagrees_is_never_chosen(monkeypatch):
    """A fused op that gives other products than the layers is not kept, however fast; nor is the
    kernel where it is turned off."""
    from mygpt.kernels import nf4

    monkeypatch.setattr(nf4.NF4Product, "_checked", {})
    product = nf4.NF4Product(nf4_layers())
    ran = spy_paths(monkeypatch)
    wrong = nf4.NF4Product._fused
    monkeypatch.setattr(nf4.NF4Product, "_fused", lambda self, x: wrong(self, x) * 1.5)
    plan = product.choose(torch.float32, [1, 4], scripted_timer(ran, {1: "fused", 4: "fused", 512: "fused"}))
    assert all(way != "fused" for _, way in plan)
    product.enabled = False
    plan = product.choose(torch.float32, [1], scripted_timer(ran, {1: "kernel", 512: "layers"}))
    assert plan == [(512, "layers")] and set(product.timings[1]) == {"layers"}


def test_plan_in_words():
    from mygpt.engine.runner import _plan_text

    plan = [(1, "layers"), (2, "layers"), (4, "kernel"), (8, "kernel"), (16, "fused"), (32, "fused"),
            (512, "layers")]  # fmt: skip
    assert _plan_text(plan) == "layers at 1-2 rows, kernel at 3-8 rows, fused at 9-32 rows, layers past 32"
    assert _plan_text([(1, "kernel"), (512, "fused")]) == "kernel at 1 row, fused past 1"
    assert _plan_text([(1, "fused"), (8, "fused"), (512, "fused")]) == "fused at every size"


def test_runner_times_one_plan_per_product_shape(monkeypatch):
    """runner.choose_nf4_paths measures the first layer's four products, each timed call running the
    other layer's product of the shape too, and gives every layer's product of the same shape that
    plan; the model's logits stay the dequantized model's on each path, with an adapter too. On a CPU
    the runner measures nothing by itself."""
    from mygpt.engine.runner import ModelRunner
    from mygpt.kernels import nf4

    monkeypatch.setattr(nf4.NF4Product, "_checked", {})
    quant, dense = nf4_llama()
    keep_gpu_layout(quant)
    kw = {"num_slots": 4, "max_len": 64, "dtype": torch.float32, "max_loras": 2}
    runner, plain = ModelRunner(quant, nf4_kernel=True, **kw), ModelRunner(dense, **kw)
    products = runner._nf4_products()
    assert len(products) == 8 and all(p.paths is None for p in products)
    ran = spy_paths(monkeypatch)
    timed = []

    def timer(fn, rows):
        timed.append(rows)
        seconds = scripted_timer(ran, {1: "kernel", 2: "layers", 4: "fused", 512: "fused"})(fn, rows)
        assert len(ran) == 2  # this layer's product and the other layer's
        return seconds

    plans = runner.choose_nf4_paths([1, 2, 4], timer)
    # q/k/v (256 + 2 x 128 outputs), o, gate/up, down: each timed once, at 4 sizes, by its paths
    assert set(plans) == {(512, 256), (256, 256), (1024, 256), (256, 512)}
    assert len(timed) == 4 * (3 * 3 + 2)
    want = [(1, "kernel"), (2, "layers"), (512, "fused")]
    assert all(plan == want for plan in plans.values()) and all(p.paths == want for p in products)
    assert runner.nf4_changes() == [1, 2]
    g = torch.Generator().manual_seed(1)
    for layer_q, layer_d in zip(runner.lora_layers.values(), plain.lora_layers.values(), strict=True):
        a, b = (
            torch.randn(4, layer_q.in_features, generator=g),
            torch.randn(layer_q.out_features, 4, generator=g),
        )
        layer_q.set_slot(1, a * 0.1, b * 0.1)
        layer_d.set_slot(1, a * 0.1, b * 0.1)
    prompt = torch.randint(0, 128, (40,), generator=g).tolist()
    ran.clear()
    got, want_logits = (r.prefill(0, prompt, 0, lora_slot=1) for r in (runner, plain))  # 40 rows: fused
    assert set(ran) == {"fused"} and float((got - want_logits).norm() / want_logits.norm()) < 1e-4
    for args in (
        ([0], [5], [40], [1]),
        ([0, 1], [5, 9], [41, 3], [1, -1]),
        ([0, 1, 2], [1, 2, 3], [42, 4, 0], [1, 1, -1]),
    ):
        ran.clear()
        got, want_logits = runner.decode(*args), plain.decode(*args)
        torch.testing.assert_close(got, want_logits, rtol=1e-4, atol=1e-4)
        assert set(ran) == {{1: "kernel", 2: "layers", 3: "fused"}[len(args[0])]}, ran


def test_available_on_a_cpu_only_in_the_interpreter(monkeypatch):
    from mygpt.kernels import nf4

    assert nf4.available(torch.device("cpu"))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not nf4.available(torch.device("cpu"))


def nf4_llama():
    """A tiny random Llama with NF4 projections (bitsandbytes' GPU layout, float32 compute) and the same
    model with those weights dequantized: (quantized, dense)."""
    import bitsandbytes as bnb
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    quant, dense = LlamaForCausalLM(config).eval(), LlamaForCausalLM(config).eval()
    for lq, ld in zip(quant.model.layers, dense.model.layers, strict=True):
        for pq, pd in ((lq.self_attn, ld.self_attn), (lq.mlp, ld.mlp)):
            for name, lin in list(pq.named_children()):
                if isinstance(lin, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(
                        lin.in_features, lin.out_features, bias=False, compute_dtype=torch.float32,
                        quant_type="nf4", compress_statistics=True,
                    )  # fmt: skip
                    q.weight = bnb.nn.Params4bit(
                        lin.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True
                    )._quantize("cpu")
                    setattr(pq, name, q)
                    w = bnb_f.dequantize_4bit(q.weight.data, q.weight.quant_state).float()
                    getattr(pd, name).weight.data.copy_(w)
    dense.load_state_dict({k: v for k, v in quant.state_dict().items() if "proj" not in k}, strict=False)
    return quant, dense


def test_runner_with_the_kernel_equals_the_dequantized_model(monkeypatch):
    """A tiny NF4 Llama through the ModelRunner with the kernel in every projection (q/k/v and gate/up
    concatenated) gives the logits of the same model with its weights dequantized: prefill (more rows
    than MAX_ROWS: bitsandbytes) and decode steps (the kernel), with and without adapters."""
    from mygpt.engine.runner import ModelRunner
    from mygpt.kernels import nf4

    monkeypatch.setattr(nf4.NF4Product, "_checked", {})
    quant, dense = nf4_llama()
    runners = [
        ModelRunner(m, num_slots=4, max_len=64, dtype=torch.float32, max_loras=2, nf4_kernel=True)
        for m in (quant, dense)
    ]
    assert runners[0].nf4_kernel(True) == 8 and runners[1].nf4_kernel(True) == 0  # 4 products a layer
    g = torch.Generator().manual_seed(1)
    for layer_q, layer_d in zip(
        runners[0].lora_layers.values(), runners[1].lora_layers.values(), strict=True
    ):
        a = torch.randn(4, layer_q.in_features, generator=g) * 0.1
        b = torch.randn(layer_q.out_features, 4, generator=g) * 0.1
        layer_q.set_slot(1, a, b)
        layer_d.set_slot(1, a, b)
    prompt = torch.randint(0, 128, (40,), generator=g).tolist()
    for r in runners:  # rows <= MAX_ROWS: the kernel; float32 throughout, as the dense model
        r.prefill(1, prompt[:7], 0)
    got = [r.prefill(0, prompt[:20], 0, lora_slot=1) for r in runners]
    torch.testing.assert_close(got[0], got[1], rtol=1e-4, atol=1e-4)
    steps = [r.decode([0, 1], [5, 9], [20, 7], [1, -1]) for r in runners]
    torch.testing.assert_close(steps[0], steps[1], rtol=1e-4, atol=1e-4)
    assert nf4.NF4Product._checked and all(nf4.NF4Product._checked.values())
    assert runners[0].nf4_kernel(False) == 8  # off: the layers one by one, as without the kernel
    assert runners[0]._proj[0].qkv.joined(torch.zeros(1, 1, 256)) is None
    runners[0].nf4_kernel(True)
    # 40 rows: bitsandbytes' own product, which on a CPU multiplies in bfloat16
    got = [r.prefill(2, prompt, 0, lora_slot=1) for r in runners]
    assert float((got[0] - got[1]).norm() / got[1].norm()) < 1e-2
    assert (
        ModelRunner(quant, num_slots=4, max_len=64, dtype=torch.float32).nf4_kernel(True) == 0
    )  # opt-in only


def keep_gpu_layout(model) -> None:
    """bitsandbytes repacks a layer's weight for its CPU kernel on its first forward where the CPU has
    AVX512-BF16, in the middle of compiled code; keep the GPU layout, the one the kernel reads."""
    from bitsandbytes.nn import Linear4bit

    for m in model.modules():
        if isinstance(m, Linear4bit):
            m.support_avx512bf16_for_cpu = False


def test_compiled_layers_call_the_kernel_as_one_op(monkeypatch):
    """nf4_kernel with compile_layers (and the LoRA kernels): every product shape is checked in its three
    configurations before anything compiles (NF4Product.verify); compiled decode steps (1 row: gemv, 3:
    dot) and compiled prompt pieces up to MAX_ROWS tokens call the kernel as one opaque op, longer
    prompts bitsandbytes; the logits of the dequantized model, uncompiled, and no graph break."""
    from torch._dynamo.utils import counters

    from mygpt.engine.runner import ModelRunner
    from mygpt.kernels import nf4

    monkeypatch.setattr(nf4.NF4Product, "_checked", {})
    quant, dense = nf4_llama()
    keep_gpu_layout(quant)
    kw = {"num_slots": 4, "max_len": 64, "dtype": torch.float32, "max_loras": 2}
    compiled = ModelRunner(
        quant, nf4_kernel=True, static_decode=True, compile_layers=True, lora_kernel=True, **kw
    )
    plain = ModelRunner(dense, **kw)
    assert compiled.compiled and compiled.lora_kernel
    products = compiled._nf4_products()
    assert len(products) == 8 and all(p.compiled_ok for p in products)
    checked = nf4.NF4Product._checked
    assert len(checked) == 4 * 3 and all(checked.values())  # q/k/v, o, gate/up, down x 3 configurations
    g = torch.Generator().manual_seed(1)
    for layer_q, layer_d in zip(compiled.lora_layers.values(), plain.lora_layers.values(), strict=True):
        a = torch.randn(4, layer_q.in_features, generator=g) * 0.1
        b = torch.randn(layer_q.out_features, 4, generator=g) * 0.1
        layer_q.set_slot(1, a, b)
        layer_d.set_slot(1, a, b)
    rows, real = [], nf4.nf4_matmul
    monkeypatch.setattr(nf4, "nf4_matmul", lambda x, *a: rows.append(x.shape[0]) or real(x, *a))
    torch._dynamo.reset()
    breaks, graphs = sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]
    prompt = torch.randint(0, 128, (40,), generator=g).tolist()
    for slot, n, lora in ((0, 20, 1), (1, 7, -1)):  # compiled pieces, the kernel
        got, want = (r.prefill(slot, prompt[:n], 0, lora) for r in (compiled, plain))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for args in (([0], [5], [20], [1]), ([0, 1, 3], [5, 9, 2], [21, 7, 0], [1, -1, 1])):
        got, want = compiled.decode(*args), plain.decode(*args)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert sorted(set(rows)) == [1, 4, 7, 20] and compiled.decoder.stats.eager == 2  # 3 rows: bucket 4
    # one compile serves both layers (no product is guarded as its own): the pieces (q/k/v, the rest),
    # with and without an adapter, and the decode layer at 1 row and at 4
    assert counters["stats"]["unique_graphs"] - graphs == 2 * 2 + 2
    rows.clear()
    got, want = (r.prefill(2, prompt, 0, 1) for r in (compiled, plain))  # 40 rows: bitsandbytes (bfloat16)
    assert float((got - want).norm() / want.norm()) < 1e-2 and not rows
    assert sum(counters["graph_break"].values()) == breaks and compiled.compiled
    # settings changed after the check (gpu_check's sweep does): compiled code takes bitsandbytes
    monkeypatch.setitem(nf4.TILES, "gemv", {**nf4.TILES["gemv"], "block_k": 128})
    assert not any(p.compiled_ok for p in products)
    got, want = compiled.decode([1], [3], [7], [-1]), plain.decode([1], [3], [7], [-1])
    assert float((got - want).norm() / want.norm()) < 1e-2 and not rows and compiled.compiled
    # a plan (choose_nf4_paths) of bitsandbytes' op once a product: compiled code follows it (one op a
    # product, 4 a layer, where the layers one by one take 7)
    for args in (([1], [3], [8], [-1]), ([0, 1], [6, 3], [22, 9], [1, -1])):
        for paths, ops in ((None, 7), ([(nf4.MAX_ROWS, "fused"), (nf4.PROMPT_ROWS, "fused")], 4)):
            for p in products:
                p.paths = paths
            compiled.decode(*args)  # a new plan or batch size: compiles again (guarded on the plan)
            with torch.profiler.profile() as prof:
                got = compiled.decode(*args)
            calls = sum(e.name == "bitsandbytes::gemm_4bit" for e in prof.events())
            assert calls == ops * 2, (paths, calls)  # 2 layers
            want = plain.decode(*args)
            assert float((got - want).norm() / want.norm()) < 1e-2 and compiled.compiled


def test_compiled_prompt_pieces_take_the_bytes_kernel_past_max_rows(monkeypatch):
    """With the bytes tiles, compiled prompt pieces past MAX_ROWS tokens call the kernel too (its rows
    in blocks), verified at its row blocks and a prompt step's rows first; the dequantized model's
    logits, no graph break."""
    from torch._dynamo.utils import counters

    from mygpt.engine.runner import ModelRunner
    from mygpt.kernels import nf4

    monkeypatch.setattr(nf4.NF4Product, "_checked", {})
    for kind in ("gemv", "dot"):
        monkeypatch.setitem(nf4.TILES, kind, {**nf4.TILES[kind], "lut": "bytes", "block_k": 64})
    quant, dense = nf4_llama()
    keep_gpu_layout(quant)
    kw = {"num_slots": 2, "max_len": 64, "dtype": torch.float32}
    compiled = ModelRunner(quant, nf4_kernel=True, static_decode=True, compile_layers=True, **kw)
    plain = ModelRunner(dense, **kw)
    assert all(p.compiled_ok for p in compiled._nf4_products())
    rows, real = [], nf4.nf4_matmul
    monkeypatch.setattr(nf4, "nf4_matmul", lambda x, *a: rows.append(x.shape[0]) or real(x, *a))
    torch._dynamo.reset()
    breaks = sum(counters["graph_break"].values())
    prompt = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    got, want = (r.prefill(0, prompt, 0) for r in (compiled, plain))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert set(rows) == {40} and sum(counters["graph_break"].values()) == breaks and compiled.compiled


@pytest.mark.parametrize(
    "paths",
    [None, [(512, "fused")], [(1, "kernel"), (8, "fused"), (512, "layers")]],
    ids=["no plan", "one path", "three"],
)
def test_warm_compile_covers_the_nf4_kernels_rows(paths, monkeypatch):
    """With the NF4 kernel in compiled layers, the start-up warm-up compiles the kinds of step on both
    sides of MAX_ROWS, and with a measured plan (runner.choose_nf4_paths) on both sides of each change
    of path: afterwards decode steps and prompts of any length compile nothing (without the LoRA
    kernels, whose warm-up past their 128 tokens would cover it here)."""
    from torch._dynamo.utils import counters

    from mygpt.engine.runner import ModelRunner
    from mygpt.kernels import nf4

    monkeypatch.setattr(nf4.NF4Product, "_checked", {})
    torch._dynamo.reset()
    quant, _ = nf4_llama()
    keep_gpu_layout(quant)
    runner = ModelRunner(quant, num_slots=4, max_len=64, dtype=torch.float32, max_loras=2, nf4_kernel=True,
                         static_decode=True, compile_layers=True)  # fmt: skip
    for p in runner._nf4_products():
        p.paths = paths
    assert runner.decoder.warm_compile() > 0
    graphs = counters["stats"]["unique_graphs"]
    for slot, n, lora in ((0, 40, 1), (1, 20, -1), (2, 50, -1), (3, 9, 0)):
        runner.prefill(slot, [5] * n, 0, lora)
    runner.prefill(0, [5, 6, 7], 40, 1)
    runner.decode([0], [6], [43], [1])
    runner.decode([0, 1, 2], [6, 7, 8], [44, 20, 50], [1, -1, 0])
    runner.decode([0, 1], [6, 7], [45, 21], [1, -1])
    assert counters["stats"]["unique_graphs"] == graphs and runner.compiled
    # the plan's bands: a plan of one path has none, so it compiles the kinds of step without a plan
    assert runner.nf4_changes() == ([] if paths is None or len(paths) == 1 else [1, 8])


def test_gpu_checks_tile_sweep_keeps_the_fastest_of_each_kind(monkeypatch):
    """scripts/gpu_check.py's nf4_bench on the CPU (host-timed, the interpreter): every tile checked
    against bitsandbytes and timed, the fastest of each kind left in TILES, a row per row count."""
    import importlib.util
    from pathlib import Path

    from mygpt.engine.runner import ModelRunner
    from mygpt.kernels import nf4

    path = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.setattr(nf4.NF4Product, "_checked", {})
    for kind in nf4.TILES:
        monkeypatch.setitem(nf4.TILES, kind, dict(nf4.TILES[kind]))
    tiles = {
        "gemv": [(16, 256, 4, 3, 264, "shared"), (32, 256, 2, 3, 1, "select"), (64, 64, 4, 3, 264, "bytes")],
        "dot": [(64, 256, 4, 3, 512, "select"), (32, 128, 4, 3, 1, "shared"), (64, 64, 4, 3, 512, "bytes")],
    }
    monkeypatch.setattr(gpu_check, "NF4_TILES", tiles)
    runner = ModelRunner(nf4_llama()[0], num_slots=2, max_len=64, dtype=torch.float32, nf4_kernel=True)
    rows, report = [], {}
    gpu_check.nf4_bench(runner, rows, report)
    got = report["nf4_bench"]
    assert set(got["bnb"]) == {f"{p} m{m}" for p in ("qkv", "o", "gate_up", "down") for m in (1, 8, 32)}
    for kind, rows_of in (("gemv", (1,)), ("dot", (8, 32))):
        assert set(got[kind]) == {str(t) for t in tiles[kind]}
        for times in got[kind].values():  # every tile agreed with bitsandbytes and was timed
            assert set(times) == {f"{p} m{m}" for p in ("qkv", "o", "gate_up", "down") for m in rows_of}
        best = min(got[kind], key=lambda t: sum(got[kind][t].values()))
        assert got["best"][kind] == best
        kept = tuple(
            nf4.TILES[kind][k] for k in ("block_n", "block_k", "num_warps", "num_stages", "programs", "lut")
        )
        assert str(kept) == best
    assert set(got["fused"]) == set(got["bnb"])  # bitsandbytes once a product, where it agrees (here all)
    assert [r[0].split(":")[0] for r in rows[:3]] == [
        f"one layer's 4-bit products, {m} rows" for m in (1, 8, 32)
    ]
    # the runner's plan measured again with the tiles kept: one per product, in words
    assert set(got["paths"]) == {"qkv", "o", "gate_up", "down"}
    assert set(got["path_us"]["qkv"]) == {1, 2, nf4.MAX_ROWS, nf4.PROMPT_ROWS}  # the timings behind them
    assert set(got["path_us"]["qkv"][1]) == set(nf4.PATHS)
    products = runner._nf4_products()
    assert set(products[0].timings) == {1, 2, nf4.MAX_ROWS, nf4.PROMPT_ROWS}  # 2 slots' batch sizes
    names = ["qkv", "o", "gate_up", "down"] * 2  # the two layers' products
    assert all(p.paths and p.paths == got["paths"][name] for p, name in zip(products, names, strict=True))
    assert [r[0] for r in rows[3:]] == [
        f"  the engine's path for {p} (measured at start-up)" for p in ("qkv", "o", "gate_up", "down")
    ] + [f"one layer's 4-bit products, {nf4.PROMPT_ROWS} rows, eager (us)"]
    # (the kernel at a prompt step's rows where the sweep kept a bytes tile for the dot)
    bytes_kept = nf4.TILES["dot"]["lut"] == "bytes"
    assert "fused " in rows[-1][1] and "layers " in rows[-1][1] and ("kernel " in rows[-1][1]) == bytes_kept
    for m in (1, 8, 32):  # the bandwidth: the layer's bytes over the summed microseconds, in TB/s
        kind = "gemv" if m == 1 else "dot"
        us = sum(v for k, v in got[kind][got["best"][kind]].items() if k.endswith(f" m{m}"))
        assert got["tb_per_s"][f"m{m}"][0] == pytest.approx(got["layer_bytes"] / us / 1e6)


def test_every_tile_compiles_for_an_h100_without_spilling():
    """scripts/kernel_sass.py --check: the default tiles and gpu_check's sweep, compiled for sm_90 by
    Triton's own ptxas (no GPU needed; in a process of its own, Triton picks compiled or interpreted
    when it is imported), in bfloat16 as the engine runs them: none spills registers to local memory,
    and the shared-memory table costs at most MAX_PER_WEIGHT instructions of the K loop per weight."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton has no ptxas")
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root / "server")
    done = subprocess.run(
        [sys.executable, str(root / "scripts" / "kernel_sass.py"), "--check"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = [line for line in done.stdout.splitlines() if line.startswith(("gemv", "dot"))]
    assert len(table) >= 20  # 8 gemv tiles at 1 row, 8 dot tiles at 16 and 32 rows


def test_no_rows_and_tiles_that_are_no_power_of_two(monkeypatch):
    from mygpt.kernels import nf4

    _, packed, qs = quantized(64, 256, seed=1)
    scale = nf4.nf4_scales(_Weight(qs))
    out = nf4.nf4_matmul(torch.zeros(0, 256), packed.view(64, 128), scale, qs.code.float())
    assert out.shape == (0, 64)
    monkeypatch.setitem(nf4.TILES, "dot", {**nf4.TILES["dot"], "block_k": 384})
    with pytest.raises(ValueError, match="power of two"):
        nf4.nf4_matmul(torch.zeros(8, 256), packed.view(64, 128), scale, qs.code.float())
