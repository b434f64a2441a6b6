"""Random peft LoRA adapters (tests, benchmarks, the GPU check), saved by peft in its own format."""

from __future__ import annotations

from pathlib import Path

import torch


def make_adapter(
    base_dir: Path, out: Path, rank: int, targets: list[str], seed: int, alpha: int | None = None
) -> Path:
    """A peft LoRA adapter with random (non-zero) A and B, saved by peft itself."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if (out / "adapter_model.safetensors").exists():
        return out
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # peft's B starts at zero-ish scale: make the adapter's effect large and visible
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(out)
    return out
