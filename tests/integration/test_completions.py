"""POST /v1/completions (the legacy text endpoint) through the openai SDK against the default model."""

from __future__ import annotations

import httpx
import openai
import pytest
from test_wire import assert_openai_error

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The three primary colors are"


@pytest.fixture(scope="module")
def client(default_server):
    return openai.OpenAI(base_url=default_server.base_url + "/v1", api_key="unused", max_retries=0)


def post(server, body: dict) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/completions", json=body, timeout=60)


def test_greedy_completion_streamed_and_not_agree(client, tokenizer):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    [choice] = r.choices
    assert choice.index == 0 and len(choice.text.strip()) > 0 and choice.finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(tokenizer(PROMPT)["input_ids"])  # no chat template around it
    assert (
        r.usage.total_tokens
        == r.usage.prompt_tokens + r.usage.completion_tokens
        <= r.usage.prompt_tokens + 12
    )
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_defaults_to_16_tokens_and_takes_token_ids(client, tokenizer):
    r = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0)
    assert r.usage.completion_tokens <= 16
    ids = tokenizer(PROMPT)["input_ids"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text and by_ids.usage.prompt_tokens == len(ids)


def test_echo_n_seed_stop(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, echo=True, temperature=0)
    assert r.choices[0].text.startswith(PROMPT) and len(r.choices[0].text) > len(PROMPT)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, n=2, seed=3, temperature=1.0)
    assert [c.index for c in r.choices] == [0, 1]
    again = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, n=2, seed=3, temperature=1.0)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # B5
    greedy = (
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    )
    word = greedy.split()[1] if len(greedy.split()) > 1 else greedy.split()[0]
    cut = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=[word])
    assert word not in cut.choices[0].text and cut.choices[0].finish_reason == "stop"


def test_several_prompts_in_one_request(client, tokenizer):
    """OpenAI's layout: prompt i's choice j at index i * n + j, usage summed; each prompt answered as if
    alone (greedy), streamed or not, text or token ids, echo per prompt."""
    prompts = [PROMPT, "Once upon a time", "The sky is"]
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0) for p in prompts]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, n=2, echo=True)
    assert [c.index for c in r.choices] == list(range(6)) and len({r.id} | {a.id for a in alone}) == 4
    for i, a in enumerate(alone):
        for j in range(2):
            assert r.choices[2 * i + j].text == prompts[i] + a.choices[0].text
    assert r.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert r.usage.completion_tokens == 2 * sum(a.usage.completion_tokens for a in alone)
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=prompts[:2], max_tokens=6, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    texts = ["", ""]
    for c in chunks[:-1]:
        texts[c.choices[0].index] += c.choices[0].text
    assert texts == [a.choices[0].text for a in alone[:2]]
    assert chunks[-1].usage.total_tokens == sum(a.usage.total_tokens for a in alone[:2])
    ids = [tokenizer(p)["input_ids"] for p in prompts[1:]]  # lists of token ids
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert [c.text for c in r.choices] == [a.choices[0].text for a in alone[1:]]


def test_echo_with_logprobs_scores_the_prompt(client, tokenizer):
    """What evaluation harnesses send (lm-eval's local-completions: token-id prompts in a batch, echo,
    logprobs=1, max_tokens=1): every prompt token but the first gets its logprob under the model, and
    agrees with what the model gives for that position when the prompt stops there."""
    ids = tokenizer(PROMPT + " red, yellow and blue.")["input_ids"]
    other = tokenizer("Once upon a time")["input_ids"]
    r = client.completions.create(
        model=MODEL, prompt=[ids, other], echo=True, logprobs=5, max_tokens=1, temperature=0
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens[: len(ids)]) == tokenizer.decode(ids) and lp.text_offset[0] == 0
    assert len(r.choices[1].logprobs.tokens) == len(other) + 1
    for k in (3, len(ids) - 1):  # the prompt cut before token k: the model's next-token logprobs there
        cut = client.completions.create(model=MODEL, prompt=ids[:k], max_tokens=1, logprobs=5, temperature=0)
        alternatives = cut.choices[0].logprobs.top_logprobs[0]
        for token, value in lp.top_logprobs[k].items():
            if token in alternatives:
                assert abs(alternatives[token] - value) < 2e-3, (k, token)
        assert set(alternatives) & set(lp.top_logprobs[k])


def test_legacy_logprobs(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0 and len(top) == 3 and max(top.values()) == pytest.approx(logprob, abs=1e-4)
        assert token in top  # greedy: the chosen token is the best one
    zero = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=0)
    lz = zero.choices[0].logprobs  # 0: the sampled token only, as OpenAI does
    assert [list(t) for t in lz.top_logprobs] == [[t] for t in lz.tokens] and len(lz.token_logprobs) == 3
    streamed = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3, stream=True
    )
    parts = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == lp.tokens  # no token's logprob lost in streaming
    assert [o for p in parts for o in p.text_offset] == lp.text_offset


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"suffix": " and that is all."}, "suffix"),
        ({"prompt": ["one"] * 33}, "prompt"),  # more prompts than MYGPT_MAX_PROMPTS (32)
        ({"prompt": ["one", ""]}, "prompt"),  # any prompt refused refuses the request
        ({"best_of": 3}, "best_of"),
        ({"echo": True, "logprobs": 1, "stream": True}, "echo"),
        ({"prompt": [1, 2, 10**9]}, "prompt"),
        ({"prompt": [[True, False]]}, "prompt"),  # were token ids 1 and 0
        ({"prompt": [["5", "6"]]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"n": 99}, "n"),
    ],
)
def test_refusals_name_the_parameter(default_server, extra, param):
    r = post(default_server, {"model": MODEL, "prompt": PROMPT, **extra})
    assert_openai_error(r, 400, param=param)


def test_unknown_model_and_bad_body(default_server):
    assert_openai_error(post(default_server, {"model": "nope", "prompt": "x"}), 404, code="model_not_found")
    assert post(default_server, {"model": MODEL}).status_code in (400, 422)  # no prompt
