"""The naive baseline engine: one request at a time through transformers' generate() + peft.

It exists to be measured against (`mygpt serve --engine naive`, `docs/benchmarks.md`): the same API,
sampling and stop handling, but no batching, the HF dynamic cache and peft's set_adapter per request.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from typing import Any

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mygpt.engine.detokenizer import HeldLogprobs, IncrementalDetokenizer, StopStringMatcher
from mygpt.engine.engine import EngineThread
from mygpt.engine.guided import Guide, mask_logits
from mygpt.engine.sampling import score_tokens, token_logprobs
from mygpt.engine.types import (
    AdapterRef,
    EngineOverloaded,
    FinishReason,
    GenerationRequest,
    TokenEvent,
)

log = logging.getLogger(__name__)


class NaiveEngine(EngineThread):
    """Same contract as Engine (submit, abort, alive, stalled), generate() underneath."""

    def __init__(
        self, model: Any, tokenizer: Any, eos_token_ids, max_len: int, adapters: bool = False, max_waiting=256
    ):
        self.model = model  # a PeftModel when adapters are given
        self.tokenizer = tokenizer
        self.eos_token_ids = list(eos_token_ids)
        self.max_len = max_len
        self.adapters = adapters  # serve adapters (peft's load_adapter + set_adapter per request)
        self.max_waiting = max_waiting
        self._queue: queue.Queue = queue.Queue()
        self._aborted: set[str] = set()
        self._loaded: set[str] = set()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._busy_since: float | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="mygpt-naive-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._queue.put(None)
        if self._thread:
            self._thread.join(timeout)

    @property
    def num_waiting(self) -> int:
        return self._queue.qsize()

    def submit(self, request: GenerationRequest, on_event) -> None:
        if self._queue.qsize() >= self.max_waiting:
            raise EngineOverloaded()
        self._queue.put((request, on_event))

    def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)

    def _loop(self) -> None:
        while not self._stopping:
            item = self._queue.get()
            if item is None:
                continue
            request, on_event = item
            self._busy_since = time.monotonic()
            index = 0
            try:
                for index in range(request.params.n):
                    self._generate(request, index, on_event)
            except Exception as exc:
                log.exception("naive generation failed")
                for rest in range(index, request.params.n):  # the failed choice and those not begun:
                    # every choice gets its final event (the request's accounting waits for all of them)
                    on_event(_final(request, rest, FinishReason.ERROR, error=f"{type(exc).__name__}: {exc}"))
            finally:
                self._busy_since = None
                self._aborted.discard(request.request_id)

    def _generate(self, request: GenerationRequest, index: int, on_event) -> None:
        p = request.params
        if request.request_id in self._aborted:
            on_event(_final(request, index, FinishReason.ABORT))
            return
        self._select_adapter(request.adapter)
        if request.embed is not None:
            self._embed(request, on_event)
            return
        detok = IncrementalDetokenizer(self.tokenizer, request.prompt_ids)
        stops = StopStringMatcher(p.stop)
        held = HeldLogprobs()  # logprobs sent with their tokens' text
        guide = None if p.grammar is None else p.grammar.start(request.prompt_ids)
        ends = sorted(p.end_ids(self.eos_token_ids))  # EOS unless ignore_eos, and stop_token_ids
        state: dict = {"n": 0, "done": None, "logprobs": None}
        ids = torch.tensor([request.prompt_ids], device=self.model.device)
        prompt_lps = None
        if p.prompt_logprobs is not None:  # one forward over the prompt (generate() gives no prompt logits)
            with torch.inference_mode():
                logits = self.model(input_ids=ids).logits[0]
            prompt_lps = score_tokens(logits, request.prompt_ids[1:], p.prompt_logprobs)

        def on_token(token: int) -> None:
            if state["done"] is not None:  # generate() checks its stopping criteria before the streamer
                return  # sees the token: one token more comes after our finish
            state["n"] += 1
            finish, error, piece, stopped = None, None, "", False
            if token in ends and (guide is None or guide.accepting):
                text, finish = stops.flush(), FinishReason.STOP
            elif guide is not None and not guide.advance(token):
                error = f"The response_format schema could not be followed: {guide.error}"
                text, finish = "", FinishReason.ERROR
            else:
                piece = detok.push(token)  # no stop string before min_tokens (vLLM's rule)
                text, stopped = stops.push(piece) if state["n"] >= p.min_tokens else (piece, False)
                if stopped:
                    finish = FinishReason.STOP
                elif (complete := guide is not None and guide.done) or state["n"] >= p.max_tokens:
                    rest = detok.flush()
                    piece += rest
                    tail, stopped = stops.push(rest)
                    text += tail + ("" if stopped else stops.flush())
                    finish = FinishReason.STOP if stopped or complete else FinishReason.LENGTH
            state["done"] = finish
            prompt = len(request.prompt_ids)
            first = prompt_lps if state["n"] == 1 else None
            logprob = token_logprobs(state["logprobs"], [token], p.top_logprobs)[0] if p.logprobs else None
            logprobs = held.push(logprob, piece, text, finish is not None, stopped) or None
            on_event(
                TokenEvent(
                    request.request_id, index, [token], text, finish, prompt, state["n"], logprobs=logprobs,
                    error=error, prompt_logprobs=first, error_param="response_format" if error else None,
                )
            )  # fmt: skip

        class Streamer:
            first = True

            def put(self, value):
                if self.first:  # generate() first puts the prompt
                    self.first = False
                    return
                on_token(int(value.reshape(-1)[0]))

            def end(self):
                pass

        aborted = self._aborted
        rid = request.request_id

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.tensor([state["done"] is not None or rid in aborted], device=input_ids.device)

        if p.seed is not None:  # generate() samples from the global generator; this thread is its only user
            torch.manual_seed((p.seed + index) % 2**64)
        sampling = not p.greedy
        # in the engine's order: logprobs of the raw logits, bias, grammar mask, then temperature and
        # top_p (generate() would put its own warpers before ours, so it gets 1.0 and no top_k)
        processors = [_Record(state)] if p.logprobs else []
        processors += [_Bias(p.logit_bias)] if p.logit_bias else []
        if p.repetition_penalty != 1.0:  # over the prompt and the output, as the engine's
            processors.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
        if p.presence_penalty or p.frequency_penalty:  # over the output, as the engine's
            processors.append(_Penalties(ids.shape[1], p.presence_penalty, p.frequency_penalty))
        if p.min_tokens and ends and guide is None:
            processors.append(
                MinNewTokensLengthLogitsProcessor(ids.shape[1], p.min_tokens, ends, device=str(ids.device))
            )
        processors += [_Guided(guide, self.eos_token_ids)] if guide else []
        if sampling and p.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(max(p.temperature, 1e-5)))
        if sampling and p.top_k > 0:  # then min_p, then top_p, as the engine's
            processors.append(TopKLogitsWarper(p.top_k))
        if sampling and p.min_p > 0.0:
            processors.append(MinPLogitsWarper(p.min_p))
        if sampling and p.top_p < 1.0:
            processors.append(TopPLogitsWarper(max(p.top_p, 1e-8)))  # top_p 0: the most likely token
        with torch.inference_mode():
            self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=p.max_tokens,
                do_sample=sampling,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                eos_token_id=ends or None,
                pad_token_id=self.tokenizer.pad_token_id or 0,
                streamer=Streamer(),
                stopping_criteria=StoppingCriteriaList([Stop()]),
                logits_processor=LogitsProcessorList(processors),
            )
        if state["done"] is None:
            on_event(_final(request, index, FinishReason.ABORT if rid in aborted else FinishReason.LENGTH))

    def _embed(self, request: GenerationRequest, on_event) -> None:
        """An embedding: the decoder's last_hidden_state (after its final norm), pooled, normalized."""
        from peft import PeftModel

        model = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        ids = torch.tensor([request.prompt_ids], device=model.device)
        with torch.inference_mode():
            hidden = model.model(input_ids=ids).last_hidden_state[0].float()
        pooled = hidden.mean(0) if request.embed == "mean" else hidden[-1]
        event = _final(request, 0, FinishReason.STOP)
        event.embedding = torch.nn.functional.normalize(pooled, dim=0).tolist()
        on_event(event)

    def _select_adapter(self, ref: AdapterRef | None) -> None:
        if not self.adapters:
            if ref is not None:
                raise ValueError("no adapters on this server")
            return
        from peft import PeftModel

        if ref is None:
            self._base_mode(True)
            return
        name = "a" + hashlib.sha1(ref.key.encode()).hexdigest()[:16]  # peft names cannot hold "." or "/"
        path = ref.weights.path
        if not isinstance(self.model, PeftModel):
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
            self._loaded.add(name)
        elif name not in self._loaded:
            self.model.load_adapter(path, adapter_name=name)
            self._loaded.add(name)
        self._base_mode(False)
        self.model.set_adapter(name)

    def _base_mode(self, base: bool) -> None:
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            if base:
                self.model.base_model.disable_adapter_layers()
            else:
                self.model.base_model.enable_adapter_layers()


class _Bias(LogitsProcessor):
    def __init__(self, bias: dict[int, float]):
        self.ids = torch.tensor(list(bias))
        self.values = torch.tensor(list(bias.values()))

    def __call__(self, input_ids, scores):
        scores[:, self.ids.to(scores.device)] += self.values.to(scores.device, scores.dtype)
        return scores


class _Penalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties over the generated tokens (transformers has neither)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        counts = torch.zeros_like(scores).scatter_add_(
            1,
            input_ids[:, self.prompt_len :],
            torch.ones_like(input_ids[:, self.prompt_len :], dtype=scores.dtype),
        )
        return scores - self.presence * (counts > 0) - self.frequency * counts


class _Record(LogitsProcessor):
    """Keeps the step's log-softmax of the raw logits, for the sampled token's logprob."""

    def __init__(self, state: dict):
        self.state = state

    def __call__(self, input_ids, scores):
        self.state["logprobs"] = torch.log_softmax(scores[:1].float(), dim=-1)  # [1, V]
        return scores


class _Guided(LogitsProcessor):
    """Structured output: only the tokens the grammar allows next (on_token advances the guide)."""

    def __init__(self, guide: Guide, eos: list[int]):
        self.guide, self.eos = guide, eos

    def __call__(self, input_ids, scores):
        mask = self.guide.allowed(self.eos)
        return scores if mask is None else mask_logits(scores, {0: mask})


def _final(
    request: GenerationRequest, index: int, reason: FinishReason, error: str | None = None
) -> TokenEvent:
    return TokenEvent(request.request_id, index, [], "", reason, len(request.prompt_ids), 0, error=error)
