"""On a GPU the KV cache is allocated whole at start: the served context is what fits of the model's
(loader.fit_context), and a --max-model-len that does not fit is refused with the settings to change."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from mygpt.engine.loader import (
    MemoryFitError,
    attention_bytes_per_position,
    fit_context,
    kv_budget,
    kv_bytes_per_position,
)

GIB = 2**30
LLAMA_8B = LlamaConfig(
    hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    max_position_embeddings=131072,
)  # fmt: skip


def test_bytes_per_position_of_llama_8b():
    # keys and values, 32 layers, 8 KV heads of 128, bfloat16: 128 KiB a position
    assert kv_bytes_per_position(LLAMA_8B, torch.bfloat16) == 2 * 32 * 8 * 128 * 2 == 128 << 10


def test_the_budget_is_the_share_less_what_is_used_and_a_reserve():
    total = 80 * GIB
    # 0.9 of the card, less 6 GiB in use (weights), less the reserve (5% of 80 GiB: 4 GiB)
    assert kv_budget(total, total - 6 * GIB, 0.9) == int(72 * GIB) - 6 * GIB - 4 * GIB
    assert kv_budget(16 * GIB, 10 * GIB, 0.9) == int(0.9 * 16 * GIB) - 6 * GIB - 2 * GIB  # reserve >= 2 GiB
    assert kv_budget(total, total - 6 * GIB, 0.9, other=GIB) == kv_budget(total, total - 6 * GIB, 0.9) - GIB


def test_a_context_that_fits_is_served_whole():
    per = 128 << 10
    budget = 17 * 9000 * per  # 16 rows + the spare of 8,999 positions + the spare one
    assert fit_context(budget, per, 16, 131072, 8192) == 8192
    assert fit_context(budget, per, 16, 4096, None) == 4096


def test_the_models_context_is_shortened_to_what_fits():
    per = 128 << 10
    budget = 62 * GIB  # an H100 with an 8B NF4 model: 131,072 positions x 16 rows would need 272 GiB
    got = fit_context(budget, per, 16, 131072, None)
    assert got % 256 == 0 and per * 17 * (got + 1) <= budget < per * 17 * (got + 256 + 1)
    assert got == 29696


def test_a_max_model_len_that_does_not_fit_is_refused_with_what_to_change():
    with pytest.raises(MemoryFitError) as err:
        fit_context(62 * GIB, 128 << 10, 16, 131072, 65536)
    message = str(err.value)
    assert "--max-model-len" in message and "29696" in message and "--max-num-seqs (now 16)" in message


def test_too_many_rows_for_any_context_is_refused():
    with pytest.raises(MemoryFitError, match="not enough for 4096 rows"):
        fit_context(GIB, 128 << 10, 4096, 131072, None)
    with pytest.raises(MemoryFitError):
        fit_context(-GIB, 128 << 10, 1, 131072, None)  # the model alone took more than the share


def test_the_attention_over_the_cache_is_budgeted_too():
    """A decode step gathers one layer's keys and values for the padded batch, and PyTorch's math
    kernel repeats them for every query head (masked grouped-query attention); a prompt chunk holds
    float32 scores over the whole span. Per position of context, for Llama-3.1-8B, 16 rows, 512-token
    chunks: 16 x 4 KiB x (1 + 4) + 32 heads x 512 x 4 bytes."""
    per = attention_bytes_per_position(LLAMA_8B, torch.bfloat16, 16, 512)
    assert per == 16 * 4096 * 5 + 32 * 512 * 4
    got = fit_context(62 * GIB, 128 << 10, 16, 131072, None, transient=per)
    assert got == 25344 < fit_context(62 * GIB, 128 << 10, 16, 131072, None)
    need = (128 << 10) * 17 * (got + 1) + per * got
    assert need <= 62 * GIB < need + 256 * ((128 << 10) * 17 + per)


def test_mistrals_sliding_window_caps_what_is_fitted_as_the_runner_caps_it():
    from transformers import MistralConfig

    from mygpt.engine.runner import cache_len

    assert cache_len(MistralConfig(sliding_window=4096), 32768) == 4096
    assert cache_len(MistralConfig(sliding_window=None), 32768) == 32768
    assert cache_len(LLAMA_8B, 131072) == 131072
