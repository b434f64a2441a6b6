"""SlotPrefixes: the longest common prefix, the match rules and the order slots are taken in."""

from __future__ import annotations

import random

from mygpt.engine.prefix import SlotPrefixes, common_prefix


def test_common_prefix_equals_a_plain_loop():
    rng = random.Random(0)
    for _ in range(2000):
        n = rng.randrange(0, 70)
        a = [rng.randrange(3) for _ in range(n)]
        b = a[: rng.randrange(0, n + 1)] + [rng.randrange(3) for _ in range(rng.randrange(0, 10))]
        want = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        assert common_prefix(a, b) == want == common_prefix(b, a)


def test_match_takes_the_longest_usable_prefix_for_the_same_key_only():
    p = SlotPrefixes(chunk=8, block=2)
    key, other = ("t", None), ("t", "t/a@1")
    p.hold(0, key, [1, 2, 3, 4, 5])
    p.hold(1, key, [1, 2, 3, 9])
    p.hold(2, other, [1, 2, 3, 4, 5, 6])
    prompt = [1, 2, 3, 4, 5, 6, 7]
    m = p.match(key, prompt, free=[0, 1, 2])
    assert (m.slot, m.length, m.free) == (0, 4, True)  # 5 match: 4 end on a block
    assert p.match(("u", None), prompt, free=[0, 1, 2]) is None  # another group
    assert p.match(key, [1, 2, 3, 4, 5], free=[0]).length == 4  # the last prompt token must run
    assert p.match(key, [1, 2], free=[0]) is None  # no longer than a block: nothing to gain
    assert p.match(key, prompt, free=[1, 2]).length == 2  # slot 0 is not free


def test_usable_prefixes_end_on_a_chunk_plus_whole_blocks():
    p = SlotPrefixes(chunk=512, block=64)
    assert [p.usable(n) for n in (0, 63, 64, 127, 511, 512, 575, 576, 1100)] == [
        0, 0, 64, 64, 448, 512, 512, 576, 1088,
    ]  # fmt: skip
    odd = SlotPrefixes(chunk=100, block=64)  # a chunk size that is no multiple of the block
    assert [odd.usable(n) for n in (64, 99, 100, 163, 164, 250)] == [64, 64, 100, 100, 164, 200]


def test_a_running_row_is_copied_from_only_for_a_longer_prefix():
    p = SlotPrefixes(chunk=8, block=2)
    key = (None, None)
    p.hold(0, key, [1, 2, 3])
    m = p.match(key, [1, 2, 3, 4, 5, 6], free=[0], running=[(5, [1, 2, 3, 4, 5, 9])])
    assert (m.slot, m.length, m.free) == (5, 4, False)
    m = p.match(key, [1, 2, 3, 7, 8], free=[0], running=[(5, [1, 2, 3, 4])])  # a tie: no copy
    assert (m.slot, m.length, m.free) == (0, 2, True)


def test_take_prefers_empty_slots_then_those_freed_longest_ago():
    p = SlotPrefixes()
    free = [0, 1, 2, 3]
    p.hold(2, (None, None), [1])
    p.hold(0, (None, None), [2])
    assert p.take(free, 2) == [1, 3]  # hold nothing
    assert p.take(free, 1) == [2]  # freed before slot 0
    assert len(p) == 1 and free == [0]
    free += [5, 6]
    p.hold(5, (None, None), [3])
    assert p.take(free, 2, keep=5) == [5, 6]
    assert len(p) == 1  # slot 0's content stays until it is taken


def test_disabled_holds_and_matches_nothing():
    p = SlotPrefixes(enabled=False, chunk=8, block=2)
    p.hold(0, (None, None), [1, 2, 3])
    assert len(p) == 0 and p.match((None, None), [1, 2, 3, 4], free=[0]) is None
