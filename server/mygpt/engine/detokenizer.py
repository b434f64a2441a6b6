"""Incremental detokenization and stop-string matching (TGI's prefix/read offsets)."""

from __future__ import annotations

from typing import Any

_CONTEXT_TOKENS = 5  # prompt tokens decoded before the first output token, for correct leading spaces


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without re-decoding everything.

    decode(ids[prefix:]) minus decode(ids[prefix:read]) is the new text; a trailing "\\ufffd" is an
    unfinished UTF-8 sequence, so it is held back until the next token completes it.
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int]):
        self._tok = tokenizer
        self._ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self._ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an unfinished UTF-8 sequence at the very end)."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text) :].rstrip("\ufffd")

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class StopStringMatcher:
    """Holds back any suffix that could start a stop string; cuts the text at the first match.

    No returned text ever contains any part of a stop string: text is released only once it can no
    longer be the beginning of one.
    """

    def __init__(self, stops: tuple[str, ...]):
        self._stops = tuple(s for s in stops if s)
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, stopped)."""
        if not self._stops:
            return text, False
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return buf[:cut], True
        keep = self._longest_stop_prefix_suffix(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _longest_stop_prefix_suffix(self, buf: str) -> int:
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:k]):
                    best = k
                    break
        return best


class HeldLogprobs:
    """Each sampled token's logprob, held while its text is (a partial character, a possible stop
    string) and sent with it; a stop string drops the logprobs of the tokens it cut away whole, so that
    an answer's logprobs are those of the tokens its text holds (a token partly in it counts), as the
    text's offsets need. Positions are characters of the row's output text."""

    def __init__(self) -> None:
        self._held: list[tuple[Any, int, int]] = []  # (logprob, its text's start, end)
        self._pushed = 0  # characters the tokens' pieces have brought so far
        self._sent = 0  # characters sent (released by the stop-string matcher)

    def push(self, logprob: Any, piece: str, sent: str, finish: bool = False, cut: bool = False) -> list[Any]:
        """One token: its logprob (None: none asked), its piece of text, the text sent with it; finish:
        the row ends here (everything held goes), cut: a stop string ended it. Returns the logprobs to
        send now, in order."""
        if logprob is not None:
            self._held.append((logprob, self._pushed, self._pushed + len(piece)))
        self._pushed += len(piece)
        self._sent += len(sent)
        if cut:
            ready = len([1 for _, start, _ in self._held if start < self._sent])
        elif finish:
            ready = len(self._held)
        else:  # a piece sent whole (one that brought no text: once text after it is)
            ready = 0
            for _, start, end in self._held:
                if end > self._sent or end == start == self._sent:
                    break
                ready += 1
        out, self._held = [lp for lp, _, _ in self._held[:ready]], self._held[ready:]
        return out
