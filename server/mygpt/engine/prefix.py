"""Prefix caching per KV-cache slot: a new prompt starts from the longest prefix already cached.

A freed slot keeps its KV rows until something overwrites them, so the engine remembers which tokens
they are (and for which adapter and group). A prompt that begins with them (the next turn of a chat,
the same system prompt again) takes that slot and prefills only the rest; a prompt that shares a
prefix with a running row's slot copies those positions instead of computing them. llama.cpp's server
reuses a slot's prompt the same way; vLLM and SGLang share blocks of a paged cache, which this engine
(one contiguous row per slot) does not have.

A cached position is reused only for the same key: the same adapter version (its k/v projections and
every layer below them change the keys and values) and the same group (the server passes the tenant:
one tenant's prompts must not speed up, and so be detectable by, another's).

Reused keys and values equal freshly computed ones up to floating-point rounding, not bit for bit:
attention kernels round a position's result differently with the shape of the chunk it was computed
in (on the 2-core CPU, cutting a 46-token prompt's prefill at 8 or 23 positions changed the bf16
logits by up to 0.4, at 16 or 45 by nothing). So that the rounding differs as little as possible:
- prompt positions only are reused, never generated ones: a decode step computes a position as a
  query of one, which rounds differently from the same position inside a prompt chunk;
- a reused prefix ends where a chunk of a fresh prefill could start: prompts are cut into chunks at
  multiples of the chunk size (max_num_batched_tokens) from position 0, and kernels tile a chunk's
  queries from its first position, so the prefix ends at a multiple of BLOCK within its chunk;
- a request with a seed computes its whole prompt (B5: same seed, same request, same output): its
  tokens never depend on what the cache held.
With that, the tests' tokens and logprobs equal an engine's without the cache bit for bit, and in
scripts/bench_prefix.py six chat turns gave the same greedy tokens with and without it; with eight
users sharing a system prompt (copied from a running row), 3 of 8 greedy answers parted from the
uncached ones after 2 to 39 tokens (near ties in a 135M model's bf16 logits).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

Key = tuple[str | None, str | None]  # (group, adapter key): None, None = the base model, no group
BLOCK = 64  # a reused prefix ends at a multiple of this within its chunk (see above)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists (list slices compare in C: a binary
    search over them costs O(n log n) C comparisons, no Python loop over tokens)."""
    hi = min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    lo = 0  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class _Held:
    key: Key
    tokens: list[int]  # the tokens whose KV the slot's first len(tokens) positions hold
    freed: int  # release order: the slot freed longest ago is overwritten first


@dataclass(frozen=True)
class Match:
    slot: int  # where the prefix is cached
    length: int  # cached positions the prompt can use
    free: bool  # True: a free slot (the prompt takes it), False: a running row's (the prompt copies it)


class SlotPrefixes:
    """What each free KV-cache slot holds, and the choice of slots for a new request."""

    def __init__(self, enabled: bool = True, chunk: int = 512, block: int = BLOCK):
        self.enabled = enabled
        self.chunk = chunk  # the engine's prompt chunk (max_num_batched_tokens)
        self.block = block
        self._held: dict[int, _Held] = {}
        self._clock = itertools.count()

    def __len__(self) -> int:
        return len(self._held)

    def usable(self, n: int) -> int:
        """The longest reusable prefix of n matching positions: it ends where a fresh prefill's chunk
        starts, or BLOCK positions into one."""
        start = n // self.chunk * self.chunk
        return start + (n - start) // self.block * self.block

    def hold(self, slot: int, key: Key, tokens: list[int]) -> None:
        """`slot` was freed with these prompt tokens' KV in its first positions."""
        if self.enabled and tokens:
            self._held[slot] = _Held(key, tokens, next(self._clock))
        else:
            self._held.pop(slot, None)

    def clear(self) -> None:
        """Forget every slot's content (after a failed step its KV may be half written)."""
        self._held.clear()

    def match(
        self, key: Key, prompt: list[int], free: Iterable[int], running: Iterable[tuple[int, list[int]]] = ()
    ) -> Match | None:
        """The longest usable cached prefix of `prompt` for `key` among the free slots and the running
        rows' (slot, cached prompt tokens); short of the last prompt token (it must run for its logits).
        A free slot wins a tie: taking it copies nothing."""
        if not self.enabled or len(prompt) <= self.block:
            return None
        best: Match | None = None
        limit = len(prompt) - 1
        candidates = [
            (s, self._held[s].tokens, True) for s in free if s in self._held and self._held[s].key == key
        ]
        for slot, tokens, is_free in candidates + [(s, t, False) for s, t in running]:
            if tokens and tokens[0] == prompt[0]:
                n = self.usable(min(common_prefix(tokens, prompt), limit))
                if n > (best.length if best else 0):
                    best = Match(slot, n, is_free)
        return best

    def take(self, free: list[int], count: int, keep: int | None = None) -> list[int]:
        """Removes and returns `count` slots from `free`: `keep` first (if given), then slots that hold
        nothing, then those freed longest ago. A taken slot's content is forgotten."""
        chosen = [keep] if keep is not None else []
        rest = sorted((s for s in free if s != keep), key=lambda s: (s in self._held, self._freed(s), s))
        chosen += rest[: count - len(chosen)]
        for s in chosen:
            free.remove(s)
            self._held.pop(s, None)
        return chosen

    def _freed(self, slot: int) -> int:
        held = self._held.get(slot)
        return -1 if held is None else held.freed
