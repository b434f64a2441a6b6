"""The LoRA kernels (kernels/lora.py) on a CUDA device against the grouped batched products they
replace, at the 8B shape's widths, and inside a CUDA graph (skipped without a CUDA device)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def stacked(slots: int, d_in: int, rank: int, outs: list[int], dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    at_all = (torch.randn(slots, d_in, len(outs) * rank, generator=g, device="cuda") * 0.02).to(dtype)
    bts = [(torch.randn(slots, rank, o, generator=g, device="cuda") * 0.02).to(dtype) for o in outs]
    return at_all, bts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("d_in", "outs"), [(4096, [4096, 1024, 1024]), (4096, [14336, 14336]), (14336, [4096])]
)
@pytest.mark.parametrize("n", [1, 7, 32])
@pytest.mark.parametrize("side_by_side", [False, True], ids=["apart", "side-by-side"])
def test_kernels_equal_the_grouped_products(dtype, d_in, outs, n, side_by_side, monkeypatch):
    """Each part's stack and output apart (one expand a part), or side by side in one stack and one
    output as FusedLinear keeps them (one expand for every part)."""
    from mygpt import kernels
    from mygpt.kernels import lora
    from mygpt.kernels.lora import add_lora
    from mygpt.lora.layers import LoRABatch, lora_delta, set_rows

    launches, jitted = [], kernels.jitted
    monkeypatch.setattr(lora, "jitted", lambda fn: launches.append(fn.__name__) or jitted(fn))

    at_all, bts = stacked(8, d_in, 16, outs, dtype)
    if side_by_side:
        bts = list(torch.cat(bts, dim=2).split(outs, dim=2))
    rows = [(i * 5) % 9 - 1 for i in range(n)]  # slots 0..7 and -1 (the base model)
    x = torch.randn(n, d_in, device="cuda", dtype=dtype)
    base = [torch.randn(n, o, device="cuda", dtype=dtype) for o in outs]
    batch = LoRABatch()
    set_rows(batch, rows, 16, dtype, x.device)
    deltas = lora_delta(batch, x, at_all, bts)
    want = [b + d.to(dtype) for b, d in zip(base, deltas, strict=True)] if deltas else base
    got = list(torch.cat(base, dim=-1).split(outs, dim=-1)) if side_by_side else [b.clone() for b in base]
    add_lora(x, at_all, bts, got, torch.tensor(rows, dtype=torch.int32, device="cuda"))
    assert launches.count("_expand_kernel") == (1 if side_by_side else len(outs))
    for g, w, b in zip(got, want, base, strict=True):
        term_err = float(((g.float() - b.float()) - (w.float() - b.float())).norm())
        term = float((w.float() - b.float()).norm()) or 1.0
        assert term_err / term < (2e-2 if dtype == torch.bfloat16 else 1e-5), (term_err, term)


def test_kernels_in_a_cuda_graph_replay_as_run_eagerly():
    from mygpt.kernels.lora import add_lora

    at_all, bts = stacked(4, 4096, 16, [4096, 1024, 1024], torch.bfloat16)
    x = torch.randn(5, 4096, device="cuda", dtype=torch.bfloat16)
    rows = torch.tensor([0, -1, 3, 3, 1], dtype=torch.int32, device="cuda")
    base = torch.randn(5, 6144, device="cuda", dtype=torch.bfloat16)
    eager = base.clone()
    add_lora(x, at_all, bts, list(eager.split([4096, 1024, 1024], -1)), rows)
    y = base.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y.copy_(base)
        add_lora(x, at_all, bts, list(y.split([4096, 1024, 1024], -1)), rows)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, eager)  # same kernels, same inputs: the same bits
