"""Grouped-query attention folded (runner.fold_gqa, off by default) on CUDA: the same logits as the
unfolded attention, for prompt chunks, eager decode rows and graphed ones (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mygpt.engine.runner import DecodeRow, ModelRunner, PrefillChunk

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("graphs", [False, True])
def test_folded_gqa_equals_unfolded_on_cuda(graphs):
    config = LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=1024,
    )  # fmt: skip
    runners = []
    for fold in (True, False):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval().cuda()
        r = ModelRunner(model, num_slots=4, max_len=600, dtype=torch.float32, cuda_graphs=graphs)
        r.fold_gqa = fold
        runners.append(r)
    steps = [
        ([], [PrefillChunk(0, list(range(3, 203)), 0), PrefillChunk(1, [5, 6, 7], 0)]),
        ([DecodeRow(0, 7, 200)], [PrefillChunk(2, list(range(9, 300)), 0)]),
        ([DecodeRow(0, 8, 201), DecodeRow(1, 9, 3), DecodeRow(2, 4, 291)], []),
    ]
    for decode, chunks in steps:
        (got_d, got_c), (want_d, want_c) = (r.step(decode, chunks) for r in runners)
        torch.testing.assert_close(got_d, want_d, atol=2e-3, rtol=2e-3)  # TF32 may differ between kernels
        for g, w in zip(got_c, want_c, strict=True):
            torch.testing.assert_close(g, w, atol=2e-3, rtol=2e-3)
