import torch

from mygpt.engine.sampling import RowSampler, sample
from mygpt.engine.types import SamplingParams


def rows(n, **kw):
    return [RowSampler(SamplingParams(max_tokens=8, **kw), seed=i) for i in range(n)]


def test_greedy_is_argmax():
    logits = torch.randn(3, 50)
    tokens, _ = sample(logits, rows(3, temperature=0.0))
    assert tokens == logits.argmax(-1).tolist()


def test_seeded_sampling_does_not_depend_on_the_batch():
    torch.manual_seed(1)
    logits = torch.randn(4, 100)
    alone = [
        sample(logits[i : i + 1], [RowSampler(SamplingParams(max_tokens=8), seed=7)])[0][0] for i in range(4)
    ]
    batch, _ = sample(logits, [RowSampler(SamplingParams(max_tokens=8), seed=7) for _ in range(4)])
    assert alone == batch


def test_tiny_top_p_keeps_only_the_best_token():
    logits = torch.randn(5, 60)
    tokens, _ = sample(logits, rows(5, temperature=1.5, top_p=1e-6))
    assert tokens == logits.argmax(-1).tolist()


def test_logit_bias_forces_a_token():
    tokens, _ = sample(torch.zeros(2, 30), rows(2, temperature=0.0, logit_bias={17: 100.0}))
    assert tokens == [17, 17]


def test_penalties_move_away_from_repeated_tokens():
    logits = torch.zeros(1, 10)
    logits[0, 3] = 1.0
    r = RowSampler(SamplingParams(max_tokens=8, temperature=0.0, frequency_penalty=2.0), seed=0)
    r.output_ids.extend([3])
    assert sample(logits, [r])[0] != [3]
    r = RowSampler(SamplingParams(max_tokens=8, temperature=0.0, presence_penalty=-2.0), seed=0)
    r.output_ids.extend([5])
    assert sample(logits, [r])[0] == [5]


def test_logprobs_are_log_softmax_with_ranked_top():
    logits = torch.randn(2, 40)
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=True, top_logprobs=3)
    tokens, lps = sample(logits, [RowSampler(params, 0), RowSampler(SamplingParams(max_tokens=8), 0)])
    ref = torch.log_softmax(logits, -1)
    assert lps[1] is None
    assert abs(lps[0].logprob - float(ref[0, tokens[0]])) < 1e-5
    assert [t for t, _ in lps[0].top] == ref[0].topk(3).indices.tolist()
