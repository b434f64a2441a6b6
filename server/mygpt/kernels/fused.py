"""Triton kernels for the small element-wise steps of a decoder layer (--fused-ops, on a GPU).

A graphed decode step of the 8B-shaped model on the H100 runs ~2,300 kernels, ~70 a layer; most are
element-wise and each costs a few microseconds however small its tensor (docs/benchmarks.md: 8.1 ms of
kernel time at batch 1, of which ~2.4 ms outside the matrix products, and ~2 ms more of gaps between
kernels inside the graph). Each kernel here replaces several of PyTorch's:

    add_rms_norm   residual + x, then HF's RMSNorm of the sum: 1 kernel for 8 (2 a layer)
    rms_norm       HF's RMSNorm alone (the first layer's input, the final norm)
    rotary         q/k * cos + rotate_half(q/k) * sin: 1 kernel for 5
    silu_mul       act(gate) * up: 1 kernel for 2

Each rounds where PyTorch's bf16/fp16 ops round (after every op, as HF's modules compute): the
residual sums and the rotary embedding are PyTorch's bit for bit; RMSNorm (its mean summed in another
order, 1/sqrt for rsqrt) and silu (Triton's exp) agree within a last-bit rounding. Tested on
the CPU in Triton's interpreter against the PyTorch ops; the runner checks each kernel against them
once per shape on its device before using it (a mismatch or a failure: PyTorch's ops, with a warning).
"""

from __future__ import annotations

import torch

from mygpt.kernels import available, check_once, jitted, triton

if triton is not None:
    import triton.language as tl

    def _add_rms_norm_kernel(
        x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr, D, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr
    ):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        ok = cols < D
        x = tl.load(x_ptr + row * D + cols, mask=ok, other=0.0)
        if HAS_RESIDUAL:  # the sum rounded to the model's dtype, as `residual + x` is
            x = (tl.load(r_ptr + row * D + cols, mask=ok, other=0.0).to(tl.float32) + x.to(tl.float32)).to(
                x.dtype
            )
            tl.store(sum_ptr + row * D + cols, x, mask=ok)
        h = x.to(tl.float32)
        var = tl.sum(h * h, axis=0) / D
        normed = (h * (1.0 / tl.sqrt(var + eps))).to(x.dtype)  # HF: hidden.to(input_dtype), then weight *
        w = tl.load(w_ptr + cols, mask=ok, other=0.0)
        tl.store(out_ptr + row * D + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(x.dtype), mask=ok)

    def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, H, stride_t, HD: tl.constexpr, HALF: tl.constexpr):
        token = tl.program_id(0)
        head = tl.program_id(1)
        i = tl.arange(0, HALF)
        base = x_ptr + token * stride_t + head * HD
        x1 = tl.load(base + i)
        x2 = tl.load(base + HALF + i)
        c1 = tl.load(cos_ptr + token * HD + i).to(tl.float32)
        c2 = tl.load(cos_ptr + token * HD + HALF + i).to(tl.float32)
        s1 = tl.load(sin_ptr + token * HD + i).to(tl.float32)
        s2 = tl.load(sin_ptr + token * HD + HALF + i).to(tl.float32)
        dt = x1.dtype
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        # x * cos + cat(-x2, x1) * sin, each product and the sum rounded as PyTorch's ops round them
        o1 = ((f1 * c1).to(dt).to(tl.float32) + ((-f2) * s1).to(dt).to(tl.float32)).to(dt)
        o2 = ((f2 * c2).to(dt).to(tl.float32) + (f1 * s2).to(dt).to(tl.float32)).to(dt)
        out = out_ptr + (token * H + head) * HD
        tl.store(out + i, o1)
        tl.store(out + HALF + i, o2)

    def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, cols, stride_g, stride_u, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < cols
        g = tl.load(g_ptr + row * stride_g + offs, mask=ok, other=0.0)
        u = tl.load(u_ptr + row * stride_u + offs, mask=ok, other=0.0)
        gf = g.to(tl.float32)
        act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
        tl.store(out_ptr + row * cols + offs, (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=ok)


def _kernel(name: str):
    return jitted(globals()[name])


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(residual + x), residual + x) over the last dimension; residual None: RMSNorm(x), x."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d).contiguous()
    out = torch.empty_like(x2)
    if residual is None:
        total, r2 = x2, x2
    else:
        r2 = residual.reshape(-1, d).contiguous()
        total = torch.empty_like(x2)
    _kernel("_add_rms_norm_kernel")[(x2.shape[0],)](
        x2, r2, weight, out, total, d, eps, HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(d)
    )
    return out.view(x.shape), total.view(x.shape)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H, hd] * cos + rotate_half(x) * sin, cos and sin [N, 1, hd] (or [N, hd]); x's tokens may
    be strided (a column block of a wider output), its heads not. Returns a contiguous [N, H, hd]."""
    n, h, hd = x.shape
    if x.stride(2) != 1 or x.stride(1) != hd:
        x = x.contiguous()
    cos, sin = cos.reshape(n, hd).contiguous(), sin.reshape(n, hd).contiguous()
    out = torch.empty(n, h, hd, dtype=x.dtype, device=x.device)
    _kernel("_rotary_kernel")[(n, h)](x, cos, sin, out, h, x.stride(0), HD=hd, HALF=hd // 2)
    return out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up over [..., cols] (each may be a column block of a wider output). Returns a
    contiguous tensor of gate's shape."""
    cols = gate.shape[-1]
    g, u = gate.reshape(-1, cols), up.reshape(-1, cols)
    if g.stride(1) != 1:
        g = g.contiguous()
    if u.stride(1) != 1:
        u = u.contiguous()
    out = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    grid = (g.shape[0], triton.cdiv(cols, 1024))
    _kernel("_silu_mul_kernel")[grid](g, u, out, cols, g.stride(0), u.stride(0), BLOCK=1024)
    return out.view(gate.shape)


def supported(head_dim: int, hidden: int) -> bool:
    """Shapes the kernels take: a power-of-two head size (rotary's halves), any hidden size."""
    return head_dim >= 2 and head_dim & (head_dim - 1) == 0 and hidden > 0


class FusedOps:
    """The runner's switch: each kernel checked once per (op, shape, dtype) against PyTorch's ops on its
    device; a kernel that fails or disagrees is replaced by PyTorch's ops for good."""

    def __init__(self, device: torch.device):
        self.enabled = available(device)
        self._checked: dict[tuple, bool] = {}

    def ok(self, key: tuple, run, reference) -> bool:
        """Whether the kernel for `key` may run; `run`/`reference` compute the same outputs (first call:
        compared, outside any CUDA graph capture: a shape's first step is eager, graphs.py)."""
        return self.enabled and check_once(self._checked, key, run, reference)
