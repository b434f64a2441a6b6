import random

import pytest

from mygpt.engine.detokenizer import HeldLogprobs, IncrementalDetokenizer, StopStringMatcher


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


def test_logprobs_go_with_their_tokens_text_and_a_stop_drops_those_it_cut():
    """Tokens "1".."7" with stop "4567": the text "123" and the logprobs of "1", "2", "3" only (OpenAI's
    content and logprobs line up); a token partly before the cut counts; one whose piece is empty (part
    of a character) goes with the text after it; without a stop, all go at the end."""

    def run(pieces: list[str], stops: tuple[str, ...], last: int | None = None) -> tuple[str, list[list]]:
        m, held, text, sent = StopStringMatcher(stops), HeldLogprobs(), "", []
        for i, piece in enumerate(pieces):
            out, cut = m.push(piece)
            finish = cut or i == (len(pieces) - 1 if last is None else last)
            if finish and not cut:
                out += m.flush()
            sent.append(held.push(f"lp{i}", piece, out, finish, cut))
            text += out
            if finish:
                break
        return text, sent

    text, sent = run(list("1234567"), ("4567",))
    assert text == "123" and sum(sent, []) == ["lp0", "lp1", "lp2"]
    assert sent[:3] == [["lp0"], ["lp1"], ["lp2"]]  # each with its own text, none held
    text, sent = run(["1", "23", "45", "67"], ("34",))
    assert text == "12" and sum(sent, []) == ["lp0", "lp1"]  # "23" is partly in the answer
    text, sent = run(["a", "", "é", "b"], ())  # (a character in two tokens: the first piece empty)
    assert sent == [["lp0"], [], ["lp1", "lp2"], ["lp3"]]
    text, sent = run(["x", "4", "5"], ("4567",))  # max_tokens while "45" is held: all of it comes
    assert text == "x45" and sent == [["lp0"], [], ["lp1", "lp2"]]
    assert HeldLogprobs().push(None, "a", "a") == []  # no logprobs asked


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
