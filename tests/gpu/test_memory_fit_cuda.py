"""On a GPU the served context is what fits in memory (state._served_context): a model whose whole
context would not fit is served shortened, and the runner then allocates its cache (skipped without
a CUDA device)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mygpt.config import Settings
from mygpt.engine.loader import MemoryFitError
from mygpt.engine.runner import ModelRunner
from mygpt.state import _served_context

pytestmark = pytest.mark.gpu


def test_a_context_too_long_for_the_card_is_shortened_and_allocates():
    # 64 layers x 32 KV heads x 128 x bf16 x 2: 1 MiB a position; 4M positions x 17 rows would be 68 TiB
    config = LlamaConfig(
        vocab_size=256, hidden_size=4096, intermediate_size=256, num_hidden_layers=64, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=1 << 22,
    )  # fmt: skip
    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    loaded = SimpleNamespace(
        model=meta, device=torch.device("cuda"), dtype=torch.bfloat16, context_len=1 << 22
    )
    context = _served_context(Settings(max_num_seqs=16, gpu_memory_utilization=0.5), loaded)
    free, total = torch.cuda.mem_get_info()
    assert 256 <= context < 1 << 22 and context % 256 == 0
    assert 17 * (context + 1) * (1 << 20) <= 0.5 * total
    with pytest.raises(MemoryFitError, match="--max-model-len"):
        _served_context(Settings(max_num_seqs=16, max_model_len=1 << 22), loaded)
    small = LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1 << 30,
    )).cuda().to(torch.bfloat16)  # fmt: skip
    loaded = SimpleNamespace(
        model=small, device=torch.device("cuda"), dtype=torch.bfloat16, context_len=1 << 30
    )
    context = _served_context(Settings(max_num_seqs=4, gpu_memory_utilization=0.3), loaded)
    runner = ModelRunner(small, num_slots=4, max_len=context, dtype=torch.bfloat16)  # allocates, no OOM
    assert runner.max_len == context < 1 << 30
