"""The fused element-wise Triton kernels on a CUDA device, against PyTorch's ops (skipped without one).
There, unlike in Triton's CPU interpreter, bfloat16 rounds to nearest even as PyTorch does."""

from __future__ import annotations

import pytest
import torch

from mygpt.kernels import fused

pytestmark = pytest.mark.gpu


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def test_rotary_and_residual_sum_are_bit_for_bit_in_bf16():
    n, h, hd = 32, 40, 128
    wide = torch.randn(1, n, (h + 8) * hd, device="cuda", dtype=torch.bfloat16)
    qk = wide[0, :, : h * hd].view(n, h, hd)
    cos = torch.randn(n, 1, hd, device="cuda", dtype=torch.bfloat16)
    sin = torch.randn(n, 1, hd, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(fused.rotary(qk, cos, sin), qk * cos + rotate_half(qk) * sin)
    x, r = (torch.randn(1, n, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    normed, total = fused.add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(total, r + x)
    h32 = total.float()
    want = w * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    torch.testing.assert_close(normed, want, rtol=8e-3, atol=8e-3)
    assert (normed != want).float().mean() < 0.02


def test_silu_mul_in_bf16():
    y = torch.randn(1, 32, 2 * 14336, device="cuda", dtype=torch.bfloat16)
    gate, up = y.split(14336, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    got = fused.silu_mul(gate, up)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)
    assert (got != want).float().mean() < 0.01


def test_graph_runner_with_fused_ops_gives_the_plain_logits():
    from transformers import LlamaConfig, LlamaForCausalLM

    from mygpt.engine.runner import ModelRunner

    config = LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    runners = []
    for on in (False, True):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval().cuda().to(torch.bfloat16)
        runners.append(ModelRunner(model, 4, 300, torch.bfloat16, cuda_graphs=True, fused_ops=on))
    assert runners[1]._fused is not None
    for r in runners:
        r.prefill(0, [5, 6, 7, 8, 9], 0)
    got = [r.decode([0], [11], [5]) for r in runners]
    torch.testing.assert_close(got[1], got[0], rtol=2e-2, atol=2e-2)
    assert all(runners[1]._fused._checked.values())
