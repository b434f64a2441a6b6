"""The LoRA kernels (kernels/lora.py) on the CPU, through Triton's interpreter: each row's term from its
own adapter slot equals the grouped batched products (lora_delta), added in place."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")


@pytest.fixture(autouse=True)
def interpreter():
    if os.environ.get("TRITON_INTERPRET") != "1":  # conftest sets it without a GPU, before Triton loads
        pytest.skip("Triton's interpreter is off (a GPU is there: tests/gpu runs the kernels)")


def stacked(slots: int, d_in: int, rank: int, outs: list[int], seed: int):
    """Random stacked adapter slots as lora/layers.py keeps them: A^T [S, in, P*R], B^T_p [S, R, out_p]."""
    g = torch.Generator().manual_seed(seed)
    at_all = torch.randn(slots, d_in, len(outs) * rank, generator=g) * 0.1
    bts = [torch.randn(slots, rank, o, generator=g) * 0.1 for o in outs]
    return at_all, bts


@pytest.mark.parametrize("rows", [[0, -1, 2, 2, 1], [1], [-1, -1], [3, 0, 1, 2, 3, 2, 1, 0, -1] * 4])
@pytest.mark.parametrize(("d_in", "outs"), [(256, [64, 32, 32]), (1200, [96]), (640, [128, 200])])
def test_kernels_equal_the_grouped_products(rows, d_in, outs):
    """Base rows (-1) and several rows on one slot, one to three parts, K split or not (SHRINK_K 512: 256
    is one program, 1200 three with a partial one), outputs wider than one expand block."""
    from mygpt.kernels.lora import add_lora
    from mygpt.lora.layers import LoRABatch, lora_delta, set_rows

    at_all, bts = stacked(4, d_in, 8, outs, seed=len(rows) + d_in)
    x = torch.randn(len(rows), d_in, generator=torch.Generator().manual_seed(3))
    base = [torch.randn(len(rows), o) for o in outs]
    batch = LoRABatch()
    set_rows(batch, rows, 8, torch.float32, torch.device("cpu"))
    deltas = lora_delta(batch, x, at_all, bts)
    want = [b + d for b, d in zip(base, deltas, strict=True)] if deltas else base
    got = [b.clone() for b in base]
    add_lora(x, at_all, bts, got, torch.tensor(rows, dtype=torch.int32))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_terms_go_into_column_blocks_of_one_output():
    """The joined base product's output [1, N, sum of out] split into column blocks (FusedLinear.joined):
    each block gets its part's term, in place, nothing else changes."""
    from mygpt.kernels.lora import add_lora
    from mygpt.lora.layers import LoRABatch, lora_delta, set_rows

    outs, rows = [64, 32, 32], [2, 0, -1]
    at_all, bts = stacked(3, 256, 16, outs, seed=5)
    x = torch.randn(1, 3, 256)
    y = torch.randn(1, 3, sum(outs))
    batch = LoRABatch()
    set_rows(batch, rows, 16, torch.float32, torch.device("cpu"))
    want = torch.cat(
        [
            b + d.view(b.shape)
            for b, d in zip(y.split(outs, -1), lora_delta(batch, x, at_all, bts), strict=True)
        ],
        -1,
    )
    ptr = y.data_ptr()
    add_lora(x, at_all, bts, list(y.split(outs, dim=-1)), torch.tensor(rows, dtype=torch.int32))
    assert y.data_ptr() == ptr
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_half_precision_rounds_where_the_batched_products_do():
    """float16: h and the term rounded to the dtype (the batched matmuls' outputs), then added."""
    from mygpt.kernels.lora import add_lora

    at_all, bts = stacked(2, 256, 8, [64], seed=9)
    at_all, bts = at_all.half(), [b.half() for b in bts]
    x = torch.randn(2, 256).half()
    y = torch.randn(2, 64).half()
    rows = [1, 0]
    h = torch.stack([(x[i].float() @ at_all[s].float()).half() for i, s in enumerate(rows)])
    term = torch.stack([(h[i].float() @ bts[0][s].float()).half() for i, s in enumerate(rows)])
    want = (y.float() + term.float()).half()
    got = y.clone()
    add_lora(x, at_all, bts, [got], torch.tensor(rows, dtype=torch.int32))
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-3, atol=2e-3)


def test_a_runner_turns_the_kernels_off_where_they_disagree(tiny_model_dir, monkeypatch, caplog):
    """ModelRunner(lora_kernel=True) checks the kernels at its own shapes against the grouped products
    first: kernels that compute something else (here: nothing) stay off, with a warning, and the
    grouped products run."""
    from transformers import AutoModelForCausalLM

    from mygpt.engine.runner import ModelRunner
    from mygpt.kernels import lora

    def runner():
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        return ModelRunner(model, num_slots=2, max_len=64, dtype=torch.float32, max_loras=2, static_decode=True,
                           lora_kernel=True)  # fmt: skip

    monkeypatch.setattr(lora, "_checked", {})
    assert runner().lora_kernel and len(lora._checked) == 4 and all(lora._checked.values())  # 4 groups
    monkeypatch.setattr(lora, "_checked", {})
    monkeypatch.setattr(lora, "add_lora", lambda *args: None)
    assert not runner().lora_kernel
    assert "disagrees" in caplog.text and not any(lora._checked.values())


def test_strided_adapter_stacks_are_refused():
    """A FusedLinear part's A^T is a column view of the group's: the kernels read whole stacks."""
    from mygpt.kernels.lora import add_lora

    at_all, bts = stacked(2, 256, 8, [64, 32], seed=1)
    part = at_all[:, :, :8]
    with pytest.raises(ValueError, match="whole adapter stacks"):
        add_lora(torch.randn(1, 256), part, bts[:1], [torch.zeros(1, 64)], torch.tensor([0]))


@pytest.mark.parametrize("rows", [[2, 0, -1, 1], [1]], ids=["4-rows", "1-row"])
@pytest.mark.parametrize("into", [False, True], ids=["in-place", "new-outputs"])
def test_parts_side_by_side_take_one_expand(monkeypatch, into, rows):
    """FusedLinear's layout: the parts' B^T column blocks of one stack and the output one tensor: one
    expand for all parts (each column from its part's rows of h), the same terms as the grouped
    products; outputs apart take one expand a part, from the same strided stacks."""
    from mygpt import kernels
    from mygpt.kernels import lora
    from mygpt.lora.layers import LoRABatch, lora_delta, set_rows

    outs, rank = [192, 64, 64], 8
    at_all, bts = stacked(3, 256, rank, outs, seed=7)
    bt_all = torch.cat(bts, dim=2)
    views = list(bt_all.split(outs, dim=2))
    x = torch.randn(len(rows), 256, generator=torch.Generator().manual_seed(8))
    # the joined product's output as FusedLinear has it: [1, N, W] (one row: each part's block is
    # contiguous on its own, its row stride meaningless)
    y = torch.randn(1, len(rows), sum(outs), generator=torch.Generator().manual_seed(9))
    batch = LoRABatch()
    set_rows(batch, rows, rank, torch.float32, torch.device("cpu"))
    want = y + torch.cat(lora_delta(batch, x, at_all, bts), dim=-1).view(y.shape)
    launches = []
    jitted = kernels.jitted
    monkeypatch.setattr(lora, "jitted", lambda fn: launches.append(fn.__name__) or jitted(fn))
    slots = torch.tensor(rows, dtype=torch.int32)
    if into:
        (got,) = lora.lora_added([y], x, at_all, views, slots)
    else:
        got = y.clone()
        lora.add_lora(x, at_all, views, list(got.split(outs, dim=-1)), slots)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert launches == ["_shrink_kernel", "_expand_kernel"]
    launches.clear()
    apart = [t.clone() for t in y.split(outs, dim=-1)]
    lora.add_lora(x, at_all, views, apart, slots)
    torch.testing.assert_close(torch.cat(apart, dim=-1), want, rtol=1e-5, atol=1e-5)
    assert launches == ["_shrink_kernel"] + ["_expand_kernel"] * 3


def test_one_row_outputs_end_to_end_in_memory_but_apart_take_one_expand_each(monkeypatch):
    """One decode row's outputs, separate tensors that lie end to end in memory (the CUDA caching
    allocator places them so: the H100 run of session 15 failed here, a view across them reaching out
    of the first one's storage): not joined, one expand a part, the grouped products' terms."""
    from mygpt import kernels
    from mygpt.kernels import lora
    from mygpt.lora.layers import LoRABatch, lora_delta, set_rows

    outs, rank = [192, 64, 64], 8
    at_all, bts = stacked(3, 256, rank, outs, seed=7)
    views = list(torch.cat(bts, dim=2).split(outs, dim=2))
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(8))
    y = torch.randn(1, sum(outs), generator=torch.Generator().manual_seed(9))
    batch = LoRABatch()
    set_rows(batch, [1], rank, torch.float32, torch.device("cpu"))
    want = y + torch.cat(lora_delta(batch, x, at_all, bts), dim=-1)
    memory = bytearray(y.numel() * y.element_size())
    offsets = [0, outs[0], outs[0] + outs[1]]
    apart = [  # each its own storage, at consecutive addresses of one buffer
        torch.frombuffer(memory, dtype=torch.float32, count=w, offset=o * 4).view(1, w)
        for o, w in zip(offsets, outs, strict=True)
    ]
    for part, block in zip(apart, y.split(outs, dim=-1), strict=True):
        part.copy_(block)
    assert len({p.untyped_storage().data_ptr() for p in apart}) == 3
    assert [p.data_ptr() - apart[0].data_ptr() for p in apart] == [o * 4 for o in offsets]
    assert lora._side_by_side(apart) is None
    launches = []
    jitted = kernels.jitted
    monkeypatch.setattr(lora, "jitted", lambda fn: launches.append(fn.__name__) or jitted(fn))
    lora.add_lora(x, at_all, views, apart, torch.tensor([1], dtype=torch.int32))
    torch.testing.assert_close(torch.cat(apart, dim=-1), want, rtol=1e-5, atol=1e-5)
    assert launches == ["_shrink_kernel"] + ["_expand_kernel"] * 3
