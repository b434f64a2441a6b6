"""The QLoRA trainer, run as its own process by the job manager:

    python -m mygpt.finetune.trainer SPEC.json

LoRA on the same NF4 base the server serves (loaded the same way), loss on assistant tokens only,
the model's chat template. Progress goes to stdout as one JSON object a line; the adapter is saved in
peft's format (safetensors) to spec["out_dir"]. On CPU it runs at the lowest priority with one
thread, so serving keeps its cores; on CUDA it uses bitsandbytes' paged 8-bit AdamW.

Checkpoints (spec["checkpoint_dir"]): at the end of every epoch but the last, every
spec["checkpoint_s"] seconds within one, and on SIGTERM (then it exits: the server is stopping). Each
holds the adapter and everything the run's continuation depends on: the optimizer's and the
schedule's states, the random generators, the epoch and the batch within it. A run started with
spec["resume"] (a checkpoint) goes on from there and ends with the adapter the uninterrupted run
makes, bit for bit on the same machine.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASE_LR = 2e-4  # learning_rate_multiplier 1.0
STATE = "trainer_state.pt"  # a checkpoint's state beside its adapter; written last: a complete one has it
EPOCH_END = "epoch_end"  # an empty file in the checkpoints that end an epoch
EPOCH_CHECKPOINTS_KEPT = 2  # besides the newest checkpoint (OpenAI keeps those of the last 3 epochs)


def emit(event: str, **data: Any) -> None:
    print(json.dumps({"event": event, **data}), flush=True)


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    stopping: list[int] = []  # SIGTERM: checkpoint at the next step's end, then exit
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    die_with_parent(spec.get("parent_pid"))
    import torch

    from mygpt.config import Settings
    from mygpt.engine.loader import load_model
    from mygpt.finetune.data import read_examples, tokenize

    hp = spec["hyperparameters"]
    settings = Settings(**spec["settings"])
    if settings.device in ("auto", "cpu") and not torch.cuda.is_available():
        os.nice(19)  # serving first: the trainer takes what the server leaves
        torch.set_num_threads(int(spec.get("cpu_threads", 1)))
    random.seed(spec["seed"])
    torch.manual_seed(spec["seed"])
    loaded = load_model(settings)
    tokenizer, model = loaded.tokenizer, loaded.model
    max_len = int(spec.get("max_len", 1024))
    train = [tokenize(tokenizer, m, max_len) for m in read_examples(spec["train_path"])]
    valid = (
        [tokenize(tokenizer, m, max_len) for m in read_examples(spec["valid_path"])]
        if spec.get("valid_path")
        else []
    )
    train = [t for t in train if t.trained_tokens]
    if not train:
        raise SystemExit("no example has assistant tokens left after truncation")

    if device_of(model).type == "cpu":
        no_cpu_weight_packing(model)

    from peft import LoraConfig, get_peft_model

    rank = int(hp["lora_rank"])
    model = get_peft_model(
        model,
        LoraConfig(
            r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM"
        ),
    )
    device = next(p for p in model.parameters() if p.requires_grad).device
    params = [p for p in model.parameters() if p.requires_grad]
    lr = BASE_LR * float(hp["learning_rate_multiplier"])
    if device.type == "cuda":
        import bitsandbytes as bnb

        optimizer = bnb.optim.PagedAdamW8bit(params, lr=lr)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def loss_on(examples) -> float | None:
        loss = mean_loss(model, examples, int(hp["batch_size"]), pad, device)
        model.train()
        return loss

    epochs, batch_size = int(hp["n_epochs"]), int(hp["batch_size"])
    steps = epochs * math.ceil(len(train) / batch_size)
    warmup = max(1, steps // 10)  # linear warm-up over 10% of the steps, then linear decay to 0
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda k: (k + 1) / warmup if k < warmup else max(0.0, (steps - k) / max(1, steps - warmup)),
    )
    emit("started", train_examples=len(train), valid_examples=len(valid), total_steps=steps,
         train_tokens=sum(t.trained_tokens for t in train), device=str(device))  # fmt: skip
    resume = load_checkpoint(spec.get("resume"), spec["base_name"], model, optimizer, schedule)
    if resume is None:
        with model.disable_adapter():
            base_valid = loss_on(valid)
        if base_valid is not None:
            emit("base_valid_loss", valid_loss=base_valid)
        first, skip, step, trained, spent, valid_loss = 1, 0, 0, 0, 0.0, None
    else:
        base_valid, valid_loss = resume["base_valid"], resume["valid_loss"]
        first, skip, step, trained, spent = (
            resume[k] for k in ("epoch", "batch", "step", "trained", "spent")
        )
        random.setstate(resume["epoch_random"])  # this epoch's order, as it was drawn
        emit("resumed", step=step, epoch=first, trained_tokens=trained)
    ckpt_dir = Path(spec["checkpoint_dir"]) if spec.get("checkpoint_dir") else None
    every_s = float(spec.get("checkpoint_s") or 0)
    model.train()
    t0 = time.monotonic() - spent
    last_saved = time.monotonic()

    def checkpoint(epoch: int, batch: int, epoch_random, epoch_end: bool, train_loss: float | None) -> None:
        if ckpt_dir is None:
            return
        started = time.monotonic()
        state = {
            "epoch": epoch, "batch": batch, "step": step, "trained": trained, "spent": time.monotonic() - t0,
            "base_valid": base_valid, "valid_loss": valid_loss, "epoch_random": epoch_random,
            "base_name": spec["base_name"],
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
        }  # fmt: skip
        path = save_checkpoint(ckpt_dir, step, epoch_end, model, spec["base_name"], state)
        emit("checkpoint", step=step, epoch=epoch - 1 if epoch_end else epoch, epoch_end=epoch_end,
             path=str(path), train_loss=train_loss, valid_loss=valid_loss if epoch_end else None,
             seconds=time.monotonic() - started, bytes=sum(f.stat().st_size for f in path.iterdir()))  # fmt: skip

    for epoch in range(first, epochs + 1):
        epoch_random = random.getstate()
        order = shuffled(len(train))
        if resume is not None:  # the generators as they were at the checkpoint (dropout)
            torch.set_rng_state(resume["torch_rng"])
            if resume["cuda_rng"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(resume["cuda_rng"])
            resume = None
        loss = None
        for b, (ids, labels, mask, n) in enumerate(make_batches(train, batch_size, order, pad, device, skip)):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step, trained = step + 1, trained + n
            emit("step", step=step, total_steps=steps, epoch=epoch, train_loss=float(loss.detach()),
                 trained_tokens=trained, tokens_per_s=trained / (time.monotonic() - t0))  # fmt: skip
            last_batch = skip + b + 1 == math.ceil(len(train) / batch_size)
            if not last_batch and (stopping or (every_s and time.monotonic() - last_saved >= every_s)):
                checkpoint(epoch, skip + b + 1, epoch_random, False, float(loss.detach()))
                last_saved = time.monotonic()
                if stopping:
                    emit("paused", step=step)
                    raise SystemExit(0)
        skip = 0
        valid_loss = loss_on(valid)
        emit("epoch", epoch=epoch, valid_loss=valid_loss)
        if epoch < epochs:  # the next epoch starts here: its order is drawn from this state
            checkpoint(
                epoch + 1, 0, random.getstate(), True, float(loss.detach()) if loss is not None else None
            )
            last_saved = time.monotonic()
            if stopping:
                emit("paused", step=step)
                raise SystemExit(0)
    out = Path(spec["out_dir"])
    save_adapter(model, out, spec["base_name"])
    emit("done", trained_tokens=trained, valid_loss=valid_loss, base_valid_loss=base_valid,
         seconds=time.monotonic() - t0, tokens_per_s=trained / max(time.monotonic() - t0, 1e-9))  # fmt: skip


def die_with_parent(parent_pid: int | None) -> None:
    """The trainer ends with the server that started it (SIGKILLed, it cannot stop its trainer): Linux
    kills it when its parent goes. Otherwise another server could resume the job while it trains."""
    if parent_pid is None:
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the server's own stop is all there is
        return
    if os.getppid() != parent_pid:  # it went before the call above
        raise SystemExit("the server that started this trainer has stopped")


def save_adapter(model, out: Path, base_name: str) -> None:
    """The adapter in peft's format, naming the base it was trained on."""
    model.save_pretrained(out, safe_serialization=True)
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_name
    config_path.write_text(json.dumps(config, indent=2))


def save_checkpoint(root: Path, step: int, epoch_end: bool, model, base_name: str, state: dict) -> Path:
    """`root`/step-<step>: the adapter and the trainer's state, written aside and renamed, so that a
    checkpoint that exists is whole. Keeps the newest and the last EPOCH_CHECKPOINTS_KEPT of the epochs'
    ends; removes the rest."""
    import torch

    path = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.{os.getpid()}.tmp"  # (its own, should two trainers ever share a job)
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp, base_name)
    torch.save(state, tmp / STATE)
    if epoch_end:
        (tmp / EPOCH_END).touch()
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    found = checkpoints(root)
    ends = [p for p in found if (p / EPOCH_END).is_file()]
    keep = {found[-1], *ends[-EPOCH_CHECKPOINTS_KEPT:]}
    for old in found:
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)
    return path


def checkpoints(root: Path | None) -> list[Path]:
    """The whole checkpoints under `root`, oldest first."""
    if root is None or not Path(root).is_dir():
        return []
    return sorted(p for p in Path(root).glob("step-*") if (p / STATE).is_file())


def load_checkpoint(path: str | None, base_name: str, model, optimizer, schedule) -> dict | None:
    """The state of the checkpoint at `path`, its adapter loaded into `model` and its optimizer's and
    schedule's states into theirs; None without one."""
    if not path:
        return None
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = torch.load(Path(path) / STATE, weights_only=False)
    if state.get("base_name") != base_name:  # a restart on another --model: its weights are not these
        raise SystemExit(f"checkpoint {path} was made on base '{state.get('base_name')}', not '{base_name}'")
    set_peft_model_state_dict(model, load_file(str(Path(path) / "adapter_model.safetensors")))
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    return state


def device_of(model):
    return next(model.parameters()).device


def no_cpu_weight_packing(model) -> int:
    """bitsandbytes repacks a 4-bit weight in place for its fast CPU kernel the first time the layer
    runs in eval mode without gradients (our validation passes), and its training backward then
    reads the repacked data as if it were plain NF4: the gradients are wrong and QLoRA stops learning
    (measured on the default model: validation loss 4.45 -> 4.07 after 3 epochs, 4.44 -> 0.39 with
    repacking off, and 3.82 -> 0.37 on the float32 base). Call before any forward pass: it turns the
    repacking off (bitsandbytes' own inverse did not give the original gradients back). Returns the
    layers changed."""
    import bitsandbytes as bnb

    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
                raise RuntimeError("4-bit weights were already repacked for inference: load the model again")
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def shuffled(n: int) -> list[int]:
    order = list(range(n))
    random.shuffle(order)
    return order


def make_batches(examples, size: int, order: list[int] | None, pad: int, device, skip: int = 0):
    """(input_ids, labels, attention_mask, trained tokens) batches of `examples` in `order` (as they
    are when None), right-padded to their longest; the first `skip` batches left out."""
    import torch

    order = list(range(len(examples))) if order is None else order
    for i in range(skip * size, len(order), size):
        group = [examples[j] for j in order[i : i + size]]
        width = max(len(t.input_ids) for t in group)
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        labels = torch.full((len(group), width), -100, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for r, t in enumerate(group):
            ids[r, : len(t.input_ids)] = torch.tensor(t.input_ids)
            labels[r, : len(t.labels)] = torch.tensor(t.labels)
            mask[r, : len(t.input_ids)] = 1
        yield ids.to(device), labels.to(device), mask.to(device), sum(t.trained_tokens for t in group)


def mean_loss(model, examples, batch_size: int, pad: int, device) -> float | None:
    """Mean cross-entropy per trained token (the validation loss); None without examples."""
    import torch

    if not examples:
        return None
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ids, labels, mask, n in make_batches(examples, batch_size, None, pad, device):
            total += float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) * n
            tokens += n
    return total / tokens


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except SystemExit:
        raise
    except BaseException as exc:  # the job manager shows the reason
        emit("error", message=f"{type(exc).__name__}: {exc}")
        raise SystemExit(1) from exc
