"""Text completions (POST /v1/completions, OpenAI's legacy endpoint): a raw prompt, no chat template.

Shares the chat service's model resolution, tenant admission, engine submission and token texts;
adds what this endpoint has of its own: prompts as text or token ids, `echo`, logprobs in the legacy
shape (tokens, token_logprobs, top_logprobs as dicts, text_offset), `max_tokens` defaulting to 16.
Refused with the parameter named (B2): several prompts in one request, `suffix`, `best_of` other than
`n`, and `echo` together with `logprobs` (prompt logprobs are not computed).
"""

from __future__ import annotations

import codecs
import time
from collections.abc import AsyncIterator

from mygpt.api.chat import ChatService, collect, stream_payloads
from mygpt.api.errors import invalid
from mygpt.api.protocol import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, Usage
from mygpt.engine.types import GenerationRequest, SamplingParams, TokenEvent, TokenLogprob
from mygpt.tenancy.auth import Principal
from mygpt.tenancy.tenants import Ticket


async def prepare(
    chat: ChatService, principal: Principal, req: CompletionRequest
) -> tuple[GenerationRequest, Ticket]:
    arrival = time.monotonic()
    adapter = await chat.resolve_model(principal, req.model)
    chat.refuse_unsupported_common(req)
    _refuse_unsupported(req)
    prompt = _the_prompt(req)

    def render() -> list[int]:
        if isinstance(prompt, str):
            ids = chat.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        else:
            bad = next((t for t in prompt if not 0 <= t < chat.vocab_size), None)
            if bad is not None:
                raise invalid(f"prompt token id {bad} is out of the vocabulary.", param="prompt")
            ids = list(prompt)
        if not ids:
            raise invalid("The prompt is empty.", param="prompt")
        return list(ids)

    def params(prompt_len: int) -> SamplingParams:
        max_tokens = 16 if req.max_tokens is None else req.max_tokens  # an explicit null: the default
        logprobs = req.logprobs is not None
        return chat.sampling_params(
            req, prompt_len, max_tokens, "max_tokens", "prompt", logprobs, req.logprobs or 0
        )

    return await chat.admit(principal, req.model, adapter, render, params, "cmpl", arrival)


def _the_prompt(req: CompletionRequest) -> str | list[int]:
    """The one prompt: text or token ids (a list holding one of them is unwrapped)."""
    p = req.prompt
    return p[0] if isinstance(p, list) and p and isinstance(p[0], (str, list)) else p


def _refuse_unsupported(req: CompletionRequest) -> None:
    p = req.prompt
    if isinstance(p, list) and not p:
        raise invalid("The prompt is empty.", param="prompt")
    if isinstance(p, list) and isinstance(p[0], (str, list)) and len(p) != 1:
        raise invalid(
            "Send one prompt per request (a list of several prompts is not supported).", param="prompt"
        )
    if req.suffix:
        raise invalid("suffix (insertion) is not supported by this server.", param="suffix")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise invalid("best_of is supported only equal to n.", param="best_of")
    if req.echo and req.logprobs is not None:
        raise invalid("echo with logprobs is not supported (no prompt logprobs).", param="echo")


def _echo(chat: ChatService, req: CompletionRequest, gen: GenerationRequest) -> str:
    if not req.echo:
        return ""
    prompt = _the_prompt(req)
    if isinstance(prompt, str):
        return prompt
    return chat.tokenizer.decode(gen.prompt_ids, skip_special_tokens=False)


class _TextOffsets:
    """The legacy text_offset of one choice's tokens: the index in the text of the character where each
    token's first byte lies (a token that ends inside a character counts up to that character)."""

    def __init__(self, start: int):
        self.chars = start
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def next(self, token: bytes) -> int:
        at = self.chars
        self.chars += len(self._utf8.decode(token))
        return at


def _legacy_logprobs(
    chat: ChatService, lps: list[TokenLogprob], offsets: _TextOffsets, top: int
) -> CompletionLogprobs:
    """OpenAI's legacy shape. Each top_logprobs dict holds the `top` most likely tokens and the sampled
    one (so up to top + 1)."""
    tokens = [chat.token_text(lp.token_id) for lp in lps]
    text_offsets = [offsets.next(chat.token_bytes(lp.token_id)) for lp in lps]
    tops = []
    for lp, text in zip(lps, tokens, strict=True):
        alternatives = {chat.token_text(t): v for t, v in lp.top[:top]}
        alternatives.setdefault(text, lp.logprob)
        tops.append(alternatives)
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=[lp.logprob for lp in lps], top_logprobs=tops, text_offset=text_offsets
    )


async def complete(
    chat: ChatService, req: CompletionRequest, gen: GenerationRequest, ticket: Ticket
) -> Completion:
    echo = _echo(chat, req, gen)
    done = await collect(gen, chat.submit(gen, ticket))
    choices = [
        CompletionChoice(
            text=echo + done.texts[i],
            index=i,
            logprobs=_legacy_logprobs(chat, done.logprobs[i], _TextOffsets(len(echo)), req.logprobs or 0)
            if gen.params.logprobs
            else None,
            finish_reason=done.reasons[i],
        )
        for i in range(gen.params.n)
    ]
    return Completion(id=gen.request_id, model=req.model, choices=choices, usage=done.usage)


async def stream(
    chat: ChatService, req: CompletionRequest, gen: GenerationRequest, ticket: Ticket
) -> AsyncIterator[str]:
    """SSE data payloads: text chunks, an optional usage chunk, then [DONE]."""
    events = chat.submit(gen, ticket)  # before the first byte: overload is still a real 429
    created = int(time.time())
    echo = _echo(chat, req, gen)
    offsets = [_TextOffsets(len(echo)) for _ in range(gen.params.n)]

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        c = Completion(id=gen.request_id, created=created, model=req.model, choices=choices, usage=usage)
        return c.model_dump_json()

    def piece(ev: TokenEvent, logprobs: list[TokenLogprob], finish: str | None) -> str:
        lps = None
        if gen.params.logprobs:
            lps = _legacy_logprobs(chat, logprobs, offsets[ev.index], req.logprobs or 0)
        return chunk([CompletionChoice(text=ev.text, index=ev.index, logprobs=lps, finish_reason=finish)])

    head = [chunk([CompletionChoice(text=echo, index=i)]) for i in range(gen.params.n)] if echo else []
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return stream_payloads(gen, events, head, piece, (lambda u: chunk([], u)) if include_usage else None)
