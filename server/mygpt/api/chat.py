"""Chat completions: request -> prompt ids and SamplingParams -> engine events -> OpenAI objects."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from mygpt.api import reasoning, tools
from mygpt.api.errors import APIError, adapter_changing, invalid, model_not_found
from mygpt.api.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    CompletionTokensDetails,
    Delta,
    ErrorInfo,
    PromptTokensDetails,
    RefusalPart,
    TextPart,
    TokenLogprobOut,
    TopLogprob,
    Usage,
)
from mygpt.engine.async_engine import AsyncEngine
from mygpt.engine.guided import Grammar, GrammarError, Grammars, ThinkFirst
from mygpt.engine.types import (
    SHUTTING_DOWN,
    AdapterRef,
    EngineNotRunning,
    EngineOverloaded,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
)
from mygpt.lora.registry import AdapterEntry, AdapterRegistry
from mygpt.lora.weights import AdapterChanging, AdapterError
from mygpt.tenancy.auth import Principal
from mygpt.tenancy.limits import RateLimited
from mygpt.tenancy.tenants import RequestTimes, Tenants, Ticket

log = logging.getLogger(__name__)


@dataclass
class ChatLimits:
    context_len: int
    max_n: int
    max_stop_sequences: int
    max_prompts: int = 32  # per /v1/completions request


class ChatService:
    """Turns ChatCompletionRequests into engine requests and engine events into OpenAI objects."""

    def __init__(
        self,
        engine: AsyncEngine,
        tokenizer: Any,
        model_name: str,
        limits: ChatLimits,
        tenants: Tenants,
        adapters: AdapterRegistry | None = None,
        grammars: Grammars | None = None,
        reasoning_parser: str = "auto",
    ):
        self.engine = engine
        self.tenants = tenants
        self.adapters = adapters
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.limits = limits
        self.special_ids = frozenset(tokenizer.all_special_ids)  # left out of generated text
        self.renders_tools = tools.template_renders_tools(tokenizer)  # else: told in a system message
        # a reasoning model's <think>...</think> goes apart from its answer (api/reasoning.py)
        self.reasoning = reasoning_parser == "think" or (
            reasoning_parser == "auto" and reasoning.template_thinks(tokenizer)
        )
        # the tags' ids where each is one token: a grammar (tools, response_format) then holds from the
        # end of the thinking (guided.ThinkFirst), not from the first token
        self.think_ids = reasoning.tag_ids(tokenizer) if self.reasoning else None
        # structured outputs, compiled for the model's logits width (default: the tokenizer's size)
        self.grammars = grammars or Grammars(tokenizer, len(tokenizer))
        # token ids a request may name (logit_bias keys, prompt ids): both the tokenizer's and the
        # logits' (a tokenizer with tokens added past the embedding would index past the logits)
        self.vocab_size = min(len(tokenizer), self.grammars.vocab_size)

    # ------------------------------------------------------------------ request -> engine
    async def prepare(
        self, principal: Principal, req: ChatCompletionRequest
    ) -> tuple[GenerationRequest, Ticket]:
        """Validates the request, takes the tenant's limits and builds the engine request; every refusal
        is an APIError (4xx). The ticket must reach submit() or be finished by the caller."""
        arrival = time.monotonic()
        adapter = await self.resolve_model(principal, req.model)
        self._refuse_unsupported(req)
        calls, _ = self._plan(req)  # tools: the grammar of a call (or of a call or text: "auto")
        render = self.renderer(req)
        grammar = await self._grammar(req) if calls is None else await self._tools_grammar(calls, req)
        if calls is not None and not calls.auto and req.stop:  # stop strings would cut a forced call
            req = req.model_copy(update={"stop": None})
        if grammar is not None and self.think_ids is not None:  # a reasoning model thinks first, freely
            blank = await asyncio.to_thread(self.grammars.blank_mask)
            grammar = ThinkFirst(grammar, *self.think_ids, blank)

        def params(prompt_len: int) -> SamplingParams:
            requested = req.max_completion_tokens or req.max_tokens  # A5: max_completion_tokens wins
            param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            return self.sampling_params(
                req, prompt_len, requested, param, "messages", bool(req.logprobs), req.top_logprobs or 0,
                grammar,
            )  # fmt: skip

        return await self.admit(principal, req.model, adapter, render, params, "chatcmpl", arrival)

    def renderer(self, req: ChatCompletionRequest, generation_prompt: bool = True) -> Callable[[], list[int]]:
        """The request's prompt ids as the chat template gives them, its tools included (a 400 for
        messages out of order now; the template itself runs when called, off the event loop)."""
        calls, _ = self._plan(req)
        messages = self._messages(req.messages)
        if calls is not None and not self.renders_tools:
            messages = tools.with_tools(messages, calls)
        template_tools = [tools.template_tool(t) for t in calls.tools] if calls is not None else None
        kwargs = self._template_kwargs(req)
        return functools.partial(self._render, messages, template_tools, generation_prompt, kwargs)

    @staticmethod
    def _template_kwargs(req: Any) -> dict[str, Any]:
        """The chat template's extra arguments: vLLM's chat_template_kwargs (Qwen3's enable_thinking),
        and reasoning_effort "none" or "minimal" as enable_thinking false where those do not set it.
        The arguments that say how the template runs are mygpt's to set: a 400 naming the key."""
        kwargs = dict(getattr(req, "chat_template_kwargs", None) or {})
        for key in kwargs:
            if key in RESERVED_TEMPLATE_KWARGS:
                raise invalid(
                    f"chat_template_kwargs cannot set '{key}': the server sets it.",
                    param=f"chat_template_kwargs.{key}",
                )
        if getattr(req, "reasoning_effort", None) in ("none", "minimal"):
            kwargs.setdefault("enable_thinking", False)
        return kwargs

    async def admit(
        self,
        principal: Principal,
        model: str,
        adapter: AdapterRef | None,
        render: Callable[[], list[int]],
        params: Callable[[int], SamplingParams],
        id_prefix: str,
        arrival: float,
    ) -> tuple[GenerationRequest, Ticket]:
        """Takes the tenant's limits (429), renders the prompt off the event loop and builds the
        engine request (a bad prompt or parameter: 400, not counted as usage)."""
        ticket = self.ticket(principal, model, adapter)
        try:
            prompt_ids = await asyncio.to_thread(render)
            sampling = params(len(prompt_ids))
        except BaseException:
            ticket.finish(None)  # bad input: not usage
            raise
        ticket.charge(len(prompt_ids))
        ticket.arrival = arrival
        gen = GenerationRequest(
            request_id=f"{id_prefix}-{uuid.uuid4().hex}",
            prompt_ids=prompt_ids,
            params=sampling,
            adapter=adapter,
            group=principal.tenant,
        )
        return gen, ticket

    def ticket(self, principal: Principal, model: str, adapter: AdapterRef | None) -> Ticket:
        """One request admitted to its tenant's limits, or their 429 (with the x-ratelimit-* headers)."""
        try:
            return self.tenants.admit(principal, model, None if adapter is None else model)
        except RateLimited as exc:
            headers = {"Retry-After": exc.retry_after, **self.tenants.rate_headers(principal)}
            raise APIError(429, str(exc), code="rate_limit_exceeded", headers=headers) from exc

    def model_ids(self, principal: Principal) -> list[str]:
        """The base model, then the adapters the caller may use (an admin sees "<tenant>/<name>")."""
        if self.adapters is None:
            return [self.model_name]
        # adapters a request can use: not those whose files a load would refuse (registry.problem)
        entries = [e for e in self.adapters.list(principal.tenant) if self.adapters.problem(e) is None]
        return [self.model_name] + [e.name if principal.tenant else f"{e.tenant}/{e.name}" for e in entries]

    async def resolve_model(self, principal: Principal, model: str) -> AdapterRef | None:
        """None for the base model; for an adapter of the caller's, its current version with weights
        read and validated here, off the engine thread; 404 for anything else, another tenant's
        adapter included (D3: never a silent base-model answer)."""
        if model == self.model_name:
            return None
        entry = self.adapter_of(principal, model)
        if entry is None:
            raise model_not_found(model)
        try:
            entry, weights = await asyncio.to_thread(self.adapters.weights, entry)
        except AdapterError as exc:
            if self.adapter_of(principal, model) is None:  # deleted or unloaded while it was read
                raise model_not_found(model) from exc
            if isinstance(exc, AdapterChanging):  # being copied or replaced: a retry will find it (C3)
                raise adapter_changing(exc) from exc
            raise invalid(str(exc), param="model", code="invalid_adapter") from exc
        return AdapterRef(entry.key, weights)

    def adapter_of(self, principal: Principal, model: str) -> AdapterEntry | None:
        """The routable adapter `model` names for the caller: a tenant's own by name, any by
        "<tenant>/<name>" for an admin; None for anything else."""
        tenant, name = (principal.tenant, model) if principal.tenant else (model.partition("/")[::2])
        return self.adapters.get(tenant, name) if self.adapters is not None and tenant and name else None

    def refuse_unsupported_common(self, req: Any) -> None:
        """The checks chat and text completions share: n, stop strings, logit_bias token ids,
        stream_options."""
        if req.stream_options is not None and not req.stream:
            raise invalid("stream_options is only allowed when stream is true.", param="stream_options")
        if (req.n or 1) > self.limits.max_n:
            raise invalid(f"n must be at most {self.limits.max_n}, got {req.n}.", param="n")
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        if len(stops) > self.limits.max_stop_sequences:
            raise invalid(f"stop accepts at most {self.limits.max_stop_sequences} sequences.", param="stop")
        for key in req.logit_bias or {}:
            if not 0 <= int(key) < self.vocab_size:  # the keys are ASCII digits (protocol.py)
                raise invalid(
                    f"logit_bias keys are token ids in the vocabulary (0 to {self.vocab_size - 1}), got {key!r}.",
                    param="logit_bias",
                )

    def _refuse_unsupported(self, req: ChatCompletionRequest) -> None:
        # B2: honoured or refused with the parameter named, never silently ignored
        self.refuse_unsupported_common(req)
        if req.top_logprobs and not req.logprobs:
            raise invalid("top_logprobs requires logprobs to be true.", param="top_logprobs")
        if req.audio is not None or any(m != "text" for m in req.modalities or ()):
            raise invalid(
                "This model produces text only: modalities must be ['text'], without audio.",
                param="audio" if req.audio is not None else "modalities",
            )

    async def _grammar(self, req: ChatCompletionRequest) -> Grammar | None:
        """The grammar of response_format (None for text), compiled off the event loop; 400 naming
        response_format when the type is unknown or the schema cannot be compiled."""
        fmt = self._format(req)
        return None if fmt is None else await self._compile(fmt[0], "response_format", fmt[1])

    @staticmethod
    def _format(req: ChatCompletionRequest) -> tuple[dict[str, Any] | None, str] | None:
        """response_format's JSON Schema (None: any JSON object) and its name in errors; None for text;
        400 naming response_format when it is incomplete or of an unknown type."""
        fmt = req.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return None, "response_format"
        elif fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise invalid(
                    "Missing required parameter: 'response_format.json_schema'.",
                    param="response_format.json_schema",
                )
            return fmt.json_schema.schema_ or {}, f"response_format '{fmt.json_schema.name}'"
        raise invalid(
            f"response_format type '{fmt.type}' is not supported; use 'text', 'json_object' or 'json_schema'.",
            param="response_format.type",
        )

    async def _tools_grammar(self, calls: tools.ToolPlan, req: ChatCompletionRequest) -> Grammar:
        """The grammar of a tool plan: one call, or ("auto") calls, bare or in Hermes/Qwen tags, or text
        (with a response_format: JSON of it)."""
        fmt = self._format(req)  # (its 400s also where a forced call leaves it for a later turn)
        if not calls.auto:
            return await self._compile(calls.schema(), "tools")
        if fmt is not None:  # the answer's schema first: a 400 for it names response_format
            answer = fmt[0] or {"type": "object"}
            await self._compile(answer, "response_format", fmt[1])
        build = functools.partial(
            self.grammars.json_or_text,
            tags=tools.TAGS,
            many=calls.many,
            answer=None if fmt is None else answer,
        )
        return await self._compile(calls.schema(), "tools", build=build)

    async def _compile(
        self, schema: Any, param: str, what: str | None = None, build: Callable[[Any], Grammar] | None = None
    ) -> Grammar:
        """A JSON grammar (or build's, of the schema) compiled off the event loop; 400 naming `param` if
        it cannot be."""
        try:
            return await asyncio.to_thread(build or self.grammars.json, schema)
        except GrammarError as exc:
            raise invalid(f"Invalid schema for {what or param}: {exc}", param=param) from exc

    @staticmethod
    def _plan(req: ChatCompletionRequest) -> tuple[tools.ToolPlan | None, bool]:
        """The request's tool plan, and whether it came from the deprecated functions (its answer is then
        a function_call)."""
        legacy = tools.legacy_functions(req)
        return tools.plan(legacy or req, legacy=legacy is not None), legacy is not None

    def _messages(self, messages: list[Any]) -> list[dict[str, Any]]:
        """The chat template's messages; a tool message must answer an assistant's tool_calls, a
        function message (deprecated) an assistant's function_call, whose call it then answers."""
        out, called, legacy_call = [], False, None
        for i, m in enumerate(messages):
            if m.content is None and m.role in ("system", "developer", "user", "tool"):  # (an assistant's
                # may be empty: its tool_calls, function_call or refusal speak for it)
                raise invalid(
                    f"Missing required parameter: 'messages[{i}].content'.", param=f"messages.[{i}].content"
                )
            if m.role == "tool" and not called:
                raise invalid(
                    "a message with role 'tool' must answer a preceding assistant message's tool_calls.",
                    param=f"messages.[{i}].role",
                )
            if m.role == "function" and legacy_call is None:
                raise invalid(
                    "a message with role 'function' must answer a preceding assistant message's function_call.",
                    param=f"messages.[{i}].role",
                )
            if m.function_call is not None and (m.role != "assistant" or m.tool_calls):
                raise invalid(
                    "function_call belongs to an assistant message without tool_calls.",
                    param=f"messages.[{i}].function_call",
                )
            if m.function_call is not None:  # the deprecated call as a tool call, answered by the next
                # function message (one result a call: a second one has nothing left to answer)
                tools.legacy_call(i, m.function_call)  # a 400 naming function_call if malformed
                legacy_call = f"call_legacy_{i}"
                call = {"id": legacy_call, "type": "function", "function": m.function_call}
                m = m.model_copy(update={"tool_calls": [call]})
            if m.role == "function":
                m = m.model_copy(update={"role": "tool", "tool_call_id": legacy_call})
                legacy_call = None
            out.append(self._message(i, m))
            called = called or bool(m.tool_calls)
        return out

    def _message(self, i: int, m: Any) -> dict[str, Any]:
        content = m.content
        if isinstance(content, list):
            said = (RefusalPart, TextPart) if m.role == "assistant" else (TextPart,)  # (refusals: replayed)
            other = [p.type for p in content if not isinstance(p, said)]
            known = {"text", "refusal"} if m.role == "assistant" else {"text"}
            if malformed := next((t for t in other if t in known), None):  # its text missing, or no string
                raise invalid(
                    f"a content part of type '{malformed}' needs a string '{malformed}'.",
                    param=f"messages.[{i}].content",
                )
            if other:
                kinds = "'text' and, in assistant messages, 'refusal'"
                raise invalid(
                    f"content part type '{other[0]}' is not supported; only {kinds}.",
                    param=f"messages.[{i}].content",
                )
            content = "".join(p.text if isinstance(p, TextPart) else p.refusal for p in content)
        if m.role == "assistant" and not content and m.refusal:
            content = m.refusal
        role = "system" if m.role == "developer" else m.role
        message: dict[str, Any] = {"role": role, "content": content or ""}
        if m.name:
            message["name"] = m.name
        if m.role == "tool":
            message["tool_call_id"] = m.tool_call_id
        thought = m.reasoning_content or m.reasoning
        if thought and m.role == "assistant":  # as Qwen3's template reads an earlier turn's thinking
            message["reasoning_content"] = thought
        if m.tool_calls and m.role == "assistant":
            message["tool_calls"] = tools.assistant_calls(i, m.tool_calls)
            if not self.renders_tools:  # the calls as the model was told to write them
                message["content"] = "\n".join(
                    filter(None, [message["content"], tools.written(message["tool_calls"])])
                )
        return message

    def _render(
        self,
        messages: list[dict[str, Any]],
        template_tools: list[dict] | None = None,
        generation_prompt: bool = True,
        kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        try:
            extra = {"tools": template_tools} if template_tools and self.renders_tools else {}
            ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=False,
                **extra, **(kwargs or {}),
            )  # fmt: skip
        except Exception as exc:  # the template itself refuses (e.g. roles out of order)
            raise invalid(f"The messages could not be formatted: {exc}", param="messages") from exc
        return list(ids)

    def sampling_params(
        self, req: Any, prompt_len: int, requested: int | None, param: str, prompt_param: str, logprobs: bool,
        top_logprobs: int, grammar: Grammar | None = None,
    ) -> SamplingParams:  # fmt: skip
        """The engine's parameters; B4: 400 context_length_exceeded naming `prompt_param` or `param`."""
        ctx = self.limits.context_len
        if prompt_len >= ctx or (requested and prompt_len + requested > ctx):
            asked = f"{prompt_len + (requested or 0)} tokens ({prompt_len} in the {prompt_param}, {requested or 0} in the completion)"
            raise invalid(
                f"This model's maximum context length is {ctx} tokens. However, you requested {asked}. "
                f"Please reduce the length of the {prompt_param} or completion.",
                param=prompt_param if prompt_len >= ctx or not requested else param,
                code="context_length_exceeded",
            )
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        room = requested or ctx - prompt_len
        if (req.min_tokens or 0) > room:
            limit = f"{param} ({requested})" if requested else f"the {room} tokens left in the context"
            raise invalid(f"min_tokens ({req.min_tokens}) must be at most {limit}.", param="min_tokens")
        if grammar is not None:  # structured output and tools end where the grammar lets them
            for name in ("ignore_eos", "min_tokens"):
                if getattr(req, name):
                    raise invalid(
                        f"{name} cannot be combined with response_format or tools: the structured output "
                        "ends where its grammar does.",
                        param=name,
                    )
        return SamplingParams(
            max_tokens=requested or ctx - prompt_len,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed,
            stop=tuple(stops),
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            top_k=max(req.top_k or 0, 0),
            min_p=req.min_p or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            stop_token_ids=tuple(req.stop_token_ids or ()),
            ignore_eos=bool(req.ignore_eos),
            min_tokens=req.min_tokens or 0,
            logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()},
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            n=req.n or 1,
            grammar=grammar,
        )

    def submit(self, gen: GenerationRequest, ticket: Ticket) -> AsyncIterator[TokenEvent]:
        """Queues the request; its ticket is finished with the usage when the engine ends it."""

        def done(finals: list[TokenEvent]) -> None:
            ticket.finish(
                _outcome(finals), len(gen.prompt_ids), sum(e.completion_tokens for e in finals),
                request_times(ticket.arrival, finals),
                sum(e.cached_tokens for e in finals),  # choice 0's event carries them
            )  # fmt: skip

        try:
            return self.engine.submit(gen, on_done=done)
        except EngineOverloaded as exc:
            ticket.finish("rejected")
            raise APIError(
                429, "The server is at capacity; retry shortly.", code="rate_limit_exceeded",
                headers={"Retry-After": str(max(1, round(exc.retry_after_s)))},
            ) from exc  # fmt: skip
        except EngineNotRunning as exc:
            ticket.finish("rejected")
            raise APIError(
                503, "The server is not ready.", code="not_ready", headers={"Retry-After": "5"}
            ) from exc
        except BaseException:
            ticket.finish("error")
            raise

    # ------------------------------------------------------------------ engine -> response
    async def complete(
        self, req: ChatCompletionRequest, gen: GenerationRequest, ticket: Ticket
    ) -> ChatCompletion:
        """Runs a request to the end and returns the whole completion."""
        calls, legacy = self._plan(req)
        inside = self._thinks(req, gen, calls)
        thoughts = reasoning.Thoughts(gen.params.n, inside) if inside is not None else None
        observe = None
        if thoughts is not None:  # each choice's reasoning tokens, counted as its events come

            def observe(ev: TokenEvent) -> None:
                thoughts.see(ev.index, ev.text, ev.completion_tokens, ev.finish_reason is not None)

        done = await collect(gen, self.submit(gen, ticket), observe)
        choices = []
        for i in range(gen.params.n):
            text, thought = done.texts[i], None
            if inside is not None:  # a reasoning model: its thinking apart from its answer
                thought, text = reasoning.split(text, inside)
            made, finish = tools.answer(calls, text, done.reasons[i]) if calls else (None, done.reasons[i])
            if made and legacy:  # one call at most (the plan allows no more)
                message = AssistantMessage(content=None, function_call=made[0].function)
                finish = "function_call" if finish == "tool_calls" else finish  # (cut: "length")
            elif made:
                message = AssistantMessage(content=None, tool_calls=made)
            else:
                message = AssistantMessage(content=text)
            if thought is not None:
                message = message.model_copy(update={"reasoning": thought, "reasoning_content": thought})
            lps = ChoiceLogprobs(content=self._logprobs(done.logprobs[i])) if gen.params.logprobs else None
            choices.append(Choice(index=i, message=message, logprobs=lps, finish_reason=finish))
        usage = done.usage if thoughts is None else self._with_thoughts(done.usage, thoughts)
        return ChatCompletion(id=gen.request_id, model=req.model, choices=choices, usage=usage)

    @staticmethod
    def _with_thoughts(usage: Usage, thoughts: reasoning.Thoughts) -> Usage:
        details = CompletionTokensDetails(reasoning_tokens=sum(thoughts.tokens))
        return usage.model_copy(update={"completion_tokens_details": details})

    async def stream(
        self, req: ChatCompletionRequest, gen: GenerationRequest, ticket: Ticket, wait_s: float
    ) -> Closing:
        """Yields SSE data payloads: chunks, an optional usage chunk, then [DONE] (A1-A6, A10). Returns
        once each choice's first event came or `wait_s` passed (see opened())."""
        # before the first byte: overload is still a real 429, a failed first step a real 500 (C2)
        events, waited = await opened(self.submit(gen, ticket), wait_s, gen.params.n)
        created = int(time.time())

        def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
            c = ChatCompletionChunk(
                id=gen.request_id, created=created, model=req.model, choices=choices, usage=usage
            )
            return c.model_dump_json(exclude_none=False)

        calls, legacy = self._plan(req)
        inside = self._thinks(req, gen, calls)
        thinking = reasoning.Thoughts(gen.params.n, inside) if inside is not None else None
        held = [""] * gen.params.n  # a call's text, sent as tool_calls (or function_call) once whole
        # per choice: a call (True), text (False), or not known yet (None: "auto", only whitespace so far)
        kind = [None if calls is not None and calls.auto else calls is not None] * gen.params.n

        def piece(ev: TokenEvent, logprobs: list[TokenLogprob], finish: str | None) -> str | None:
            text, thought = ev.text, ""
            if thinking is not None:  # a reasoning model: its thinking apart, a tag in pieces held back
                thought, text = thinking.see(
                    ev.index, ev.text, ev.completion_tokens, final=finish is not None
                )
            delta = Delta(content=text) if text or (finish is None and thinking is None) else Delta()
            if kind[ev.index] is not False:  # a call, or not known yet: held back
                held[ev.index] += text
                if kind[ev.index] is None:
                    kind[ev.index] = calls.is_call(held[ev.index])
                if kind[ev.index] is False:  # "auto" answers in text: what was held, then as it comes
                    delta = Delta(content=held[ev.index])
                elif finish is None:
                    if not thought:
                        return None
                    delta = Delta()  # the thinking goes out; the call comes whole
                else:
                    made, finish = tools.answer(calls, held[ev.index], finish)
                    if made is None:
                        delta = Delta(content=held[ev.index])
                    elif legacy:
                        delta = Delta(function_call=made[0].function.model_dump())
                        finish = "function_call" if finish == "tool_calls" else finish
                    else:
                        delta = Delta(tool_calls=[{"index": k, **c.model_dump()} for k, c in enumerate(made)])
            if thought:
                delta = delta.model_copy(update={"reasoning": thought, "reasoning_content": thought})
            elif thinking is not None and not (
                delta.content or delta.tool_calls or delta.function_call or finish or gen.params.logprobs
            ):
                return None  # nothing to say yet (a tag's beginning, held back)
            lps = ChoiceLogprobs(content=self._logprobs(logprobs)) if gen.params.logprobs else None
            return chunk([ChunkChoice(index=ev.index, delta=delta, logprobs=lps, finish_reason=finish)])

        # A2: the first chunk of each choice carries the role
        head = [
            chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
            for i in range(gen.params.n)
        ]
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def usage_chunk(u: Usage) -> str:
            return chunk([], u if thinking is None else self._with_thoughts(u, thinking))

        return stream_payloads(gen, events, head, piece, usage_chunk if include_usage else None, waited)

    def _thinks(
        self, req: ChatCompletionRequest, gen: GenerationRequest, calls: tools.ToolPlan | None
    ) -> bool | None:
        """For a reasoning model's answer: whether its prompt leaves it inside its thinking
        (api/reasoning.py); None where nothing is split. calls: the request's tool plan (_plan)."""
        structured = req.response_format is not None and req.response_format.type != "text"
        # (where the tags are not one token each, a grammar holds from the first token: no thinking)
        if not self.reasoning or ((calls is not None or structured) and self.think_ids is None):
            return None
        # the generation prompt's last tokens only: a <think> in a user's message says nothing
        tail = self.tokenizer.decode(gen.prompt_ids[-4:], skip_special_tokens=False)
        return reasoning.opens_in_reasoning(tail)

    def _logprobs(self, lps: list[TokenLogprob] | None) -> list[TokenLogprobOut]:
        out = []
        for lp in lps or []:
            top = [TopLogprob(token=self.token_text(t), logprob=v, bytes=self._bytes(t)) for t, v in lp.top]
            out.append(
                TokenLogprobOut(
                    token=self.token_text(lp.token_id),
                    logprob=lp.logprob,
                    bytes=self._bytes(lp.token_id),
                    top_logprobs=top,
                )  # fmt: skip
            )
        return out

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one service per process, bounded
    def token_bytes(self, token_id: int) -> bytes:
        """The token's own bytes: a byte-level token can hold part of a character (an emoji is often
        two or three tokens), which decoding it alone would turn into U+FFFD."""
        return self.grammars.token_bytes(token_id)

    def token_text(self, token_id: int) -> str:
        """As OpenAI writes a token: its text, bytes that are not whole UTF-8 characters as \\xNN."""
        return self.token_bytes(token_id).decode("utf-8", errors="backslashreplace")

    def _bytes(self, token_id: int) -> list[int]:
        return list(self.token_bytes(token_id))


# apply_chat_template's arguments that say how it runs: not a request's to set (chat_template_kwargs)
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
    "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "sanitize_control_tokens",
})  # fmt: skip


@dataclass
class Collected:
    """A request's answer, run to the end: each choice's text, token logprobs and finish reason."""

    texts: list[str]
    logprobs: list[list[TokenLogprob]]
    reasons: list[str | None]
    usage: Usage
    prompt_logprobs: list[list[TokenLogprob]]  # each choice's, if the request asked for them


async def collect(
    gen: GenerationRequest,
    events: AsyncIterator[TokenEvent],
    observe: Callable[[TokenEvent], None] | None = None,
) -> Collected:
    """The non-streamed answer of chat and text completions; an error or abort raises APIError.
    observe: sees each event as it comes (a reasoning model's token count)."""
    n = gen.params.n
    texts: list[list[str]] = [[] for _ in range(n)]
    logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
    reasons: list[str | None] = [None] * n
    completion = [0] * n
    prompt_logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
    cached = [0] * n  # prompt tokens from the prefix cache (choice 0's events carry them)
    async with contextlib.aclosing(events):
        async for ev in events:
            if ev.finish_reason in (FinishReason.ERROR, FinishReason.ABORT):
                raise failure(ev)
            texts[ev.index].append(ev.text)
            if observe is not None:
                observe(ev)
            logprobs[ev.index] += ev.logprobs or []
            prompt_logprobs[ev.index] += ev.prompt_logprobs or []
            completion[ev.index] = ev.completion_tokens
            cached[ev.index] = ev.cached_tokens
            if ev.finish_reason is not None:
                reasons[ev.index] = ev.finish_reason.value
    usage = _usage(gen, sum(completion), sum(cached))
    return Collected(["".join(t) for t in texts], logprobs, reasons, usage, prompt_logprobs)


def failure(ev: TokenEvent) -> APIError:
    """The HTTP error of a request the engine failed or aborted, before any of its output was sent."""
    if ev.error_param is not None:  # the request's own fault, found while generating
        return invalid(ev.error or "invalid request", param=ev.error_param)
    if ev.error == SHUTTING_DOWN:  # nothing was sent: another replica can take it, as G2's new requests
        return APIError(503, f"{ev.error}; retry shortly.", code="not_ready", headers={"Retry-After": "5"})
    return APIError(500 if ev.error else 499, ev.error or "cancelled", type="server_error")


FIRST_EVENTS_GRACE_S = 0.1  # opened(): how long the other choices' first events may lag the first's


class Closing:
    """An async iterator whose aclose() also runs `close`, even where the iterator never started: an
    async generator that never ran closes nothing, and here closing is what aborts a request (the
    client left before the response's body began)."""

    def __init__(self, it: AsyncGenerator, close: Callable[[], Awaitable[None]]):
        self._it, self._close = it, close

    def __aiter__(self) -> Closing:
        return self

    def __anext__(self) -> Awaitable:
        return self._it.__anext__()

    async def aclose(self) -> None:
        await self._it.aclose()
        await self._close()


async def opened(events: AsyncIterator[TokenEvent], wait_s: float, choices: int = 1) -> tuple[Closing, bool]:
    """C2: waits up to `wait_s` for the first event of each of a stream's `choices` before the response
    commits to its 200, so that a request that fails before any output (a prefill out of device memory,
    a schema that breaks at a choice's first token) gets a real HTTP status, not a 200 stream that
    carries an error. The first tokens then leave with the headers: the client's time to first token
    is the same where its choices sample their first tokens together (one prompt's n choices share one
    prefill, in the same step). Once a first event came, the others get at most FIRST_EVENTS_GRACE_S
    more (a list of prompts prefills in several steps; the naive engine runs choices one by one).

    Returns the events, those already come included, and whether none came: the wait ran out (a long
    queue or prefill), and the stream opens without them, with a keep-alive comment first (A9).
    Cancelled while waiting (the client left), it aborts the request."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    came: list[TokenEvent] = []
    seen: set[int] = set()
    wait = Waiting(events)
    try:
        while len(seen) < choices:
            await asyncio.wait({wait.next()}, timeout=max(0.0, deadline - loop.time()))
            if not wait.pending.done():
                break  # the wait ran out: the stream opens with what came
            exc = wait.pending.exception()
            if isinstance(exc, StopAsyncIteration):
                break
            if exc is not None:  # the event stream itself failed
                raise APIError(500, f"{type(exc).__name__}: {exc}", type="server_error") from exc
            ev = wait.take()
            if ev.finish_reason in (FinishReason.ERROR, FinishReason.ABORT):
                raise failure(ev)
            if not came:
                deadline = min(deadline, loop.time() + FIRST_EVENTS_GRACE_S)
            came.append(ev)
            seen.add(ev.index)
    except BaseException:
        await wait.close()
        raise
    return Closing(_replay(came, wait), wait.close), not came


class Waiting:
    """An event stream and the read of its next event that may be under way (a task that the
    wait for the first events started)."""

    def __init__(self, events: AsyncIterator[TokenEvent]):
        self.events = events
        self.pending: asyncio.Future | None = None

    def next(self) -> asyncio.Future:
        self.pending = asyncio.ensure_future(anext(self.events))
        return self.pending

    def take(self) -> TokenEvent:
        ev, self.pending = self.pending.result(), None
        return ev

    async def close(self) -> None:
        """Stops the read under way and closes the events, which aborts a request still running."""
        if self.pending is not None and not self.pending.done():
            self.pending.cancel()  # raised inside the event stream, whose exit aborts the request
            await asyncio.wait({self.pending})
        if self.pending is not None and not self.pending.cancelled():
            self.pending.exception()  # retrieved: nobody reads it now (asyncio would log it)
        await self.events.aclose()


async def _replay(came: list[TokenEvent], wait: Waiting) -> AsyncIterator[TokenEvent]:
    try:
        for ev in came:
            yield ev
        if wait.pending is not None:  # the read the wait left under way
            try:
                ev = await wait.pending
            except StopAsyncIteration:
                return
            wait.pending = None
            yield ev
        async for ev in wait.events:
            yield ev
    finally:  # left early (a disconnect): the request is aborted
        await wait.close()


def stream_payloads(
    gen: GenerationRequest,
    events: Closing,
    head: list[str],
    piece: Callable[[TokenEvent, list[TokenLogprob], str | None], str | None],
    usage_chunk: Callable[[Usage], str] | None,
    waited: bool = False,
) -> Closing:
    """The streaming loop of chat and text completions: `head`, then piece(event, its logprobs,
    finish reason) for each event with text or a finish, the usage chunk if asked, [DONE]. A token
    whose text is held back (a partial character or stop string) sends its logprob with the next
    piece of its choice. After the first byte a failure is an error event, not a hang (A10).

    None stands for a keep-alive comment: the first thing sent where opened() `waited` in vain (the
    client has then heard nothing for a keep-alive interval, A9). Closing the payloads, read or not,
    closes the events (which aborts the request if it is still running)."""
    return Closing(_payloads(gen, events, head, piece, usage_chunk, waited), events.aclose)


async def _payloads(
    gen: GenerationRequest,
    events: Closing,
    head: list[str],
    piece: Callable[[TokenEvent, list[TokenLogprob], str | None], str | None],
    usage_chunk: Callable[[Usage], str] | None,
    waited: bool,
) -> AsyncIterator[str | None]:
    completion = [0] * gen.params.n
    pending: list[list[TokenLogprob]] = [[] for _ in range(gen.params.n)]
    cached = [0] * gen.params.n
    async with contextlib.aclosing(events):
        try:
            if waited:
                yield None
            for payload in head:
                yield payload
            async for ev in events:
                if ev.finish_reason in (FinishReason.ERROR, FinishReason.ABORT):
                    yield _error_payload(ev.error or "the request was cancelled", ev.error_param)
                    return
                completion[ev.index] = ev.completion_tokens
                cached[ev.index] = ev.cached_tokens
                pending[ev.index] += ev.logprobs or []
                if not ev.text and ev.finish_reason is None:
                    continue
                finish = ev.finish_reason.value if ev.finish_reason is not None else None
                payload = piece(ev, pending[ev.index], finish)
                if payload is None:  # held back (a forced tool call until whole): its logprobs wait too
                    continue
                pending[ev.index] = []
                yield payload
            if usage_chunk is not None:
                yield usage_chunk(_usage(gen, sum(completion), sum(cached)))
            yield "[DONE]"
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("stream %s failed", gen.request_id)
            yield _error_payload(f"{type(exc).__name__}: {exc}")


def _usage(gen: GenerationRequest, completion_tokens: int, cached_tokens: int = 0) -> Usage:
    prompt = len(gen.prompt_ids)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion_tokens, total_tokens=prompt + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
    )  # fmt: skip


def request_times(arrival: float, finals: list[TokenEvent]) -> RequestTimes:
    """A request's metrics from its final events' engine timings (its choices', or an embeddings
    request's inputs'; the naive engine's carry none); TTFT and end-to-end from its arrival."""
    timings = [e.timings for e in finals if e.timings is not None]
    firsts = [t.first_token for t in timings if t.first_token is not None]
    admitted = [t.admitted for t in timings if t.admitted is not None]
    finished = [t.finished for t in timings if t.finished is not None]
    return RequestTimes(
        engine_s=sum(t.engine_s for t in timings),
        queue_s=min(admitted) - timings[0].submitted if admitted else None,
        ttft_s=min(firsts) - arrival if firsts else None,
        e2e_s=max(finished) - arrival if finished else None,
        token_gaps=[g for t in timings for g in t.token_gaps],
    )


def _outcome(finals: list[TokenEvent]) -> str:
    reasons = {e.finish_reason for e in finals}
    if FinishReason.ERROR in reasons:
        return "error"
    if FinishReason.ABORT in reasons:
        return "cancelled"
    return "length" if FinishReason.LENGTH in reasons else "stop"


def _error_payload(message: str, param: str | None = None) -> str:
    if param is not None:  # the request's own fault, found after the first byte
        info = ErrorInfo(message=message, type="invalid_request_error", param=param, code="invalid_value")
    else:
        info = ErrorInfo(message=message, type="server_error", code="internal_error")
    return json.dumps({"error": info.model_dump()})
