"""`mygpt finetune` (a client of a running server's fine-tuning API, with a progress bar) and
`mygpt eval` (validation loss of the base and an adapter on a file, and a few answers side by side)."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path


def finetune(args: argparse.Namespace, api_key: str) -> None:
    import openai
    from tqdm import tqdm

    client = openai.OpenAI(base_url=args.base_url, api_key=api_key)
    model = args.model or client.models.list().data[0].id  # the base model comes first
    with open(args.training_file, "rb") as f:
        train = client.files.create(file=(Path(args.training_file).name, f), purpose="fine-tune")
    valid = None
    if args.validation_file:
        with open(args.validation_file, "rb") as f:
            valid = client.files.create(file=(Path(args.validation_file).name, f), purpose="fine-tune")
    hp = {k: v for k, v in {"n_epochs": args.epochs, "batch_size": args.batch_size,
                            "learning_rate_multiplier": args.lr_multiplier, "lora_rank": args.lora_rank}.items()
          if v is not None}  # fmt: skip
    job = client.fine_tuning.jobs.create(
        model=model, training_file=train.id, validation_file=valid.id if valid else None, suffix=args.suffix,
        hyperparameters=hp, seed=args.seed,
    )  # fmt: skip
    print(f"job {job.id}: training {model} on {train.id}", file=sys.stderr)
    bar, seen = None, set()
    try:
        while True:
            events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
            for e in reversed(events):
                if e.id in seen:
                    continue
                seen.add(e.id)
                data = e.data or {}
                if data.get("type") == "started":
                    bar = tqdm(total=data["total_steps"], unit="step", file=sys.stderr)
                elif data.get("type") == "metrics" and bar is not None:
                    bar.n = data["step"]
                    bar.set_postfix(loss=f"{data['train_loss']:.3f}", tok_s=f"{data['tokens_per_s']:.0f}")
                    bar.refresh()
                elif data.get("type") in ("epoch", "base_valid_loss", "done") or e.level == "error":
                    (bar.write if bar else print)(e.message)
            job = client.fine_tuning.jobs.retrieve(job.id)
            if job.status in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(1)
    except KeyboardInterrupt:
        client.fine_tuning.jobs.cancel(job.id)
        sys.exit(f"\njob {job.id} cancelled")
    finally:
        if bar is not None:
            bar.close()
    if job.status != "succeeded":
        sys.exit(f"job {job.id} {job.status}: {job.error.message if job.error else ''}")
    print(job.fine_tuned_model)


def evaluate(args: argparse.Namespace) -> None:
    import torch
    from peft import PeftModel

    from mygpt.config import Settings
    from mygpt.engine.loader import load_model
    from mygpt.finetune.data import read_examples, tokenize
    from mygpt.finetune.trainer import mean_loss

    torch.set_grad_enabled(False)
    path = Path(args.adapter)
    if not path.is_dir():
        path = Path(args.adapter_dir) / args.tenant / args.adapter
    loaded = load_model(Settings(model=args.model, cache_dir=args.cache_dir))
    tok, base = loaded.tokenizer, loaded.model
    conversations = read_examples(args.file)
    examples = [tokenize(tok, m, 2048) for m in conversations]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    device = next(base.parameters()).device
    base_loss = mean_loss(base, examples, 4, pad, device)
    model = PeftModel.from_pretrained(base, path).eval()
    tuned_loss = mean_loss(model, examples, 4, pad, device)
    print(f"{'model':<10} {'loss':>8} {'perplexity':>11}   ({len(examples)} examples of {args.file})")
    print(f"{'base':<10} {base_loss:>8.4f} {math.exp(base_loss):>11.2f}")
    print(f"{'adapter':<10} {tuned_loss:>8.4f} {math.exp(tuned_loss):>11.2f}   {path}")
    for messages in conversations[: args.samples]:
        first_answer = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
        prompt = [  # the conversation up to the first answer to be learned, as the trainer renders it
            {"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
            for m in messages[:first_answer]
        ]
        ids = tok.apply_chat_template(
            prompt, add_generation_prompt=True, return_tensors="pt", return_dict=False
        )
        ids = ids if isinstance(ids, torch.Tensor) else torch.tensor([ids])
        answers = {}
        for label, use_adapter in (("base", False), ("adapter", True)):
            if use_adapter:
                out = model.generate(ids.to(device), max_new_tokens=48, do_sample=False)
            else:
                with model.disable_adapter():
                    out = model.generate(ids.to(device), max_new_tokens=48, do_sample=False)
            answers[label] = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        print(f"\n> {prompt[-1]['content']}\n  base:    {answers['base']}\n  adapter: {answers['adapter']}")
