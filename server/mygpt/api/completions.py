"""Text completions (POST /v1/completions, OpenAI's legacy endpoint): a raw prompt, no chat template.

Shares the chat service's model resolution, tenant admission, engine submission and token texts;
adds what this endpoint has of its own: prompts as text or token ids, several prompts in one request,
`echo`, logprobs in the legacy shape (tokens, token_logprobs, top_logprobs as dicts, text_offset),
`max_tokens` defaulting to 16, and with `echo` and `logprobs` the prompt's own tokens scored (what
evaluation harnesses such as lm-eval send). Refused with the parameter named (B2): `suffix`, `best_of`
other than `n`, and `echo` with `logprobs` when streaming.

Several prompts (a list of strings or of token-id lists, as LangChain's and LiteLLM's text clients
send a batch): each prompt is its own engine request and tenant admission, all answered in one
response, prompt i's choice j at index i * n + j, usage summed (OpenAI's layout).
"""

from __future__ import annotations

import asyncio
import codecs
import dataclasses
import functools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from mygpt.api.chat import ChatService, Closing, collect, opened, stream_payloads
from mygpt.api.errors import invalid
from mygpt.api.protocol import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Usage,
    one_or_many,
)
from mygpt.engine.types import GenerationRequest, SamplingParams, TokenEvent, TokenLogprob
from mygpt.tenancy.auth import Principal
from mygpt.tenancy.tenants import Ticket


@dataclass
class Prompts:
    """One request's prompts, each admitted as its own engine request."""

    prompts: list[str | list[int]]
    gens: list[GenerationRequest]
    tickets: list[Ticket]

    @property
    def whole(self) -> GenerationRequest:
        """The request as one: the first prompt's id, every choice, every prompt token (for the usage)."""
        if len(self.gens) == 1:
            return self.gens[0]
        first = self.gens[0]
        return dataclasses.replace(
            first,
            prompt_ids=[t for g in self.gens for t in g.prompt_ids],
            params=dataclasses.replace(first.params, n=first.params.n * len(self.gens)),
        )


async def prepare(chat: ChatService, principal: Principal, req: CompletionRequest) -> Prompts:
    arrival = time.monotonic()
    adapter = await chat.resolve_model(principal, req.model)
    chat.refuse_unsupported_common(req)
    _refuse_unsupported(req)
    prompts = one_or_many(req.prompt)
    if len(prompts) > chat.limits.max_prompts:
        raise invalid(
            f"prompt holds {len(prompts)} prompts; at most {chat.limits.max_prompts}.", param="prompt"
        )
    capacity = chat.tenants.capacity(principal)  # each prompt is a request to the tenant's limits
    if capacity is not None and len(prompts) > capacity:
        raise invalid(
            f"prompt holds {len(prompts)} prompts, but this API key's limits admit at most {capacity} "
            "requests at once; send fewer prompts per request.",
            param="prompt",
        )

    def render(prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            try:
                ids = chat.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            except Exception as exc:  # e.g. a lone surrogate, which is no UTF-8
                raise invalid(f"The prompt could not be tokenized: {exc}", param="prompt") from exc
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
        sampling = chat.sampling_params(
            req, prompt_len, max_tokens, "max_tokens", "prompt", logprobs, req.logprobs or 0
        )
        if req.echo and logprobs:  # the echoed prompt's tokens come with theirs (evaluation harnesses)
            sampling = dataclasses.replace(sampling, prompt_logprobs=req.logprobs)
        return sampling

    admitted: list[tuple[GenerationRequest, Ticket]] = []
    try:
        for prompt in prompts:
            one = functools.partial(render, prompt)
            admitted.append(await chat.admit(principal, req.model, adapter, one, params, "cmpl", arrival))
    except BaseException:
        for _, ticket in admitted:  # a later prompt was refused: none of them runs, none is usage
            ticket.withdraw()
        raise
    return Prompts(prompts, [g for g, _ in admitted], [t for _, t in admitted])


def _refuse_unsupported(req: CompletionRequest) -> None:
    p = req.prompt
    if isinstance(p, list) and not p:
        raise invalid("The prompt is empty.", param="prompt")
    if req.suffix:
        raise invalid("suffix (insertion) is not supported by this server.", param="suffix")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise invalid("best_of is supported only equal to n.", param="best_of")
    if req.echo and req.logprobs is not None and req.stream:
        raise invalid(
            "echo with logprobs (prompt logprobs) is supported without streaming only.", param="echo"
        )


def _echoes(chat: ChatService, req: CompletionRequest, batch: Prompts) -> list[str]:
    """The text echoed before each choice (index i * n + j: prompt i's)."""
    n = batch.gens[0].params.n
    if not req.echo:
        return [""] * (n * len(batch.gens))
    texts = [
        p if isinstance(p, str) else chat.tokenizer.decode(g.prompt_ids, skip_special_tokens=False)
        for p, g in zip(batch.prompts, batch.gens, strict=True)
    ]
    return [t for t in texts for _ in range(n)]


def _submit(chat: ChatService, batch: Prompts) -> AsyncIterator[TokenEvent]:
    """Queues every prompt (a 429 for any of them drops them all) and merges their events, choice
    indices moved to i * n + j."""
    streams: list[AsyncIterator[TokenEvent]] = []
    try:
        for gen, ticket in zip(batch.gens, batch.tickets, strict=True):
            streams.append(chat.submit(gen, ticket))
    except BaseException:  # prompt k refused (its ticket: rejected); the others never count
        for gen, ticket in zip(batch.gens[: len(streams)], batch.tickets, strict=False):
            ticket.withdraw()  # before the abort: the engine's final event finds it finished
            chat.engine.abort(gen.request_id)
        for ticket in batch.tickets[len(streams) + 1 :]:
            ticket.withdraw()
        raise
    return streams[0] if len(streams) == 1 else _merged(streams, batch.gens[0].params.n)


async def _merged(streams: list[AsyncIterator[TokenEvent]], n: int) -> AsyncIterator[TokenEvent]:
    events: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[TokenEvent]) -> None:
        try:
            async for ev in stream:
                events.put_nowait(dataclasses.replace(ev, index=i * n + ev.index))
        except Exception as exc:
            events.put_nowait(exc)
        finally:
            events.put_nowait(None)

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(streams)
        while open_streams:
            item = await events.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:  # leaving early (disconnect, error) closes every stream, which aborts its request
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


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
    chat: ChatService, lps: list[TokenLogprob], offsets: _TextOffsets, top: int, first: int | None = None,
    prompt_count: int = 0,
) -> CompletionLogprobs:  # fmt: skip
    """OpenAI's legacy shape. Each top_logprobs dict holds the `top` most likely tokens and the sampled
    one (so up to top + 1). `first`: the echoed prompt's first token, which has no logprob (null);
    the first `prompt_count` tokens are the echoed prompt's, whose text holds their special tokens
    (the generated text leaves them out, so there they take no room)."""
    ids = ([] if first is None else [first]) + [lp.token_id for lp in lps]
    tokens = [chat.token_text(t) for t in ids]
    text_offsets = [
        offsets.next(b"" if j >= prompt_count and t in chat.special_ids else chat.token_bytes(t))
        for j, t in enumerate(ids)
    ]
    tops: list[dict[str, float] | None] = [] if first is None else [None]
    for lp, text in zip(lps, tokens[len(tops) :], strict=True):
        alternatives = {chat.token_text(t): v for t, v in lp.top[:top]}
        alternatives.setdefault(text, lp.logprob)
        tops.append(alternatives)
    logprobs = ([] if first is None else [None]) + [lp.logprob for lp in lps]
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=logprobs, top_logprobs=tops, text_offset=text_offsets
    )


async def complete(chat: ChatService, req: CompletionRequest, batch: Prompts) -> Completion:
    gen, echoes = batch.whole, _echoes(chat, req, batch)
    done = await collect(gen, _submit(chat, batch))
    n, top = gen.params.n // len(batch.gens), req.logprobs or 0

    def logprobs(i: int) -> CompletionLogprobs | None:
        if not gen.params.logprobs:
            return None
        if gen.params.prompt_logprobs is None:
            return _legacy_logprobs(chat, done.logprobs[i], _TextOffsets(len(echoes[i])), top)
        # echo: the prompt's tokens first (its first token has no logprob), from the text's start
        first, prompt = batch.gens[i // n].prompt_ids[0], done.prompt_logprobs[i]
        lps = prompt + done.logprobs[i]
        return _legacy_logprobs(chat, lps, _TextOffsets(0), top, first, prompt_count=1 + len(prompt))

    choices = [
        CompletionChoice(
            text=echo + done.texts[i], index=i, logprobs=logprobs(i), finish_reason=done.reasons[i]
        )
        for i, echo in enumerate(echoes)
    ]
    return Completion(id=gen.request_id, model=req.model, choices=choices, usage=done.usage)


async def stream(chat: ChatService, req: CompletionRequest, batch: Prompts, wait_s: float) -> Closing:
    """SSE data payloads: text chunks, an optional usage chunk, then [DONE]; as ChatService.stream."""
    choices = len(batch.gens) * batch.gens[0].params.n
    events, waited = await opened(_submit(chat, batch), wait_s, choices)  # a real 429, or 500 (C2)
    gen, echoes = batch.whole, _echoes(chat, req, batch)
    created = int(time.time())
    offsets = [_TextOffsets(len(echo)) for echo in echoes]

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        c = Completion(id=gen.request_id, created=created, model=req.model, choices=choices, usage=usage)
        return c.model_dump_json()

    def piece(ev: TokenEvent, logprobs: list[TokenLogprob], finish: str | None) -> str:
        lps = None
        if gen.params.logprobs:
            lps = _legacy_logprobs(chat, logprobs, offsets[ev.index], req.logprobs or 0)
        return chunk([CompletionChoice(text=ev.text, index=ev.index, logprobs=lps, finish_reason=finish)])

    head = [chunk([CompletionChoice(text=echo, index=i)]) for i, echo in enumerate(echoes) if echo]
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    usage_chunk = (lambda u: chunk([], u)) if include_usage else None
    return stream_payloads(gen, events, head, piece, usage_chunk, waited)
