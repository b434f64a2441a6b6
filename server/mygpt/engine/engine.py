"""Engine: one thread owns the model and runs continuous batching over a ModelRunner.

Contract: `submit(request, on_event)` and `abort(request_id)` are thread-safe and never block on the
model; `on_event` is called from the engine thread with each TokenEvent (it must not block). A
request with n choices becomes n rows that share one prefill. Each step: admit waiting requests into
free slots, prefill up to `max_num_batched_tokens` prompt tokens (long prompts in chunks, so running
streams are not stalled for long), then decode one token for every running row in one forward.
"""

from __future__ import annotations

import collections
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from mygpt.engine.detokenizer import HeldLogprobs, IncrementalDetokenizer, StopStringMatcher
from mygpt.engine.guided import Guide
from mygpt.engine.prefix import Key, Match, SlotPrefixes
from mygpt.engine.runner import DecodeRow, ModelRunner, PrefillChunk
from mygpt.engine.sampling import RowSampler, device_index, sample, score_tokens
from mygpt.engine.types import (
    SHUTTING_DOWN,
    AdapterRef,
    EngineNotRunning,
    EngineOverloaded,
    FinishReason,
    GenerationRequest,
    Timings,
    TokenEvent,
    TokenLogprob,
)
from mygpt.lora.cache import AdapterCache

log = logging.getLogger(__name__)
RETIRED_KEYS_KEPT = 4096
EventCallback = Callable[[TokenEvent], None]


@dataclass
class Row:
    """One choice of one request, holding one KV-cache slot."""

    request: GenerationRequest
    index: int  # choice index
    slot: int  # KV cache slot
    sampler: RowSampler
    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    held: HeldLogprobs = field(default_factory=HeldLogprobs)  # logprobs sent with their tokens' text
    timings: Timings = None  # type: ignore[assignment]  # set by _new_row
    lora_slot: int = -1  # adapter slot, -1 = the base model
    guide: Guide | None = None  # structured output: where the row is in its grammar
    prompt_logprobs: list[TokenLogprob] | None = None  # sent with the row's first event
    num_cached: int = 0  # positions written to the slot's KV cache
    cached_tokens: int = 0  # prompt positions found in the prefix cache, not computed
    next_token: int | None = None  # sampled, not yet fed to the model
    finished: bool = False  # slot freed
    finish_reason: FinishReason | None = None  # set once the final event was sent

    @property
    def output_ids(self) -> list[int]:
        return self.sampler.output_ids


@dataclass
class Group:
    """A request being prefilled: its rows share one prompt; row 0 prefills, the others copy."""

    request: GenerationRequest
    on_event: EventCallback
    rows: list[Row]
    num_prefilled: int = 0  # prompt tokens written to rows[0]'s slot
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # so far, if asked
    pooled: torch.Tensor | None = None  # an embedding's hidden states so far (summed, or the last)


@dataclass
class _Ahead:
    """A decode step launched before the host read the tokens it feeds (Engine overlap): its rows by
    (slot, position, adapter slot, token), and their logits, on the device."""

    rows: dict[tuple[int, int, int, int], int]
    logits: torch.Tensor

    def logits_for(self, decode: list[Row]) -> torch.Tensor | None:
        """The logits of these rows, where each was launched ahead with the token it now feeds; None
        if one was not (the step runs as usual)."""
        index = []
        for r in decode:
            i = self.rows.get((r.slot, r.num_cached, r.lora_slot, r.next_token))
            if i is None:
                return None
            index.append(i)
        if index == list(range(len(self.rows))):
            return self.logits
        return self.logits.index_select(0, device_index(index, self.logits.device))


class FairQueue:
    """Waiting requests: FIFO within a group (GenerationRequest.group), round-robin across groups, so
    that one group's backlog does not hold every other group's requests behind it."""

    def __init__(self) -> None:
        self._groups: collections.OrderedDict[str | None, collections.deque] = collections.OrderedDict()

    def __len__(self) -> int:
        return sum(len(q) for q in self._groups.values())

    def __iter__(self):
        return (item for q in self._groups.values() for item in q)

    def append(self, item: tuple[GenerationRequest, EventCallback]) -> None:
        self._groups.setdefault(item[0].group, collections.deque()).append(item)

    def head(self) -> tuple[GenerationRequest, EventCallback]:
        """The next request to admit: the oldest of the group whose turn it is."""
        return next(iter(self._groups.values()))[0]

    def popleft(self) -> tuple[GenerationRequest, EventCallback]:
        group, waiting = next(iter(self._groups.items()))
        item = waiting.popleft()
        if waiting:
            self._groups.move_to_end(group)  # its next request waits for the other groups' turns
        else:
            del self._groups[group]
        return item

    def pop_first(
        self, wanted: Callable[[GenerationRequest], bool]
    ) -> tuple[GenerationRequest, EventCallback] | None:
        """The first wanted request in the groups' turn order (each group's oldest wanted one); its
        group's turn is then over, as with popleft."""
        for group, waiting in self._groups.items():
            item = next((it for it in waiting if wanted(it[0])), None)
            if item is not None:
                waiting.remove(item)
                if waiting:
                    self._groups.move_to_end(group)
                else:
                    del self._groups[group]
                return item
        return None

    def remove(self, request_id: str) -> tuple[GenerationRequest, EventCallback] | None:
        for group, waiting in self._groups.items():
            for item in waiting:
                if item[0].request_id == request_id:
                    waiting.remove(item)
                    if not waiting:
                        del self._groups[group]
                    return item
        return None

    def clear(self) -> None:
        self._groups.clear()


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    steps: int = 0
    prompt_tokens: int = 0  # computed (cached ones not)
    cached_tokens: int = 0  # prompt tokens found in the prefix cache
    generation_tokens: int = 0
    errors: int = 0
    # where the engine thread's time goes, in seconds over all steps: the forward call (on a GPU only
    # its launch, the device runs on), sampling (on a GPU it waits there for the device to finish the
    # step), and the whole step (the rest: admission, planning, detokenizing, events). With overlap,
    # sampling includes the launch of the next step, and a step whose logits came ahead forwards nothing
    forward_s: float = 0.0
    sample_s: float = 0.0
    step_s: float = 0.0
    # overlap: decode steps launched before the host read their tokens, and those whose logits served
    ahead_launched: int = 0
    ahead_used: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class EngineThread:
    """Health of an engine's own thread, for /ready: alive, and not stuck in one step."""

    _thread: threading.Thread | None = None
    _stopping: bool = False
    _busy_since: float | None = None  # set while a step runs

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def stalled(self, timeout_s: float) -> bool:
        """True when one step has been running for longer than timeout_s."""
        busy = self._busy_since
        return busy is not None and time.monotonic() - busy > timeout_s


class Engine(EngineThread):
    """Continuous-batching generation engine around a ModelRunner, in its own thread."""

    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Any,
        eos_token_ids: Iterable[int],
        max_num_batched_tokens: int = 512,
        max_waiting: int = 256,
        adapters: AdapterCache | None = None,
        metrics: Any = None,
        overlap: bool = False,
        prefix_caching: bool = True,
        embed_chunk: int | None = None,
        embed_share: float = 0.5,
    ):
        self.runner = runner
        # overlap: with the runner's static decoder, a decode-only step launches the next one from the
        # sampled tokens while they are still on the device, then reads them; the host's work on a step
        # (events, detokenizing, scheduling, the next launch) runs while the device computes the next
        self.overlap = overlap
        self._ahead: _Ahead | None = None
        self.metrics = metrics  # mygpt.metrics.Metrics (record_step), or None
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_len = runner.max_len
        self.max_num_batched_tokens = max_num_batched_tokens
        # embeddings' prompt chunk, and their tokens a step at most while rows decode (_plan_prefill)
        # (at most a step's budget: a chunk larger than that would never be planned)
        self.embed_chunk = min(embed_chunk or max(16, max_num_batched_tokens // 4), max_num_batched_tokens)
        # while rows decode, the steps that carry embedding chunks take at most this share of the
        # engine's time: a bulk job at most doubles the streams' mean inter-token time at 0.5 (_charge)
        if not 0 < embed_share <= 1:
            raise ValueError(f"embed_share must be in (0, 1], got {embed_share}")
        self.embed_share = embed_share
        self._embed_credit = 0.0  # seconds: below 0, embeddings wait while rows decode
        # the step's time not yet split among its rows: since when, its tokens, rows, chunks, split once
        self._attribution: tuple[float, int, list[Row], list[tuple[Group, PrefillChunk]], bool] | None = None
        self.max_waiting = max_waiting
        self.adapters = adapters
        self.stats = EngineStats()
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._lock = threading.Lock()
        self._num_waiting = 0  # submitted, not yet admitted (guarded by _lock)
        self._waiting = FairQueue()
        self._prefilling: list[Group] = []
        self._running: list[Row] = []
        self._callbacks: dict[str, EventCallback] = {}
        self._open_choices: dict[str, int] = {}  # request id -> choices without a final event
        self._submitted: dict[str, float] = {}  # request id -> when it was submitted
        self._free_slots = list(range(runner.num_slots))
        # what the free slots' KV rows hold: a prompt that starts with it prefills only the rest
        self.prefixes = SlotPrefixes(prefix_caching, chunk=max_num_batched_tokens)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._busy_since: float | None = None  # set while a step runs
        # adapter versions that are no longer routable. A key is never reused (registry), so a request
        # that arrives with one read its weights just before the unload: it runs, and the version leaves
        # its slot when the request ends. The newest RETIRED_KEYS_KEPT are kept (the race lasts ms).
        self._retired_keys: collections.OrderedDict[str, None] = collections.OrderedDict()

    # ------------------------------------------------------------------ thread-safe API
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="mygpt-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: GenerationRequest, on_event: EventCallback) -> None:
        """Queues a request; raises EngineOverloaded when the waiting queue is full."""
        if not self.alive:
            raise EngineNotRunning("the engine is not running")
        if len(request.prompt_ids) + request.params.max_tokens > self.max_len:
            raise ValueError("prompt plus max_tokens exceeds the engine's context")
        if request.embed is not None and (request.params.n != 1 or request.params.max_tokens != 0):
            raise ValueError("an embedding request has n=1 and max_tokens=0")
        if request.params.n > self.runner.num_slots:
            raise ValueError(f"n={request.params.n} exceeds the batch size {self.runner.num_slots}")
        with self._lock:
            if self._num_waiting >= self.max_waiting:
                raise EngineOverloaded(retry_after_s=1.0)
            self._num_waiting += 1
        self._inbox.put(("submit", (request, on_event, time.monotonic())))
        self._wakeup.set()

    def abort(self, request_id: str) -> None:
        """Cancels a request; its rows leave the batch before the next step."""
        self._inbox.put(("abort", request_id))
        self._wakeup.set()

    def pin_adapter(self, ref: AdapterRef, done: Callable[[Exception | None], None]) -> None:
        """Makes an adapter resident for good (never evicted); `done` is called from the engine thread."""
        self._inbox.put(("pin", (ref, done)))
        self._wakeup.set()

    def retire_adapter(self, key: str) -> None:
        """An adapter version is no longer routable: its slot is freed once its requests have finished."""
        self._inbox.put(("retire", key))
        self._wakeup.set()

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    @property
    def num_running(self) -> int:
        return len(self._running) + sum(len(g.rows) for g in self._prefilling)

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stopping:
            self._drain_inbox()
            self._record_counts()
            if not (self._waiting or self._prefilling or self._running):
                self._wakeup.wait(timeout=0.5)
                self._wakeup.clear()
                continue
            self._busy_since = time.monotonic()
            try:
                self.step()
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # a failed step fails its rows, never the engine (a panic in
                # native code, llguidance's say, arrives as a BaseException)
                log.exception("engine step failed")
                self.stats.errors += 1
                self._fail_all(f"engine error: {type(exc).__name__}: {exc}")
            finally:
                self._busy_since = None
        self._drain_inbox()  # requests submitted during the last step get their final event too
        self._fail_all(SHUTTING_DOWN)

    def _record_counts(self) -> None:
        """The running and waiting counts where something outside a step changed them (an abort, new
        requests while idle): the gauges would otherwise keep the last step's until the next one."""
        running, waiting = self.num_running, self._num_waiting
        if (running, waiting) != (self.stats.running, self.stats.waiting):
            self.stats.running, self.stats.waiting = running, waiting
            if self.metrics is not None:
                self.metrics.record_step(running, waiting, 0, 0, 0.0)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                request, on_event, submitted = payload
                self._submitted[request.request_id] = submitted
                self._callbacks[request.request_id] = on_event
                self._open_choices[request.request_id] = request.params.n
                self._waiting.append((request, on_event))
            elif kind == "abort":
                self._abort(payload)
            elif kind == "pin":
                self._pin(*payload)
            elif kind == "retire" and self.adapters is not None:
                self.adapters.retire(payload)
                self._retired_keys[payload] = None
                while len(self._retired_keys) > RETIRED_KEYS_KEPT:
                    self._retired_keys.popitem(last=False)

    def _pin(self, ref: AdapterRef, done: Callable[[Exception | None], None]) -> None:
        error: Exception | None = None
        if self.adapters is None:
            error = RuntimeError("this server has no adapter slots (max_loras=0)")
        elif ref.key in self._retired_keys:  # replaced or unloaded meanwhile: pinned, it would never go
            error = RuntimeError(f"adapter version {ref.key} was replaced or unloaded; load it again")
        elif not self.adapters.can_pin(ref.key):
            n = self.adapters.num_slots
            error = RuntimeError(
                f"at most {n - 1} of the {n} adapter slots (--max-loras) can be pinned: one stays for the "
                "adapters that are not pinned, or requests for them would wait forever"
            )
        elif not self.adapters.can_acquire(ref.key):
            error = RuntimeError("every adapter slot is in use or pinned")
        else:
            try:
                self.adapters.pin(ref.key, ref.weights)
            except Exception as exc:
                error = exc
        try:
            done(error)
        except Exception:
            log.debug("pin callback failed", exc_info=True)

    def step(self) -> None:
        """One engine step: 1. admit, 2. plan prefill chunks within the token budget, 3. one forward
        for every running row and every chunk, 4. sample and emit."""
        t0 = time.monotonic()
        self._admit()
        # rows grouped by adapter slot: the LoRA layers then need no gather or scatter
        decode = sorted((r for r in self._running if r.next_token is not None), key=lambda r: r.lora_slot)
        budget = max(self.max_num_batched_tokens - len(decode), 16)
        chunks = self._plan_prefill(
            budget, decoding=bool(decode), embed=not decode or self._embed_credit >= 0
        )
        tokens = len(decode) + sum(len(c.token_ids) for _, c in chunks)
        ahead, self._ahead = self._ahead, None
        if decode or chunks:
            t_forward = time.monotonic()
            decode_logits = ahead.logits_for(decode) if ahead is not None and decode and not chunks else None
            if decode_logits is not None:  # launched during the last step's sampling
                chunk_logits = []
                self.stats.ahead_used += 1
            else:
                # a seeded request's rows must not depend on the batch (B5): the LoRA products then take
                # their batch-invariant layout (lora/layers.py), which costs a little
                seeded = any(r.request.params.seed is not None for r in decode) or any(
                    g.request.params.seed is not None for g, _ in chunks
                )
                decode_logits, chunk_logits = self.runner.step(
                    [DecodeRow(r.slot, r.next_token, r.num_cached, r.lora_slot) for r in decode],
                    [chunk for _, chunk in chunks],
                    invariant=seeded,
                )
            self.stats.forward_s += time.monotonic() - t_forward
            # cost attribution: the step's time split by the tokens each row computed (_attribute)
            self._attribution = (t0, tokens, decode, chunks, False)
            for r in decode:
                r.num_cached += 1
                r.next_token = None
            self._emit_sampled(decode, decode_logits, launch_ahead=self.overlap and not chunks)
            for (group, chunk), logits in zip(chunks, chunk_logits, strict=True):
                self._prefilled(group, chunk, logits)
            self._attribute(end=True)  # the rest: a finished row's usage went out with its last event
            self._running = [r for r in self._running if not r.finished]
        self.stats.steps += 1
        self.stats.step_s += time.monotonic() - t0
        self._charge(time.monotonic() - t0, bool(decode), any(c.pool is not None for _, c in chunks))
        self.stats.running = self.num_running
        self.stats.waiting = self._num_waiting
        if self.metrics is not None:
            rows = len(decode) + sum(len(g.rows) for g, _ in chunks)
            self.metrics.record_step(
                self.stats.running, self.stats.waiting, rows, tokens, time.monotonic() - t0
            )

    def _admit(self) -> None:
        while (item := self._next_waiting()) is not None:
            request, on_event = item
            with self._lock:
                self._num_waiting -= 1
            lora_slot = -1
            ref = request.adapter
            if ref is not None:
                if self.adapters is None:
                    self._end_request(
                        request, FinishReason.ERROR, "this server has no adapter slots (max_loras=0)"
                    )
                    continue
                try:
                    lora_slot = self.adapters.acquire(ref.key, ref.weights)
                except Exception as exc:  # a bad adapter fails its own request only
                    self._end_request(
                        request, FinishReason.ERROR, f"adapter '{ref.key}' failed to load: {exc}"
                    )
                    continue
                for _ in range(request.params.n - 1):
                    self.adapters.acquire(ref.key, ref.weights)  # one pin per row
                if ref.key in self._retired_keys:  # unloaded before this request was admitted
                    self.adapters.retire(ref.key)  # it leaves the slot when its last row ends
            match = self._cached_prefix(request)
            keep = match.slot if match is not None and match.free else None
            slots = self.prefixes.take(self._free_slots, request.params.n, keep)
            try:
                rows = [self._new_row(request, i, slot, lora_slot) for i, slot in enumerate(slots)]
                cached = 0
                if match is not None:
                    if not match.free:  # a running row's slot holds it: copied, not computed
                        self.runner.copy_slot(match.slot, slots[0], match.length)
                    cached = match.length
            except Exception as exc:  # its slots and adapter pins go back: nothing may leak (a stall)
                log.exception("request %s could not start", request.request_id)
                self._free_slots.extend(slots)
                for _ in range(request.params.n if ref is not None else 0):
                    self.adapters.release(ref.key)
                self._end_request(request, FinishReason.ERROR, f"the request could not start: {exc}")
                continue
            rows[0].cached_tokens = cached  # the prompt's: reported once, on choice 0's events
            self.stats.cached_tokens += cached
            if self.metrics is not None and self._uses_cache(request):
                self.metrics.record_prefix_cache(len(request.prompt_ids), cached)
            self._prefilling.append(Group(request, on_event, rows, num_prefilled=cached))

    def _uses_cache(self, request: GenerationRequest) -> bool:
        params = request.params
        return (
            self.prefixes.enabled
            and params.prompt_logprobs is None
            and params.seed is None
            and request.embed is None  # a mean needs every position's hidden state
        )

    @staticmethod
    def _cache_key(request: GenerationRequest) -> Key:
        return request.group, None if request.adapter is None else request.adapter.key

    def _cached_prefix(self, request: GenerationRequest) -> Match | None:
        """The longest prefix of the request's prompt cached in a free slot or a running row's slot
        (same adapter version, same group); None without one, when every prompt position's logits are
        asked for (prompt_logprobs), or for a request with a seed (B5: its output must not depend on
        what the cache held, see prefix.py)."""
        if not self._uses_cache(request):
            return None
        key = self._cache_key(request)
        running = [  # prompt positions only (generated ones were computed apart, see prefix.py): a
            # running row holds its whole prompt
            (r.slot, r.request.prompt_ids)
            for r in self._running
            if not r.finished and self._cache_key(r.request) == key
        ]
        running += [  # (not an embedding's: it is cut in other chunks, and its slot is left empty)
            (g.rows[0].slot, g.request.prompt_ids[: g.num_prefilled])
            for g in self._prefilling
            if g.num_prefilled and g.request.embed is None and self._cache_key(g.request) == key
        ]
        return self.prefixes.match(key, request.prompt_ids, self._free_slots, running)

    def _next_waiting(self) -> tuple[GenerationRequest, EventCallback] | None:
        """Takes the next request to admit off the queue: the head, once there are batch slots for
        its choices and (if it needs one) an adapter slot; None: wait. While the head waits for an
        adapter slot (every one in use), the first base-model request behind it goes first: it needs
        none, and so never delays the head (requests for resident adapters wait behind it, or they
        could keep every adapter slot in use for good)."""
        if not self._waiting:
            return None
        head = self._waiting.head()[0]
        if len(self._free_slots) < head.params.n:
            return None  # nothing passes it: it would wait for good behind smaller requests
        ref = head.adapter
        if ref is None or self.adapters is None or self.adapters.can_acquire(ref.key):
            return self._waiting.popleft()
        return self._waiting.pop_first(lambda r: r.adapter is None and len(self._free_slots) >= r.params.n)

    def _new_row(self, request: GenerationRequest, index: int, slot: int, lora_slot: int) -> Row:
        seed = None if request.params.seed is None else request.params.seed + index
        submitted = self._submitted.get(request.request_id, time.monotonic())
        return Row(
            timings=Timings(submitted, admitted=time.monotonic()),
            request=request,
            index=index,
            slot=slot,
            lora_slot=lora_slot,
            sampler=RowSampler(
                request.params,
                seed,
                prompt_ids=request.prompt_ids,
                end_ids=request.params.end_ids(self.eos_token_ids),
            ),
            detok=IncrementalDetokenizer(self.tokenizer, request.prompt_ids),
            stops=StopStringMatcher(request.params.stop),
            guide=None
            if request.params.grammar is None
            else request.params.grammar.start(request.prompt_ids),
        )

    def _attribute(self, end: bool = False) -> None:
        """Splits the step's time (self._attribution: since when, its tokens, its decode rows and prompt
        chunks, whether split once already) among its rows by the tokens each computed (a chunk's share
        to the row that prefills): the usage and cost of the tokens come from it. First at the step's
        first read from the device (a sampling, or an embedding's vector), which waits for the forward,
        before any event goes out with a row's usage; then, at the step's end (end), the rest (the
        events, the other samplings) to the rows that go on."""
        if self._attribution is None:
            return
        since, tokens, decode, chunks, split = self._attribution
        if split and not end:
            return
        now = time.monotonic()
        per_token = (now - since) / tokens
        for r in decode:
            if not (end and r.finished):
                r.timings.engine_s += per_token
        for group, chunk in chunks:
            if not (end and group.rows[0].finished):
                group.rows[0].timings.engine_s += per_token * len(chunk.token_ids)
        self._attribution = None if end else (now, tokens, decode, chunks, True)

    def _charge(self, seconds: float, decoding: bool, embedded: bool) -> None:
        """Embeddings' share of the engine's time while rows decode (embed_share): each such step earns
        share x its time, a step that carried embedding chunks spends all of its time, and embeddings
        wait while the balance is below 0. On a GPU a step with an embedding chunk runs eagerly (the
        graphs give logits only): it costs about the same whatever its embedding tokens, several decode
        steps' time, so a cap on tokens alone let every step be one (H100, session 15: 8 streams' p50
        14 ms alone, 205 ms beside a bulk job). Idle or without rows decoding, nothing is owed."""
        if not decoding:
            self._embed_credit = 0.0
            return
        credit = self._embed_credit + seconds * self.embed_share - (seconds if embedded else 0.0)
        self._embed_credit = min(credit, 0.0)  # none saved up: decode-only time buys no later burst

    def _plan_prefill(
        self, budget: int, decoding: bool = False, embed: bool = True
    ) -> list[tuple[Group, PrefillChunk]]:
        """The next prompt chunks, oldest request first, at most `budget` tokens in all.

        A prompt is cut only at multiples of max_num_batched_tokens from its first position (also after
        a cached prefix), never to fit what other requests left of the budget: its chunks, and so its
        numerics, do not depend on the batch or the prefix cache (B5: same seed, same output alone or in
        a busy batch). A chunk that does not fit waits a step.

        Embeddings are bulk work beside interactive streams: their prompts are cut at multiples of
        embed_chunk, and while rows are decoding a step takes at most embed_chunk of their tokens (the
        streams' next token waits for the whole step); generation prompts go first, embeddings take
        what they leave of the budget, and none while they are over their share of the time (embed
        False: _charge).
        """
        chunks = []
        embed_budget = (self.embed_chunk if decoding else budget) if embed else 0
        for group in sorted(self._prefilling, key=lambda g: g.request.embed is not None):  # (stable)
            embed = group.request.embed is not None
            size = self.embed_chunk if embed else self.max_num_batched_tokens
            prompt, start = group.request.prompt_ids, group.num_prefilled
            ids = prompt[start : (start // size + 1) * size]
            if embed and len(ids) > embed_budget:
                continue
            if len(ids) > budget and chunks:
                break
            all_logits = group.request.params.prompt_logprobs is not None
            pool = {"mean": "sum", "last": "last", None: None}[group.request.embed]
            row = group.rows[0]
            chunks.append((group, PrefillChunk(row.slot, ids, start, row.lora_slot, all_logits, pool)))
            budget -= len(ids)
            embed_budget -= len(ids) if embed else 0
        return chunks

    def _prefilled(self, group: Group, chunk: PrefillChunk, logits: torch.Tensor) -> None:
        """A chunk's logits [1 or c, V] arrived: the prompt logprobs it gives, if asked; once the
        whole prompt is in, the first token of every choice (an embedding's chunk: its pooled hidden
        states, and once the whole prompt is in, its vector)."""
        n, prompt = len(chunk.token_ids), group.request.prompt_ids
        if chunk.pool is not None:
            keep = group.pooled is not None and chunk.pool == "sum"
            group.pooled = group.pooled + logits if keep else logits
        if chunk.all_logits:  # position p's logits score prompt token p + 1
            k = group.request.params.prompt_logprobs or 0
            group.prompt_logprobs += score_tokens(logits, prompt[chunk.start + 1 : chunk.start + n + 1], k)
        group.num_prefilled += n
        self.stats.prompt_tokens += n
        prompt_len = len(prompt)
        if group.num_prefilled < prompt_len:
            return
        self._prefilling.remove(group)
        if group.request.embed is not None:
            self._embedded(group)
            return
        for row in group.rows:
            if row is not group.rows[0]:
                self.runner.copy_slot(group.rows[0].slot, row.slot, prompt_len)
            row.num_cached = prompt_len
            if chunk.all_logits:
                row.prompt_logprobs = group.prompt_logprobs
        self._emit_sampled(group.rows, logits[-1].expand(len(group.rows), -1))
        self._running.extend(r for r in group.rows if not r.finished)

    def _embedded(self, group: Group) -> None:
        """An embedding request's whole prompt is in: its vector, in its one (final) event."""
        row, prompt_len = group.rows[0], len(group.request.prompt_ids)
        pooled = group.pooled[0] / (prompt_len if group.request.embed == "mean" else 1)
        vector = F.normalize(pooled, dim=0).tolist()
        self._attribute()  # (its step's first read from the device, where nothing was sampled before)
        # its slot is left holding nothing for the prefix cache: embedding inputs (thousands, seen once)
        # would otherwise push out the chats' prefixes, freed before them
        row.num_cached = 0
        row.timings.first_token = row.timings.finished = time.monotonic()
        self._finish_row(row)
        row.finish_reason = FinishReason.STOP
        event = TokenEvent(
            request_id=group.request.request_id, index=0, token_ids=[], text="", finish_reason=FinishReason.STOP,
            prompt_tokens=prompt_len, timings=row.timings, embedding=vector,
        )  # fmt: skip
        self._send(group.request.request_id, event)

    def _emit_sampled(self, rows: list[Row], logits: torch.Tensor, launch_ahead: bool = False) -> None:
        if not rows:  # (a step of prompt chunks only: nothing read from the device here)
            return
        allowed = {  # (None: every token, as a reasoning model's thinking before its grammar)
            i: mask
            for i, r in enumerate(rows)
            if r.guide is not None and (mask := r.guide.allowed(self.eos_token_ids)) is not None
        }
        hook, launched = None, {}
        if launch_ahead and self.runner.decoder is not None:
            # every row that has room for one more position: those this token ends (EOS, a stop string,
            # max_tokens) are computed once too many and dropped next step (leaving them out would need an
            # index tensor before the launch, a copy that waits for the device's queue)
            cont = [i for i, r in enumerate(rows) if r.num_cached + 1 < self.max_len]
            if cont:
                hook = functools.partial(
                    self._launch_ahead, [rows[i] for i in cont], cont, len(rows), launched
                )
        t0 = time.monotonic()
        tokens, logprobs = sample(logits, [r.sampler for r in rows], allowed, before_read=hook)
        self.stats.sample_s += time.monotonic() - t0
        self._attribute()  # the step's time up to here (the first sampling waits for the device)
        if "logits" in launched:
            cont = launched["cont"]
            keys = {
                (rows[i].slot, rows[i].num_cached, rows[i].lora_slot, tokens[i]): j
                for j, i in enumerate(cont)
            }
            self._ahead = _Ahead(keys, launched["logits"])
            self.stats.ahead_launched += 1
        self.stats.generation_tokens += len(tokens)
        for row, token, lp in zip(rows, tokens, logprobs, strict=True):
            self._append(row, token, lp)

    def _launch_ahead(
        self, rows: list[Row], cont: list[int], n: int, out: dict, tokens: torch.Tensor
    ) -> None:
        """The next decode step of `rows` (the sampled rows at indices cont of n), fed the sampled
        tokens on the device; out gets its logits. A failure turns overlap off (the steps then run
        one after the other, as without it)."""
        try:
            ids = tokens if len(cont) == n else tokens.index_select(0, device_index(cont, tokens.device))
            step = [DecodeRow(r.slot, 0, r.num_cached, r.lora_slot) for r in rows]
            out["logits"], out["cont"] = self.runner.decode_ahead(step, ids), cont
        except Exception:
            log.warning("launching the next decode step ahead failed: overlap is off", exc_info=True)
            self.overlap = False

    def _append(self, row: Row, token: int, logprob: TokenLogprob | None) -> None:
        row.output_ids.append(token)
        now, t = time.monotonic(), row.timings
        if t.first_token is None:
            t.first_token = now
        else:
            t.token_gaps.append(now - t.finished)
        t.finished = now
        finish: FinishReason | None = None
        error, piece, stopped = None, "", False
        if token in row.sampler.end_ids and (row.guide is None or row.guide.accepting):
            text, finish = row.stops.flush(), FinishReason.STOP
        elif row.guide is not None and not row.guide.advance(token):  # past llguidance's limits, say
            error = f"The response_format schema could not be followed: {row.guide.error}"
            text, finish = "", FinishReason.ERROR
        else:
            piece = row.detok.push(token)
            if len(row.output_ids) < row.request.params.min_tokens:  # no stop string before (vLLM's rule)
                text, stopped = piece, False
            else:
                text, stopped = row.stops.push(piece)
            if stopped:
                finish = FinishReason.STOP
            elif (
                (complete := row.guide is not None and row.guide.done)  # the structured output is whole
                or len(row.output_ids) >= row.request.params.max_tokens
                or row.num_cached + 1 >= self.max_len
            ):
                rest = row.detok.flush()
                piece += rest
                tail, stopped = row.stops.push(rest)
                text += tail + ("" if stopped else row.stops.flush())
                finish = FinishReason.STOP if stopped or complete else FinishReason.LENGTH
            else:
                row.next_token = token
        logprobs = row.held.push(logprob, piece, text, finish is not None, stopped)
        if finish is not None:
            self._finish_row(row)
            row.finish_reason = finish
        self._send(
            row.request.request_id,
            TokenEvent(
                request_id=row.request.request_id,
                index=row.index,
                token_ids=[token],
                text=text,
                finish_reason=finish,
                prompt_tokens=len(row.request.prompt_ids),
                cached_tokens=row.cached_tokens,
                completion_tokens=len(row.output_ids),
                logprobs=logprobs or None,  # (of this token, or of earlier ones held with their text)
                prompt_logprobs=row.prompt_logprobs if len(row.output_ids) == 1 else None,
                error=error,
                error_param="response_format" if error is not None else None,
                timings=row.timings if finish is not None else None,
            ),
        )

    def _finish_row(self, row: Row) -> None:
        row.finished = True
        row.next_token = None
        if row.request.adapter is not None and self.adapters is not None:
            self.adapters.release(row.request.adapter.key)
        self._free_slots.append(row.slot)
        self.prefixes.hold(row.slot, self._cache_key(row.request), row.request.prompt_ids[: row.num_cached])

    def _send(self, request_id: str, event: TokenEvent) -> None:
        callback = self._callbacks.get(request_id)
        if event.finish_reason is not None:
            self._open_choices[request_id] -= 1
            if self._open_choices[request_id] == 0:
                del self._open_choices[request_id]
                self._callbacks.pop(request_id, None)
                self._submitted.pop(request_id, None)
        if callback is not None:
            try:
                callback(event)
            except Exception:  # a consumer that went away must not hurt the batch
                log.debug("event callback failed for %s", request_id, exc_info=True)

    def _abort(self, request_id: str) -> None:
        waiting = self._waiting.remove(request_id)
        if waiting is not None:
            with self._lock:
                self._num_waiting -= 1
            log.info("request %s aborted while waiting", request_id)
            self._end_request(waiting[0], FinishReason.ABORT, None)
            return
        rows = [r for r in self._running if r.request.request_id == request_id]
        groups = [g for g in self._prefilling if g.request.request_id == request_id]
        for g in groups:
            self._prefilling.remove(g)
            rows.extend(g.rows)
        for r in rows:
            if not r.finished:
                self._finish_row(r)
        self._running = [r for r in self._running if not r.finished]
        if rows:
            generated = sum(len(r.output_ids) for r in rows)
            log.info("request %s aborted after %d generated tokens", request_id, generated)
            self._end_request(rows[0].request, FinishReason.ABORT, None, rows)

    def _fail_all(self, message: str) -> None:
        """Ends every admitted and waiting request with an error event and frees all slots."""
        self._ahead = None
        requests: dict[str, tuple[GenerationRequest, list[Row]]] = {}
        for r in self._running + [r for g in self._prefilling for r in g.rows]:
            requests.setdefault(r.request.request_id, (r.request, []))[1].append(r)
            if not r.finished:
                self._finish_row(r)
        for request, _ in self._waiting:
            requests.setdefault(request.request_id, (request, []))
        with self._lock:
            self._num_waiting -= len(self._waiting)
        self._waiting.clear()
        self._running, self._prefilling = [], []
        self.prefixes.clear()  # a failed step may have written part of a slot's KV
        for request, rows in requests.values():
            self._end_request(request, FinishReason.ERROR, message, rows)

    def _end_request(
        self, request: GenerationRequest, reason: FinishReason, error: str | None, rows: list[Row] = ()
    ) -> None:
        """Sends the final event to every choice of `request` that has not had one."""
        done = {r.index for r in rows if r.finish_reason is not None}
        submitted = self._submitted.get(request.request_id, time.monotonic())
        for index in range(request.params.n):
            if index in done or request.request_id not in self._open_choices:
                continue
            row = next((r for r in rows if r.index == index), None)
            event = TokenEvent(
                request_id=request.request_id,
                index=index,
                token_ids=[],
                text="",
                finish_reason=reason,
                prompt_tokens=len(request.prompt_ids),
                cached_tokens=row.cached_tokens if row is not None else 0,
                completion_tokens=len(row.output_ids) if row is not None else 0,
                error=error,
                timings=row.timings if row is not None else Timings(submitted),
            )
            self._send(request.request_id, event)
