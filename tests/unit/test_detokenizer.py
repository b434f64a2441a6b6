import random

import pytest

from mygpt.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher


@pytest.mark.parametrize(
    "text",
    ["Hello, world! How are you?", "naïve café — 東京 🙂🙂 ok", "  leading spaces\n\nand\ttabs", "a" * 50],
)
def test_incremental_detokenizer_joins_to_the_full_decode(tokenizer, text):
    prompt = tokenizer.encode("Say something:", add_special_tokens=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.push(t) for t in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == tokenizer.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


def test_stop_string_never_leaks_and_spans_pushes():
    m = StopStringMatcher(("STOP", "\n\n"))
    out = []
    for piece in ["Hello S", "T", "OP and more"]:
        text, stopped = m.push(piece)
        out.append(text)
        if stopped:
            break
    assert "".join(out) == "Hello "
    assert stopped
    assert not any(part in "".join(out) for part in ("S", "ST", "STO"))


def test_held_prefix_is_released_when_no_match_follows():
    m = StopStringMatcher(("STOP",))
    assert m.push("abc ST") == ("abc ", False)
    assert m.push("O") == ("", False)
    assert m.push("x S") == ("STOx ", False)
    assert m.flush() == "S"


def test_earliest_stop_wins_and_no_stops_passes_through():
    m = StopStringMatcher(("world", "lo"))
    assert m.push("hello world") == ("hel", True)
    assert StopStringMatcher(()).push("anything") == ("anything", False)


def test_stop_matcher_random_chunking_equals_one_shot():
    rng = random.Random(0)
    for _ in range(200):
        text = "".join(rng.choice("ab\n") for _ in range(30))
        stops = ("aab", "\n\n")
        whole, whole_stopped = StopStringMatcher(stops).push(text)
        if not whole_stopped:
            whole = text
        m, out, stopped, i = StopStringMatcher(stops), [], False, 0
        while i < len(text) and not stopped:
            j = i + rng.randint(1, 4)
            piece, stopped = m.push(text[i:j])
            out.append(piece)
            i = j
        if not stopped:
            out.append(m.flush())
        assert "".join(out) == whole
