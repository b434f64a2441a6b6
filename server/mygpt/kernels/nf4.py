"""A Triton kernel for the small-batch products with bitsandbytes NF4 weights on a GPU.

On the H100, a decode step of 32 rows of the 8B-shaped model spends about 11.8 of its 21 device
milliseconds in bitsandbytes' 4-bit products (docs/benchmarks.md): at 32 rows its dispatch dequantizes
most weights to a bfloat16 copy (writes and reads 4x the packed bytes) and calls cuBLAS, and its own
MMA kernel reads gate/up at ~0.4 TB/s; one row runs its GEMV at ~0.9 TB/s of the card's ~3. Decode
steps are bound by reading the weights, so this kernel reads the packed 4-bit weight once per step for
up to MAX_ROWS rows (the "bytes" reading below: any number):

    out[m, n] = sum_k x[m, k] * w[n, k],   w[n, k] = code[nibble(n, k)] * scale[n, k // blocksize]

    words    int32 [N, K/8], bitsandbytes' own bytes read four at a time (a byte holds element 2j in
             its high nibble and 2j+1 in its low one; little-endian words: nibble t of word i is
             element 8i + t at shift 8 * (t // 2) + 4 * (1 - t % 2))
    scale    float32 [N, K/blocksize], its absmax with the double quantization undone once at load
             (4 bytes per 64 weights: 1/8 more than the packed bytes; bitsandbytes keeps 1 byte)
    code     float32 [16], the NF4 table

The K loop works on eight planes per step: plane t holds the weights k = 8i + t of every loaded word
([BLOCK_N, BLOCK_K / 8], the words' own layout), with its own strided x columns. Reshaping the nibbles to
[BLOCK_N, BLOCK_K] instead cost Triton layout conversions through shared memory. Four ways of turning
a nibble into its table value (TILES[...]["lut"]), and a fifth kernel ("bytes") below them:
- "shared": the 16 values read with tl.gather along their one axis. Triton stages them in shared memory,
  one shared load a weight, as bitsandbytes' own GEMV does; 16 four-byte entries sit in 16 banks, so no
  access pattern conflicts. But Triton stores the table to shared memory again for every gather,
  between two barriers: 16 barriers a K step of the gemv tile, 32 of the dot tile's (with its
  operands' own).
- "select": a branch-free tree of 15 selects between the 16 values held in registers. It touches no
  memory, at ~18 instructions a weight; it is kept as the control. On the H100 it took 1.23x the
  shared table's time for 2.6x its instructions: the kernel is not bound by its instruction count.
- "shared8" (session 16): as "shared", but the 8 planes' nibbles joined into one tensor (tl.join, in
  registers), gathered once a K step and split again, and the step's x loaded in one contiguous piece
  and split the same way (the other readings load each plane's x columns one by one, 8 apart: 8 loads
  a K step that are not pipelined). The gemv tile's K loop: 3 barriers where "shared" has 16, no
  unpipelined load, 6.6 instructions a weight against 6.8, the same 64 registers; the dot tile's: 18
  barriers where 32, but 150-197 registers where 74-103.
- "global" (session 16): each weight's value loaded from the table in memory (an L1 hit), which
  Triton pipelines through shared memory with cp.async: 2 barriers (17 for the dot), at 8.9
  instructions a weight for the gemv tile and 9.3-10.1 for the dot.
- "bytes" (session 17; its own kernel, _nf4_bytes_kernel, for the gemv's one row too): the tile's
  transpose, w [BLOCK_N, BLOCK_K] @ x^T [BLOCK_K, rows], one tl.dot a K step over the whole tile (wgmma
  on an H100; the rows, 16 to BYTES_BLOCK_M a program, are its narrow side). Its rows go in blocks, so
  it takes any number (kernel_rows): a prompt step's too, where bitsandbytes writes a bfloat16 copy of
  each weight and spends ~150-225 us of Python a call (session 9 and 15's profiles). Each byte is looked
  up once, in a 256-entry table whose entry holds both nibbles' values in x's dtype packed in one
  integer (two bfloat16 in an int32): the lookup yields the tensor cores' operand register itself, with
  no float multiply or conversion a weight. The weights are the table's values rounded to x's dtype,
  unscaled; each step stays within one scale block and multiplies its sums by the rows' scales
  (bitsandbytes rounds code x scale instead: the same relative error, 2^-9 in bfloat16). Its K loop:
  3.8-4.2 instructions a weight for the 128- and 256-wide tiles, where the others take 6.5-8.1, and 5
  barriers a step of BLOCK_N x 64 weights. Triton's interpreter multiplies bfloat16 tl.dot operands
  wrongly, so the CPU tests take float16 and float32 (its float32 table packs two float32 in an int64).
Which is fastest is the device's answer (gpu_check's sweep): for shared8, global and bytes, not yet
asked.
`scripts/kernel_sass.py` compiles each tile for sm_90 without a GPU and counts the instructions of its K
loop per weight: the shared table takes 6.8-9.3. Run 4's "gather", a table broadcast to [BLOCK_N, 16] in
registers, compiled to a compare-and-select tree of ~37.

Two kernels' settings (TILES):
- "gemv", for products of up to GEMV_ROWS rows (one stream's decode step): multiply and add without
  tensor cores (tl.dot would pad the row to 16 and move every weight through shared memory into its
  operand layout). Each word lane keeps its own float32 sum, reduced once after the K loop. Its
  weights stay float32 (code x scale, not rounded to the input's dtype: a conversion runs at a quarter
  of the FMA rate and cost more than the rest of a weight's work; bitsandbytes' own GEMV rounds its
  products differently again).
- "dot", for more rows: one tl.dot per plane, each weight rounded once to the input's dtype, as
  bitsandbytes' dequantization does.
Either entry whose "lut" is "bytes" runs the bytes kernel instead (its "block_k" cut to the scale block).
Loads are pipelined (tl.range's num_stages: cp.async into shared memory, which Triton does only for
loads that feed a tl.dot unless asked). A product whose N blocks do not fill the card (fewer than
"programs" programs) splits K: the partial sums go to a float32 buffer that one more small kernel adds
up in order and writes in the input's dtype (never atomically, so the result is the same on every run;
torch's sum and cast were two kernels, each a node of a CUDA graph, whose launch time grows with its
nodes). Without a split the kernel writes the output in the input's dtype. Products with more rows
(prefill) and shapes it does not cover call bitsandbytes as before.

Projections that read the same input (q/k/v, gate/up) run as one product over their concatenated
weights (lora/layers.py concat_base): the layers' packed weights become views of the concatenation.

Which path a product of m rows takes is measured on the device when the runner starts (NF4Product.choose,
runner.choose_nf4_paths): this kernel, bitsandbytes' own 4-bit op once over the concatenation (its
float32 scales above: "fused"), or bitsandbytes layer by layer ("layers", as without the kernel), each
timed at the static decoder's batch sizes inside a CUDA graph (as graphed steps run them; the kernel
up to its rows, kernel_rows) and at PROMPT_ROWS eagerly (as prompt steps run). Session 15's
H100 sweep shows why one path does not fit all: at 8 rows the kernel took 38 us for q/k/v where
bitsandbytes took 76, at 32 rows 271 us for gate/up where bitsandbytes took 137, and at one row
bitsandbytes won every product.

Tested on the CPU through Triton's interpreter (TRITON_INTERPRET=1) against the dequantized product;
on a GPU each product shape is checked once against bitsandbytes before it is used (a mismatch or a
compile error turns the kernel off, with a warning). scripts/gpu_check.py sweeps TILES on the device
(each product timed inside a CUDA graph) and keeps the fastest.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import torch

from mygpt.kernels import available, check_once, jitted, triton  # noqa: F401 - available: re-exported

log = logging.getLogger(__name__)

# rows (tokens) up to which the plane kernels run (kernel_rows); more: bitsandbytes' dequantize + GEMM
MAX_ROWS = 32
# the bytes kernel's rows a program (more rows: more programs), for 16-bit inputs: at 64 its 128 x 64 tile
# takes 224 registers and 4.8 instructions a weight (no spill); each row block reads and looks up the weights
# again. float32 inputs take half (at 64 the 128- and 256-wide tiles spill)
BYTES_BLOCK_M = 64
# rows up to which the "gemv" settings (no tensor cores) run; more: "dot". From 2 rows the dot costs fewer
# instructions a weight (scripts/kernel_sass.py, one 32 x 256 gemv tile: 6.8 at 1 row, 8.5 at 2, 10.4 at 4;
# the dot, padded to 16 rows: 7.6)
GEMV_ROWS = 1
LUTS = {"shared": 0, "select": 1, "global": 2, "shared8": 3, "bytes": 4}
# the rows at which NF4Product.choose times the paths past the decode batch sizes, eagerly: a prompt chunk's
# step (the server's default step budget)
PROMPT_ROWS = 512
PATHS = ("kernel", "fused", "layers")
SUM_BLOCK = 1024  # outputs per program of the split-K sum
# not measured on a GPU yet in this form (run 4's kernel lost to bitsandbytes in the engine): no register
# spills and the fewest K-loop instructions per weight in scripts/kernel_sass.py; gpu_check's sweep keeps its
# fastest
TILES = {
    "gemv": {"block_n": 32, "block_k": 256, "num_warps": 4, "num_stages": 3, "programs": 264, "lut": "shared"},
    "dot": {"block_n": 128, "block_k": 128, "num_warps": 8, "num_stages": 3, "programs": 512, "lut": "shared"},
}  # fmt: skip

if triton is not None:
    import triton.language as tl

    def _nf4_kernel(
        x_ptr, w_ptr, s_ptr, code_ptr, out_ptr,
        M, N, k_split,
        stride_xm, stride_wn, stride_sn, stride_om, stride_os,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, QBLOCK: tl.constexpr,
        PRECISION: tl.constexpr, LUT: tl.constexpr, DOT: tl.constexpr, STAGES: tl.constexpr,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        n_ok = rn < N
        m_ok = rm < M
        words = tl.arange(0, BLOCK_K // 8)  # a K step's words: word i holds elements 8i .. 8i + 7
        if LUT == 0 or LUT == 3:  # gathered along its one axis: Triton stages it in shared memory
            table = tl.load(code_ptr + tl.arange(0, 16))
        elif LUT == 1:  # the 16 values as scalars (registers)
            c0 = tl.load(code_ptr + 0)
            c1 = tl.load(code_ptr + 1)
            c2 = tl.load(code_ptr + 2)
            c3 = tl.load(code_ptr + 3)
            c4 = tl.load(code_ptr + 4)
            c5 = tl.load(code_ptr + 5)
            c6 = tl.load(code_ptr + 6)
            c7 = tl.load(code_ptr + 7)
            c8 = tl.load(code_ptr + 8)
            c9 = tl.load(code_ptr + 9)
            c10 = tl.load(code_ptr + 10)
            c11 = tl.load(code_ptr + 11)
            c12 = tl.load(code_ptr + 12)
            c13 = tl.load(code_ptr + 13)
            c14 = tl.load(code_ptr + 14)
            c15 = tl.load(code_ptr + 15)
        if DOT:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:  # one float32 sum per row, output and word lane: reduced across the lanes once, at the end
            acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K // 8), dtype=tl.float32)
        k_begin = pid_k * k_split
        # STAGES > 1: the loads of the next K steps go out (cp.async into shared memory) while this one
        # computes; Triton pipelines loads that feed a tl.dot on its own, the gemv's only when asked
        for step in tl.range(0, k_split, BLOCK_K, num_stages=STAGES):
            col = (k_begin + step) // 8 + words  # the words' columns in the packed weight
            packed = tl.load(w_ptr + rn[:, None] * stride_wn + col[None, :], mask=n_ok[:, None], other=0)
            # a word's 8 weights share a scale block (QBLOCK is a multiple of 8)
            scale = tl.load(
                s_ptr + rn[:, None] * stride_sn + (col * 8 // QBLOCK)[None, :], mask=n_ok[:, None], other=0.0
            )
            if LUT == 3:  # the 8 planes' nibbles joined (in registers), one gather for all, split again
                n0 = (packed >> 4) & 15
                n1 = packed & 15
                n2 = (packed >> 12) & 15
                n3 = (packed >> 8) & 15
                n4 = (packed >> 20) & 15
                n5 = (packed >> 16) & 15
                n6 = (packed >> 28) & 15
                n7 = (packed >> 24) & 15
                # join adds a last axis; split takes it off again, the last joined first
                q = tl.join(
                    tl.join(tl.join(n0, n1), tl.join(n2, n3)), tl.join(tl.join(n4, n5), tl.join(n6, n7))
                )
                flat = tl.gather(table, tl.reshape(q, (BLOCK_N * BLOCK_K,)), axis=0)
                q03, q47 = tl.split(tl.reshape(flat, (BLOCK_N, BLOCK_K // 8, 2, 2, 2)))
                p01, p23 = tl.split(q03)
                p45, p67 = tl.split(q47)
                v0, v1 = tl.split(p01)
                v2, v3 = tl.split(p23)
                v4, v5 = tl.split(p45)
                v6, v7 = tl.split(p67)
                values = (v0, v1, v2, v3, v4, v5, v6, v7)  # plane t's: values[t] (t a compile-time int)
                # and the step's x in one contiguous load (pipelined), split into the planes' columns the
                # same way: reshaped t = 4a + 2b + c, the axes turned to (c, b, a) as the joins made them
                xs = tl.load(
                    x_ptr + rm[:, None] * stride_xm + (k_begin + step + tl.arange(0, BLOCK_K))[None, :],
                    mask=m_ok[:, None],
                    other=0.0,
                )
                xs = tl.permute(tl.reshape(xs, (BLOCK_M, BLOCK_K // 8, 2, 2, 2)), (0, 1, 4, 3, 2))
                xq03, xq47 = tl.split(xs)
                xp01, xp23 = tl.split(xq03)
                xp45, xp67 = tl.split(xq47)
                x0, x1 = tl.split(xp01)
                x2, x3 = tl.split(xp23)
                x4, x5 = tl.split(xp45)
                x6, x7 = tl.split(xp67)
                x_planes = (x0, x1, x2, x3, x4, x5, x6, x7)
            # one plane per nibble position t: [BLOCK_N, BLOCK_K / 8] weights k = 8i + t, all in the
            # packed words' own layout (no reshape to [BLOCK_N, BLOCK_K], which cost Triton layout
            # conversions through shared memory: scripts/kernel_sass.py), each with its strided x columns
            for t in tl.static_range(8):
                nib = (packed >> (8 * (t // 2) + 4 * (1 - t % 2))) & 15
                if LUT == 3:
                    value = values[t]
                elif LUT == 0:
                    flat = tl.gather(table, tl.reshape(nib, (BLOCK_N * BLOCK_K // 8,)), axis=0)
                    value = tl.reshape(flat, (BLOCK_N, BLOCK_K // 8))
                elif LUT == 2:  # each weight's value loaded from the 64-byte table (an L1 hit)
                    value = tl.load(code_ptr + nib)
                else:  # bit 0 picks within pairs, bit 1 within fours, bit 2 within eights, bit 3 the half
                    b = (nib & 1) != 0
                    p0 = tl.where(b, c1, c0)
                    p1 = tl.where(b, c3, c2)
                    p2 = tl.where(b, c5, c4)
                    p3 = tl.where(b, c7, c6)
                    p4 = tl.where(b, c9, c8)
                    p5 = tl.where(b, c11, c10)
                    p6 = tl.where(b, c13, c12)
                    p7 = tl.where(b, c15, c14)
                    b = (nib & 2) != 0
                    q0 = tl.where(b, p1, p0)
                    q1 = tl.where(b, p3, p2)
                    q2 = tl.where(b, p5, p4)
                    q3 = tl.where(b, p7, p6)
                    b = (nib & 4) != 0
                    r0 = tl.where(b, q1, q0)
                    r1 = tl.where(b, q3, q2)
                    value = tl.where((nib & 8) != 0, r1, r0)
                w = value * scale
                if LUT == 3:
                    x = x_planes[t]
                else:  # plane t's x columns, 8 apart: loaded one by one (no cp.async for 2-byte pieces)
                    x = tl.load(
                        x_ptr + rm[:, None] * stride_xm + (col * 8 + t)[None, :],
                        mask=m_ok[:, None],
                        other=0.0,
                    )
                if DOT:  # the tensor cores' operand in x's dtype: as bitsandbytes dequantizes, rounded once
                    acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=PRECISION)
                else:  # float32 weights, not rounded (a conversion costs more than the rest of a weight's work)
                    acc += x.to(tl.float32)[:, None, :] * w[None, :, :]
        if not DOT:
            acc = tl.sum(acc, axis=2)
        out = out_ptr + pid_k * stride_os + rm[:, None] * stride_om + rn[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    def _nf4_bytes_kernel(
        x_ptr, b_ptr, s_ptr, code_ptr, out_ptr,
        M, N, k_split,
        stride_xm, stride_bn, stride_sn, stride_om, stride_os,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, QBLOCK: tl.constexpr,
        PRECISION: tl.constexpr, STAGES: tl.constexpr,
    ):  # fmt: skip
        """The "bytes" reading (module docstring): the output's transpose, out^T [BLOCK_N, BLOCK_M] =
        code [BLOCK_N, BLOCK_K] @ x^T [BLOCK_K, BLOCK_M] x scale [BLOCK_N], one tl.dot a K step (BLOCK_K
        divides QBLOCK: one scale a row and step, applied to the step's sums). The weights arrive as
        bitsandbytes' bytes [BLOCK_N, BLOCK_K / 2]; each byte is looked up once in a 256-entry table of
        its two nibbles' values in x's dtype, packed in an integer twice as wide (element 2j, the high
        nibble's, in the low half): the halves, joined, are the tile's elements in order."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)  # rows in blocks: any number of them
        n_ok = rn < N
        m_ok = rm < M
        dtype = x_ptr.dtype.element_ty
        bits = tl.int16 if dtype.primitive_bitwidth == 16 else tl.int32
        pair = tl.int32 if dtype.primitive_bitwidth == 16 else tl.int64
        width: tl.constexpr = dtype.primitive_bitwidth
        entry = tl.arange(0, 256)
        # (names apart from the loop's: Triton takes a name reassigned in the loop for a loop variable)
        high = tl.load(code_ptr + (entry >> 4)).to(dtype).to(bits, bitcast=True)  # element 2j's nibble
        low = tl.load(code_ptr + (entry & 15)).to(dtype).to(bits, bitcast=True)
        mask = (1 << width) - 1
        table = (high.to(pair) & mask) | (low.to(pair) << width)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        k_begin = pid_k * k_split
        for step in tl.range(0, k_split, BLOCK_K, num_stages=STAGES):
            k0 = k_begin + step
            byte = tl.load(
                b_ptr + rn[:, None] * stride_bn + (k0 // 2 + tl.arange(0, BLOCK_K // 2))[None, :],
                mask=n_ok[:, None],
                other=0,
            ).to(tl.int32)
            both = tl.reshape(
                tl.gather(table, tl.reshape(byte, (BLOCK_N * BLOCK_K // 2,)), axis=0), byte.shape
            )
            even = (both & mask).to(bits).to(dtype, bitcast=True)
            odd = (both >> width).to(bits).to(dtype, bitcast=True)
            w = tl.reshape(tl.join(even, odd), (BLOCK_N, BLOCK_K))  # element 2j, then 2j + 1
            xt = tl.load(
                x_ptr + rm[None, :] * stride_xm + (k0 + tl.arange(0, BLOCK_K))[:, None],
                mask=m_ok[None, :],
                other=0.0,
            )
            scale = tl.load(s_ptr + rn * stride_sn + k0 // QBLOCK, mask=n_ok, other=0.0)
            acc += tl.dot(w, xt, input_precision=PRECISION) * scale[:, None]
        out = out_ptr + pid_k * stride_os + rm[None, :] * stride_om + rn[:, None]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])

    def _sum_splits_kernel(partial_ptr, out_ptr, size, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
        """out = the sum of the split-K partial sums [SPLIT, size], in order, in out's dtype: one kernel
        where torch takes two (the sum, then the cast), one node fewer in a CUDA graph."""
        at = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = at < size
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for sp in tl.static_range(SPLIT):
            acc += tl.load(partial_ptr + sp * size + at, mask=ok, other=0.0)
        tl.store(out_ptr + at, acc.to(out_ptr.dtype.element_ty), mask=ok)


def _bytes_rows(itemsize: int) -> int:
    """The bytes kernel's rows a program for inputs of `itemsize` bytes (BYTES_BLOCK_M; half for float32)."""
    return BYTES_BLOCK_M * 2 // max(itemsize, 2)


def _config(m: int, n: int, k: int, qblock: int, itemsize: int = 2) -> tuple[str, int, int, int, int]:
    """(which TILES entry, BLOCK_M, BLOCK_N, BLOCK_K, split) for an [m, k] x [k, n] product of inputs of
    `itemsize` bytes, with a scale every qblock weights of K: split K until the programs (N blocks x row
    blocks x splits) reach the entry's "programs" (an H100 has 132 SMs), each K range a whole number of
    BLOCK_K columns."""
    kind = "gemv" if m <= GEMV_ROWS else "dot"
    tile = TILES[kind]
    for key in ("block_n", "block_k"):  # the halving below and tl.arange take powers of two only
        if tile[key] < 1 or tile[key] & (tile[key] - 1):
            raise ValueError(f"TILES[{kind!r}][{key!r}] must be a power of two, got {tile[key]}")
    if tile["lut"] == "bytes":  # one tl.dot a K step, rows as its N: at least 16 of each
        # and a K step within one scale block (QBLOCK: bitsandbytes' blocksize, a power of two from 32)
        block_m, block_n = min(max(16, triton.next_power_of_2(m)), _bytes_rows(itemsize)), tile["block_n"]
        block_k = min(max(tile["block_k"], 16), qblock)
    else:
        block_m = triton.next_power_of_2(m) if kind == "gemv" else (16 if m <= 16 else 32)
        # a dot's K (a plane's BLOCK_K / 8 columns) is at least 16
        block_n, block_k = tile["block_n"], max(tile["block_k"], 128 if kind == "dot" else 8)
    while k % block_k:  # k is a multiple of 256 (supported)
        block_k //= 2
    n_blocks = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)  # (the plane kernels: one row block)
    split = 1
    while n_blocks * split < tile["programs"] and k % (block_k * split * 2) == 0:
        split *= 2
    return kind, block_m, block_n, block_k, split


@torch.compiler.disable  # compiled code calls nf4_matmul_op; a frame torch.compile runs eagerly, this as it is
def nf4_matmul(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, code: torch.Tensor
) -> torch.Tensor:
    """x [M, K] (M <= kernel_rows(), K a multiple of 256) times the NF4 weight [N, K]^T: [M, N] in x's dtype.
    packed: bitsandbytes' bytes as uint8 [N, K/2], or the same memory as int32 [N, K/8]. float32 inputs
    multiply in full float32 (no TF32), as bitsandbytes' float32 path does."""
    m, k = x.shape
    words = packed if packed.dtype == torch.int32 else packed.view(torch.int32)
    n = words.shape[0]
    if m == 0:
        return torch.empty(0, n, dtype=x.dtype, device=x.device)
    qblock = k // scale.shape[1]
    kind, block_m, block_n, block_k, split = _config(m, n, k, qblock, x.element_size())
    tile = TILES[kind]
    if tile["lut"] != "bytes" and m > MAX_ROWS:  # the plane kernels' rows are one block of 16 or 32
        raise ValueError(f"the NF4 kernel's {tile['lut']!r} tiles take at most {MAX_ROWS} rows, not {m}")
    if x.stride(1) != 1:
        x = x.contiguous()
    if split == 1:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    else:
        out = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, block_n), split, triton.cdiv(m, block_m))
    if tile["lut"] == "bytes":
        jitted(_nf4_bytes_kernel)[grid](
            x, words.view(torch.uint8), scale, code, out, m, n, k // split,
            x.stride(0), words.stride(0) * 4, scale.stride(0), n, m * n,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, QBLOCK=qblock,
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32", STAGES=tile["num_stages"],
            num_warps=tile["num_warps"], num_stages=tile["num_stages"],
        )  # fmt: skip
    else:
        jitted(_nf4_kernel)[grid](
            x, words, scale, code, out, m, n, k // split, x.stride(0), words.stride(0), scale.stride(0), n, m * n,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, QBLOCK=qblock,
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32", LUT=LUTS[tile["lut"]],
            DOT=kind == "dot", STAGES=tile["num_stages"], num_warps=tile["num_warps"], num_stages=tile["num_stages"],
        )  # fmt: skip
    if split == 1:
        return out
    summed = torch.empty(m, n, dtype=x.dtype, device=x.device)
    jitted(_sum_splits_kernel)[(triton.cdiv(m * n, SUM_BLOCK),)](
        out, summed, m * n, SPLIT=split, BLOCK=SUM_BLOCK
    )
    return summed


@torch.library.custom_op("mygpt::nf4_matmul", mutates_args=())
def nf4_matmul_op(
    x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, code: torch.Tensor
) -> torch.Tensor:
    """nf4_matmul as torch.compile takes it (runner.compile_layers): one opaque op."""
    return nf4_matmul(x, words, scale, code)


@nf4_matmul_op.register_fake
def _(x, words, scale, code):
    return x.new_empty(x.shape[0], words.shape[0])


def kernel_rows() -> int:
    """The most rows a product takes the kernel for: MAX_ROWS for the plane kernels (a dot's rows are one
    block of 16 or 32), any number where the dot's tile reads "bytes" (rows in blocks: BYTES_BLOCK_M)."""
    return sys.maxsize if TILES["dot"]["lut"] == "bytes" else MAX_ROWS


def configurations_of(n: int, k: int, qblock: int, itemsize: int) -> list[int]:
    """Row counts that together take every configuration (_config) that an [m, k] x [k, n] product of up
    to kernel_rows() rows runs: for each, its fewest rows that are a multiple of 16 and its fewest that
    are not (Triton compiles apart for an M divisible by 16). The bytes kernel's K split only shrinks as
    its row blocks grow: once a full row block runs unsplit, every larger m takes that configuration."""
    seen: dict[tuple, list[int]] = {}
    full = _bytes_rows(itemsize)
    m = 1
    while m <= kernel_rows():
        config = _config(m, n, k, qblock, itemsize)
        found = seen.setdefault(config, [])
        if not any((r % 16 == 0) == (m % 16 == 0) for r in found):
            found.append(m)
        if config[1] == full and config[4] == 1 and len(found) == 2:
            break
        m += 1
    return sorted(r for rows in seen.values() for r in rows)


def plan_of(best: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """A product's plan from the fastest path at each measured row count [(rows, path)], ascending:
    the sizes where the path changes ((most rows, path) for each run of sizes that share a path; the
    last entry for every larger count), and never the kernel past kernel_rows()."""
    out: list[tuple[int, str]] = []
    for most, way in best:
        if way == "kernel" and most > kernel_rows():
            raise ValueError(f"the NF4 kernel takes at most {kernel_rows()} rows, not {most}")
        if out and out[-1][1] == way:
            out[-1] = (most, way)
        else:
            out.append((most, way))
    if out and out[-1][1] == "kernel" and kernel_rows() == MAX_ROWS:  # past its last size: the layers
        out.append((out[-1][0] + 1, "layers"))
    return out


def _settings() -> tuple:
    """The module's kernel settings as they stand (gpu_check's sweep and tests change them)."""
    tiles = tuple((kind, tuple(sorted(tile.items()))) for kind, tile in sorted(TILES.items()))
    return MAX_ROWS, GEMV_ROWS, tiles


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
        if k % 256 or k % qs.blocksize or qs.blocksize % 8 or layer.weight.dtype != torch.uint8:
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
    The layers' packed weights become views of one concatenation (no second copy), which the Triton
    kernel (up to kernel_rows() rows) and bitsandbytes' fused op read; the layers (bitsandbytes) read their
    views. Which of the three runs at each row count: path(), as choose() measured it."""

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
        self.words = packed.view(torch.int32)  # the same memory, four bytes at a time (the kernel's)
        self.scale = torch.cat([nf4_scales(layer.weight) for layer in layers])
        self.code = layers[0].weight.quant_state.code.float().to(packed.device)
        self.compute_dtype = layers[0].compute_dtype  # None: the input's, as bitsandbytes' layer does
        self.enabled = True
        # verify(): the input dtype and kernel settings the kernel was checked with for compiled layers
        self.verified_for: tuple | None = None
        # choose(): the path of a product of m rows, as (most rows, path) pairs in ascending order, the last
        # for every larger m; None: the kernel up to kernel_rows() rows, the layers past it
        self.paths: list[tuple[int, str]] | None = None
        self.timings: dict[int, dict[str, float]] = {}  # choose()'s: rows -> path -> seconds a call

    def _bnb(self, x2: torch.Tensor) -> torch.Tensor:
        outs = [layer(x2) for layer in self.layers]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def _fused(self, x2: torch.Tensor) -> torch.Tensor:
        """bitsandbytes' own 4-bit op once over the concatenated weights, with their double quantization
        undone once (self.scale), where the layers take one op each: the same products, one launch."""
        n, k = self.packed.shape[0], self.packed.shape[1] * 2
        if x2.shape[0] == 0:  # (bitsandbytes' layers return early there; its op would launch on nothing)
            return x2.new_empty(0, n)
        return torch.ops.bitsandbytes.gemm_4bit.default(
            x2, self.packed.view(-1, 1), [n, k], self.scale.view(-1), k // self.scale.shape[1], "nf4"
        )

    def _fused_ok(self, x2: torch.Tensor) -> bool:
        """Once per input shape (bitsandbytes picks its kernel by rows and shape): the fused op against
        the layers' own products. choose() asks at each size it measures and keeps the op only where it
        agreed; the row counts between and past the measured sizes take the plan's path unchecked.
        bitsandbytes picks its implementation by rows and by the joined N, which may differ from the
        one each layer gets: equal within rounding."""
        n, k = self.packed.shape[0], self.packed.shape[1] * 2
        key = ("nf4 fused", str(x2.device), n, k, k // self.scale.shape[1], x2.dtype, x2.shape[0])
        return check_once(NF4Product._checked, key, lambda: self._fused(x2), lambda: self._bnb(x2))

    def path(self, m: int) -> str:
        """The path a product of m rows takes (PATHS): the plan choose() measured, or without one the
        kernel up to kernel_rows() rows and the layers past it. Compiled code compares m with each change
        of path only (a guard each: a kind of step compiles once a band, graphs.py warm_compile)."""
        if self.paths is None:
            return "kernel" if m <= kernel_rows() else "layers"
        way = self.paths[-1][1]
        for most, w in self.paths[:-1]:
            if m <= most:
                way = w
                break
        # (choose's plans never take the kernel past kernel_rows(), where m <= most decided it already;
        # a plan measured with the bytes kernel and kept after the tiles changed may)
        return "layers" if way == "kernel" and m > kernel_rows() else way

    def choose(
        self,
        dtype: torch.dtype,
        sizes: list[int],
        timer: Callable[[Callable[[], object], int], float],
        peers: list[NF4Product] | None = None,
    ) -> list[tuple[int, str]]:
        """Measures the paths and keeps the fastest at each row count (self.paths, merged: plan_of): at
        every size in `sizes` and at PROMPT_ROWS, bitsandbytes layer by layer and once over the joined
        weights, and up to kernel_rows() rows the kernel (while enabled); a path that disagrees with the
        layers' products (check_once) or fails is never kept. timer(fn, rows) -> the seconds fn takes
        as steps of that many rows run it (the runner's: on the device, inside a CUDA graph for graphed
        sizes). Each timed call runs the path on this product and its peers (products of the same
        shape: other layers'), as a step reads every layer's weights once: not one product's weights
        from the GPU's cache. Inputs: random rows of `dtype` (the layers' compute dtype where they set
        one). Returns the plan."""
        k = self.packed.shape[1] * 2
        dtype = self.compute_dtype or dtype
        group = [self, *(peers or [])]
        g = torch.Generator(device=self.packed.device).manual_seed(0)
        best, self.timings = [], {}
        for m in sorted({*(s for s in sizes if s > 0), PROMPT_ROWS}):
            x = torch.randn(m, k, generator=g, device=self.packed.device).to(dtype)
            ways: dict[str, Callable[[NF4Product], object]] = {"layers": lambda p, x=x: p._bnb(x)}
            if self._fused_ok(x):
                ways["fused"] = lambda p, x=x: p._fused(x)
            if self.enabled and m <= kernel_rows() and self._kernel_ok(x):
                ways["kernel"] = lambda p, x=x: nf4_matmul(x, p.words, p.scale, p.code)
            times = {}
            for way, run in ways.items():
                try:
                    times[way] = timer(lambda run=run: [run(p) for p in group], m) / len(group)
                except Exception:
                    log.warning("timing the NF4 product's %s path at %d rows failed", way, m, exc_info=True)
            self.timings[m] = times
            best.append((m, min(times, key=times.__getitem__) if times else "layers"))
        self.paths = plan_of(best)
        return self.paths

    def _kernel_ok(self, x2: torch.Tensor) -> bool:
        """Once per product shape: the kernel against bitsandbytes on this input (not during a CUDA
        graph capture: the first call of a shape is always eager, graphs.py warms up before capturing)."""
        n, k = self.packed.shape[0], self.packed.shape[1] * 2
        qblock = k // self.scale.shape[1]
        config = _config(x2.shape[0], n, k, qblock, x2.element_size())
        key = (str(x2.device), n, k, qblock, x2.dtype, config, tuple(TILES[config[0]].values()))
        return check_once(
            NF4Product._checked,
            ("nf4", *key),
            lambda: nf4_matmul(x2, self.words, self.scale, self.code),
            lambda: self._bnb(x2),
        )

    def verify(self, dtype: torch.dtype) -> bool:
        """Checks the kernel for inputs of `dtype` (the model's; the layers' compute dtype where they set
        one) in each configuration its products take (_config: with GEMV_ROWS 1 and the plane kernels,
        the gemv at 1 row and the dot's two row blocks up to MAX_ROWS; with the bytes tiles, each row
        block and K split a step of any rows takes: configurations_of), on random rows, against
        bitsandbytes; returns whether all agree. Called before torch.compile traces the product
        (runner.compile_layers): compiled code calls the kernel as one opaque op, where the per-shape
        check of eager steps (a host read of the result) cannot run. Compiled code calls the kernel
        only for the dtype and settings verified here (verified_for), bitsandbytes otherwise."""
        n, k = self.packed.shape[0], self.packed.shape[1] * 2
        dtype = self.compute_dtype or dtype
        qblock = k // self.scale.shape[1]
        g = torch.Generator(device=self.packed.device).manual_seed(0)
        ok = True
        for m in configurations_of(n, k, qblock, torch.empty(0, dtype=dtype).element_size()):
            ok &= self._kernel_ok(torch.randn(m, k, generator=g, device=self.packed.device).to(dtype))
        self.verified_for = (dtype, _settings()) if ok else None
        return ok

    @property
    def compiled_ok(self) -> bool:
        """Whether compiled layers may call the kernel, for verify()'s dtype."""
        return self.verified_for is not None and self.verified_for[1] == _settings()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if self.compute_dtype is not None and x2.dtype != self.compute_dtype:
            x2 = x2.to(self.compute_dtype)
        way = self.path(x2.shape[0]) if self.enabled else "layers"
        if torch.compiler.is_compiling():  # runner.compile_layers: verified, or bitsandbytes' traced ops
            # (compared while torch.compile traces: guards, nothing at run time)
            verified = self.verified_for == (x2.dtype, _settings())
            if way == "kernel" and verified:
                y = nf4_matmul_op(x2, self.words, self.scale, self.code)
            else:
                y = self._fused(x2) if way == "fused" else self._bnb(x2)
        elif way == "kernel" and self._kernel_ok(x2):
            y = nf4_matmul(x2, self.words, self.scale, self.code)
        elif way == "fused":  # choose() kept it where it agreed with the layers
            y = self._fused(x2)
        else:
            y = self._bnb(x2)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])
