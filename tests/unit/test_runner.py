"""The slot-cache forward must equal the HF model's own forward, for every supported family."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mygpt.engine.runner import ModelRunner


def tiny(model_type: str, **extra):
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type, vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128, **extra,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_prefill_chunks_and_ragged_decode_match_hf(model_type):
    model = tiny(model_type)
    runner = ModelRunner(model, num_slots=4, max_len=64, dtype=torch.float32)
    a, b = [1, 5, 7, 9, 11, 3, 2], [2, 4, 6]
    with torch.no_grad():
        ref_a = model(torch.tensor([a + [13, 14]])).logits[0]
        ref_b = model(torch.tensor([b + [15, 16]])).logits[0]
    # a in two chunks into slot 3, b in one chunk into slot 1 (non-contiguous slots)
    runner.prefill(3, a[:4], 0)
    la = runner.prefill(3, a[4:], 4)
    lb = runner.prefill(1, b, 0)
    torch.testing.assert_close(la, ref_a[len(a) - 1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lb, ref_b[len(b) - 1], atol=1e-4, rtol=1e-4)
    # one decode step with rows at different positions
    out = runner.decode([3, 1], [13, 15], [len(a), len(b)])
    torch.testing.assert_close(out[0], ref_a[len(a)], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1], ref_b[len(b)], atol=1e-4, rtol=1e-4)
    out = runner.decode([1, 3], [16, 14], [len(b) + 1, len(a) + 1])
    torch.testing.assert_close(out[0], ref_b[len(b) + 1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1], ref_a[len(a) + 1], atol=1e-4, rtol=1e-4)


def test_copy_slot_continues_identically():
    model = tiny("llama")
    runner = ModelRunner(model, num_slots=3, max_len=32, dtype=torch.float32)
    runner.prefill(0, [3, 4, 5, 6], 0)
    runner.copy_slot(0, 2, 4)
    out = runner.decode([0, 2], [7, 7], [4, 4])
    torch.testing.assert_close(out[0], out[1])


def test_stale_cache_of_a_previous_row_does_not_leak():
    model = tiny("llama")
    runner = ModelRunner(model, num_slots=2, max_len=32, dtype=torch.float32)
    fresh = runner.prefill(1, [8, 9], 0).clone()
    runner.prefill(0, list(range(1, 20)), 0)  # a long row fills slot 0
    reused = runner.prefill(0, [8, 9], 0)  # a short row reuses it
    torch.testing.assert_close(reused, fresh)
    out = runner.decode([0, 1], [10, 10], [2, 2])
    torch.testing.assert_close(out[0], out[1])


def test_unsupported_family_is_refused_clearly():
    torch.manual_seed(0)
    config = AutoConfig.for_model("gpt2", vocab_size=50, n_embd=32, n_layer=1, n_head=2)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="not supported"):
        ModelRunner(model, num_slots=1, max_len=16, dtype=torch.float32)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_one_step_mixing_decode_rows_and_prefill_chunks_matches_hf(model_type):
    """Continuous batching's mixed step: decode tokens and prompt chunks share one forward."""
    from mygpt.engine.runner import DecodeRow, PrefillChunk

    model = tiny(model_type)
    runner = ModelRunner(model, num_slots=4, max_len=64, dtype=torch.float32)
    a, b, c = [1, 5, 7, 9], [2, 4, 6, 8, 10, 12], [3, 11]
    with torch.no_grad():
        ref_a = model(torch.tensor([a + [13]])).logits[0]
        ref_b = model(torch.tensor([b])).logits[0]
        ref_c = model(torch.tensor([c])).logits[0]
    runner.prefill(0, a, 0)
    runner.prefill(2, b[:3], 0)  # b's first chunk earlier; its second chunk rides with a's decode
    chunks = [PrefillChunk(2, b[3:], 3), PrefillChunk(3, c, 0, all_logits=True)]  # c: every position's
    dec, out = runner.step([DecodeRow(0, 13, len(a))], chunks)
    torch.testing.assert_close(dec[0], ref_a[len(a)], atol=1e-4, rtol=1e-4)
    assert out[0].shape == (1, ref_b.shape[-1]) and out[1].shape == ref_c.shape
    torch.testing.assert_close(out[0][0], ref_b[-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1], ref_c, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_shortcut_is_bit_exact(dtype):
    """The runner's one-op RMSNorm gives the model's own module's bits (in bfloat16 it is the module)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from mygpt.engine.runner import _norm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(96, eps=1e-5).to(dtype)
    norm.weight.data = torch.randn(96).to(dtype)
    for scale in (1e-3, 1.0, 50.0):
        x = (torch.randn(7, 96) * scale).to(dtype)
        assert torch.equal(_norm(norm, x), norm(x))
