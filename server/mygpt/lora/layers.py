"""Per-row LoRA on unmerged (4-bit) base layers: every adapter in the batch in two batched matmuls.

All resident adapters of one module are stacked: A_all [S*R, in] and B_all^T [S*R, out] (slot s owns
rows s*R..s*R+R, zero-padded past its rank; zeros where the adapter skips the module), viewed as
[S, R, in] and [S, R, out] without a copy. A step's tokens are grouped by slot into [S, M, in]
(M = most tokens on one slot; padding rows are zeroed), then

    h = bmm(x_grouped, A^T) [S, M, R]    o = bmm(h, B^T) [S, M, out]    y[t] = base(x)[t] + o[slot(t), j(t)]

One bmm pair per projection for any mix of adapters, ranks (zero-padded to R) and target modules (zero
blocks): no loop over adapters, no global set_adapter, no weights copied. Its cost is S*M token-slots,
never more than a dense mask over all slots (N*S) and equal to one adapter's when the tokens spread
evenly (measured: docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRABatch:
    """The current forward's tokens grouped by adapter slot; set by the runner before each forward.
    gather/valid/scatter are None when not needed: tokens already in slot order, equal groups, no
    base-model tokens (the common decode batch once the engine sorts its rows by adapter)."""

    slots: int = 0  # S: slots 0..S-1 take part (highest slot used + 1); 0 = no token uses an adapter
    gather: torch.Tensor | None = None  # [S*M] token index at (slot, j); padding points at token 0
    valid: torch.Tensor | None = None  # [S, M, 1] 1 where (slot, j) holds a token, 0 for padding
    scatter: torch.Tensor | None = None  # [N] flat position slot*M + j of each token (base: a padding one)


class LoRALinear(nn.Module):
    """Wraps a base projection (nn.Linear or bitsandbytes Linear4bit) with stacked adapter slots."""

    def __init__(self, base: nn.Module, batch: LoRABatch, num_slots: int, max_rank: int, dtype, device):
        super().__init__()
        self.base = base
        self.batch = batch
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank = max_rank
        self.register_buffer(
            "lora_a", torch.zeros(num_slots * max_rank, self.in_features, dtype=dtype, device=device)
        )
        self.register_buffer(  # B transposed: a slot is a block of rows, a prefix of slots is contiguous
            "lora_bt", torch.zeros(num_slots * max_rank, self.out_features, dtype=dtype, device=device)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        b = self.batch
        if not b.slots:
            return y
        s, r, width = b.slots, self.rank, b.slots * self.rank
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != self.lora_a.dtype:
            x2 = x2.to(self.lora_a.dtype)
        if b.gather is not None:  # tokens into [S, M] slot groups (index_select: far cheaper than x[idx])
            x2 = x2.index_select(0, b.gather)
        a = self.lora_a[:width].view(s, r, self.in_features)
        h = torch.bmm(x2.view(s, -1, self.in_features), a.transpose(1, 2))  # [S, M, R]
        if b.valid is not None:
            h.mul_(b.valid)  # padding rows contribute nothing
        o = torch.bmm(h, self.lora_bt[:width].view(s, r, self.out_features)).view(-1, self.out_features)
        if b.scatter is not None:
            o = o.index_select(0, b.scatter)
        return y.add_(o.view(y.shape).to(y.dtype))  # y is the base layer's fresh output

    def set_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Writes one adapter's A [r, in] and B [out, r] into `slot` (None: zeros)."""
        rows = slice(slot * self.rank, (slot + 1) * self.rank)
        self.lora_a[rows].zero_()
        self.lora_bt[rows].zero_()
        if a is not None:
            r = a.shape[0]
            self.lora_a[slot * self.rank : slot * self.rank + r].copy_(a)
            self.lora_bt[slot * self.rank : slot * self.rank + r].copy_(b.T)


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


def set_rows(batch: LoRABatch, slots: list[int], max_rank: int, dtype, device) -> None:
    """Groups the step's tokens by adapter slot, token i using slot slots[i] (-1 = the base model)."""
    slot_t = torch.tensor(slots, dtype=torch.long)
    adapted = slot_t >= 0
    n_adapted = int(adapted.sum())
    if n_adapted == 0:
        batch.slots, batch.gather, batch.valid, batch.scatter = 0, None, None, None
        return
    n = len(slots)
    s = int(slot_t.max()) + 1
    counts = torch.bincount(slot_t[adapted], minlength=s)
    m = int(counts.max())
    if n_adapted < n and n_adapted == s * m:
        m += 1  # base-model tokens need a padding position to read zeros from
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
    if n_adapted == n == s * m and bool((order == torch.arange(n)).all()):
        batch.gather = batch.valid = batch.scatter = None  # already [S, M] in token order
        return
    batch.gather = gather.to(device)
    batch.valid = None if n_adapted == s * m else valid.view(s, m, 1).to(device)
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
