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


def test_a_rows_draw_does_not_depend_on_the_other_rows_top_p():
    """B5: a top_p=1 row used to be drawn over the sorted vocabulary whenever another row of the batch
    had top_p < 1, and over the unsorted one otherwise: another token for the same seed."""
    torch.manual_seed(2)
    logits = torch.randn(3, 500) * 2
    params = [
        SamplingParams(max_tokens=8),
        SamplingParams(max_tokens=8, top_p=0.5),
        SamplingParams(max_tokens=8, top_p=0.9),
    ]
    for seed in range(20):
        alone = [sample(logits[i : i + 1], [RowSampler(p, seed)])[0][0] for i, p in enumerate(params)]
        batch, _ = sample(logits, [RowSampler(p, seed) for p in params])
        assert alone == batch


def test_top_p_from_the_head_equals_a_full_sort():
    """The CPU draws top_p from the k most likely tokens; the same draw as from the sorted vocabulary."""
    from mygpt.engine.sampling import _draw, _nucleus, _top_p_one

    torch.manual_seed(3)
    for scale in (0.5, 3.0, 8.0):  # flat (needs the whole vocabulary) to peaked (a few tokens)
        probs = torch.softmax(torch.randn(5000) * scale, -1)
        values, order = torch.sort(probs, descending=True)
        for top_p in (0.1, 0.5, 0.9, 0.99):
            for u in torch.rand(25):
                assert _top_p_one(probs, top_p, u) == order[_draw(_nucleus(values, top_p), u)][0]


def test_the_gpus_batched_top_p_draws_what_the_cpus_row_by_row_draws():
    """The GPU path (one sort of every row, kept for the top_p rows only), run here on the CPU."""
    from mygpt.engine.sampling import _sample_random

    torch.manual_seed(4)
    logits = torch.randn(6, 3000) * 3
    top_ps = [1.0, 0.9, 0.5, 1.0, 0.99, 0.2]

    def rows(seed):
        return [RowSampler(SamplingParams(max_tokens=8, top_p=p), seed + i) for i, p in enumerate(top_ps)]

    for seed in range(10):
        batched = _sample_random(logits, rows(seed), batched_sort=True)
        assert torch.equal(batched, _sample_random(logits, rows(seed), batched_sort=False))


def test_a_draw_of_zero_never_picks_a_token_of_probability_zero():
    """torch.rand can return exactly 0; a left-side search then picked token 0 whatever its
    probability (a token a grammar forbids, say)."""
    from mygpt.engine.sampling import _draw

    probs = torch.zeros(1000)
    probs[10], probs[500] = 0.3, 0.7
    assert _draw(probs, torch.tensor(0.0)).item() == 10
    assert _draw(probs, torch.tensor(0.2)).item() == 10 and _draw(probs, torch.tensor(0.5)).item() == 500
    assert _draw(probs, torch.tensor(0.9999999)).item() == 500


def test_top_p_zero_keeps_the_most_likely_token_on_both_paths():
    """top_p 0 zeroed the first token too; the draw then fell on the last index (the 64th of the head
    on the CPU, the least likely token on the GPU's path)."""
    from mygpt.engine.sampling import _sample_random

    torch.manual_seed(5)
    logits = torch.randn(3, 400) * 2
    for batched in (False, True):
        rows = [RowSampler(SamplingParams(max_tokens=8, top_p=0.0), seed) for seed in range(3)]
        assert _sample_random(logits, rows, batched_sort=batched).tolist() == logits.argmax(-1).tolist()


def test_top_k_draws_only_the_k_likeliest_tokens():
    """vLLM's top_k: 1 is greedy at any temperature; k draws each of the k likeliest, nothing else."""
    torch.manual_seed(3)
    logits = torch.randn(4, 200)
    tokens, _ = sample(logits, rows(4, temperature=1.8, top_k=1))
    assert tokens == logits.argmax(-1).tolist()
    best3 = set(logits[0].topk(3).indices.tolist())
    drawn = {sample(logits[:1], [RowSampler(SamplingParams(max_tokens=8, temperature=2.0, top_k=3), s)])[0][0]
             for s in range(300)}  # fmt: skip
    assert drawn == best3  # flat at temperature 2: all three come up in 300 draws


def test_min_p_drops_tokens_under_its_share_of_the_likeliest():
    """min_p 0.5: only tokens at least half as likely as the likeliest (after temperature)."""
    logits = torch.log(torch.tensor([[0.40, 0.25, 0.19, 0.16]]))
    drawn = {
        sample(logits, [RowSampler(SamplingParams(max_tokens=8, min_p=0.5), s)])[0][0] for s in range(300)
    }
    assert drawn == {0, 1}
    both = {
        sample(logits, [RowSampler(SamplingParams(max_tokens=8, min_p=0.45, top_k=1), s)])[0][0]
        for s in range(50)
    }
    assert both == {0}


def test_repetition_penalty_is_transformers_own():
    """The prompt's and the output's tokens, a positive logit divided and a negative one multiplied:
    the logits transformers' RepetitionPenaltyLogitsProcessor gives, as the greedy choice shows; the
    mask of seen tokens follows the output as it grows."""
    from transformers import RepetitionPenaltyLogitsProcessor

    from mygpt.engine.sampling import _adjust

    torch.manual_seed(4)
    logits = torch.randn(1, 50) * 3
    prompt, out = [int(logits.argmax()), 7, 7, 9], [int(logits[0].topk(2).indices[1])]
    r = RowSampler(
        SamplingParams(max_tokens=8, temperature=0.0, repetition_penalty=1.7), 0, prompt_ids=prompt
    )
    r.output_ids.extend(out)
    want = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt + out]), logits.clone())
    torch.testing.assert_close(_adjust(logits, [r]), want)
    assert sample(logits, [r])[0] == want.argmax(-1).tolist() and want.argmax() not in (*prompt, *out)
    r.output_ids.append(int(want.argmax()))  # the next step sees it too
    want = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt + r.output_ids]), logits.clone())
    torch.testing.assert_close(_adjust(logits, [r]), want)
    plain = RowSampler(SamplingParams(max_tokens=8, temperature=0.0), 0, prompt_ids=prompt)
    assert torch.equal(_adjust(logits, [plain]), logits)  # 1.0: off


def test_top_k_and_min_p_rows_do_not_change_the_others_draws():
    """The rows that ask for top_k or min_p are filtered together (one topk at the largest k): each
    row draws what it draws alone, and only from its own k likeliest."""
    torch.manual_seed(5)
    logits = torch.randn(6, 300) * 2
    params = [
        SamplingParams(max_tokens=8),
        SamplingParams(max_tokens=8, top_k=5),
        SamplingParams(max_tokens=8, min_p=0.1),
        SamplingParams(max_tokens=8, top_k=40, temperature=2.0),
        SamplingParams(max_tokens=8, top_k=3, min_p=0.3, temperature=2.0),
        SamplingParams(max_tokens=8, top_k=300),  # the whole vocabulary: no filter
    ]
    for seed in range(30):
        batch = sample(logits, [RowSampler(p, seed) for p in params])[0]
        assert batch[1] in logits[1].topk(5).indices and batch[4] in logits[4].topk(3).indices
    for seed in range(10):
        alone = [sample(logits[i : i + 1], [RowSampler(p, seed)])[0][0] for i, p in enumerate(params)]
        assert alone == sample(logits, [RowSampler(p, seed) for p in params])[0]


def test_min_tokens_holds_the_ending_tokens_back():
    """Until min_tokens outputs, no ending token (EOS, stop_token_ids) can be drawn, greedy or not;
    then they can; a grammar's row is left alone (it may have only EOS left)."""
    logits = torch.zeros(1, 20)
    logits[0, 2], logits[0, 5] = 10.0, 9.0
    r = RowSampler(SamplingParams(max_tokens=8, temperature=0.0, min_tokens=2), 0, end_ids=frozenset({2, 5}))
    assert sample(logits, [r])[0] not in ([2], [5])
    r.output_ids.extend([7, 8])
    assert sample(logits, [r])[0] == [2]
    drawn = RowSampler(
        SamplingParams(max_tokens=8, temperature=1.0, min_tokens=1), 3, end_ids=frozenset({2, 5})
    )
    assert all(sample(logits, [drawn])[0][0] not in (2, 5) for _ in range(20))
    guided = RowSampler(SamplingParams(max_tokens=8, temperature=0.0, min_tokens=2, grammar=object()), 0,
                        end_ids=frozenset({2}))  # fmt: skip
    assert sample(logits, [guided])[0] == [2]
