"""Reasoning models' thinking, apart from their answer (`--reasoning-parser`).

Models such as Qwen3 and the DeepSeek-R1 distills write their chain of thought between <think> and
</think>, then the answer. A client of an OpenAI-compatible server expects only the answer in
`content` and the thinking beside it: `reasoning` (vLLM's and OpenRouter's name, after OpenAI's
guidance for gpt-oss) and `reasoning_content` (DeepSeek's, which many clients still read), in a
message and in stream deltas alike.

With a grammar (tools, response_format), the model thinks first all the same: where each tag is one
token, the grammar holds from the end of the thinking (engine/guided.py ThinkFirst).

The thinking may start in the prompt: a template that ends its generation prompt with "<think>\\n"
(the R1 distills) has the model write only the end tag. One that closes it there (Qwen3 with
`enable_thinking: false`) has none to split. opens_in_reasoning() reads that from the prompt's end.
"""

from __future__ import annotations

from typing import Any, Literal

OPEN, CLOSE = "<think>", "</think>"


def template_thinks(tokenizer: Any) -> bool:
    """Whether the model's chat template writes thinking tags (how `auto` knows a reasoning model)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: any of them
        template = " ".join(str(t) for t in template.values())
    return isinstance(template, str) and CLOSE in template


def tag_ids(tokenizer: Any) -> tuple[int, int] | None:
    """(<think>'s id, </think>'s id) where each tag is one token of the tokenizer (Qwen3, the R1
    distills), else None."""
    ids = []
    for tag in (OPEN, CLOSE):
        encoded = tokenizer.encode(tag, add_special_tokens=False)
        if len(encoded) != 1 or tokenizer.decode(encoded) != tag:
            return None
        ids.append(encoded[0])
    return ids[0], ids[1]


def opens_in_reasoning(prompt_tail: str) -> bool:
    """Whether the prompt leaves a thinking block open (its last <think> after its last </think>)."""
    return prompt_tail.rfind(OPEN) > prompt_tail.rfind(CLOSE)


def _held(text: str, tag: str) -> int:
    """How many characters at text's end could begin `tag` (held back until the next text says)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class Splitter:
    """One choice's text, as it streams, split into (reasoning, answer) pieces. A tag may arrive in
    pieces: a possible beginning of one is held back until the text after it decides."""

    def __init__(self, open_: bool):
        self.state: Literal["start", "reasoning", "answer"] = "reasoning" if open_ else "start"
        self.thought = open_  # it has been inside its thinking
        self.buf = ""
        # newlines right after <think> and </think> are the template's, not the thinking's or answer's
        self.lead, self.trim = True, False

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """(reasoning, answer) to send for this piece of text; final: the choice's last, nothing held."""
        self.buf += text
        reasoning = answer = ""
        if self.state == "start":
            lead = self.buf.lstrip()
            if lead.startswith(OPEN):
                self.state, self.buf, self.thought = "reasoning", lead[len(OPEN) :], True
            elif OPEN.startswith(lead) and not final:
                return "", ""  # only whitespace, or a beginning of <think>, so far
            else:
                self.state = "answer"
        if self.state == "reasoning":
            if self.lead:
                self.buf = self.buf.lstrip("\n")
                self.lead = not self.buf
            at = self.buf.find(CLOSE)
            if at < 0:
                end = len(self.buf) if final else len(self.buf) - _held(self.buf, CLOSE)
                if not final:  # newlines before </think> are the template's: held until text follows them
                    end = len(self.buf[:end].rstrip("\n"))
                reasoning, self.buf = self.buf[:end], self.buf[end:]
                return reasoning, ""
            reasoning, self.buf = self.buf[:at].rstrip("\n"), self.buf[at + len(CLOSE) :]
            self.state, self.trim = "answer", True
        if self.trim:
            self.buf = self.buf.lstrip("\r\n")
            if not self.buf and not final:
                return reasoning, ""
            self.trim = False
        answer, self.buf = self.buf, ""
        return reasoning, answer


class Thoughts:
    """A request's choices, split as their events come (Splitter each), and each one's reasoning
    tokens: its completion tokens as of the event that ended its thinking (the one carrying </think>),
    or as of its last event while it thinks."""

    def __init__(self, choices: int, open_: bool):
        self.splitters = [Splitter(open_) for _ in range(choices)]
        self.tokens = [0] * choices

    def see(self, index: int, text: str, completion_tokens: int, final: bool) -> tuple[str, str]:
        """The event's (reasoning, answer) pieces; counts its tokens if it was (part) thinking."""
        splitter = self.splitters[index]
        was = splitter.state
        pieces = splitter.feed(text, final)
        if splitter.thought and was != "answer":
            self.tokens[index] = completion_tokens
        return pieces


def split(text: str, open_: bool) -> tuple[str | None, str]:
    """A whole choice's (reasoning or None, answer)."""
    reasoning, answer = Splitter(open_).feed(text, final=True)
    return (reasoning if reasoning or open_ or OPEN in text else None), answer
