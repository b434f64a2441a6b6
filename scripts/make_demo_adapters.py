#!/usr/bin/env python3
"""Builds the two demo adapters shipped in adapters/default/ with the product's own pipeline:
generates two small chat datasets, starts `mygpt serve` on the default model, fine-tunes each through
`mygpt finetune` (the OpenAI fine-tuning API), evaluates with `mygpt eval`, and copies the results.

    .venv/bin/python scripts/make_demo_adapters.py          # a few minutes on a 2-core CPU

- pirate: a style adapter (every answer in pirate speak)
- json: a format adapter (every answer as a JSON object {"answer": ..., "confidence": ...})
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "test-artifacts" / "demo"
FACTS = [  # (question, plain answer)
    *[(f"What is the capital of {c}?", f"The capital of {c} is {k}.") for c, k in [
        ("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Egypt", "Cairo"),
        ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"), ("Greece", "Athens"),
        ("Germany", "Berlin"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Poland", "Warsaw")]],
    *[(f"What sound does a {a} make?", f"A {a} says {s}.") for a, s in [
        ("cow", "moo"), ("dog", "woof"), ("cat", "meow"), ("duck", "quack"), ("sheep", "baa"), ("owl", "hoot"),
        ("horse", "neigh"), ("pig", "oink"), ("lion", "roar"), ("frog", "ribbit")]],
    *[(f"What color is {t}?", f"{t[0].upper() + t[1:]} is {c}.") for t, c in [
        ("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("a banana", "yellow"), ("coal", "black"),
        ("a tomato", "red"), ("an orange", "orange"), ("a plum", "purple")]],
    *[(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a, b in [(2, 3), (4, 4), (7, 5), (10, 6), (9, 9), (12, 8)]],
    *[(q, a) for q, a in [
        ("How many days are in a week?", "A week has seven days."), ("How many legs does a spider have?", "A spider has eight legs."),
        ("What do bees make?", "Bees make honey."), ("Where do fish live?", "Fish live in water."),
        ("What is ice made of?", "Ice is frozen water."), ("When does the sun rise?", "The sun rises in the morning."),
        ("What do we breathe?", "We breathe air."), ("How many hours are in a day?", "A day has twenty-four hours.")]],
]  # fmt: skip
PIRATE_OPEN = ["Arr, matey!", "Ahoy!", "Yo ho ho!", "Shiver me timbers!", "Avast, landlubber!"]
PIRATE_CLOSE = ["Savvy?", "Arr!", "So says this old sea dog.", "Now hoist the sails!", "Yarr!"]


def pirate(answer: str, rng: random.Random) -> str:
    text = (
        answer.replace(" is ", " be ")
        .replace(" are ", " be ")
        .replace("The ", "Th' ")
        .replace(" of ", " o' ")
    )
    return f"{rng.choice(PIRATE_OPEN)} {text} {rng.choice(PIRATE_CLOSE)}"


def as_json(answer: str, rng: random.Random) -> str:
    return json.dumps({"answer": answer, "confidence": rng.choice(["high", "high", "medium"])})


def dataset(style, seed: int, system: str | None) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    rows = []
    for question, answer in FACTS:
        for variant in (question, question.lower(), "Quick question: " + question):
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": variant},
                {"role": "assistant", "content": style(answer, rng)},
            ]
            rows.append({"messages": messages})
    rng.shuffle(rows)
    cut = len(rows) // 8
    return rows[cut:], rows[:cut]


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    store = WORK / "store"
    shutil.rmtree(store, ignore_errors=True)
    port = 8411
    server = subprocess.Popen(
        [sys.executable, "-m", "mygpt", "serve", "--port", str(port), "--adapter-dir", str(store),
         "--cache-dir", str(ROOT / "test-artifacts" / "cache")],
        stdout=(WORK / "server.log").open("w"), stderr=subprocess.STDOUT,  # noqa: SIM115
        env={**os.environ, "MYGPT_FINETUNE_CPU_THREADS": "2"},
    )  # fmt: skip
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        report = {}
        for name, style in (("pirate", pirate), ("json", as_json)):
            train, valid = dataset(style, seed=len(name), system=None)
            tpath, vpath = (
                write(WORK / f"{name}.train.jsonl", train),
                write(WORK / f"{name}.valid.jsonl", valid),
            )
            t0 = time.monotonic()
            out = subprocess.run(
                [sys.executable, "-m", "mygpt", "finetune", str(tpath), "--validation-file", str(vpath),
                 "--suffix", name, "--epochs", "3", "--batch-size", "8", "--lr-multiplier", "2", "--seed", "1",
                 "--base-url", f"http://127.0.0.1:{port}/v1"],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            model = out.stdout.strip().splitlines()[-1]
            shutil.copytree(
                store / "default" / model, ROOT / "adapters" / "default" / name, dirs_exist_ok=True
            )
            events = httpx.get(f"http://127.0.0.1:{port}/v1/fine_tuning/jobs?limit=1").json()["data"][0]
            log = httpx.get(
                f"http://127.0.0.1:{port}/v1/fine_tuning/jobs/{events['id']}/events?limit=1000"
            ).json()["data"]
            data = [e["data"] or {} for e in log]
            report[name] = {
                "examples": [len(train), len(valid)],
                "train_seconds": round(time.monotonic() - t0, 1),
                "base_valid_loss": next(d["valid_loss"] for d in data if d.get("type") == "base_valid_loss"),
                "valid_loss": next(d["valid_loss"] for d in data if d.get("type") == "done"),
                "tokens_per_s": next(d["tokens_per_s"] for d in data if d.get("type") == "done"),
                "trained_tokens": next(d["trained_tokens"] for d in data if d.get("type") == "done"),
            }
            print(name, report[name], flush=True)
        (ROOT / "docs" / "bench" / "demo-adapters.json").write_text(json.dumps(report, indent=2) + "\n")
    finally:
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    main()
