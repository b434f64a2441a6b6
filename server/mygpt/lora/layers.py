"""Per-row LoRA on unmerged (4-bit) base layers: every adapter in the batch in two matmuls.

All resident adapters of one module are stacked: A_all [S*R, in] and B_all [out, S*R] (slot s owns
rows/columns s*R..s*R+R, zero-padded past its rank; zeros where the adapter skips the module). For a
step whose tokens use slots `slot[t]` (or none), with mask[t, s*R+j] = 1 iff slot[t] == s:

    y = base(x) + ((x @ A_all[:n].T) * mask) @ B_all[:, :n].T        (n = R * (highest slot used + 1))

That is one GEMM pair for any mix of adapters, ranks and target modules (no loop over adapters, no
global set_adapter), and the cost grows with the slots in use, not with the number of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRABatch:
    """What the current forward's rows need; set by the runner before each forward."""

    mask: torch.Tensor | None = None  # [N, n] per token, compute dtype; None: no token uses an adapter
    width: int = 0  # n = R * (highest slot used + 1)


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
        self.register_buffer(
            "lora_b", torch.zeros(self.out_features, num_slots * max_rank, dtype=dtype, device=device)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        batch = self.batch
        if batch.mask is None:
            return y
        n = batch.width
        h = F.linear(x.to(self.lora_a.dtype), self.lora_a[:n]) * batch.mask  # [1, N, n]
        return y + F.linear(h, self.lora_b[:, :n]).to(y.dtype)

    def set_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Writes one adapter's A [r, in] and B [out, r] into `slot` (None: zeros)."""
        rows = slice(slot * self.rank, (slot + 1) * self.rank)
        self.lora_a[rows].zero_()
        self.lora_b[:, rows].zero_()
        if a is not None:
            r = a.shape[0]
            self.lora_a[slot * self.rank : slot * self.rank + r].copy_(a)
            self.lora_b[:, slot * self.rank : slot * self.rank + r].copy_(b)


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
    """Prepares the mask for the step's tokens, token i using adapter slot slots[i] (-1 = base)."""
    used = [s for s in slots if s >= 0]
    if not used:
        batch.mask, batch.width = None, 0
        return
    width = (max(used) + 1) * max_rank
    owner = torch.arange(width, device=device) // max_rank  # [n]: which slot owns each column
    slot_t = torch.tensor(slots, device=device)
    batch.mask = (owner[None, :] == slot_t[:, None]).to(dtype)  # [N, n]
    batch.width = width


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
