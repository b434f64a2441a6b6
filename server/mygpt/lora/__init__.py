"""LoRA adapters: loading and validation (weights), per-row batched compute (layers), residency (cache)."""
