"""The naive baseline engine (generate() + peft) keeps the API's contract too: n choices each end once,
seeds repeat, logprobs come back, top_p 0 is the most likely token (a fuzzer found each broken)."""

from __future__ import annotations

import pytest
import torch

from mygpt.engine.naive import NaiveEngine
from mygpt.engine.types import FinishReason
from test_engine import PROMPTS, Collector


@pytest.fixture(scope="module")
def naive(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    engine = NaiveEngine(model, tokenizer, [tokenizer.eos_token_id], max_len=512)
    engine.start()
    yield engine
    engine.stop()


def test_every_choice_ends_once_with_a_stop_string(naive):
    """generate() checks its stopping criteria before the streamer sees the token: one token more
    came after a choice's finish, and a second final event."""
    c = Collector()
    c.submit(naive, "s", PROMPTS[0], max_tokens=30, n=3, temperature=1.0, seed=1, stop=[" "])
    c.wait()
    for i in range(3):
        finals = [e for e in c.events["s"] if e.index == i and e.finish_reason is not None]
        assert len(finals) == 1 and finals[0].finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
        assert " " not in c.text("s", i)
        assert finals[0].completion_tokens == len(c.tokens("s", i))


def test_seeds_repeat_and_logprobs_come_back(naive):
    runs = []
    for rid in ("a", "b"):
        c = Collector()
        c.submit(
            naive, rid, PROMPTS[1], max_tokens=8, temperature=1.0, seed=42, logprobs=True, top_logprobs=2
        )
        c.wait()
        runs.append(c)
    assert runs[0].tokens("a") == runs[1].tokens("b")  # the generator made for the seed was never used
    lps = [lp for e in runs[0].events["a"] for lp in (e.logprobs or [])]
    assert [lp.token_id for lp in lps] == runs[0].tokens("a")
    assert all(lp.logprob <= 0 and len(lp.top) == 2 and lp.top[0][1] >= lp.top[1][1] for lp in lps)


def test_top_p_zero_is_the_most_likely_token(naive):
    c = Collector()
    c.submit(naive, "greedy", PROMPTS[2], max_tokens=6, temperature=0.0)
    c.submit(naive, "top_p0", PROMPTS[2], max_tokens=6, temperature=1.0, top_p=0.0, seed=3)
    c.wait()
    assert c.tokens("greedy") == c.tokens("top_p0")
