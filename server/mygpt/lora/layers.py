"""Per-row LoRA on unmerged (4-bit) base layers: every adapter in the batch in two batched matmuls.

All resident adapters of one module are stacked: A_all^T [S, in, R] and B_all^T [S, R, out] (slot s
owns index s, its rank's columns/rows first and zeros past them; zeros where the adapter skips the
module). A step's tokens are grouped by slot into [S, M, in]
(M = most tokens on one slot; padding rows are zeroed), then

    h = bmm(x_grouped, A^T) [S, M, R]    o = bmm(h, B^T) [S, M, out]    y[t] = base(x)[t] + o[slot(t), j(t)]


One bmm pair per projection for any mix of adapters, ranks (zero-padded to R) and target modules (zero
blocks): no loop over adapters, no global set_adapter, no weights copied. Its cost is S*M token-slots,
never more than a dense mask over all slots (N*S) and equal to one adapter's when the tokens spread
evenly (measured: docs/benchmarks.md).

Projections that read the same input (q/k/v; gate/up) run as one FusedLinear: one base product where
the base weights can be concatenated, and one A product over the parts' A^T side by side
[S, in, P*R]; the B products stay one per part (a block-diagonal B measured slower on the CPU and
costs P times the memory). Per layer: 4 base products and 11 LoRA products instead of 7 and 14 (on the
2-core CPU each small call costs more in overhead than in arithmetic: docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mygpt.kernels import lora as lora_kernels

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The batch-invariant layout (set_rows(invariant=True)): torch's CPU bmm rounds a row in one of a few
# ways, by the product's shape: one batch entry (S = 1) or more, fewer than 4 rows per entry or more
# (measured at every LoRA shape of the default model). With S >= 2 and M >= 4 a row's result is the
# same for any S, M and row position, so it no longer depends on how many rows share the step or its
# adapter (B5: a seeded request's sample on an adapter changed in a busy batch). It costs a row more
# work (1 row on 1 adapter: 17.4 ms a step instead of 13.7, docs/benchmarks.md), so the engine asks for
# it only in steps that carry a seeded request.
MIN_ROWS = 4


@dataclass
class LoRABatch:
    """The current forward's tokens grouped by adapter slot; set by the runner before each forward.
    gather/valid/scatter are None when not needed: tokens already in slot order, equal groups, no
    base-model tokens (the common decode batch once the engine sorts its rows by adapter)."""

    slots: int = 0  # S: slots 0..S-1 take part (highest slot used + 1); 0 = no token uses an adapter
    gather: torch.Tensor | None = None  # [S*M] token index at (slot, j); padding points at token 0
    valid: torch.Tensor | None = None  # [S, M, 1] 1 where (slot, j) holds a token, 0 for padding
    scatter: torch.Tensor | None = None  # [N] flat position slot*M + j of each token (base: a padding one)
    # the LoRA kernels' steps (kernels/lora.py; the static decoder with runner.lora_kernel): each token's
    # slot [N] (-1: none), read by the kernels instead of the grouping above
    rows: torch.Tensor | None = None

    def clear(self) -> None:
        """No token on an adapter: the state between steps (the layers are the model's own)."""
        self.slots, self.gather, self.valid, self.scatter, self.rows = 0, None, None, None, None


class LoRALinear(nn.Module):
    """Wraps a base projection (nn.Linear or bitsandbytes Linear4bit) with stacked adapter slots."""

    def __init__(self, base: nn.Module, batch: LoRABatch, num_slots: int, max_rank: int, dtype, device):
        super().__init__()
        self.base = base
        self.batch = batch
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank = max_rank
        # A^T [S, in, R] and B^T [S, R, out]; a FusedLinear makes lora_at a view of its own A^T
        self.register_buffer(
            "lora_at", torch.zeros(num_slots, self.in_features, max_rank, dtype=dtype, device=device)
        )
        self.register_buffer(
            "lora_bt", torch.zeros(num_slots, max_rank, self.out_features, dtype=dtype, device=device)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.batch.rows is not None:  # the LoRA kernels
            return lora_kernels.with_lora([y], x, self.lora_at, [self.lora_bt], self.batch.rows)[0]
        o = lora_delta(self.batch, x, self.lora_at, [self.lora_bt])
        if o is not None:
            _add(y, o[0])  # y is the base layer's fresh output
        return y

    def set_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Writes one adapter's A [r, in] and B [out, r] into `slot` (None: zeros)."""
        self.lora_at[slot].zero_()
        self.lora_bt[slot].zero_()
        if a is not None:
            r = a.shape[0]
            self.lora_at[slot, :, :r].copy_(a.T)
            self.lora_bt[slot, :r].copy_(b.T)


def lora_delta(
    b: LoRABatch, x: torch.Tensor, at_all: torch.Tensor, bts: list[torch.Tensor]
) -> list[torch.Tensor] | None:
    """The LoRA terms [N, out_p] of every token of x [..., in] for each of P projections that read x
    (None: no token uses an adapter), from their A^T side by side, at_all [slots, in, P*R], and each
    one's B^T [slots, R, out_p]."""
    if b.valid is None and not b.slots:
        return None
    # S from valid's shape where there is one (the static decode steps): torch.compile then treats it as
    # a size that may vary (a dynamic dimension), not as a constant that each value compiles again
    s, d_in = (b.slots if b.valid is None else b.valid.shape[0]), at_all.shape[1]
    x2 = x.reshape(-1, d_in)
    if x2.dtype != at_all.dtype:
        x2 = x2.to(at_all.dtype)
    if b.gather is not None:  # tokens into [S, M] slot groups (index_select: far cheaper than x[idx])
        x2 = x2.index_select(0, b.gather)
    h = torch.bmm(x2.view(s, -1, d_in), at_all[:s])  # [S, M, P*R]
    if b.valid is not None:
        h.mul_(b.valid)  # padding rows contribute nothing
    outs, col = [], 0
    for bt in bts:
        r, d_out = bt.shape[1:]
        o = torch.bmm(h[..., col : col + r] if len(bts) > 1 else h, bt[:s]).view(-1, d_out)
        outs.append(o if b.scatter is None else o.index_select(0, b.scatter))
        col += r
    return outs


class FusedLinear(nn.Module):
    """Projections that read the same input (q/k/v, gate/up) as one module: forward returns the parts'
    outputs, in order. The parts stay usable on their own and share this module's memory."""

    def __init__(self, parts: list[nn.Module], nf4_kernel: bool = False):
        super().__init__()
        self.sizes = [p.out_features for p in parts]
        self.in_features = parts[0].in_features
        self._bases = [p.base if isinstance(p, LoRALinear) else p for p in parts]
        self._fused_base = concat_base(self._bases, nf4_kernel)
        self.batch: LoRABatch | None = None
        self._bts: list[torch.Tensor] = []
        wrapped = [isinstance(p, LoRALinear) for p in parts]
        if any(wrapped) and not all(wrapped):
            raise ValueError("FusedLinear: either every part carries adapter slots or none does")
        if all(wrapped):
            first = parts[0]
            self.batch = first.batch
            r = first.lora_at.shape[2]
            at_all = torch.cat([p.lora_at for p in parts], dim=2)  # [S, in, P*R]
            bt_all = torch.cat([p.lora_bt for p in parts], dim=2)  # [S, R, sum of out]
            off = 0
            for i, p in enumerate(parts):  # set_slot on a part writes into these views
                p.lora_at = at_all[:, :, i * r : (i + 1) * r]
                p.lora_bt = bt_all[:, :, off : off + p.out_features]
                off += p.out_features
            self.register_buffer("lora_at", at_all)
            # the parts' B^T side by side: the LoRA kernels expand every part of a joined output at once
            self.register_buffer("lora_bt", bt_all)
            self._bts = [p.lora_bt for p in parts]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = self.joined(x)
        if y is not None:
            return list(y.split(self.sizes, dim=-1))
        return self._with_lora(x, [base(x) for base in self._bases])

    def joined(self, x: torch.Tensor) -> torch.Tensor | None:
        """The parts' outputs side by side in one tensor [..., sum of out], where the base runs as one
        product (None otherwise: call forward; also when that product is a kernel turned off, so the
        parts run one by one exactly as without it)."""
        if self._fused_base is None or not getattr(self._fused_base, "enabled", True):
            return None
        return self._with_lora(x, [self._fused_base(x)])[0]

    def _with_lora(self, x: torch.Tensor, ys: list[torch.Tensor]) -> list[torch.Tensor]:
        """ys (the parts' outputs, or one output whose column blocks are the parts) with the step's LoRA
        terms added: in place, except for the LoRA kernels under torch.compile (new tensors)."""
        if self.batch is None:
            return ys
        if self.batch.rows is not None:  # the LoRA kernels (kernels/lora.py): each row its own slot
            return lora_kernels.with_lora(ys, x, self.lora_at, self._bts, self.batch.rows)
        if deltas := lora_delta(self.batch, x, self.lora_at, self._bts):
            for out, o in zip(lora_kernels.parts(ys, self._bts), deltas, strict=True):
                _add(out, o)
        return ys


def _add(y: torch.Tensor, o: torch.Tensor) -> None:
    """y += o, o [N, out] being the LoRA term of y's N tokens (y: a fresh output or a block of one)."""
    y.add_(o.view(y.shape) if o.dtype == y.dtype else o.view(y.shape).to(y.dtype))


def concat_base(
    bases: list[nn.Module], nf4_kernel: bool = False
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """One product for base projections that read the same input: plain Linear layers (weights
    concatenated), or bitsandbytes 4-bit layers in its CPU layout (packed weights and scales
    concatenated; each output is computed exactly as by its own layer). The layers' weights become
    views of the concatenation (no second copy; the 4-bit scales, 1/16 of the packed bytes at block
    size 64, are kept twice: each layer's own call needs them contiguous). With nf4_kernel, NF4 layers in
    the GPU layout run as one product of the Triton kernel where Triton is there (kernels/nf4.py). None where the
    weights cannot be concatenated (the GPU 4-bit layout without Triton, mixed kinds or compute
    dtypes): the caller runs the layers one by one. The layers must stay where they are afterwards (no .to(), no second runner
    with adapters over the same model: the fused tensors would no longer be theirs)."""
    first = bases[0]
    if all(type(b) is nn.Linear for b in bases):
        w = torch.cat([b.weight.detach() for b in bases])
        bias = None
        if all(b.bias is not None for b in bases):
            bias = torch.cat([b.bias.detach() for b in bases])
        elif any(b.bias is not None for b in bases):
            return None
        _share_rows(bases, w, bias)
        return lambda x: F.linear(x, w, bias)
    from mygpt.kernels import nf4

    if nf4_kernel and nf4.available(first.weight.device) and nf4.supported(bases):  # experimental
        return nf4.NF4Product(bases)
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return None
    if not all(type(b) is Linear4bit and b.bias is None and b.weight.device.type == "cpu" for b in bases):
        return None
    if len({b.compute_dtype for b in bases}) > 1:
        return None
    with torch.no_grad():  # bitsandbytes moves a layer's weight to its CPU layout on its first forward
        for b in bases:
            b(torch.zeros(1, b.in_features, dtype=b.compute_dtype or torch.float32))
    states = [b.weight.quant_state for b in bases]
    if not all(getattr(q, "packing_format_for_cpu", False) for q in states) or any(
        q.blocksize != states[0].blocksize or not torch.equal(q.code, states[0].code) for q in states
    ):
        return None
    w = torch.cat([b.weight.data for b in bases])  # [sum out, in / 2], rows in blocks of 32 outputs
    absmax = torch.cat([q.absmax for q in states], dim=1).contiguous()  # [in / blocksize, sum out]
    shape = torch.Size([w.shape[0], first.in_features])
    code, blocksize, compute = states[0].code, states[0].blocksize, first.compute_dtype or torch.float32
    _share_rows(bases, w, None)
    gemm = _bnb_cpu_kernel(w, absmax, shape, code, blocksize)

    def run(x: torch.Tensor) -> torch.Tensor:  # as Linear4bit.forward: compute dtype, the kernel's bf16, back
        x2 = x.reshape(-1, x.shape[-1])
        if x2.dtype != compute:
            x2 = x2.to(compute)
        y = gemm(x2.to(torch.bfloat16)).to(compute)
        return (y if y.dtype == x.dtype else y.to(x.dtype)).view(*x.shape[:-1], shape[0])

    return run


def _bnb_cpu_kernel(
    w: torch.Tensor, absmax: torch.Tensor, shape: torch.Size, code: torch.Tensor, blocksize: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """x [M, in] bfloat16 -> x @ W^T [M, out] bfloat16 by bitsandbytes' CPU 4-bit kernel. Called through
    its C entry point where bitsandbytes' own op would call that too: its Python wrapper (custom-op
    dispatch, a dynamo guard, a quant-type check on the code tensor) cost about a fifth of the
    kernel's time per call at 16 rows on the 2-core CPU; otherwise through the op."""
    op = torch.ops.bitsandbytes.gemv_4bit.default
    try:
        from bitsandbytes.backends.cpu import ops as cpu_ops
        from bitsandbytes.cextension import lib

        fp4 = bool(code[1] > 0)  # bitsandbytes' own test for the quant type
        # the library itself, not bitsandbytes' wrapper (which turns a missing symbol into a stub)
        entry = getattr(lib._lib, f"gemv_4bit_inference_cpu_{'fp4' if fp4 else 'nf4'}_bf16", None)
        if getattr(cpu_ops, "gemm_4bit_forward_kernel", None) is not None:
            entry = None  # bitsandbytes found a faster kernel: its op uses that
    except (ImportError, AttributeError, RuntimeError):
        entry = None
    if entry is None or w.dtype != torch.uint8 or absmax.dtype != torch.bfloat16:
        return lambda x: op(x, w, shape, absmax, code, blocksize)
    c = ctypes.c_int64
    n, k, bs = c(shape[0]), c(shape[1]), c(blocksize)

    def call(x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or w.device.type != "cpu":
            raise RuntimeError("bitsandbytes' CPU 4-bit kernel got a tensor off the CPU")
        if not x.is_contiguous():
            x = x.contiguous()
        y = torch.empty(x.shape[0], shape[0], dtype=torch.bfloat16)
        # pointers read on every call (w and absmax live in this closure; their storage could move)
        entry(c(x.shape[0]), n, k, ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(w.data_ptr()),
              ctypes.c_void_p(absmax.data_ptr()), ctypes.c_void_p(y.data_ptr()), bs, c(x.stride(0)),
              c(y.stride(0)))  # fmt: skip
        return y

    return call


def _share_rows(bases: list[nn.Module], w: torch.Tensor, bias: torch.Tensor | None) -> None:
    row = 0
    for b in bases:
        n = b.weight.shape[0]
        b.weight.data = w[row : row + n]
        if bias is not None:
            b.bias.data = bias[row : row + n]
        row += n


def wrap_model(
    model: nn.Module, num_slots: int, max_rank: int, dtype, device
) -> tuple[LoRABatch, dict[str, LoRALinear]]:
    """Replaces every LoRA-capable projection of the decoder layers with a LoRALinear (in place)."""
    batch = LoRABatch()
    wrapped: dict[str, LoRALinear] = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in TARGETS and not isinstance(child, LoRALinear) and hasattr(child, "in_features"):
                layer = LoRALinear(child, batch, num_slots, max_rank, dtype, device)
                setattr(module, child_name, layer)
                wrapped[f"{name}.{child_name}" if name else child_name] = layer
    return batch, wrapped


def set_rows(
    batch: LoRABatch, slots: list[int], max_rank: int, dtype, device, at_least: int = 1, max_slots: int = 0,
    invariant: bool = False,
) -> None:  # fmt: skip
    """Groups the step's tokens by adapter slot, token i using slot slots[i] (-1 = the base model).
    at_least > 1: at least that many slots (up to max_slots) and rows per slot, and always the three
    index tensors (runner.compile_layers: the same kind of step whatever the grouping). invariant: the
    batch-invariant layout (see MIN_ROWS)."""
    slot_t = torch.tensor(slots, dtype=torch.long)
    adapted = slot_t >= 0
    n_adapted = int(adapted.sum())
    if n_adapted == 0:
        batch.clear()
        return
    n = len(slots)
    s = int(slot_t.max()) + 1
    if at_least > 1 or invariant:
        s = max(s, min(max(at_least, 2 if invariant else 1), max_slots))
    counts = torch.bincount(slot_t[adapted], minlength=s)
    m = max(int(counts.max()), at_least, MIN_ROWS if invariant else 1)
    if invariant and s == 1:  # one slot only (max_slots 1): whole blocks of 4 rows, no tail rows
        m = -(-m // MIN_ROWS) * MIN_ROWS
    if n_adapted < n and n_adapted == s * m:  # base-model tokens need a padding position to read zeros
        m += MIN_ROWS if invariant and s == 1 else 1  # from (one slot, invariant: still whole blocks)
    order = torch.argsort(torch.where(adapted, slot_t, s), stable=True)  # by slot, base tokens last
    sorted_slots = slot_t[order[:n_adapted]]
    starts = torch.cumsum(counts, 0) - counts
    flat = sorted_slots * m + (torch.arange(n_adapted) - starts[sorted_slots])  # positions of adapted tokens
    gather = torch.zeros(s * m, dtype=torch.long)
    gather[flat] = order[:n_adapted]
    valid = torch.zeros(s * m, dtype=dtype)
    valid[flat] = 1
    scatter = torch.empty(n, dtype=torch.long)
    scatter[order[:n_adapted]] = flat
    if n_adapted < n:
        scatter[order[n_adapted:]] = int(torch.nonzero(valid == 0)[0])
    batch.slots = s
    always = at_least > 1
    if not always and n_adapted == n == s * m and bool((order == torch.arange(n)).all()):
        batch.gather = batch.valid = batch.scatter = None  # already [S, M] in token order
        return
    batch.gather = gather.to(device)
    batch.valid = None if n_adapted == s * m and not always else valid.view(s, m, 1).to(device)
    batch.scatter = scatter.to(device)


def lora_module_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """The LoRA-capable projections of a model: path -> (in_features, out_features)."""
    shapes = {}
    for name, module in model.named_modules():
        if (
            isinstance(module, LoRALinear)
            or name.rsplit(".", 1)[-1] in TARGETS
            and hasattr(module, "in_features")
            and ".base" not in name
        ):
            shapes[name] = (module.in_features, module.out_features)
    return shapes
