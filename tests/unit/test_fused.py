"""FusedLinear: projections that read one input (q/k/v, gate/up) computed as one give each part's own
output, base and LoRA, and leave the parts usable and sharing its memory."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from mygpt.lora.layers import FusedLinear, LoRABatch, LoRALinear, set_rows

LAYOUTS = {  # each token's adapter slot (-1: the base model)
    "one-adapter": [0] * 6,
    "sorted-equal": [0, 0, 1, 1, 2, 2],
    "shuffled": [2, 0, 1, 0, 2, 1],
    "mixed-with-base": [1, -1, 1, 3, -1, 0],
    "base-only": [-1, -1, -1],
}


def _outputs(parts: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return [p(x).clone() for p in parts]


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_plain_linear_parts_as_one_product(bias):
    torch.manual_seed(0)
    parts = [nn.Linear(12, n, bias=bias) for n in (16, 8, 8)]
    x = torch.randn(1, 5, 12)
    want = _outputs(parts, x)
    fused = FusedLinear(parts)
    assert fused._fused_base is not None
    with torch.no_grad():
        got = fused(x)
    assert [g.shape[-1] for g in got] == [16, 8, 8]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)
    # the parts' weights are views of the concatenation: still right, and no second copy
    for p, w in zip(parts, _outputs(parts, x), strict=True):
        torch.testing.assert_close(p(x).detach(), w)
    assert parts[1].weight.untyped_storage().data_ptr() == parts[0].weight.untyped_storage().data_ptr()


def test_mixed_parts_run_one_by_one():
    """A bias on one part only: no concatenation, each part runs alone, outputs unchanged."""
    torch.manual_seed(0)
    parts = [nn.Linear(12, 16), nn.Linear(12, 8, bias=False)]
    x = torch.randn(1, 3, 12)
    want = _outputs(parts, x)
    fused = FusedLinear(parts)
    assert fused._fused_base is None
    with torch.no_grad():
        for g, w in zip(fused(x), want, strict=True):
            assert torch.equal(g, w)


def test_nf4_parts_give_each_layer_exactly_its_output(tiny_model_dir):
    """bitsandbytes' CPU 4-bit layout: the concatenated product is bit for bit each layer's own
    (where the CPU lacks that layout the parts run one by one, equally exact)."""
    qconfig = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, quantization_config=qconfig
    )
    layer = model.model.layers[0]
    groups = [
        [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj],
        [layer.mlp.gate_proj, layer.mlp.up_proj],
        [layer.mlp.down_proj],
    ]
    torch.manual_seed(0)
    for parts in groups:
        x = torch.randn(1, 7, parts[0].in_features)
        want = _outputs(parts, x)
        fused = FusedLinear(parts)
        packed = getattr(parts[0].weight.quant_state, "packing_format_for_cpu", False)
        assert (fused._fused_base is not None) == packed
        with torch.no_grad():
            for g, w in zip(fused(x), want, strict=True):
                assert torch.equal(g, w)
        for p, w in zip(parts, _outputs(parts, x), strict=True):  # the parts still run on their own
            assert torch.equal(p(x).detach(), w)


@pytest.mark.parametrize("slots", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_fused_lora_equals_each_token_alone(slots):
    """Adapters written into the parts' slots after fusion: each token gets exactly its own adapter's
    x @ A^T @ B^T on each part (ranks differ per slot, one part skipped by one adapter)."""
    torch.manual_seed(0)
    batch = LoRABatch()
    bases = [nn.Linear(12, n, bias=False) for n in (16, 8, 8)]
    parts = [LoRALinear(b, batch, num_slots=4, max_rank=4, dtype=torch.float32, device="cpu") for b in bases]
    fused = FusedLinear(parts)
    ab = {}
    for s in range(4):
        rank = 3 if s % 2 else 4
        for p, part in enumerate(parts):
            if s == 2 and p == 1:  # adapter 2 does not target the second projection
                part.set_slot(s, None, None)
                continue
            ab[s, p] = (torch.randn(rank, 12), torch.randn(part.out_features, rank))
            part.set_slot(s, *ab[s, p])
    x = torch.randn(1, len(slots), 12)
    set_rows(batch, slots, 4, torch.float32, "cpu")
    with torch.no_grad():
        got = fused(x)
        alone = [part(x)[0] for part in parts]  # the parts on their own, through the shared buffers
        for p, base in enumerate(bases):
            for t, s in enumerate(slots):
                want = base(x[0, t])
                if (s, p) in ab:
                    a, b = ab[s, p]
                    want = want + x[0, t] @ a.T @ b.T
                torch.testing.assert_close(got[p][0, t], want, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(alone[p][t], want, atol=1e-5, rtol=1e-5)


def test_parts_must_all_carry_adapter_slots_or_none():
    batch = LoRABatch()
    wrapped = LoRALinear(nn.Linear(12, 8), batch, num_slots=2, max_rank=4, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="every part"):
        FusedLinear([wrapped, nn.Linear(12, 8)])
