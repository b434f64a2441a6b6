"""A Triton kernel for the small-batch products with bitsandbytes NF4 weights on a GPU.

On the H100, a decode step of 32 rows of the 8B-shaped model spent 8.6 of its 19 GPU milliseconds in
bitsandbytes' 4-bit products (docs/benchmarks.md, 2026-11-26): for most shapes at 32 rows its dispatch
dequantizes the whole weight to bfloat16 (writes and reads 4x the packed bytes) and then calls cuBLAS;
one row takes its GEMV at about a third of the card's bandwidth. Decode steps are bound by reading the
weights once, so this kernel reads the packed 4-bit weight once per step for up to MAX_ROWS rows:

    out[m, n] = sum_k x[m, k] * bf16(code[nibble(n, k)] * scale[n, k // 64])

    packed   uint8 [N, K/2], bitsandbytes' own bytes (element 2j in the high nibble, 2j+1 in the low)
    scale    float32 [N, K/blocksize], its absmax with the double quantization undone once at load
             (4 bytes per 64 weights: 1/8 more than the packed bytes; bitsandbytes keeps 1 byte)
    code     float32 [16], the NF4 table

Each program computes BLOCK_N outputs for all rows over one K range (split-K for parallelism: the
partial sums go to a float32 buffer, summed by one torch call, never atomically, so the result is the
same on every run). The even and odd columns of x meet the high and low nibbles in two tl.dot calls.
Products with more rows (prefill) and shapes it does not cover call bitsandbytes as before.

Projections that read the same input (q/k/v, gate/up) run as one product over their concatenated
weights (lora/layers.py concat_base): the layers' packed weights become views of the concatenation.

Tested on the CPU through Triton's interpreter (TRITON_INTERPRET=1) against the dequantized product;
on a GPU each product shape is checked once against bitsandbytes before it is used (a mismatch or a
compile error turns the kernel off, with a warning).
"""

from __future__ import annotations

import torch

from mygpt.kernels import available, check_once, jitted, triton  # noqa: F401 - available: re-exported

MAX_ROWS = 32  # rows (tokens) up to which the kernel runs; more: bitsandbytes' dequantize + GEMM

if triton is not None:
    import triton.language as tl

    def _nf4_kernel(
        x_ptr, q_ptr, s_ptr, code_ptr, lut_ptr, out_ptr,
        M, N, K, k_split,
        stride_xm, stride_om,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, QBLOCK: tl.constexpr,
        PRECISION: tl.constexpr, LUT: tl.constexpr,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        half = tl.arange(0, BLOCK_K // 2)
        n_ok = rn < N
        m_ok = rm < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if LUT == 2:  # the 16 values loaded once; each weight's value gathered from them (tl.gather)
            table = tl.broadcast_to(tl.load(code_ptr + tl.arange(0, 16))[None, :], (BLOCK_N, 16))
        k_begin = pid_k * k_split
        for step in range(0, k_split, BLOCK_K):
            k0 = k_begin + step
            kk = k0 + 2 * half  # the even columns of this K block
            packed = tl.load(
                q_ptr + rn[:, None] * (K // 2) + (k0 // 2 + half)[None, :], mask=n_ok[:, None], other=0
            )
            if LUT != 0:  # one scale per block, broadcast
                blocks = k0 // QBLOCK + tl.arange(0, BLOCK_K // QBLOCK)
                per_block = tl.load(
                    s_ptr + rn[:, None] * (K // QBLOCK) + blocks[None, :], mask=n_ok[:, None], other=0.0
                )
                scale = tl.reshape(
                    tl.broadcast_to(per_block[:, :, None], (BLOCK_N, BLOCK_K // QBLOCK, QBLOCK // 2)),
                    (BLOCK_N, BLOCK_K // 2),
                )
                if LUT == 1:  # one load per byte for both of its weights (int64: the high nibble's low)
                    pair = tl.load(lut_ptr + packed.to(tl.int32))
                    hi = (pair & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True) * scale
                    lo = (pair >> 32).to(tl.uint32).to(tl.float32, bitcast=True) * scale
                else:  # no global load for the table (Triton may stage the gather in shared memory)
                    hi = tl.gather(table, (packed >> 4).to(tl.int32), axis=1) * scale
                    lo = tl.gather(table, (packed & 15).to(tl.int32), axis=1) * scale
            else:  # a scale and a table lookup per weight
                scale = tl.load(
                    s_ptr + rn[:, None] * (K // QBLOCK) + (kk // QBLOCK)[None, :],
                    mask=n_ok[:, None],
                    other=0.0,
                )
                hi = tl.load(code_ptr + (packed >> 4).to(tl.int32)) * scale
                lo = tl.load(code_ptr + (packed & 15).to(tl.int32)) * scale
            x_even = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None], other=0.0)
            x_odd = tl.load(
                x_ptr + rm[:, None] * stride_xm + (kk + 1)[None, :], mask=m_ok[:, None], other=0.0
            )
            acc += tl.dot(x_even, tl.trans(hi.to(x_even.dtype)), input_precision=PRECISION)
            acc += tl.dot(x_odd, tl.trans(lo.to(x_odd.dtype)), input_precision=PRECISION)
        out = out_ptr + pid_k * M * N + rm[:, None] * stride_om + rn[None, :]
        tl.store(out, acc, mask=m_ok[:, None] & n_ok[None, :])  # fmt: skip


# scripts/gpu_check.py measures the other tiles and the ways of reading the table (lut): "weight", a table
# load and a scale load per weight; "pair", one table load per byte (both weights) and a scale per block;
# "gather", the table loaded once and read with tl.gather, and a scale per block
TILE = {"block_n": 64, "block_k": 256, "num_warps": 4, "lut": "weight"}
LUTS = {"weight": 0, "pair": 1, "gather": 2}


def pair_table(code: torch.Tensor) -> torch.Tensor:
    """int64 [256]: for each byte, the float32 bits of its high nibble's value (low word) and of its low
    nibble's (high word)."""
    bits = code.detach().float().cpu().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    b = torch.arange(256)
    return (bits[b & 15] << 32) | bits[b >> 4]


def _config(m: int, n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, split) for an [m, k] x [k, n] product: enough programs to fill an
    H100's 132 SMs a few times over, each K range a whole number of BLOCK_K columns."""
    block_m = 16 if m <= 16 else 32
    block_n, block_k = TILE["block_n"], TILE["block_k"]
    n_blocks = triton.cdiv(n, block_n)
    split = 1
    while n_blocks * split < 512 and k % (block_k * split * 2) == 0:
        split *= 2
    return block_m, block_n, block_k, split


def nf4_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    code: torch.Tensor,
    pairs: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS, K a multiple of 256) times the NF4 weight [N, K]^T: [M, N] in x's dtype.
    float32 inputs multiply in full float32 (no TF32), as bitsandbytes' float32 path does. pairs: the
    code's pair_table on the device (made here when not given)."""
    m, k = x.shape
    n = packed.shape[0]
    qblock = k // scale.shape[1]
    block_m, block_n, block_k, split = _config(m, n, k)
    if x.stride(1) != 1:
        x = x.contiguous()
    lut = LUTS[TILE["lut"]] if block_k % qblock == 0 else 0  # a scale per block: whole blocks per step
    if lut == 1 and pairs is None:
        pairs = pair_table(code).to(x.device)
    partial = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, block_n), split)
    jitted(_nf4_kernel)[grid](
        x, packed, scale, code, pairs if lut == 1 else code, partial, m, n, k, k // split, x.stride(0), n,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, QBLOCK=qblock,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", LUT=lut, num_warps=TILE["num_warps"],
    )  # fmt: skip
    return (partial[0] if split == 1 else partial.sum(0)).to(x.dtype)


def nf4_scales(weight) -> torch.Tensor:
    """A bitsandbytes Params4bit's absmax as float32 [N, K/blocksize], its double quantization undone
    exactly as bitsandbytes does before it dequantizes."""
    from bitsandbytes.functional import dequantize_blockwise

    qs = weight.quant_state
    absmax = qs.absmax
    if qs.nested:
        absmax = dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    n, k = qs.shape
    return absmax.float().reshape(n, k // qs.blocksize).contiguous()


def supported(layers: list) -> bool:
    """bitsandbytes NF4 layers in the GPU layout this kernel reads, without bias, one compute dtype."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return False
    for layer in layers:
        if type(layer) is not Linear4bit or layer.bias is not None:
            return False
        qs = getattr(layer.weight, "quant_state", None)
        if qs is None or qs.quant_type != "nf4" or getattr(qs, "packing_format_for_cpu", False):
            return False
        n, k = qs.shape
        if k % 256 or k % qs.blocksize or qs.blocksize > 256 or layer.weight.dtype != torch.uint8:
            return False
        if layer.weight.numel() * 2 != n * k:
            return False
    first = layers[0].weight.quant_state
    return all(
        layer.compute_dtype == layers[0].compute_dtype
        and layer.weight.quant_state.blocksize == first.blocksize
        and layer.in_features == layers[0].in_features
        and torch.equal(layer.weight.quant_state.code, first.code)
        for layer in layers
    )


class NF4Product:
    """One product for bitsandbytes NF4 layers that read the same input: x [..., K] -> [..., sum N].
    The layers' packed weights become views of one concatenation (no second copy); up to MAX_ROWS rows
    the Triton kernel reads it, more rows call each layer (bitsandbytes) and concatenate."""

    _checked: dict[tuple, bool] = {}  # (device, N, K, dtype, config) -> it agreed with bitsandbytes

    def __init__(self, layers: list):
        self.layers = layers
        k = layers[0].in_features
        self.sizes = [layer.out_features for layer in layers]
        packed = torch.cat([layer.weight.data.view(-1) for layer in layers]).view(sum(self.sizes), k // 2)
        off = 0
        for layer, n in zip(layers, self.sizes, strict=True):  # each layer reads its rows of the whole
            layer.weight.data = packed[off : off + n].view(-1, 1)
            off += n
        self.packed = packed
        self.scale = torch.cat([nf4_scales(layer.weight) for layer in layers])
        self.code = layers[0].weight.quant_state.code.float().to(packed.device)
        self.pairs = pair_table(self.code).to(packed.device)
        self.compute_dtype = layers[0].compute_dtype  # None: the input's, as bitsandbytes' layer does
        self.enabled = True

    def _bnb(self, x2: torch.Tensor) -> torch.Tensor:
        outs = [layer(x2) for layer in self.layers]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def _kernel_ok(self, x2: torch.Tensor) -> bool:
        """Once per product shape: the kernel against bitsandbytes on this input (not during a CUDA
        graph capture: the first call of a shape is always eager, graphs.py warms up before capturing)."""
        n, k = self.packed.shape[0], self.packed.shape[1] * 2
        key = (str(x2.device), n, k, x2.dtype, _config(x2.shape[0], n, k), TILE["num_warps"], TILE["lut"])
        return check_once(
            NF4Product._checked,
            ("nf4", *key),
            lambda: nf4_matmul(x2, self.packed, self.scale, self.code, self.pairs),
            lambda: self._bnb(x2),
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if self.compute_dtype is not None and x2.dtype != self.compute_dtype:
            x2 = x2.to(self.compute_dtype)
        compiling = torch.compiler.is_compiling()  # runner.compile_layers: bitsandbytes' traced ops
        if self.enabled and not compiling and x2.shape[0] <= MAX_ROWS and self._kernel_ok(x2):
            y = nf4_matmul(x2, self.packed, self.scale, self.code, self.pairs)
        else:
            y = self._bnb(x2)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])
