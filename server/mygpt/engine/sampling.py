"""Batched sampling: logit bias, repetition/presence/frequency penalties, grammar masks, temperature,
top-k, min-p, top-p, per-row seeds."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from mygpt.engine.guided import mask_logits
from mygpt.engine.types import SamplingParams, TokenLogprob


@dataclass
class RowSampler:
    """Per-row sampling state."""

    params: SamplingParams
    seed: int | None  # this choice's seed (params.seed + index), None = random
    output_ids: list[int] = field(default_factory=list)  # tokens generated so far (for penalties)
    prompt_ids: list[int] = field(default_factory=list, repr=False)  # (repetition_penalty)
    end_ids: frozenset[int] = frozenset()  # the tokens that end this choice (min_tokens holds them back)
    generator: torch.Generator = field(init=False)
    # repetition_penalty: the tokens seen (prompt and output) as a mask [V] on the logits' device, and
    # how many of output_ids it holds (updated with the new ones each step, not rebuilt)
    _seen: torch.Tensor | None = field(default=None, init=False, repr=False)
    _seen_outputs: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator()
        # any integer: torch takes 0..2**64-1 (the API bounds seeds to int64; seed + choice may pass it)
        self.generator.manual_seed(self.seed % 2**64 if self.seed is not None else random.getrandbits(63))

    def seen(self, vocab: int, device: torch.device) -> torch.Tensor:
        """The tokens of the prompt and the output so far, as a bool mask [vocab] on `device`."""
        if self._seen is None:  # once per row, on the host: the prompt through numpy, not a Python loop
            ids = torch.from_numpy(np.fromiter(self.prompt_ids, dtype=np.int64, count=len(self.prompt_ids)))
            seen = torch.bincount(ids[(ids >= 0) & (ids < vocab)], minlength=vocab) > 0
            if device.type == "cuda":  # a pinned copy: the host does not wait for the device's queue
                seen = seen.pin_memory()
            self._seen = seen.to(device, non_blocking=True)
        new = [t for t in self.output_ids[self._seen_outputs :] if 0 <= t < vocab]
        if new:
            self._seen[device_index(new, device)] = True
        self._seen_outputs = len(self.output_ids)
        return self._seen


def sample(
    logits: torch.Tensor,
    rows: list[RowSampler],
    allowed: dict[int, bytes] | None = None,
    before_read: Callable[[torch.Tensor], None] | None = None,
) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits: [B, V] float32 on any device; allowed: row -> the bitmask of the tokens its grammar
    allows (guided.py). Returns one token id (and optional logprobs) per row. Logprobs are the model's
    own, before bias, penalties and masks. before_read(tokens): called with the tokens still on the
    device, after their copy to the host is queued and before the host waits for it (the engine
    launches the next step there)."""
    logits = logits.float()
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(r.params.logprobs for r in rows) else None
    logits = _adjust(logits, rows)
    if allowed:
        logits = mask_logits(logits, allowed)
    greedy = [r.params.greedy for r in rows]
    tokens = torch.argmax(logits, dim=-1)
    if not all(greedy):
        sampled = _sample_random(logits, rows)
        keep = torch.tensor(greedy, device=logits.device)
        tokens = torch.where(keep, tokens, sampled)
    token_list = tokens.tolist() if before_read is None else _read_after(tokens, before_read)
    if raw_logprobs is None:
        return token_list, [None] * len(rows)
    return token_list, _logprobs(raw_logprobs, token_list, rows)


def _read_after(tokens: torch.Tensor, before_read: Callable[[torch.Tensor], None]) -> list[int]:
    """tokens' values on the host, their copy queued before before_read runs (on a GPU the copy then
    does not wait for the work before_read queues)."""
    on_gpu = tokens.device.type == "cuda"
    # the event on the tokens' own device and stream, whatever the thread's current device
    with torch.cuda.device(tokens.device) if on_gpu else contextlib.nullcontext():
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=on_gpu)
        host.copy_(tokens, non_blocking=on_gpu)
        copied = None
        if on_gpu:
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(tokens.device))
        before_read(tokens)
        if copied is not None:
            copied.synchronize()
    return host.tolist()


def device_index(index: list[int], device: torch.device) -> torch.Tensor:
    """index as a long tensor on `device`, copied without making the host wait for the device's queue
    (a copy from ordinary host memory would)."""
    t = torch.tensor(index, dtype=torch.long, pin_memory=device.type == "cuda")
    return t.to(device, non_blocking=True)


def _adjust(logits: torch.Tensor, rows: list[RowSampler]) -> torch.Tensor:
    """Logit bias, then the penalties in vLLM's order: repetition (prompt and output tokens), then
    presence and frequency (output tokens)."""
    if not any(
        p.logit_bias
        or p.presence_penalty
        or p.frequency_penalty
        or p.repetition_penalty != 1.0
        or p.min_tokens
        for p in (r.params for r in rows)
    ):
        return logits
    logits = logits.clone()
    vocab = logits.shape[-1]
    for i, r in enumerate(rows):
        p = r.params
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=logits.device)
            logits[i, ids] += torch.tensor(list(p.logit_bias.values()), device=logits.device)
        if p.repetition_penalty != 1.0:  # as transformers' and vLLM's: divides a positive logit
            row, penalty = logits[i], p.repetition_penalty
            seen = r.seen(vocab, logits.device)
            logits[i] = torch.where(seen, torch.where(row > 0, row / penalty, row * penalty), row)
        if (p.presence_penalty or p.frequency_penalty) and r.output_ids:
            counts = torch.bincount(torch.tensor(r.output_ids), minlength=vocab).to(logits.device)
            logits[i] -= p.presence_penalty * (counts > 0) + p.frequency_penalty * counts
        # min_tokens: no ending token yet (not against a grammar, which may have only EOS left)
        if len(r.output_ids) < p.min_tokens and p.grammar is None and r.end_ids:
            logits[i, device_index(sorted(t for t in r.end_ids if 0 <= t < vocab), logits.device)] = float(
                "-inf"
            )
    return logits


def _sample_random(
    logits: torch.Tensor, rows: list[RowSampler], batched_sort: bool | None = None
) -> torch.Tensor:
    """One token per row, each drawn with one uniform number from the row's own generator and from
    the row's own distribution alone: a row's token does not depend on the rest of the batch.
    batched_sort: top_p by one sort of every row (default: off the CPU), else row by row."""
    temps = torch.tensor([max(r.params.temperature, 1e-5) for r in rows], device=logits.device)
    probs = torch.softmax(logits / temps[:, None], dim=-1)  # [B, V]
    probs = _top_k_min_p(probs, rows)
    u = torch.stack([torch.rand((), generator=r.generator) for r in rows]).to(logits.device)
    tokens = _draw(probs, u)[:, 0]  # every row from its whole distribution (top_p 1)
    nucleus = [i for i, r in enumerate(rows) if r.params.top_p < 1.0]  # decided on the host: no sync
    if not nucleus:
        return tokens
    if batched_sort is None:
        batched_sort = probs.device.type != "cpu"
    if not batched_sort:  # on the CPU a full sort of 16 x 49k probabilities took 50-75 ms
        for i in nucleus:
            tokens[i] = _top_p_one(probs[i], rows[i].params.top_p, u[i])
        return tokens
    # on a GPU one batched sort is cheap; its draws replace those of the top_p rows only
    top_p = torch.tensor([r.params.top_p for r in rows], device=logits.device)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    nucleus_tokens = order.gather(1, _draw(_nucleus(sorted_probs, top_p[:, None]), u))[:, 0]
    return torch.where(top_p < 1.0, nucleus_tokens, tokens)


def _top_k_min_p(probs: torch.Tensor, rows: list[RowSampler]) -> torch.Tensor:
    """probs [B, V] with, in each row that asks, all but its top_k likeliest tokens (0: all) and all
    under min_p times its likeliest's probability (0: none) zeroed, renormalized (top_p then applies to
    what is left, as in vLLM). A tie at the k-th probability keeps every token of it. The rows that
    ask go together (one topk at their largest k); each row's result depends on that row alone."""
    vocab = probs.shape[-1]
    asks = [i for i, r in enumerate(rows) if r.params.top_k > 0 or r.params.min_p > 0.0]  # on the host
    if not asks:
        return probs
    device = probs.device
    ks = [rows[i].params.top_k if 0 < rows[i].params.top_k < vocab else 0 for i in asks]
    index = device_index(asks, device)
    sub = probs.index_select(0, index)
    keep = torch.ones_like(sub, dtype=torch.bool)
    if any(ks):  # each row's k-th probability (0 for a row without top_k: it keeps everything)
        top = torch.topk(sub, max(ks), dim=-1).values
        kth = top.gather(1, device_index([max(k - 1, 0) for k in ks], device)[:, None])
        keep &= sub >= torch.where(device_index(ks, device)[:, None] > 0, kth, 0.0)
    min_p = [rows[i].params.min_p for i in asks]
    if any(min_p):
        floor = torch.tensor(min_p, device=device)[:, None] * sub.amax(dim=-1, keepdim=True)
        keep &= sub >= floor
    sub = sub.masked_fill(~keep, 0.0)
    return probs.index_copy(0, index, sub / sub.sum(dim=-1, keepdim=True))


def _draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws [..., 1]: the first index whose cumulative mass passes u times the total (right
    side: u = 0, which torch.rand can return, must not pick a leading token of probability 0)."""
    cum = torch.cumsum(probs, dim=-1)
    target = (u * cum[..., -1])[..., None]
    return torch.searchsorted(cum, target, right=True).clamp_(max=probs.shape[-1] - 1)


def _nucleus(sorted_probs: torch.Tensor, top_p) -> torch.Tensor:
    """Probabilities in descending order with all but the smallest prefix whose mass reaches top_p
    zeroed (the first token is always kept, top_p 0 included)."""
    beyond = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p
    beyond[..., 0] = False
    return sorted_probs.masked_fill(beyond, 0.0)


def _top_p_one(probs: torch.Tensor, top_p: float, u: torch.Tensor) -> torch.Tensor:
    """One row's top-p draw without sorting the vocabulary: the k most likely tokens (k = 64, 512,
    4096, ..., then all), the first k whose mass reaches top_p. They are the head of the full sort,
    so the draw is the one a full sort gives; a top-64 took ~0.1 ms per row where a sort took ~3 ms."""
    k, vocab = 64, probs.shape[-1]
    while True:
        if k >= vocab:
            values, order = torch.sort(probs, descending=True)
            break
        values, order = torch.topk(probs, k)
        if float(torch.cumsum(values, dim=0)[-1]) >= top_p:
            break
        k *= 8
    return order[_draw(_nucleus(values, top_p), u)][0]


def _logprobs(raw: torch.Tensor, tokens: list[int], rows: list[RowSampler]) -> list[TokenLogprob | None]:
    every = token_logprobs(raw, tokens, max(r.params.top_logprobs for r in rows))
    return [
        TokenLogprob(lp.token_id, lp.logprob, lp.top[: r.params.top_logprobs]) if r.params.logprobs else None
        for lp, r in zip(every, rows, strict=True)
    ]


def token_logprobs(logprobs: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """Row j's logprob of tokens[j], with the row's `top` most likely tokens (logprobs: [R, V], each
    row log-softmaxed)."""
    own = logprobs.gather(1, torch.tensor(tokens, device=logprobs.device)[:, None])[:, 0].tolist()
    top_v, top_i = torch.topk(logprobs, top, dim=-1) if top else (None, None)
    return [
        TokenLogprob(t, own[j], list(zip(top_i[j].tolist(), top_v[j].tolist(), strict=True)) if top else [])
        for j, t in enumerate(tokens)
    ]


def score_tokens(logits: torch.Tensor, targets: list[int], top: int) -> list[TokenLogprob]:
    """The logprob of each target token under the logits row before it (prompt logprobs)."""
    if not targets:
        return []
    return token_logprobs(torch.log_softmax(logits[: len(targets)].float(), dim=-1), targets, top)
