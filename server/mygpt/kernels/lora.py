"""Triton kernels for the LoRA terms of a step: every row (token) on its own adapter slot, read straight
from the stacked slots (lora/layers.py: A^T [S, in, P*R], each part's B^T [S, R, out_p]). The runner uses
them (lora_kernel) in graphed decode steps and in its eager steps, compiled or not (torch.compile calls
them as one opaque op, mygpt::lora_added, which returns new outputs where the eager steps add in place).

    h[t, :]            = x[t, :] @ A^T[slot(t)]                 shrink: [N, P*R]
    y_p[t, :]         += h[t, p*R : (p+1)*R] @ B^T_p[slot(t)]   expand, into the part's output in place

A row whose slot is -1 (the base model, or a padding row) adds nothing. The grouped products they
replace (lora_delta: rows gathered into [S, M] slot groups, two batched matmuls, the padding masked,
the rows scattered back, then added) take about eleven small kernels a projection group, 35 a decoder
layer; on the H100 the LoRA terms took 1.3 of an 8.1 ms one-row step and 3.3 of a 21 ms 32-row step
(docs/benchmarks.md, run 4). These take one shrink and one expand a group where its parts' B^T and
outputs lie side by side (FusedLinear's stacks, and its joined output: q/k/v, gate/up), one a part
otherwise: 8 kernels a layer (11), no gather, scatter, mask or add, and the step no longer depends on
how the rows group by adapter.

The shrink splits K (SHRINK_K columns a program) for parallelism: a row's A is in x P*R values (393 KB
for q/k/v at rank 16 on the 8B shape), too much for one program; the partial sums go to a float32
buffer that the expand adds up (in a fixed order: the same result on every run, no atomics). h and
the expanded term are rounded to the model's dtype where the batched matmuls round them (their
outputs), so the two paths differ only in their sums' order.

Tested on the CPU through Triton's interpreter against lora_delta; compiled for sm_90 without a GPU by
scripts/kernel_sass.py (no spills). Not yet run on a GPU: experimental, off (--lora-kernel).
"""

from __future__ import annotations

import torch

from mygpt.kernels import check_once, jitted, triton

SHRINK_K = 512  # columns of x (rows of A^T) per shrink program; a multiple of its K step
SHRINK_TILE = 8192  # the shrink's K step x its P*R columns (padded to a power of two): 64 float32 sums a
# thread at 4 warps, whatever the rank (a fixed K step of 128 spilled at rank 64 on q/k/v)
EXPAND_N = 128  # output columns per expand program

if triton is not None:
    import triton.language as tl

    def _shrink_kernel(
        x_ptr, a_ptr, slot_ptr, h_ptr,
        K, R_ALL, stride_xm, stride_as, stride_hs,
        K_SPLIT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ):  # fmt: skip
        t = tl.program_id(0)
        pid_k = tl.program_id(1)
        s = tl.load(slot_ptr + t)
        rr = tl.arange(0, BLOCK_R)
        r_ok = rr < R_ALL
        acc = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)  # one sum per K lane, reduced at the end
        if s >= 0:
            for k0 in tl.range(pid_k * K_SPLIT, tl.minimum(pid_k * K_SPLIT + K_SPLIT, K), BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                k_ok = rk < K
                x = tl.load(x_ptr + t * stride_xm + rk, mask=k_ok, other=0.0).to(tl.float32)
                a = tl.load(
                    a_ptr + s.to(tl.int64) * stride_as + rk[:, None] * R_ALL + rr[None, :],
                    mask=k_ok[:, None] & r_ok[None, :],
                    other=0.0,
                )
                acc += x[:, None] * a.to(tl.float32)
        tl.store(h_ptr + pid_k * stride_hs + t * R_ALL + rr, tl.sum(acc, axis=0), mask=r_ok)

    def _expand_kernel(
        h_ptr, b_ptr, slot_ptr, y_ptr, o_ptr,
        N_OUT, R, R_ALL, r_off, OFF1, OFF2, stride_hs, stride_bs, stride_br, stride_ym, stride_om,
        SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PARTS: tl.constexpr,
        COPY: tl.constexpr,
    ):  # fmt: skip
        # o = y + the term; COPY: o is another tensor, which rows without an adapter copy y into.
        # PARTS > 1: the N_OUT columns are the parts side by side (part 1 from column OFF1, part 2 from
        # OFF2), each column's term from its part's R columns of h
        t = tl.program_id(0)
        pid_n = tl.program_id(1)
        s = tl.load(slot_ptr + t)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N_OUT
        if s >= 0:
            rr = tl.arange(0, BLOCK_R)
            r_ok = rr < R
            h0 = tl.zeros((BLOCK_R,), dtype=tl.float32)
            h1 = tl.zeros((BLOCK_R,), dtype=tl.float32)
            h2 = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for sp in tl.static_range(SPLIT):  # the shrink's partial sums, in order
                at = h_ptr + sp * stride_hs + t * R_ALL + r_off + rr
                h0 += tl.load(at, mask=r_ok, other=0.0)
                if PARTS > 1:
                    h1 += tl.load(at + R, mask=r_ok, other=0.0)
                if PARTS > 2:
                    h2 += tl.load(at + 2 * R, mask=r_ok, other=0.0)
            y_dtype = y_ptr.dtype.element_ty
            lora_dtype = b_ptr.dtype.element_ty  # the batched matmuls' dtype: the adapters'
            # rounded where the batched matmul rounds its output, then each column's part
            h = tl.broadcast_to(h0.to(lora_dtype).to(tl.float32)[:, None], (BLOCK_R, BLOCK_N))
            if PARTS > 1:
                h = tl.where((rn >= OFF1)[None, :], h1.to(lora_dtype).to(tl.float32)[:, None], h)
            if PARTS > 2:
                h = tl.where((rn >= OFF2)[None, :], h2.to(lora_dtype).to(tl.float32)[:, None], h)
            b = tl.load(
                b_ptr + s.to(tl.int64) * stride_bs + rr[:, None] * stride_br + rn[None, :],
                mask=r_ok[:, None] & n_ok[None, :],
                other=0.0,
            )
            o = tl.sum(h * b.to(tl.float32), axis=0).to(lora_dtype)  # the term, rounded as bmm's
            y = tl.load(y_ptr + t * stride_ym + rn, mask=n_ok)
            tl.store(o_ptr + t * stride_om + rn, (y.to(tl.float32) + o.to(tl.float32)).to(y_dtype), mask=n_ok)
        elif COPY:
            tl.store(o_ptr + t * stride_om + rn, tl.load(y_ptr + t * stride_ym + rn, mask=n_ok), mask=n_ok)


@torch.compiler.disable  # compiled code calls lora_added; a frame torch.compile runs eagerly, this as it is
def add_lora(
    x: torch.Tensor,
    at_all: torch.Tensor,
    bts: list[torch.Tensor],
    outs: list[torch.Tensor],
    rows: torch.Tensor,
    into: list[torch.Tensor] | None = None,
) -> None:
    """outs[p] += each row's LoRA term of part p, in place; or into[p] = outs[p] + that term, outs left as
    they are. x [..., in] (N rows); at_all [S, in, P*R] contiguous; bts[p] [S, R, out_p] with unit
    column stride (a column block of a wider stack, as FusedLinear keeps them, is fine); outs[p] and
    into[p] [..., out_p] with unit column stride (a column block of a wider output is fine); rows [N]
    each row's adapter slot (-1: none). Where the parts' stacks, outputs and results each lie side by
    side in one tensor (FusedLinear's), one expand covers every part; otherwise one a part."""
    if not at_all.is_contiguous() or any(bt.stride(2) != 1 for bt in bts):
        raise ValueError(
            "add_lora reads whole adapter stacks (a FusedLinear part's A^T is a view: use the FusedLinear)"
        )
    s_all, k, r_all = at_all.shape
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    if x2.dtype != at_all.dtype:
        x2 = x2.to(at_all.dtype)
    n = x2.shape[0]
    if n == 0:
        return
    split = triton.cdiv(k, SHRINK_K)
    h = torch.empty(split, n, r_all, dtype=torch.float32, device=x.device)
    block_r = triton.next_power_of_2(r_all)
    block_k = max(16, min(128, SHRINK_TILE // block_r))
    jitted(_shrink_kernel)[(n, split)](
        x2, at_all, rows, h, k, r_all, x2.stride(0), at_all.stride(0), n * r_all,
        K_SPLIT=SHRINK_K, BLOCK_K=block_k, BLOCK_R=block_r,
    )  # fmt: skip
    r = bts[0].shape[1]
    ys = [_rows(out, n, bt.shape[2]) for bt, out in zip(bts, outs, strict=True)]
    results = ys if into is None else [_rows(o, n, bt.shape[2]) for bt, o in zip(bts, into, strict=True)]

    def expand(bt, y, o, first: int, parts: int, offs: tuple[int, int]) -> None:
        n_out = bt.shape[2]
        jitted(_expand_kernel)[(n, triton.cdiv(n_out, EXPAND_N))](
            h, bt, rows, y, o, n_out, r, r_all, first * r, *offs, n * r_all, bt.stride(0), bt.stride(1),
            y.stride(0), o.stride(0), SPLIT=split, BLOCK_N=EXPAND_N, BLOCK_R=triton.next_power_of_2(r),
            PARTS=parts, COPY=into is not None,
        )  # fmt: skip

    joined = [_side_by_side(ts) for ts in (bts, ys, results)] if 1 < len(bts) <= 3 else [None]
    if all(j is not None for j in joined):  # one expand for every part (FusedLinear's joined output)
        widths = [bt.shape[2] for bt in bts]
        total = sum(widths)
        expand(*joined, 0, len(bts), (widths[0], widths[0] + widths[1] if len(bts) > 2 else total))
    else:
        for p, (bt, y, o) in enumerate(zip(bts, ys, results, strict=True)):
            expand(bt, y, o, p, 1, (bt.shape[2], bt.shape[2]))


def _side_by_side(ts: list[torch.Tensor]) -> torch.Tensor | None:
    """ts (each [..., w_i], unit column stride) as one tensor [..., sum w_i] where they are consecutive
    column blocks of one (FusedLinear's stacks and outputs); None otherwise. Adjacent addresses are not
    enough: the CUDA caching allocator puts separate one-row tensors end to end, and a view across
    them would reach out of the first one's storage."""
    first, width = ts[0], sum(t.shape[-1] for t in ts)
    storage = first.untyped_storage().data_ptr()

    def strides(t: torch.Tensor) -> list[int]:  # the leading dimensions'; a size-1 one's means nothing
        return [st for st, size in zip(t.stride()[:-1], t.shape[:-1], strict=True) if size != 1]

    at = first.data_ptr()
    for t in ts:
        same = (t.dtype, t.device, t.shape[:-1]) == (first.dtype, first.device, first.shape[:-1])
        if not same or strides(t) != strides(first) or t.stride(-1) != 1 or t.data_ptr() != at:
            return None
        if t.untyped_storage().data_ptr() != storage:
            return None
        at += t.shape[-1] * t.element_size()
    if first.dim() >= 2 and first.shape[-2] > 1 and width > first.stride(-2):
        return None  # the blocks' rows would overlap: not one tensor's columns
    return first.as_strided((*first.shape[:-1], width), first.stride())


def _rows(out: torch.Tensor, n: int, n_out: int) -> torch.Tensor:
    """An output [..., out] as [rows, out] (a view: the kernels write into it)."""
    y = out.reshape(-1, n_out) if out.is_contiguous() else out.view(n, n_out)
    assert y.stride(1) == 1 and y.shape[0] == n, "each output a [rows, out] block with unit column stride"
    return y


@torch.library.custom_op("mygpt::lora_added", mutates_args=())
def lora_added(
    ys: list[torch.Tensor], x: torch.Tensor, at_all: torch.Tensor, bts: list[torch.Tensor], rows: torch.Tensor
) -> list[torch.Tensor]:
    """add_lora as torch.compile takes it (runner.compile_layers): new tensors ys + each row's LoRA terms,
    ys unchanged. ys: one output per part, or one output whose column blocks are the parts
    (FusedLinear.joined). One opaque op: inductor neither traces into the kernels nor fuses around them."""
    results = [torch.empty_like(y, memory_format=torch.contiguous_format) for y in ys]
    add_lora(x, at_all, bts, parts(ys, bts), rows, parts(results, bts))
    return results


@lora_added.register_fake
def _(ys, x, at_all, bts, rows):
    return [torch.empty_like(y, memory_format=torch.contiguous_format) for y in ys]


def with_lora(
    ys: list[torch.Tensor], x: torch.Tensor, at_all: torch.Tensor, bts: list[torch.Tensor], rows: torch.Tensor
) -> list[torch.Tensor]:
    """ys (one output a part, or one whose column blocks are the parts) with each row's LoRA terms: added
    in place (add_lora), or under torch.compile as new tensors (lora_added, one opaque op)."""
    if torch.compiler.is_compiling():
        return lora_added(ys, x, at_all, bts, rows)
    add_lora(x, at_all, bts, parts(ys, bts), rows)
    return ys


def parts(ys: list[torch.Tensor], bts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each part's output: ys itself, or the column blocks of its one tensor."""
    if len(ys) == len(bts):
        return ys
    if len(ys) != 1:
        raise ValueError(f"{len(ys)} outputs for {len(bts)} parts: one output or one a part")
    return list(ys[0].split([bt.shape[2] for bt in bts], dim=-1))


def verified(groups: list[tuple[torch.Tensor, list[torch.Tensor]]]) -> bool:
    """Whether the kernels may run for these projection groups (each: its A^T stack and its parts' B^T
    stacks): once per group shape, the kernels' terms against the grouped products' (lora_delta) on
    random adapters in two slots and three rows (one on the base model), compiled for this device and
    dtype, added in place (eager steps) and into new outputs (lora_added: compiled layers). A kernel
    that fails or disagrees is never used (a warning; the grouped products run)."""
    from mygpt.lora.layers import LoRABatch, lora_delta, set_rows

    ok = True
    for at_all, bts in groups:
        device, dtype, (_, d_in, r_all) = at_all.device, at_all.dtype, at_all.shape
        key = ("lora", str(device), dtype, d_in, r_all, bts[0].shape[1], tuple(bt.shape[2] for bt in bts))
        if key in _checked:
            ok &= _checked[key]
            continue
        g = torch.Generator(device=device).manual_seed(0)
        a = (torch.randn(2, d_in, r_all, generator=g, device=device) * 0.05).to(dtype)
        widths = [bt.shape[2] for bt in bts]
        # the parts' B^T side by side, as FusedLinear keeps them
        b_all = (torch.randn(2, bts[0].shape[1], sum(widths), generator=g, device=device) * 0.05).to(dtype)
        b = list(b_all.split(widths, dim=2))
        x = torch.randn(3, d_in, generator=g, device=device).to(dtype)
        rows = [1, -1, 0]
        # small outputs to add to: the check weighs the terms, and the row on the base model its copy
        base = (torch.randn(3, sum(widths), generator=g, device=device) * 0.01).to(dtype)

        def kernels(a=a, b=b, x=x, rows=rows, base=base, widths=widths) -> tuple[torch.Tensor, ...]:
            slots = torch.tensor(rows, device=x.device)
            joined = base.clone()  # one output, the parts its column blocks: one expand for all
            add_lora(x, a, b, list(joined.split(widths, dim=-1)), slots)
            apart = [y.clone() for y in base.split(widths, dim=-1)]  # one output a part: one expand each
            add_lora(x, a, b, apart, slots)
            (compiled,) = lora_added([base], x, a, b, slots)  # new outputs (compiled layers)
            return joined, torch.cat(apart, dim=-1), compiled

        def grouped(a=a, b=b, x=x, rows=rows, base=base) -> tuple[torch.Tensor, ...]:
            batch = LoRABatch()
            set_rows(batch, rows, a.shape[2], a.dtype, a.device)
            deltas = lora_delta(batch, x, a, b)
            want = base + torch.cat([d.to(base.dtype) for d in deltas], dim=-1)
            return want, want, want

        ok &= check_once(_checked, key, kernels, grouped)
    return ok


_checked: dict[tuple, bool] = {}  # group shape -> the kernels agreed with the grouped products
