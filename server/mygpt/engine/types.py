"""Plain dataclasses that cross the engine boundary: no torch, no pydantic."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS token or a stop string
    LENGTH = "length"  # max tokens or the context was reached
    ABORT = "abort"  # cancelled by the caller (client disconnect)
    ERROR = "error"  # the engine failed this request


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int  # completion tokens at most (already clipped to the context)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # choice i uses seed + i
    stop: tuple[str, ...] = ()  # stop strings, excluded from the output
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM's and llama.cpp's extra parameters (Open WebUI, LiteLLM send them): the k most likely tokens
    # (0: all), those at least min_p x the likeliest's probability (0: all), and logits of tokens seen
    # in the prompt or output divided (positive) or multiplied (negative) by repetition_penalty (1: off)
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    # vLLM's: more token ids that end a choice as EOS does (not in the text); EOS does not end it; the
    # ending tokens (EOS and stop_token_ids) cannot be drawn before min_tokens tokens
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0  # 0..20, needs logprobs
    n: int = 1  # choices sharing one prompt (prefilled once)
    prompt_logprobs: int | None = None  # the prompt tokens' logprobs with this many alternatives
    # structured output: a compiled grammar (mygpt.engine.guided.Grammar) every choice must follow
    grammar: Any = field(default=None, compare=False, repr=False)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def end_ids(self, eos_token_ids) -> frozenset[int]:
        """The tokens that end a choice: the model's EOS (not with ignore_eos) and stop_token_ids."""
        return frozenset(self.stop_token_ids) | (frozenset() if self.ignore_eos else frozenset(eos_token_ids))


@dataclass(frozen=True)
class AdapterRef:
    """One version of an adapter: a unique key and its validated host weights (read off the engine
    thread). The engine copies the weights into a device slot when the request is admitted."""

    key: str  # "<tenant>/<name>@<version>": a new version is a new key
    weights: Any = field(repr=False, compare=False)  # mygpt.lora.weights.LoRAWeights


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: AdapterRef | None = None  # None = the base model
    # fairness group (the server passes the tenant): admitted round-robin; cached prompt prefixes are
    # shared within a group only
    group: str | None = None
    # an embedding, not a generation: the prompt's final hidden states (after the model's last norm)
    # pooled, "mean" over its positions or its "last" one, L2-normalized; nothing is sampled (params:
    # max_tokens 0). Computed from the whole prompt, never from the prefix cache: the same input gives
    # the same vector alone or in a busy batch up to float rounding (a matrix product's rows round with
    # its row count: ~1e-6 in float32)
    embed: Literal["mean", "last"] | None = None


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


@dataclass
class Timings:
    """When one choice of a request went through the engine (time.monotonic() seconds), and its share
    of engine busy time. Carried by the choice's final event."""

    submitted: float
    admitted: float | None = None  # None: it never left the waiting queue
    first_token: float | None = None
    finished: float | None = None
    token_gaps: list[float] = field(default_factory=list)  # between consecutive tokens
    engine_s: float = 0.0  # this choice's share of the steps it was in (by tokens computed)


SHUTTING_DOWN = "the server is shutting down"  # the error of requests still open when the engine stops


@dataclass
class TokenEvent:
    request_id: str
    index: int  # choice index, 0..n-1
    token_ids: list[int]  # tokens produced since the last event
    text: str  # text produced since the last event (stop strings held back and removed)
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # for this choice so far
    logprobs: list[TokenLogprob] | None = None
    # on a choice's first event, if asked: the logprob of every prompt token but the first, in order
    prompt_logprobs: list[TokenLogprob] | None = None
    error: str | None = None  # with finish_reason ERROR
    error_param: str | None = None  # the request parameter at fault (a 4xx), None: the server's fault
    timings: Timings | None = None  # on final events
    # of the prompt tokens, those read from the prefix cache, not computed (on choice 0's events: the
    # choices share one prompt)
    cached_tokens: int = 0
    embedding: list[float] | None = None  # an embedding request's vector (its one, final event)


class EngineOverloaded(Exception):
    """The waiting queue is full; the caller should retry later."""

    def __init__(self, retry_after_s: float = 1.0):
        super().__init__("the server is at capacity")
        self.retry_after_s = retry_after_s


class EngineNotRunning(Exception):
    """The engine is not accepting requests (stopped, draining or dead)."""
