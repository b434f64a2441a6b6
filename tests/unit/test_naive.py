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


def test_a_failure_ends_every_choice_not_yet_ended(naive, monkeypatch):
    """A failure in choice 1 of 3: choice 0 ended as it did, choices 1 and 2 get an error final each
    (the request's accounting, a tenant's concurrency slot included, waits for every choice's)."""
    real, calls = naive._generate, {"n": 0}

    def fails_second(request, index, on_event):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("CUDA error: out of memory")
        return real(request, index, on_event)

    monkeypatch.setattr(naive, "_generate", fails_second)
    c = Collector()
    c.submit(naive, "f", PROMPTS[0], max_tokens=4, n=3, temperature=1.0, seed=1)
    c.wait()
    finals = {e.index: e for e in c.events["f"] if e.finish_reason is not None}
    assert finals[0].finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    assert [finals[i].finish_reason for i in (1, 2)] == [FinishReason.ERROR] * 2
    assert "out of memory" in finals[2].error


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


def test_vllms_extras_give_the_same_tokens_in_both_engines(naive, tiny_model_dir, tokenizer):
    """repetition_penalty, top_k, ignore_eos, min_tokens and stop_token_ids, and OpenAI's presence and
    frequency penalties: the engine (its own sampler) and the baseline (transformers' processors, and
    one of its own for the penalties) give the same tokens and finish reasons."""
    from transformers import AutoModelForCausalLM

    from mygpt.engine.engine import Engine
    from mygpt.engine.runner import ModelRunner

    eos = tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    engine = Engine(ModelRunner(model, 4, 512, torch.float32), tokenizer, [eos])
    engine.start()
    cases = {
        "plain": dict(max_tokens=12, temperature=0.0),
        "repeat": dict(max_tokens=12, temperature=0.0, repetition_penalty=1.8),
        "penalised": dict(max_tokens=12, temperature=0.0, presence_penalty=1.5, frequency_penalty=1.0),
        "top1": dict(max_tokens=12, temperature=1.5, top_k=1, seed=2),
        "ignore": dict(max_tokens=5, temperature=0.0, logit_bias={eos: 100.0}, ignore_eos=True),
        "least": dict(max_tokens=6, temperature=0.0, logit_bias={eos: 100.0}, min_tokens=3),
        "stopid": dict(max_tokens=6, temperature=0.0, logit_bias={7: 100.0}, stop_token_ids=(7,)),
    }
    got = {}
    try:
        for name, e in (("engine", engine), ("naive", naive)):
            c = Collector()
            for case, params in cases.items():
                c.submit(e, case, PROMPTS[4], **params)
                c.wait()  # one at a time: the naive engine runs them so anyway
            got[name] = {case: (c.tokens(case), c.finish(case)) for case in cases}
    finally:
        engine.stop()
    assert got["engine"] == got["naive"]
    out = got["engine"]
    assert out["repeat"][0] != out["plain"][0] and out["top1"] == out["plain"]
    assert out["penalised"][0] != out["plain"][0]
    assert out["ignore"] == ([eos] * 5, FinishReason.LENGTH)
    assert out["least"][1] == FinishReason.STOP and len(out["least"][0]) == 4 and out["least"][0][3] == eos
    assert out["stopid"] == ([7], FinishReason.STOP)
