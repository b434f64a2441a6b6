#!/usr/bin/env python3
"""What fine-tuning checkpoints cost: the trainer on the default model (NF4, CPU), the same job with
checkpoints every --every-s seconds and without any, alternating in --rounds rounds (the machine's
speed drifts), medians. Reports each checkpoint's save time and size, and the run's training time
(from its first step to its end) with and without them.

    .venv/bin/python scripts/bench_checkpoint.py [--rounds 3] [--out docs/bench/checkpoint-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mygpt.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def examples(n: int) -> str:
    rows = [
        {"messages": [
            {"role": "system", "content": "You are a pirate."},
            {"role": "user", "content": f"Tell me about ship number {i}."},
            {"role": "assistant", "content": f"Arr, ship {i} be a fine vessel, matey! Yo ho ho!"},
        ]}
        for i in range(n)
    ]  # fmt: skip
    return "".join(json.dumps(r) + "\n" for r in rows)


def run(work: Path, train: Path, args, every_s: float | None) -> dict:
    settings = Settings().model_dump(
        mode="json", include={"model", "quantization", "dtype", "device", "cache_dir"}
    )
    spec = {
        "settings": settings, "base_name": "bench", "seed": 1, "cpu_threads": args.threads,
        "hyperparameters": {"n_epochs": args.epochs, "batch_size": 4, "learning_rate_multiplier": 1.0,
                            "lora_rank": args.rank},
        "train_path": str(train), "valid_path": None, "out_dir": str(work / "adapter"),
        "checkpoint_dir": str(work / "checkpoints") if every_s is not None else None,
        "checkpoint_s": every_s,
    }  # fmt: skip
    (work / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, "-m", "mygpt.finetune.trainer", str(work / "spec.json")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    saves = [e for e in events if e["event"] == "checkpoint"]
    steps = [e for e in events if e["event"] == "step"]
    done = events[-1]
    return {
        "train_s": done["seconds"], "steps": len(steps), "checkpoints": len(saves),
        "save_s": [e["seconds"] for e in saves], "save_bytes": [e["bytes"] for e in saves],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--examples", type=int, default=24)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--every-s", type=float, default=1.0, help="checkpoints within an epoch this often")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"without": [], "with": []}
    with tempfile.TemporaryDirectory() as tmp:
        train = Path(tmp) / "train.jsonl"
        train.write_text(examples(args.examples))
        for r in range(args.rounds):
            for mode, every in (("without", None), ("with", args.every_s)):
                work = Path(tmp) / f"{mode}-{r}"
                work.mkdir()
                results[mode].append(run(work, train, args, every))
                print(mode, results[mode][-1]["train_s"], results[mode][-1]["checkpoints"], flush=True)
    saves = [s for r in results["with"] for s in r["save_s"]]
    sizes = [b for r in results["with"] for b in r["save_bytes"]]
    without = statistics.median(r["train_s"] for r in results["without"])
    with_ = statistics.median(r["train_s"] for r in results["with"])
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads",
        "date": time.strftime("%Y-%m-%d"),
        "steps": results["with"][0]["steps"], "checkpoints_per_run": statistics.median(r["checkpoints"] for r in results["with"]),
        "save_s_median": statistics.median(saves), "save_s_max": max(saves), "checkpoint_bytes": statistics.median(sizes),
        "train_s_without": without, "train_s_with": with_, "ratio": with_ / without,
    }  # fmt: skip
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(
            json.dumps(
                {"summary": summary, "runs": results, "args": vars(args) | {"out": str(args.out)}}, indent=2
            )
        )


if __name__ == "__main__":
    main()
