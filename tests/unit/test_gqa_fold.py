"""Grouped-query attention folded into plain multi-head attention over the KV heads (runner.fold_gqa,
off by default, for measurement on a GPU): the same outputs as the unfolded attention, for decode rows
(eager and static) and prompt chunks (alone, several, beside decode rows). Turned on here, on the CPU."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from mygpt.engine.runner import DecodeRow, ModelRunner, PrefillChunk


@pytest.mark.parametrize("static", [False, True])
def test_folded_attention_equals_unfolded(tiny_model_dir, static):
    runners = []
    for fold in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        r = ModelRunner(model, num_slots=4, max_len=128, dtype=torch.float32, static_decode=static)
        assert r._gqa and not r.fold_gqa  # a GQA model (4 query heads, 2 KV heads); off by default
        r.fold_gqa = fold
        runners.append(r)
    steps = [
        ([], [PrefillChunk(0, list(range(3, 40)), 0)]),
        ([], [PrefillChunk(1, [5, 6, 7], 0), PrefillChunk(2, list(range(9, 30)), 0, all_logits=True)]),
        ([DecodeRow(0, 7, 37), DecodeRow(2, 8, 21)], [PrefillChunk(3, list(range(50, 61)), 0)]),
        ([DecodeRow(0, 8, 38), DecodeRow(1, 9, 3), DecodeRow(3, 4, 11)], []),
        ([DecodeRow(2, 8, 22)], []),
    ]
    for decode, chunks in steps:
        (want_d, want_c), (got_d, got_c) = (r.step(decode, chunks) for r in runners)
        torch.testing.assert_close(got_d, want_d, atol=1e-4, rtol=1e-4)  # float32 sums in another order
        for g, w in zip(got_c, want_c, strict=True):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)  # float32 sums in another order
