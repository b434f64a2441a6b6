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


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_a_steps_chunks_attend_in_one_padded_call_as_they_do_one_by_one(model_type, monkeypatch):
    """A step's prompt chunks attend in one padded call a layer (_Packed): chunks of other lengths,
    after a cached prefix or from 0, beside decode rows, with every position's logits or pooled, give
    what the chunks one by one give (an invariant step's), and the same cache. A chunk past PACK_SPAN,
    past what PACK_KEYS leaves, or padding past PACK_SCORES and PACK_WASTE, attends alone beside the
    packed ones."""
    from mygpt.engine import runner as runner_mod
    from mygpt.engine.runner import DecodeRow, PrefillChunk, _AttentionPlan

    model = tiny(model_type)
    gen = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(1, 97, (n,), generator=gen).tolist()

    prefix, a, b, c, d, decoding = ids(9), ids(12), ids(3), ids(7), ids(1), ids(5)
    chunks = [  # they end at 21, 3, 7 and 1
        PrefillChunk(1, a, len(prefix)),
        PrefillChunk(2, b, 0, all_logits=True),
        PrefillChunk(3, c, 0, pool="sum"),
        PrefillChunk(4, d, 0),
    ]
    row = DecodeRow(0, 5, len(decoding))

    def run(invariant: bool, members: set[int] | None):
        r = ModelRunner(model, num_slots=6, max_len=64, dtype=torch.float32)
        r.pack_chunks = True  # (off by default on the CPU)
        r.prefill(1, prefix, 0)  # a cached prefix: chunk a continues it
        r.prefill(0, decoding, 0)
        plan = _AttentionPlan.build([row], chunks, r.device, pack=not invariant)
        assert (None if plan.packed is None else set(plan.packed.members)) == members
        dec, outs = r.step([row], chunks, invariant=invariant)
        return [dec, *outs, *r.k_cache, *r.v_cache]

    want = run(True, None)
    for span, keys, scores, members in [
        (1024, 16384, 1 << 20, {0, 1, 2, 3}),
        (20, 16384, 1 << 20, {1, 2, 3}),  # a ends past the span
        (1024, 22, 1 << 20, {1, 2, 3}),  # 3 x 7 keys fit, 4 x 21 do not
        (1024, 14, 1 << 20, {1, 3}),  # 2 x 3 fit, 3 x 7 do not
        (1024, 5, 1 << 20, None),  # only d's would fit: one chunk is not packed
        # by ends d, b, c, a: d and b pad 2 x 3 x 3 = 18 scores for 1 + 9; c would make 3 x 7 x 7 for
        # 10 + 49 (over 2x), and a 3 x 12 x 21 for 10 + 252
        (1024, 16384, 0, {1, 3}),
    ]:
        monkeypatch.setattr(runner_mod, "PACK_SPAN", span)
        monkeypatch.setattr(runner_mod, "PACK_KEYS", keys)
        monkeypatch.setattr(runner_mod, "PACK_SCORES", scores)
        for x, y in zip(run(False, members), want, strict=True):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fault", ["raises", "disagrees"])
def test_packed_attention_that_fails_its_start_up_check_stays_off(fault, monkeypatch, caplog):
    """The runner checks the packed attention at start-up (on a GPU; on the CPU it is off) at its dtype
    and heads: where it fails or disagrees with the chunks one by one, steps attend one by one (a
    warning), and still match HF. Unbroken, the check passes here."""
    from mygpt.engine import runner as runner_mod
    from mygpt.engine.runner import PrefillChunk

    def broken(self, attn, kc, vc, q, gqa):
        if fault == "raises":
            raise RuntimeError("no kernel for this mask")
        return torch.zeros(self.rows.shape[0], q.shape[1] * q.shape[2], dtype=q.dtype)

    model = tiny("llama")
    runner = ModelRunner(model, num_slots=3, max_len=32, dtype=torch.float32)
    assert runner._packing_agrees() and not caplog.text
    monkeypatch.setattr(runner_mod._Packed, "attend", broken)
    runner.pack_chunks = runner._packing_agrees()  # as at start-up on a GPU
    assert not runner.pack_chunks
    assert "attend one by one" in caplog.text
    a, b = [3, 4, 5, 6], [7, 8]
    _, (la, lb) = runner.step([], [PrefillChunk(0, a, 0), PrefillChunk(1, b, 0)])
    with torch.no_grad():
        torch.testing.assert_close(la[0], model(torch.tensor([a])).logits[0, -1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(lb[0], model(torch.tensor([b])).logits[0, -1], atol=1e-4, rtol=1e-4)
