"""QLoRA on CPU: gradients through the 4-bit base stay right across eval passes (bitsandbytes repacks
weights for its inference kernel on the first one; the trainer turns that off)."""

from __future__ import annotations

from pathlib import Path

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


def _spec(tiny_model_dir, tmp_path, name: str, **extra) -> Path:
    """A trainer spec on the tiny model (NF4 on CPU): 24 examples, batches of 2, 2 epochs."""
    import json

    from mygpt.config import Settings

    train = tmp_path / "train.jsonl"
    if not train.exists():
        rows = [
            {"messages": [{"role": "user", "content": f"Tell me about ship {i}."},
                          {"role": "assistant", "content": f"Arr, ship {i} be a fine vessel!"}]}
            for i in range(24)
        ]  # fmt: skip
        train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = Settings(model=str(tiny_model_dir)).model_dump(
        mode="json", include={"model", "quantization", "dtype", "device"}
    )
    spec = {
        "settings": settings, "base_name": "tiny", "seed": 7, "cpu_threads": 1,
        "hyperparameters": {"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 1.0, "lora_rank": 4},
        "train_path": str(train), "valid_path": str(train), "out_dir": str(tmp_path / name / "adapter"),
        "checkpoint_dir": str(tmp_path / name / "checkpoints"), **extra,
    }  # fmt: skip
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path


def _train(spec: Path, stop_after_step: int | None = None) -> list[dict]:
    """Runs the trainer on `spec` as the job manager does; with stop_after_step, SIGTERM once that
    step's event is read (as a stopping server does). Returns its events."""
    import json
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "mygpt.finetune.trainer", str(spec)], stdout=subprocess.PIPE, text=True
    )
    events = []
    for line in proc.stdout:
        events.append(json.loads(line))
        if events[-1]["event"] == "step" and events[-1]["step"] == stop_after_step:
            proc.terminate()
    assert proc.wait(timeout=300) == 0, events[-3:]
    return events


def test_a_run_stopped_and_resumed_ends_with_the_uninterrupted_runs_adapter(tiny_model_dir, tmp_path):
    """SIGTERM mid-epoch: the trainer checkpoints at the step's end and exits; resumed from that
    checkpoint it makes the same adapter, bit for bit, as the run that was never stopped (the same
    batches in the same order, the same dropout, the same optimizer and schedule states). Resumed
    from the first epoch's checkpoint too."""
    from safetensors.torch import load_file

    from mygpt.finetune.trainer import EPOCH_END, checkpoints

    whole = _train(_spec(tiny_model_dir, tmp_path, "whole"))
    stopped = _train(_spec(tiny_model_dir, tmp_path, "cut"), stop_after_step=3)
    assert stopped[-1]["event"] == "paused" and 3 <= stopped[-1]["step"] < 12  # within the first epoch
    found = checkpoints(tmp_path / "cut" / "checkpoints")
    assert found and not (found[-1] / EPOCH_END).exists()
    resumed = _train(_spec(tiny_model_dir, tmp_path, "cut", resume=str(found[-1])))
    assert resumed[1]["event"] == "resumed" and resumed[-1]["event"] == "done"

    def losses(events):
        return {e["step"]: e["train_loss"] for e in events if e["event"] == "step"}

    assert losses(resumed) == {k: v for k, v in losses(whole).items() if k > stopped[-1]["step"]}
    assert resumed[-1]["trained_tokens"] == whole[-1]["trained_tokens"]
    expected = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)

    epoch_end = [p for p in checkpoints(tmp_path / "whole" / "checkpoints") if (p / EPOCH_END).exists()]
    assert [p.name for p in epoch_end] == ["step-00000012"]  # the last epoch's end is the adapter itself
    _train(_spec(tiny_model_dir, tmp_path, "again", resume=str(epoch_end[0])))
    got = load_file(str(tmp_path / "again" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_checkpoint_of_another_base_is_refused(tmp_path):
    """A restart on another --model: the job's checkpoint holds another base's adapter."""
    import pytest

    from mygpt.finetune.trainer import STATE, load_checkpoint

    torch.save({"base_name": "other-base"}, tmp_path / STATE)
    with pytest.raises(SystemExit, match="made on base 'other-base', not 'tiny'"):
        load_checkpoint(str(tmp_path), "tiny", None, None, None)
