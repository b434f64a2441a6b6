"""The Triton NF4 kernel on a CUDA device against bitsandbytes' own product (skipped without one)."""

from __future__ import annotations

import pytest
import torch
from test_cuda_graphs import model

pytestmark = pytest.mark.gpu


def replayed(fn):
    """fn's output captured in a CUDA graph (kernels.capture) and replayed once."""
    from mygpt.kernels import capture

    graph, out = capture(fn)
    graph.replay()
    torch.cuda.synchronize()
    return out


def layer(n: int, k: int, dtype: torch.dtype, seed: int):
    import bitsandbytes as bnb

    g = torch.Generator().manual_seed(seed)
    q = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(
        torch.randn(n, k, generator=g) * 0.02, requires_grad=False, quant_type="nf4", compress_statistics=True
    )
    return q.cuda()


@pytest.mark.parametrize("lut", ["shared", "select", "global", "shared8", "bytes"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("n", "k"), [(1024, 4096), (4096, 14336), (6144, 4096)])
def test_kernel_equals_bitsandbytes(dtype, n, k, lut, monkeypatch):
    from mygpt.kernels import nf4
    from mygpt.kernels.nf4 import nf4_matmul, nf4_scales

    for kind in nf4.TILES:
        monkeypatch.setitem(nf4.TILES, kind, {**nf4.TILES[kind], "lut": lut})

    q = layer(n, k, dtype, seed=n)
    w = q.weight
    scale = nf4_scales(w)
    rows = (1, 3, 16, 17, 32) + ((64, 65, 512) if lut == "bytes" else ())  # bytes: a prompt step's rows too
    for m in rows:
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        got = nf4_matmul(x, w.data.view(n, k // 2), scale, w.quant_state.code.float())
        want = q(x)
        err = float((got.float() - want.float()).norm() / want.float().norm())
        assert err < (1e-2 if dtype == torch.bfloat16 else 1e-5), (m, err)


def test_product_in_a_cuda_graph_replays_as_run_eagerly():
    from mygpt.kernels import nf4

    layers = [layer(n, 4096, torch.bfloat16, seed=n) for n in (4096, 1024, 1024)]
    product = nf4.NF4Product(layers)
    x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    eager = product(x)  # checks the kernel against bitsandbytes once, then runs it
    assert all(nf4.NF4Product._checked.values())
    assert torch.equal(replayed(lambda: product(x)), eager)  # same kernels, same inputs: the same bits
    parts = torch.cat([q(x) for q in layers], dim=-1)  # the layers on their own, weights now views
    assert float((parts.float() - eager.float()).norm() / parts.float().norm()) < 1e-2


def test_runner_times_each_products_path_on_the_device():
    """With nf4_kernel on a GPU the runner times its products' paths when it starts (the decode sizes
    inside CUDA graphs, PROMPT_ROWS eagerly): every product gets the first layer's plan of its shape,
    and the graphed steps that follow it give the logits of bitsandbytes' layers."""
    from mygpt.engine.runner import ModelRunner
    from mygpt.kernels import nf4

    kw = {"num_slots": 8, "max_len": 128, "dtype": torch.float32, "cuda_graphs": True}
    chosen = ModelRunner(model(nf4=True, hidden=256), nf4_kernel=True, **kw)
    plain = ModelRunner(model(nf4=True, hidden=256), **kw)
    products = chosen._nf4_products()
    assert len(products) == 8 and not plain._nf4_products()
    sizes = [1, 2, 4, 8, nf4.MAX_ROWS, nf4.PROMPT_ROWS]  # the decoder's batch sizes, MAX_ROWS, a prompt step
    for first, second in zip(products[:4], products[4:], strict=True):  # each shape: the first layer's timed
        assert set(first.timings) == set(sizes) and not second.timings and first.paths == second.paths
        assert all(0 < t < 1 for ts in first.timings.values() for t in ts.values())
        assert first.paths == nf4.plan_of(first.paths) and first.paths[-1][0] == nf4.PROMPT_ROWS
    prompts = {0: list(range(3, 43)), 1: [7, 8, 9], 2: [5] * 20}
    for r in (chosen, plain):
        for slot, p in prompts.items():
            r.prefill(slot, p, 0)
    slots, positions = list(prompts), [len(p) for p in prompts.values()]
    for step in range(3):
        got, want = (r.decode(slots, [11 + step] * 3, positions) for r in (chosen, plain))
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
        positions = [p + 1 for p in positions]
    assert chosen.decoder.stats.replays + chosen.decoder.stats.captures > 0


def test_fused_path_equals_the_layers_eagerly_and_in_a_cuda_graph():
    """bitsandbytes' op once over the joined weights (the "fused" path, float32 scales) gives the
    layers' products at decode sizes and a prompt step's rows, and replays in a CUDA graph as it ran
    eagerly."""
    from mygpt.kernels import nf4

    layers = [layer(n, 4096, torch.bfloat16, seed=n) for n in (4096, 1024, 1024)]
    product = nf4.NF4Product(layers)
    product.paths = [(nf4.PROMPT_ROWS, "fused")]
    for m in (1, 8, 32, 300):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        want = torch.cat([q(x) for q in layers], dim=-1).float()
        got = product(x).float()
        assert product.path(m) == "fused" and float((got - want).norm() / want.norm()) < 1e-2, m
    x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(replayed(lambda: product(x)), product(x), rtol=1e-3, atol=1e-3)
