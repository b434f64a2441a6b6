"""QLoRA on CPU: gradients through the 4-bit base stay right across eval passes (bitsandbytes repacks
weights for its inference kernel on the first one; the trainer turns that off)."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from mygpt.finetune.trainer import no_cpu_weight_packing


def _qlora(tiny_model_dir):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=quant, dtype=torch.float32
    )
    torch.manual_seed(1)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
    )
    return get_peft_model(model, cfg)


def _grads(model, ids):
    model.train()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {
        n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if p.requires_grad
    }


def _eval_pass(model, ids):
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # bitsandbytes may repack the weights here (AVX512-BF16 CPUs)


def _packed(model) -> bool:
    return any(
        getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)
        for m in model.modules()
        if hasattr(m, "weight")
    )


def test_gradients_after_an_eval_pass_equal_those_of_a_fresh_model(tiny_model_dir):
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    fresh = _grads(_qlora(tiny_model_dir), ids)
    unfixed = _qlora(tiny_model_dir)
    _eval_pass(unfixed, ids)
    if _packed(unfixed):  # the bug this guards against: without the fix the gradients are wrong
        broken = _grads(unfixed, ids)
        assert any(
            b is None or not torch.allclose(b, fresh[n], atol=1e-4, rtol=1e-3) for n, b in broken.items()
        )
    model = _qlora(tiny_model_dir)
    assert no_cpu_weight_packing(model) == 14  # 7 projections x 2 layers, before any forward pass
    _eval_pass(model, ids)
    for _ in range(2):  # eval passes in between (validation) leave the training gradients right
        for name, grad in _grads(model, ids).items():
            torch.testing.assert_close(grad, fresh[name], atol=1e-5, rtol=1e-4)
        _eval_pass(model, ids)
        assert not _packed(model)


def test_refuses_a_model_already_repacked(tiny_model_dir):
    import pytest

    model = _qlora(tiny_model_dir)
    _eval_pass(model, torch.randint(0, 1000, (1, 8)))
    if _packed(model):
        with pytest.raises(RuntimeError, match="already repacked"):
            no_cpu_weight_packing(model)
