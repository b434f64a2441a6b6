#!/usr/bin/env python3
"""What prefix caching buys: time to first token with the cache on and off, the default model (NF4,
CPU, the server's runner settings), both modes alternating in one process (the machine's speed drifts
between processes), medians over the rounds. Each round starts with an empty cache.

    .venv/bin/python scripts/bench_prefix.py [--rounds 3] [--out docs/bench/prefix-cpu.json]

Two workloads:
- chat: one conversation of --turns turns under a long system prompt; each turn's prompt is the whole
  conversation so far (chat template), greedy, --tokens tokens an answer. With the cache, a turn
  reuses the previous turn's prompt (not its answer: generated positions are computed again).
- shared: --users requests with the same long system prompt and different questions, arriving
  --gap-s apart while the earlier ones run; with the cache, later ones copy the system prompt.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from pathlib import Path

import torch

from mygpt.config import Settings
from mygpt.engine.engine import Engine
from mygpt.engine.loader import load_model
from mygpt.engine.runner import ModelRunner
from mygpt.engine.types import GenerationRequest, SamplingParams

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = (
    "You are the help desk assistant of a mid-sized engineering company. You answer questions from "
    "employees about travel, expenses, equipment, leave, security and the internal tools. Be brief and "
    "concrete, and point to the right form or team when you cannot answer. Travel: trains are booked "
    "through the travel portal, flights over four hours may be business class with a manager's approval, "
    "hotels up to the city rate in the travel policy. Expenses: receipts are photographed in the expense "
    "app within thirty days; meals with customers need the names of the guests; mileage is paid at the "
    "national rate. Equipment: laptops are replaced every four years, monitors and headsets are ordered "
    "in the IT shop, lost devices are reported to security at once. Leave: requests go through the HR "
    "system at least two weeks ahead; sick days are reported to the manager before nine in the morning. "
    "Security: never share passwords, lock the screen when leaving the desk, report phishing with the "
    "button in the mail client. Tools: the wiki holds team pages, the ticket system takes IT requests, "
    "and the chat system has a channel per office. "
)
QUESTIONS = [
    "Can I fly business class to Singapore next month?",
    "How do I claim the dinner I had with a customer on Tuesday?",
    "My laptop is five years old and slow. What can I do?",
    "I lost my phone on the train this morning. Whom do I tell?",
    "How early do I need to ask for two weeks of holiday in August?",
    "Where do I report a strange email asking for my password?",
    "Which hotel rate may I book in Munich?",
    "Can I order a second monitor for my desk at home?",
]


class Timer:
    """Collects time to first token and to the end of each request."""

    def __init__(self) -> None:
        self.t0: dict[str, float] = {}
        self.first: dict[str, float] = {}
        self.end: dict[str, float] = {}
        self.tokens: dict[str, list[int]] = {}
        self.cached: dict[str, int] = {}
        self.done = threading.Semaphore(0)

    def submit(self, engine: Engine, rid: str, prompt: list[int], tokens: int) -> None:
        self.t0[rid] = time.perf_counter()
        params = SamplingParams(max_tokens=tokens, temperature=0.0)
        engine.submit(GenerationRequest(rid, prompt, params), self.on_event)

    def on_event(self, ev) -> None:
        now = time.perf_counter()
        self.first.setdefault(ev.request_id, now)
        self.tokens.setdefault(ev.request_id, []).extend(ev.token_ids)
        self.cached[ev.request_id] = max(self.cached.get(ev.request_id, 0), ev.cached_tokens)
        if ev.finish_reason is not None:
            self.end[ev.request_id] = now
            self.done.release()

    def ttft(self, rid: str) -> float:
        return self.first[rid] - self.t0[rid]


def chat(engine: Engine, tok, turns: int, tokens: int, tag: str) -> dict:
    messages = [{"role": "system", "content": SYSTEM}]
    timer, out = Timer(), []
    for k in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[k % len(QUESTIONS)]})
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt = tok(text, add_special_tokens=False).input_ids
        rid = f"{tag}-turn{k}"
        timer.submit(engine, rid, prompt, tokens)
        assert timer.done.acquire(timeout=600)
        answer = tok.decode(timer.tokens[rid], skip_special_tokens=True)
        messages.append({"role": "assistant", "content": answer})
        out.append(
            {
                "prompt": len(prompt),
                "cached": timer.cached[rid],
                "ttft_s": timer.ttft(rid),
                "tokens": timer.tokens[rid],
            }
        )
    return {"turns": out}


def shared(engine: Engine, tok, users: int, tokens: int, gap_s: float, tag: str) -> dict:
    timer, prompts = Timer(), []
    for i in range(users):
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]},
        ]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompts.append(tok(text, add_special_tokens=False).input_ids)
    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts):
        time.sleep(max(0.0, t0 + i * gap_s - time.perf_counter()))
        timer.submit(engine, f"{tag}-user{i}", prompt, tokens)
    for _ in prompts:
        assert timer.done.acquire(timeout=600)
    rids = [f"{tag}-user{i}" for i in range(users)]
    return {
        "prompt": len(prompts[0]),
        "cached": [timer.cached[r] for r in rids],
        "ttft_s": [timer.ttft(r) for r in rids],
        "wall_s": max(timer.end.values()) - t0,
        "tokens": [timer.tokens[r] for r in rids],
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--gap-s", type=float, default=0.5)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    loaded = {}
    # loaded in a thread that exits: a live thread that ran parallel torch work slows the engine's
    # thread pool (libgomp, docs/architecture.md)
    t = threading.Thread(target=lambda: loaded.update(m=load_model(Settings())))
    t.start()
    t.join()
    lm = loaded["m"]
    s = Settings()
    runner = ModelRunner(
        lm.model, s.max_num_seqs, 2048, lm.dtype, 0, 16, lm_head_dtype=torch.bfloat16, exact_attention=True
    )
    engine = Engine(runner, lm.tokenizer, lm.eos_token_ids, max_num_batched_tokens=s.max_num_batched_tokens)
    engine.start()
    tok = lm.tokenizer
    results: dict[str, list] = {"on": [], "off": []}
    for r in range(args.rounds):
        for mode in ("on", "off") if r % 2 == 0 else ("off", "on"):
            engine.prefixes.enabled = mode == "on"
            engine.prefixes.clear()  # the engine is idle between workloads
            c = chat(engine, tok, args.turns, args.tokens, f"{mode}{r}")
            engine.prefixes.clear()
            sh = shared(engine, tok, args.users, args.tokens, args.gap_s, f"{mode}{r}s")
            results[mode].append({"chat": c, "shared": sh})
            print(
                f"round {r} cache {mode:3s}: chat TTFT per turn "
                + " ".join(f"{t['ttft_s'] * 1000:.0f}" for t in c["turns"])
                + f" ms (cached {[t['cached'] for t in c['turns']]}); shared: TTFT median "
                f"{statistics.median(sh['ttft_s']) * 1000:.0f} ms, wall {sh['wall_s']:.2f} s",
                flush=True,
            )
    engine.stop()

    def med(mode: str, f) -> float:
        return statistics.median(f(x) for x in results[mode])

    later = lambda x: statistics.median(t["ttft_s"] for t in x["chat"]["turns"][1:])  # noqa: E731
    shared_ttft = lambda x: statistics.median(x["shared"]["ttft_s"][1:])  # noqa: E731
    wall = lambda x: x["shared"]["wall_s"]  # noqa: E731
    same = all(
        a["chat"]["turns"][k]["tokens"] == b["chat"]["turns"][k]["tokens"]
        and a["shared"]["tokens"] == b["shared"]["tokens"]
        for a, b in zip(results["on"], results["off"], strict=True)
        for k in range(args.turns)
    )
    summary = {
        "chat_ttft_later_turns_s": {m: med(m, later) for m in ("on", "off")},
        "shared_ttft_later_users_s": {m: med(m, shared_ttft) for m in ("on", "off")},
        "shared_wall_s": {m: med(m, wall) for m in ("on", "off")},
        "same_greedy_tokens_on_and_off": same,
    }
    chat_t, shared_t, wall_t = (
        summary[k] for k in ("chat_ttft_later_turns_s", "shared_ttft_later_users_s", "shared_wall_s")
    )
    print(
        f"chat, turns 2..{args.turns}: TTFT {chat_t['on'] * 1000:.0f} ms with the cache, "
        f"{chat_t['off'] * 1000:.0f} ms without ({chat_t['off'] / chat_t['on']:.2f}x)"
    )
    print(
        f"shared system prompt, users 2..{args.users}: TTFT {shared_t['on'] * 1000:.0f} ms with, "
        f"{shared_t['off'] * 1000:.0f} ms without ({shared_t['off'] / shared_t['on']:.2f}x); "
        f"all {args.users} done in {wall_t['on']:.2f} s with, {wall_t['off']:.2f} s without"
    )
    print(f"greedy tokens the same with and without the cache: {same}")
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "machine": platform.processor() or platform.machine(),
                    "args": vars(args) | {"out": str(args.out)},
                    "summary": summary,
                    "rounds": results,
                },
                indent=1,
            )  # fmt: skip
        )


if __name__ == "__main__":
    main()
