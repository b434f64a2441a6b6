"""The fused element-wise Triton kernels (kernels/fused.py) on the CPU, through Triton's interpreter,
against the PyTorch ops they replace (HF's modules' own arithmetic)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")


@pytest.fixture(autouse=True)
def interpreter():
    if os.environ.get("TRITON_INTERPRET") != "1":  # conftest sets it without a GPU, before Triton loads
        pytest.skip("Triton's interpreter is off (a GPU is there: tests/gpu runs the kernels)")


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm.forward, as transformers writes it."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def trunc_bf16(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16 as Triton's interpreter converts (truncating; a GPU rounds to nearest even,
    as PyTorch does: tests/gpu/test_fused_cuda.py checks that bit for bit)."""
    return (x.float().view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)


def rounded(dtype):
    """The rounding of one PyTorch op's float32 result to `dtype`, as the interpreter does it."""
    return trunc_bf16 if dtype == torch.bfloat16 else (lambda t: t.to(dtype))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("residual", [False, True])
def test_add_rms_norm(dtype, residual):
    from mygpt.kernels.fused import add_rms_norm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 5, 96, generator=g).to(dtype)  # 96: not a power of two (masked columns)
    r = torch.randn(1, 5, 96, generator=g).to(dtype) if residual else None
    w = (1 + 0.1 * torch.randn(96, generator=g)).to(dtype)
    normed, total = add_rms_norm(x, r, w, 1e-5)
    rnd = rounded(dtype)
    want_total = x if r is None else rnd(r.float() + x.float())
    assert torch.equal(total, want_total)  # the residual sum: bit for bit
    h = want_total.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
    want = rnd(w.float() * rnd(h).float())  # HF: hidden.to(input_dtype), then weight * it
    tol = 1e-6 if dtype == torch.float32 else 8e-3  # the mean summed in another order
    torch.testing.assert_close(normed, want, rtol=tol, atol=tol)
    assert (normed != want).float().mean() < 0.02  # nearly every element the same bits
    if dtype == torch.float32:
        torch.testing.assert_close(normed, hf_rms_norm(want_total, w, 1e-5), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rotary_is_bit_for_bit_and_reads_a_column_block(dtype):
    from mygpt.kernels.fused import rotary

    g = torch.Generator().manual_seed(1)
    n, h, hd = 3, 6, 16
    wide = torch.randn(1, n, (h + 2) * hd, generator=g).to(dtype)  # q/k then v, as the joined product
    qk = wide[0, :, : h * hd].view(n, h, hd)  # strided tokens
    cos = torch.randn(n, 1, hd, generator=g).to(dtype)
    sin = torch.randn(n, 1, hd, generator=g).to(dtype)
    got = rotary(qk, cos, sin)
    r, f = rounded(dtype), (lambda t: t.float())
    # each product and the sum rounded to the model's dtype, as PyTorch's ops round them
    want = r(f(r(f(qk) * f(cos))) + f(r(f(rotate_half(qk)) * f(sin))))
    assert got.is_contiguous() and torch.equal(got, want)
    torch.testing.assert_close(got, qk * cos + rotate_half(qk) * sin, rtol=1e-2, atol=1e-2)  # PyTorch's


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_silu_mul_is_bit_for_bit_on_column_blocks(dtype):
    from mygpt.kernels.fused import silu_mul

    g = torch.Generator().manual_seed(2)
    y = torch.randn(1, 4, 2 * 1500, generator=g).to(dtype)  # gate | up side by side; 1500: two blocks
    gate, up = y.split(1500, dim=-1)
    got = silu_mul(gate, up)
    assert got.shape == gate.shape
    r = rounded(dtype)
    want = r(r(torch.nn.functional.silu(gate.float())).float() * up.float())  # silu rounded, then the product
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # exp's last float32 bits may differ from PyTorch's
    torch.testing.assert_close(got, want, rtol=tol, atol=1e-6)
    if dtype == torch.bfloat16:
        assert (got != want).float().mean() < 0.01  # nearly every element the same bits


@pytest.mark.parametrize("static", [False, True])
def test_runner_with_fused_ops_gives_the_plain_runners_logits(tiny_model_dir, static):
    """The tiny Llama through the runner with every fused kernel in place (norms with the residual sums,
    rotary, silu * up), prefill and decode steps (the static decode step too), with an adapter row:
    the logits of the runner without them."""
    from transformers import AutoModelForCausalLM

    from mygpt.engine.runner import ModelRunner

    runners = []
    for fused_ops in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        runners.append(
            ModelRunner(
                model,
                num_slots=4,
                max_len=64,
                dtype=torch.float32,
                max_loras=2,
                static_decode=static,
                fused_ops=fused_ops,
            )  # fmt: skip
        )
    plain, fused_runner = runners
    assert plain._fused is None and fused_runner._fused is not None
    g = torch.Generator().manual_seed(3)
    for r in runners:  # the same adapter in both
        gen = torch.Generator().manual_seed(4)
        for layer in r.lora_layers.values():
            a = torch.randn(4, layer.in_features, generator=gen) * 0.1
            b = torch.randn(layer.out_features, 4, generator=gen) * 0.1
            layer.set_slot(1, a, b)
    prompt = torch.randint(0, 100, (12,), generator=g).tolist()
    got = [r.prefill(0, prompt, 0, lora_slot=1) for r in runners]
    torch.testing.assert_close(got[1], got[0], rtol=1e-5, atol=1e-5)
    for r in runners:
        r.prefill(2, prompt[:5], 0)
    steps = [r.decode([0, 2], [7, 9], [12, 5], [1, -1]) for r in runners]
    torch.testing.assert_close(steps[1], steps[0], rtol=1e-5, atol=1e-5)
    checked = fused_runner._fused._checked
    assert {k[0] for k in checked} == {"add_rms_norm", "rotary", "silu_mul"} and all(checked.values())
