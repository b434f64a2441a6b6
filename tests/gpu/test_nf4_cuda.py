"""The Triton NF4 kernel on a CUDA device against bitsandbytes' own product (skipped without one)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def layer(n: int, k: int, dtype: torch.dtype, seed: int):
    import bitsandbytes as bnb

    g = torch.Generator().manual_seed(seed)
    q = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(
        torch.randn(n, k, generator=g) * 0.02, requires_grad=False, quant_type="nf4", compress_statistics=True
    )
    return q.cuda()


@pytest.mark.parametrize("lut", ["shared", "select"])
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
    for m in (1, 3, 16, 17, 32):
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
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        product(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = product(x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)  # same kernels, same inputs: the same bits
    parts = torch.cat([q(x) for q in layers], dim=-1)  # the layers on their own, weights now views
    assert float((parts.float() - eager.float()).norm() / parts.float().norm()) < 1e-2
