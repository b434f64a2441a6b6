#!/usr/bin/env python3
"""/v1/embeddings' engine path against the two ways people embed with transformers, on the default
model (NF4, CPU, the server's runner settings), all in one process with the methods alternating per
round (the machine's speed drifts between processes); medians over the rounds.

    .venv/bin/python scripts/bench_embeddings.py [--rounds 3] [--inputs 256] [--out docs/bench/embeddings-cpu.json]

Methods (every one gives each input's mean-pooled, L2-normalized last_hidden_state):
- hf-one: one forward per input (what `--engine naive` does, and a loop over model(...) in a script);
- hf-padded: batches of --batch inputs sorted by length, right-padded, masked mean (what
  sentence-transformers' encode() does: it sorts by length to waste less on padding);
- engine: every input an engine request, as the server submits them, batched by the engine's chunked
  prefill (--max-num-batched-tokens per step, --max-num-seqs rows);
- engine-packed: the same with each step's chunks attending in one padded call a layer (runner._Packed,
  the default on a GPU; on the CPU they attend one by one).
Also:
- the engine's vectors against hf-one's (cosine; they differ by float rounding only);
- chat next to embeddings: --streams greedy chat streams of --tokens tokens, alone and while the engine
  embeds the inputs in each BESIDE mode (a token cap per step, and a share of the time, while streams
  decode); the streams' inter-token latency (p50, p99, mean) and the embedding wall time;
- retrieval on a small hand-written set (RETRIEVAL, 36 pairs): how many queries find their document
  first with each pooling ("prompt", the server's default, "mean", "last").
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import statistics
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mygpt.api.embeddings import PROMPT
from mygpt.config import Settings
from mygpt.engine.engine import Engine
from mygpt.engine.loader import load_model
from mygpt.engine.runner import ModelRunner
from mygpt.engine.types import GenerationRequest, SamplingParams

SENTENCES = [
    "The quarterly report shows that revenue grew in every region except the north.",
    "Our support team answers tickets within four hours on working days.",
    "The new cache layer cut the median page load time by a third.",
    "Employees may work from home up to three days a week with their manager's approval.",
    "The river flooded the lower town twice in the last ten years.",
    "A good sourdough needs a lively starter, time, and a very hot oven.",
    "The contract renews automatically unless either party gives notice ninety days ahead.",
    "Solar panels on the warehouse roof now cover most of its daytime power.",
    "The library extends loans online if nobody else has reserved the book.",
    "Vaccination appointments can be booked at the front desk or by phone.",
]
# (query, the document it should retrieve first among all documents)
RETRIEVAL = [
    ("A kitten is lying on a rug.", "The cat sat on the mat."),
    ("Sales grew by 5% this quarter.", "Quarterly revenue rose five percent."),
    ("I forgot my login credentials.", "How do I reset my password?"),
    ("Will it rain tomorrow?", "The weather tomorrow will be sunny and warm."),
    ("Which language should I learn to code?", "Python is a programming language."),
    ("How long does shipping take?", "Orders are delivered within three business days."),
    ("Can I bring my dog to the office?", "Pets are not allowed in the building."),
    ("What is the boiling point of water?", "Water boils at one hundred degrees Celsius at sea level."),
    ("Who wrote Hamlet?", "Shakespeare's tragedies include Hamlet and Macbeth."),
    ("My laptop battery drains fast.", "The notebook's battery runs out after an hour."),
    ("Where can I park my car?", "The garage under the building has visitor parking."),
    ("Is the museum open on Mondays?", "The museum is closed every Monday."),
    # written after the first 12 had chosen "prompt" pooling: a check it was not fitted to them
    ("How much does the premium plan cost?", "The premium subscription is priced at twenty dollars a month."),
    (
        "My flight was cancelled, what now?",
        "Passengers on cancelled flights can rebook for free or get a refund.",
    ),
    ("What time does the pharmacy close?", "The pharmacy is open until eight in the evening."),
    ("How do I cook rice?", "Rinse the rice, add twice as much water and simmer for fifteen minutes."),
    ("Is it safe to swim here?", "Strong currents make the beach dangerous for swimmers."),
    ("Who won the football match yesterday?", "The home team beat the visitors three to one last night."),
    ("How can I improve my sleep?", "Going to bed at the same time every night helps you rest better."),
    ("Can I return a damaged item?", "Broken products may be sent back within thirty days."),
    ("Where is the nearest hospital?", "The city clinic with an emergency room is two streets away."),
    ("What is the capital of Japan?", "Tokyo is the largest city and the seat of Japan's government."),
    ("How do plants make food?", "Photosynthesis turns sunlight, water and carbon dioxide into sugar."),
    ("When does the train to Berlin leave?", "The next departure to Berlin is at 9:15 from platform 4."),
    ("My phone screen is cracked.", "We repair broken smartphone displays in one hour."),
    ("How do I learn to play guitar?", "Beginner guitar lessons start with simple chords and strumming."),
    (
        "What should I pack for a hiking trip?",
        "Bring sturdy boots, water, a rain jacket and snacks on the trail.",
    ),
    ("Is coffee bad for your health?", "Moderate caffeine intake is not harmful for most adults."),
    (
        "How do I open a bank account?",
        "To start banking with us, bring an ID and proof of address to a branch.",
    ),
    ("Why is the sky blue?", "Air scatters blue sunlight more than red light."),
    ("The printer is not working.", "If the printer jams, remove the paper tray and restart the device."),
    ("How many vacation days do I get?", "Full-time staff receive twenty-five days of annual leave."),
    ("What's a good gift for a child?", "Building blocks and picture books are popular presents for kids."),
    ("How do I change a flat tire?", "Loosen the nuts, jack up the car, and swap in the spare wheel."),
    ("Are dogs allowed in the park?", "Leashed pets are welcome on all park paths."),
    ("How do vaccines work?", "Vaccines train the immune system to recognize a virus."),
]


def corpus(tok, n: int, seed: int = 0) -> list[list[int]]:
    """n inputs of 1 to 8 sentences (about 15 to 150 tokens), as documents chunked for retrieval are."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(SENTENCES) for _ in range(rng.randint(1, 8))) for _ in range(n)]
    return [tok(t)["input_ids"] for t in texts]


def pooled(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """hidden [B, T, H], mask [B, T] (right padding) -> [B, H] normalized."""
    if pooling == "mean":
        m = mask[..., None].to(hidden.dtype)
        v = (hidden * m).sum(1) / m.sum(1)
    else:
        v = hidden[torch.arange(hidden.shape[0]), mask.sum(1) - 1]
    return F.normalize(v.float(), dim=-1)


@torch.inference_mode()
def hf_one(model, inputs: list[list[int]], pooling: str = "mean") -> list[torch.Tensor]:
    out, device = [], next(model.parameters()).device
    for ids in inputs:
        hidden = model.model(input_ids=torch.tensor([ids], device=device)).last_hidden_state
        out.append(pooled(hidden, torch.ones(1, len(ids), dtype=torch.long, device=device), pooling)[0])
    return out


@torch.inference_mode()
def hf_padded(model, inputs: list[list[int]], batch: int, pad: int) -> list[torch.Tensor]:
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    out: list[torch.Tensor | None] = [None] * len(inputs)
    device = next(model.parameters()).device
    for k in range(0, len(order), batch):
        group = order[k : k + batch]
        width = max(len(inputs[i]) for i in group)
        ids = torch.tensor([inputs[i] + [pad] * (width - len(inputs[i])) for i in group], device=device)
        mask = torch.tensor(
            [[1] * len(inputs[i]) + [0] * (width - len(inputs[i])) for i in group], device=device
        )
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        for i, v in zip(group, pooled(hidden, mask, "mean"), strict=True):
            out[i] = v
    return out  # type: ignore[return-value]


class Waiter:
    def __init__(self, n: int):
        self.events: dict[str, list] = {}
        self.left = n
        self.cv = threading.Condition()

    def __call__(self, ev) -> None:
        with self.cv:
            self.events.setdefault(ev.request_id, []).append(ev)
            if ev.finish_reason is not None:
                self.left -= 1
                self.cv.notify_all()

    def wait(self) -> None:
        with self.cv:
            assert self.cv.wait_for(lambda: self.left == 0, 1200)


def engine_embed(
    engine: Engine, inputs: list[list[int]], tag: str, pooling: str = "mean"
) -> list[torch.Tensor]:
    w = Waiter(len(inputs))
    for i, ids in enumerate(inputs):
        engine.submit(GenerationRequest(f"{tag}-{i}", ids, SamplingParams(max_tokens=0), embed=pooling), w)
    w.wait()
    return [torch.tensor(w.events[f"{tag}-{i}"][-1].embedding) for i in range(len(inputs))]


def chat_gaps(
    engine: Engine, prompts: list[list[int]], tokens: int, tag: str, beside=None
) -> tuple[list, float]:
    """The streams' token gaps; with `beside` (inputs), embedded at the same time: also its wall time."""
    w = Waiter(len(prompts))
    for i, p in enumerate(prompts):
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        engine.submit(GenerationRequest(f"{tag}-chat{i}", p, params), w)
    wall = 0.0
    if beside is not None:
        time.sleep(0.3)  # the streams are decoding
        t0 = time.monotonic()
        engine_embed(engine, beside, f"{tag}-beside")
        wall = time.monotonic() - t0
    w.wait()
    gaps = [g for i in range(len(prompts)) for g in w.events[f"{tag}-chat{i}"][-1].timings.token_gaps]
    return gaps, wall


def in_thread(f, *args):
    """Runs f in a thread that exits (see bench_prefix.py: a live thread that ran parallel torch work
    slows the engine's thread pool)."""
    box = {}
    t = threading.Thread(target=lambda: box.update(r=f(*args)))
    t.start()
    t.join()
    return box["r"]


# chat beside a bulk embedding job, the ways the engine can run it: mode -> (embedding tokens a step
# while streams decode: "cap" (embed_chunk, the default) or "budget" (the whole step's), embed_share)
BESIDE = {
    "every step, capped": ("cap", 1.0),  # session 14's default: a capped chunk in every step
    "every step, uncapped": ("budget", 1.0),  # budgeted as generation prompts, as before the cap
    "share 0.5, capped": ("cap", 0.5),  # the default: at most half the time in such steps
    "share 0.5, uncapped": ("budget", 0.5),
}


def beside(engine: Engine, mode: str, cap: int) -> bool:
    """Sets the engine up for a BESIDE mode ("alone": the default's); whether embeddings run beside."""
    tokens, share = BESIDE.get(mode, ("cap", Settings.model_fields["embedding_time_share"].default))
    engine.embed_chunk = cap if tokens == "cap" else engine.max_num_batched_tokens
    engine.embed_share = share
    return mode in BESIDE


def packed(engine: Engine, run):
    """run() with each step's prompt chunks attending in one padded call a layer (runner._Packed: the
    default on a GPU, off on the CPU)."""
    saved, engine.runner.pack_chunks = engine.runner.pack_chunks, True
    try:
        return run()
    finally:
        engine.runner.pack_chunks = saved


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--inputs", type=int, default=256)
    p.add_argument("--batch", type=int, default=32, help="hf-padded's batch size")
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    lm = in_thread(load_model, Settings())
    s = Settings()
    runner = ModelRunner(
        lm.model, s.max_num_seqs, 2048, lm.dtype, 0, 16, lm_head_dtype=torch.bfloat16, exact_attention=True
    )
    engine = Engine(
        runner,
        lm.tokenizer,
        lm.eos_token_ids,
        max_num_batched_tokens=s.max_num_batched_tokens,
        max_waiting=10_000,
    )
    engine.start()
    tok, model = lm.tokenizer, lm.model
    inputs = corpus(tok, args.inputs)
    tokens = sum(len(x) for x in inputs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    print(
        f"{args.inputs} inputs, {tokens} tokens (median {statistics.median(map(len, inputs)):.0f} an input)",
        flush=True,
    )

    runs = {
        "hf-one": lambda: in_thread(hf_one, model, inputs),
        "hf-padded": lambda: in_thread(hf_padded, model, inputs, args.batch, pad),
        "engine": lambda: engine_embed(engine, inputs, f"e{time.monotonic_ns()}"),
        "engine-packed": lambda: packed(
            engine, lambda: engine_embed(engine, inputs, f"p{time.monotonic_ns()}")
        ),
    }
    times: dict[str, list[float]] = {m: [] for m in runs}
    vectors: dict[str, list[torch.Tensor]] = {}
    for r in range(args.rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for m in order:
            t0 = time.monotonic()
            vectors[m] = runs[m]()
            times[m].append(time.monotonic() - t0)
        print(f"round {r}: " + ", ".join(f"{m} {times[m][-1]:.2f} s" for m in runs), flush=True)
    cos = {
        m: min(float(a @ b) for a, b in zip(vectors[m], vectors["hf-one"], strict=True))
        for m in ("engine", "engine-packed", "hf-padded")
    }

    chat_prompts = [
        tok.apply_chat_template([{"role": "user", "content": f"Tell me a story about the number {i}."}],
                                add_generation_prompt=True, tokenize=True, return_dict=False)
        for i in range(args.streams)
    ]  # fmt: skip
    capped, modes = engine.embed_chunk, ("alone", *BESIDE)
    gaps: dict[str, list[list[float]]] = {m: [] for m in modes}
    walls: dict[str, list[float]] = {m: [] for m in modes[1:]}
    for r in range(args.rounds):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            g, wall = chat_gaps(
                engine,
                chat_prompts,
                args.tokens,
                f"c{r}{mode}",
                inputs if beside(engine, mode, capped) else None,
            )
            gaps[mode].append(g)
            if mode != "alone":
                walls[mode].append(wall)
        print(f"chat round {r}: ITL p50 / p99 " + ", ".join(
            f"{m} {pct(gaps[m][-1], .5) * 1e3:.1f} / {pct(gaps[m][-1], .99) * 1e3:.1f} ms" for m in modes
        ) + ", embedding wall " + ", ".join(f"{m} {walls[m][-1]:.1f} s" for m in modes[1:]), flush=True)  # fmt: skip
    beside(engine, "alone", capped)

    texts = [q for q, _ in RETRIEVAL], [d for _, d in RETRIEVAL]
    before, after = tok(PROMPT[0])["input_ids"], tok(PROMPT[1], add_special_tokens=False)["input_ids"]
    top1 = {}
    for pooling in ("prompt", "mean", "last"):  # "prompt": as the server wraps each input (its last token)
        if pooling == "prompt":
            ids = [[before + tok(t, add_special_tokens=False)["input_ids"] + after for t in g] for g in texts]
        else:
            ids = [[tok(t)["input_ids"] for t in group] for group in texts]
        pool = "last" if pooling == "prompt" else pooling
        q = torch.stack(engine_embed(engine, ids[0], f"q{pooling}", pool))
        d = torch.stack(engine_embed(engine, ids[1], f"d{pooling}", pool))
        hits = (q @ d.T).argmax(1) == torch.arange(len(RETRIEVAL))
        top1[pooling] = {
            "all": int(hits.sum()),
            "first_12": int(hits[:12].sum()),
            "later_24": int(hits[12:].sum()),
        }
    engine.stop()

    med = {m: statistics.median(times[m]) for m in runs}
    summary = {
        "inputs": args.inputs,
        "tokens": tokens,
        "seconds": med,
        "inputs_per_s": {m: args.inputs / med[m] for m in runs},
        "engine_speedup": {m: med[m] / med["engine"] for m in ("hf-one", "hf-padded", "engine-packed")},
        "min_cosine_to_hf_one": cos,
        "embed_chunk": capped,
        "chat_itl_ms": {
            m: {
                **{f"p{q}": statistics.median(pct(g, q / 100) for g in gaps[m]) * 1e3 for q in (50, 99)},
                "mean": statistics.median(statistics.fmean(g) for g in gaps[m]) * 1e3,
            }
            for m in modes
        },
        "embedding_wall_beside_chat_s": {m: statistics.median(walls[m]) for m in modes[1:]},
        "retrieval_top1": top1,
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        record = {
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.processor() or '?'}",
            "command": "scripts/bench_embeddings.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
            "summary": summary,
            "rounds": times,
        }  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
