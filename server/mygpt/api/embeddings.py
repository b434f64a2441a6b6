"""Embeddings (POST /v1/embeddings): each input's vector, from the base model or one of the tenant's
adapters, batched by the engine with everything else it runs.

A generative model's embeddings: the final hidden states (after the model's last norm), L2-normalized,
so a dot product is the cosine similarity (Settings.embedding_pooling):
- "prompt" (the default): each input inside an instruction that asks for its meaning in one word
  (PromptEOL), and the last token's state. A chat model was not trained to embed; asked so, its last
  state summarizes the input (the default model found 31 of 36 paraphrases first, against 17 with
  "mean": docs/benchmarks.md);
- "mean": the states' mean over the input, as vLLM and llama.cpp give for a generative model;
- "last": the last token's, for models trained to embed that way (e5-mistral, gte-Qwen2).

One request is one admission to its tenant's limits, all its input tokens charged at once (the
inputs' own: an instruction around them costs engine time, not usage). OpenAI's bounds: at most 2,048
inputs and 300,000 tokens, each input within the model's context, none empty. The inputs run as engine
requests, at most `window` of them waiting or running at a time: a long list neither fills the
engine's waiting queue nor keeps other requests out of it. Once one input was accepted, an input
that meets a full waiting queue waits for room instead of failing the request.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import struct
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Literal

from mygpt.api.chat import ChatService, failure, request_times
from mygpt.api.errors import APIError, invalid
from mygpt.api.protocol import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage, one_or_many
from mygpt.engine.types import (
    EngineNotRunning,
    EngineOverloaded,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)
from mygpt.tenancy.auth import Principal
from mygpt.tenancy.tenants import Ticket

MAX_INPUTS = 2048  # OpenAI's bounds of one request
MAX_TOKENS = 300_000
# embedding_pooling "prompt": PromptEOL (Jiang et al., 2023, "Scaling Sentence Embeddings with Large
# Language Models"): the input between these, and the last token's hidden state, which the instruction
# makes a summary of the whole input. The input is tokenized alone, so a text and its token ids embed
# the same.
PROMPT = ('This sentence : "', '" means in one word:"')
FULL_QUEUE_WAIT_S = 0.05  # an accepted request's input that met a full waiting queue tries again after


class EmbeddingService:
    def __init__(
        self, chat: ChatService, pooling: Literal["prompt", "mean", "last"], dimensions: int, window: int
    ):
        self.chat = chat
        self.pooling: Literal["mean", "last"] = "last" if pooling == "prompt" else pooling  # the engine's
        self.dimensions = dimensions  # the model's hidden size
        self.window = window
        # "prompt": the instruction's token ids before and after each input. The tokens the tokenizer
        # adds to a text (a BOS before it, an EOS after it) come from a probe: the instruction opens with
        # the leading ones (the model's prompts begin so) and ends with its own last token, not an EOS
        # (that state is the vector); a token-id input that carries them (/tokenize adds them) loses them
        self.wrap: tuple[list[int], list[int]] | None = None
        self._specials: tuple[list[int], list[int]] = ([], [])
        if pooling == "prompt":
            tok = chat.tokenizer
            with_specials = list(tok("a", add_special_tokens=True)["input_ids"])
            plain = list(tok("a", add_special_tokens=False)["input_ids"])
            at = next((k for k in range(len(with_specials)) if with_specials[k : k + len(plain)] == plain), 0)
            self._specials = with_specials[:at], with_specials[at + len(plain) :]
            self.wrap = (
                self._specials[0] + list(tok(PROMPT[0], add_special_tokens=False)["input_ids"]),
                list(tok(PROMPT[1], add_special_tokens=False)["input_ids"]),
            )

    async def embed(
        self, principal: Principal, req: EmbeddingRequest, window: int | None = None
    ) -> EmbeddingList:
        """window: the request's inputs in the engine at once (default: the service's; a batch's line
        takes 1: the one row the batch runner counts for it, batches.rows_of)."""
        arrival = time.monotonic()
        chat = self.chat
        adapter = await chat.resolve_model(principal, req.model)
        inputs = _inputs(req)
        if req.dimensions is not None and req.dimensions != self.dimensions:
            raise invalid(
                f"This model's embeddings have {self.dimensions} dimensions and it was not trained to be "
                "shortened (Matryoshka): leave dimensions out or give that number.",
                param="dimensions",
            )
        ticket = chat.ticket(principal, req.model, adapter)
        try:
            prompts, own = await asyncio.to_thread(self._tokenize, inputs)
        except BaseException:
            ticket.finish(None)  # bad input: not usage
            raise
        tokens = sum(own)  # the inputs' own (an instruction around them is the server's: in its cost only)
        if tokens > MAX_TOKENS:
            ticket.finish(None)
            raise invalid(
                f"The inputs hold {tokens} tokens; at most {MAX_TOKENS} in one request. Send fewer inputs "
                "per request.",
                param="input",
            )
        ticket.charge(tokens)
        ticket.arrival, ticket.embedding_inputs = arrival, len(prompts)
        base = f"embd-{uuid.uuid4().hex}"
        gens = [
            GenerationRequest(
                f"{base}-{i}", p, SamplingParams(max_tokens=0), adapter, principal.tenant, embed=self.pooling
            )
            for i, p in enumerate(prompts)
        ]
        finals = await self._run(gens, own, ticket, window or self.window)
        data = [
            Embedding(index=i, embedding=_encoded(ev.embedding, req.encoding_format))
            for i, ev in enumerate(finals)
        ]
        return EmbeddingList(
            data=data, model=req.model, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
        )

    def _tokenize(self, inputs: list[str | list[int]]) -> tuple[list[list[int]], list[int]]:
        """The engine's prompt of each input (inside the instruction, with "prompt" pooling), and the
        input's own token count (its usage)."""
        chat, context = self.chat, self.chat.limits.context_len
        texts = [x for x in inputs if isinstance(x, str)]
        special = self.wrap is None  # (inside the instruction, its own BOS comes first)
        try:  # one call for the texts: the fast tokenizer batches them
            encoded = iter(chat.tokenizer(texts, add_special_tokens=special)["input_ids"] if texts else [])
        except Exception as exc:  # e.g. a lone surrogate, which is no UTF-8
            raise invalid(f"An input could not be tokenized: {exc}", param="input") from exc
        prompts, own = [], []
        for i, x in enumerate(inputs):
            if isinstance(x, str):
                ids = list(next(encoded)) if x else []  # (a tokenizer that adds BOS makes "" one token)
            else:
                bad = next((t for t in x if not 0 <= t < chat.vocab_size), None)
                if bad is not None:  # most often tiktoken's ids (LangChain's OpenAIEmbeddings' default)
                    raise invalid(
                        f"input[{i}]: token id {bad} is out of this model's vocabulary ({chat.vocab_size} "
                        "tokens). Token-id inputs must come from this model's tokenizer (/tokenize); send "
                        "text instead (LangChain: OpenAIEmbeddings(check_embedding_ctx_length=False)).",
                        param="input",
                    )
                ids = x if self.wrap is None else self._without_specials(x)
            if not ids:
                raise invalid(f"input[{i}] is empty.", param="input")
            prompt = ids if self.wrap is None else [*self.wrap[0], *ids, *self.wrap[1]]
            if len(prompt) > context:
                room = context - (len(prompt) - len(ids))
                raise invalid(
                    f"input[{i}] has {len(ids)} tokens; at most {room} fit in this model's context of "
                    f"{context} tokens. Shorten or split it.",
                    param="input",
                    code="context_length_exceeded",
                )
            prompts.append(prompt)
            own.append(len(ids))
        return prompts, own

    def _without_specials(self, ids: list[int]) -> list[int]:
        """A token-id input as the instruction takes it: without the tokens the tokenizer adds around a
        text (a BOS from /tokenize), which the instruction places itself."""
        lead, trail = self._specials
        if lead and ids[: len(lead)] == lead:
            ids = ids[len(lead) :]
        if trail and ids[-len(trail) :] == trail:
            ids = ids[: -len(trail)]
        return ids

    async def _run(
        self, gens: list[GenerationRequest], own: list[int], ticket: Ticket, window: int
    ) -> list[TokenEvent]:
        """Every input's final event, in order. The first failure (or the client leaving) aborts the
        inputs still running; the ticket is finished once the engine has ended every input it was
        given (as a chat request's, from the engine's final events): their tokens are the usage, their
        share of engine time the cost, and the tokens of inputs never submitted go back to the
        tenant's per-minute budget."""
        finals: list[TokenEvent | None] = [None] * len(gens)
        room = asyncio.Semaphore(window)
        usage = _Usage(ticket)

        async def one(i: int, gen: GenerationRequest) -> None:
            async with room:
                while True:
                    if usage.refused:  # an earlier input met a full queue first: the request is a 429
                        return
                    try:
                        events = self.chat.engine.submit(gen, on_done=usage.ended)
                        break
                    except EngineOverloaded:
                        if not usage.submitted:  # nothing of the request ran: the client retries it (429)
                            usage.refused = True
                            raise
                        await asyncio.sleep(FULL_QUEUE_WAIT_S)
                usage.submit(own[i])
                finals[i] = await _final(events)

        tasks = [asyncio.ensure_future(one(i, g)) for i, g in enumerate(gens)]
        outcome = "error"
        try:
            await asyncio.gather(*tasks)
            outcome = "stop"
        except EngineOverloaded as exc:  # (only while nothing was submitted: see one())
            outcome = "rejected"
            raise APIError(
                429, "The server is at capacity; retry shortly.", code="rate_limit_exceeded",
                headers={"Retry-After": str(max(1, round(exc.retry_after_s)))},
            ) from exc  # fmt: skip
        except EngineNotRunning as exc:  # (stopping, or the engine died after some inputs ran)
            outcome = "error" if usage.submitted else "rejected"
            raise APIError(
                503, "The server is not ready.", code="not_ready", headers={"Retry-After": "5"}
            ) from exc
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            for t in tasks:  # none submits once cancelled (no await between a submit and its count)
                t.cancel()
            usage.close(outcome, sum(own))  # before any await: a second
            await asyncio.gather(*tasks, return_exceptions=True)  # cancel must not skip it
        return finals  # type: ignore[return-value]  # every one set once gather returned


class _Usage:
    """An embeddings request's inputs in the engine: the ticket is finished when the request stopped
    submitting (close) and the engine has sent the final event of every input it took (ended, from
    the engine thread)."""

    def __init__(self, ticket: Ticket):
        self.ticket = ticket
        self.submitted = 0  # inputs
        self.tokens = 0  # their prompt tokens
        self.refused = False  # the first input met a full waiting queue: nothing more is submitted
        self._ended: list[TokenEvent] = []
        self._outcome: str | None = None
        self._lock = threading.Lock()

    def submit(self, tokens: int) -> None:
        with self._lock:
            self.submitted += 1
            self.tokens += tokens

    def ended(self, finals: list[TokenEvent]) -> None:
        with self._lock:
            self._ended += finals
        self._maybe_finish()

    def close(self, outcome: str, charged: int) -> None:
        with self._lock:
            self._outcome = outcome
        self.ticket.refund(charged - self.tokens)  # inputs never submitted
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        with self._lock:
            if self._outcome is None or len(self._ended) < self.submitted:
                return
            outcome, ended = self._outcome, list(self._ended)
        if outcome == "rejected":
            self.ticket.finish("rejected")
        else:  # (finish runs once: the second caller to get here is a no-op)
            self.ticket.finish(outcome, self.tokens, 0, request_times(self.ticket.arrival, ended))


async def _final(events: AsyncIterator[TokenEvent]) -> TokenEvent:
    """An input's one event: its vector, or an APIError for a failure or an abort."""
    async with contextlib.aclosing(events):
        async for ev in events:
            if ev.finish_reason is not FinishReason.STOP or ev.embedding is None:
                raise failure(ev)
            return ev
    raise RuntimeError("the engine ended an embedding without its event")


def _inputs(req: EmbeddingRequest) -> list[str | list[int]]:
    """The inputs: one text, one list of token ids, or a list of either (OpenAI's four forms)."""
    inputs = one_or_many(req.input)
    if not inputs or inputs == [[]]:
        raise invalid("input is empty.", param="input")
    if len(inputs) > MAX_INPUTS:
        raise invalid(f"input holds {len(inputs)} inputs; at most {MAX_INPUTS}.", param="input")
    return inputs


def _encoded(vector: list[float], encoding: str) -> list[float] | str:
    if encoding != "base64":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
