"""Logprob tokens are the tokens' own bytes: pieces of one UTF-8 character (byte-level BPE splits an
emoji into two or three tokens) join back into it, in the chat and the legacy completions shapes."""

from __future__ import annotations

from mygpt.api.chat import ChatLimits, ChatService
from mygpt.api.completions import _legacy_logprobs, _TextOffsets
from mygpt.engine.types import TokenLogprob

TEXT = "🌱 hello Ünïcode\n"


def service(tokenizer) -> ChatService:
    return ChatService(None, tokenizer, "m", ChatLimits(512, 1, 4), None)


def test_chat_logprob_bytes_join_into_the_text(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    out = service(tokenizer)._logprobs([TokenLogprob(i, -0.5, [(i, -0.5)]) for i in ids])
    assert bytes(b for lp in out for b in lp.bytes).decode("utf-8") == TEXT
    pieces = [lp for lp in out if "\\x" in lp.token]  # bytes that are no whole character: \xNN
    assert pieces and all("\ufffd" not in lp.token for lp in out)
    assert out[0].token == "\\xf0\\x9f"  # the first piece of the emoji, as OpenAI writes it
    assert all(lp.top_logprobs[0].bytes == lp.bytes for lp in out)


def test_legacy_text_offsets_point_at_the_character_of_each_tokens_first_byte(tokenizer):
    chat = service(tokenizer)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    lps = [TokenLogprob(i, -0.5, []) for i in ids]
    first, second = lps[: len(lps) // 2], lps[len(lps) // 2 :]  # as two stream chunks
    offsets = _TextOffsets(3)  # after an echoed prompt of 3 characters
    got = [
        *_legacy_logprobs(chat, first, offsets, 0).text_offset,
        *_legacy_logprobs(chat, second, offsets, 0).text_offset,
    ]
    data, at, want = TEXT.encode(), 0, []
    for i in ids:
        want.append(3 + len(data[:at].decode("utf-8", errors="ignore")))
        at += len(chat.token_bytes(i))
    assert got == want and got[:3] == [3, 3, 3]  # the emoji's three pieces all lie in its character


def test_generated_special_tokens_take_no_room_in_the_text(tokenizer):
    """The generated text leaves special tokens out (a logit_bias can force one): offsets after one ran
    past the text."""
    chat = service(tokenizer)
    ab, c = (
        tokenizer("ab", add_special_tokens=False)["input_ids"],
        tokenizer("c", add_special_tokens=False)["input_ids"],
    )
    eos = tokenizer.eos_token_id
    lps = [TokenLogprob(i, -0.5, []) for i in ab + [eos] + c]
    offsets = _legacy_logprobs(chat, lps, _TextOffsets(0), 0).text_offset
    assert (
        offsets[len(ab)] == offsets[len(ab) + 1] == 2
    )  # "ab" then "c": the special token between is nothing
