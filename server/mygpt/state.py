"""ServerState: what the routes need, filled in by the background start-up."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mygpt.api.chat import ChatLimits, ChatService
from mygpt.api.embeddings import EmbeddingService
from mygpt.api.errors import APIError
from mygpt.batches import BatchRunner
from mygpt.config import Settings
from mygpt.engine.async_engine import AsyncEngine
from mygpt.engine.engine import Engine
from mygpt.engine.graphs import MAX_GRAPHS
from mygpt.engine.guided import Grammars
from mygpt.engine.loader import (
    LoadedModel,
    attention_bytes_per_position,
    fit_context,
    kv_budget,
    kv_bytes_per_position,
    load_model,
)
from mygpt.engine.naive import NaiveEngine
from mygpt.engine.runner import GRAPH_PROMPT_SPAN, ModelRunner, cache_len
from mygpt.engine.types import AdapterRef, GenerationRequest, SamplingParams
from mygpt.finetune.jobs import JobManager
from mygpt.finetune.store import OPEN_BATCHES, OPEN_JOBS, Store
from mygpt.lora.cache import AdapterCache
from mygpt.lora.layers import lora_module_shapes
from mygpt.lora.registry import AdapterRegistry
from mygpt.metrics import Background, Metrics
from mygpt.tenancy.config import load_tenancy_from
from mygpt.tenancy.tenants import Tenants

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    settings: Settings
    tenants: Tenants
    created: int = field(default_factory=lambda: int(time.time()))
    loaded: LoadedModel | None = None
    engine: Engine | NaiveEngine | None = None
    registry: AdapterRegistry | None = None
    chat: ChatService | None = None
    embeddings: EmbeddingService | None = None
    ready: bool = False  # model loaded and warm-up generation succeeded
    draining: bool = False  # shutting down: no new requests
    failure: str | None = None  # start-up failed: why
    # called once start-up has failed (the CLI's: stop the server, exit non-zero); None: stay up, /ready 503
    on_failure: Callable[[], None] | None = None
    metrics: Metrics | None = None
    finetune_store: Store | None = None
    jobs: JobManager | None = None
    batches: BatchRunner | None = None  # started in the event loop (api/batches.py runner())
    responses: Any = None  # the Responses API's stored responses, chosen once ready (api/responses.py)
    _reload_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def not_ready_reason(self) -> str | None:
        """None when ready to serve; otherwise why not (G1)."""
        if self.failure:
            return f"start-up failed: {self.failure}"
        if self.draining:
            return "shutting down"
        if not self.ready or self.engine is None:
            return "loading the model"
        if not self.engine.alive:
            return "the engine thread has stopped"
        if self.engine.stalled(self.settings.stall_timeout_s):
            return "the engine has made no progress for too long"
        return None

    def start(self) -> None:
        """Loads the model and starts the engine in a background thread (/live answers meanwhile)."""
        threading.Thread(target=self._start, name="mygpt-startup", daemon=True).start()

    def _start(self) -> None:
        try:
            s = self.settings
            if s.num_threads:
                torch.set_num_threads(s.num_threads)
            loaded = load_model(s)
            # a config reload waits until the registry and the declared adapters are in place (it
            # then sees them), and the registry takes the tenants of any reload made while loading
            with self._reload_lock:
                registry = AdapterRegistry(
                    s.adapter_dir, self.tenants.names, lora_module_shapes(loaded.model), s.max_lora_rank,
                    base_name=loaded.name,
                )  # fmt: skip
                if s.engine == "naive":  # the benchmark baseline: generate() + peft, one request at a time
                    context = loaded.context_len
                    engine = NaiveEngine(
                        loaded.model,
                        loaded.tokenizer,
                        loaded.eos_token_ids,
                        context,
                        adapters=s.max_loras > 0,
                    )
                else:
                    # on CPU the float32 logits GEMV is the largest read of a decode step: a bfloat16 copy
                    lm_head = torch.bfloat16 if loaded.device.type == "cpu" else None
                    runner = ModelRunner(
                        loaded.model, s.max_num_seqs, _served_context(s, loaded), loaded.dtype, s.max_loras, s.max_lora_rank,
                        lm_head_dtype=lm_head, exact_attention=loaded.device.type == "cpu",
                        cuda_graphs=s.cuda_graphs, nf4_kernel=s.nf4_kernel,
                        compile_layers=s.compile, graph_prompt_tokens=s.graph_prompt_tokens,
                        lora_kernel=s.lora_kernel,
                    )  # fmt: skip
                    if s.compile and runner.decoder is None:
                        log.warning("--compile applies to CUDA-graphed decode steps (a GPU): it is off here")
                    if s.lora_kernel and not runner.lora_kernel:
                        log.warning(
                            "--lora-kernel is off: it needs a GPU with Triton, adapter slots, and kernels "
                            "that agree with the grouped products"
                        )
                    context = runner.max_len
                    cache = AdapterCache(runner.lora_layers, s.max_loras) if s.max_loras else None
                    engine = Engine(
                        runner, loaded.tokenizer, loaded.eos_token_ids,
                        max_num_batched_tokens=s.max_num_batched_tokens, max_waiting=s.max_waiting, adapters=cache,
                        metrics=self.metrics, overlap=s.overlap_steps, prefix_caching=s.prefix_caching,
                        embed_chunk=s.embedding_step_tokens, embed_share=s.embedding_time_share,
                    )  # fmt: skip
                    registry.on_retire = engine.retire_adapter
                    if cache is not None:  # adapters packed for the slots when read, not when first used
                        on_gpu = loaded.device.type == "cuda"
                        registry.prepare = lambda w: w.packed(loaded.dtype, pin=on_gpu)
                    if self.metrics is not None and cache is not None:
                        cache.on_load = self.metrics.record_adapter_load
                        self.metrics.watch_adapter_cache(
                            lambda: (cache.stats, cache.snapshot(), registry.read_failures)
                        )
                if self.metrics is not None:
                    self.metrics.watch_device_memory(
                        _device_memory(loaded.device, getattr(engine, "runner", None))
                    )
                decoder = getattr(getattr(engine, "runner", None), "decoder", None)
                if decoder is not None and s.warmup:  # CUDA graphs of every batch size, before requests
                    t0 = time.monotonic()
                    try:
                        n = decoder.precapture()
                    except Exception:  # the graphs are then captured on first use, as without this
                        log.warning("capturing decode graphs at start-up failed", exc_info=True)
                    else:
                        if n:
                            what = (
                                "compiled the decoder layers and captured"
                                if decoder.runner.compiled
                                else "captured"
                            )
                            log.info("%s %d decode graphs in %.1fs", what, n, time.monotonic() - t0)
                engine.start()
                # a request's n choices run side by side: never more than the batch has rows
                max_n = s.max_n if s.engine == "naive" else min(s.max_n, s.max_num_seqs)
                limits = ChatLimits(context, max_n, s.max_stop_sequences, s.max_prompts)
                self.loaded, self.engine, self.registry = loaded, engine, registry
                grammars = Grammars(loaded.tokenizer, loaded.model.config.vocab_size)  # the logits' width
                grammars.token_bytes(0)  # its view of the vocabulary, built now, not in a first request
                self.chat = ChatService(
                    AsyncEngine(engine),
                    loaded.tokenizer,
                    loaded.name,
                    limits,
                    self.tenants,
                    registry,
                    grammars,
                    s.reasoning_parser,
                )
                # an embeddings request keeps at most a batch's rows of inputs in the engine at once
                self.embeddings = EmbeddingService(
                    self.chat, s.embedding_pooling, loaded.model.config.hidden_size, window=s.max_num_seqs
                )
                self._load_configured_adapters()
            if s.finetune:
                self._start_finetuning(loaded.name, registry)
            if s.warmup:
                _warm_up(engine, loaded.tokenizer)
            self.ready = True
            log.info(
                "ready: serving %s (context %d) on http://%s:%d/v1",
                loaded.name,
                context,
                s.host,
                s.port,
            )
        except Exception as exc:
            log.exception("start-up failed")
            self.failure = f"{type(exc).__name__}: {exc}"
            if self.on_failure is not None:
                self.on_failure()

    def _start_finetuning(self, base_name: str, registry: AdapterRegistry) -> None:
        s = self.settings
        self.finetune_store = Store(s.finetune_dir or Path(s.adapter_dir) / "_finetune")
        model_settings = s.model_dump(
            mode="json",
            include={
                "model",
                "quantization",
                "dtype",
                "device",
                "cache_dir",
                "revision",
                "trust_remote_code",
            },
        )
        self.jobs = JobManager(
            self.finetune_store, registry, base_name, model_settings, s.finetune_cpu_threads
        )
        if s.train:
            self.jobs.start()
        else:  # the APIs answer from the store; a replica that trains runs the jobs
            log.info("fine-tuning jobs are not trained on this replica (--no-train)")
        if self.metrics is not None:
            self.metrics.watch_background(self._background)

    def _background(self) -> Background:
        jobs, batches = self.finetune_store.open_counts()
        tenants = self.tenants.names
        return Background(
            jobs={(t, s): jobs.get((t, s), 0) for t in tenants for s in OPEN_JOBS},
            batches={(t, s): batches.get((t, s), 0) for t in tenants for s in OPEN_BATCHES},
            trained_tokens={t: self.jobs.trained_tokens[t] for t in tenants},
            trainers=self.jobs.trainers_live(),
        )

    def _load_configured_adapters(self, strict: bool = True) -> list[str]:
        """The adapters the config declares: validated now (at start a bad one fails the start: the
        operator named it), pinned ones made resident before /ready says yes (G1). Not strict (a
        reload): each failure is returned as "tenant/name: why" and the others still load."""
        errors = []
        for tenant in self.tenancy.tenants.values():
            for name, spec in tenant.adapters.items():
                try:
                    current = self.registry.get(tenant.name, name)
                    replace = False
                    if current is not None:  # the config wins for the names it declares
                        replace = current.path != self.registry.resolve_path(tenant.name, name, spec.path)
                        if current.source == "config" and current.pinned and not spec.pinned:
                            current.pinned = False
                            self.registry.on_retire(current.key)  # unpinned: leaves its slot once unused
                    entry, _ = self.registry.load(
                        tenant.name, name, spec.path, replace=replace, pinned=spec.pinned, source="config"
                    )
                    if entry.pinned:
                        self._pin_now(AdapterRef(entry.key, entry.weights))
                except Exception as exc:
                    if strict:
                        raise
                    errors.append(f"{tenant.name}/{name}: {exc}")
        return errors

    def reload_tenancy(self) -> dict:
        """Reads the tenancy config, the key files and the keys dir again and applies them at once
        (SIGHUP, POST /v1/admin/reload): keys, tenants, limits and declared adapters. A bad config
        changes nothing (ConfigError names the problem). Requests in flight finish as admitted."""
        with self._reload_lock:
            tenancy = load_tenancy_from(self.settings, os.environ)
            summary: dict = self.tenants.reload(tenancy)
            summary["adapter_errors"] = []
            if self.registry is not None:
                self.registry.set_tenants(self.tenants.names)
                declared = {(t.name, n) for t in tenancy.tenants.values() for n in t.adapters}
                for entry in self.registry.list():
                    if entry.source == "config" and (entry.tenant, entry.name) not in declared:
                        self.registry.unload(entry.tenant, entry.name)  # no longer in the config
                summary["adapter_errors"] = self._load_configured_adapters(strict=False)
            summary["tenants"] = self.tenants.names
            log.info("tenancy reloaded: %s", summary)
            return summary

    def _pin_now(self, ref: AdapterRef) -> None:
        done = threading.Event()
        errors: list[Exception | None] = []

        def settle(error: Exception | None) -> None:
            errors.append(error)
            done.set()

        self._pin(ref, settle)
        if not done.wait(120) or errors[0] is not None:
            raise RuntimeError(f"pinning adapter {ref.key} failed: {errors[0] if errors else 'timed out'}")

    @property
    def tenancy(self):
        return self.tenants.tenancy

    def _pin(self, ref: AdapterRef, done) -> None:
        if not isinstance(self.engine, Engine):
            done(None)  # the naive baseline keeps no device slots
            return
        self.engine.pin_adapter(ref, done)

    async def pin_adapter(self, ref: AdapterRef) -> None:
        """Pins an adapter on the device (from the event loop); APIError 400 if it cannot be."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._pin(ref, lambda e: loop.call_soon_threadsafe(_settle, future, e))
        error = await future
        if error is not None:
            raise APIError(400, f"Adapter {ref.key} cannot be pinned: {error}", code="adapter_slots_full")

    def adapter_cache_snapshot(self) -> dict[str, dict]:
        engine = self.engine
        cache = getattr(engine, "adapters", None) if isinstance(engine, Engine) else None
        return cache.snapshot() if cache is not None else {}

    def stop(self) -> None:
        self.draining = True
        if self.jobs is not None:
            self.jobs.stop()
        if self.engine is not None:
            self.engine.stop()


def _served_context(s: Settings, loaded: LoadedModel) -> int:
    """The context the runner allocates: on a GPU, what fits of it (loader.fit_context; the KV cache is
    allocated whole at start, and 16 rows of Llama-3.1-8B's 131,072 positions would take 272 GiB); on
    a CPU all of it (its KV cache maps pages only when they are written)."""
    if loaded.device.type != "cuda":
        return loaded.context_len
    config, dtype, rows = loaded.model.config, loaded.dtype, s.max_num_seqs
    free, total = torch.cuda.mem_get_info(loaded.device)
    per_position = kv_bytes_per_position(config, dtype)
    # allocated beside the cache: the adapter slots (A and B of every projection), the CUDA graphs'
    # logits (at most MAX_GRAPHS graphs of up to max_num_seqs rows and graph_prompt_tokens prompt rows,
    # float32), and the prompt rows' attention (their keys and values gathered, up to GRAPH_PROMPT_SPAN)
    lora = sum(i + o for i, o in lora_module_shapes(loaded.model).values()) * s.max_lora_rank * s.max_loras
    graphs = 0
    if s.cuda_graphs:
        prompt_rows = s.graph_prompt_tokens
        graphs = MAX_GRAPHS * (rows + prompt_rows) * config.vocab_size * 4
        graphs += attention_bytes_per_position(config, dtype, prompt_rows, 0) * GRAPH_PROMPT_SPAN
    budget = kv_budget(total, free, s.gpu_memory_utilization, lora * dtype.itemsize + graphs)
    transient = attention_bytes_per_position(config, dtype, rows, s.max_num_batched_tokens)
    model_len = cache_len(config, config.max_position_embeddings)
    asked = cache_len(config, s.max_model_len) if s.max_model_len else None
    context = fit_context(budget, per_position, rows, model_len, asked, transient)
    if context < cache_len(config, loaded.context_len):
        log.warning(
            "the model's context of %d positions does not fit %d rows in GPU memory: serving %d "
            "(--max-model-len, --max-num-seqs and --gpu-memory-utilization choose)",
            loaded.context_len, rows, context,
        )  # fmt: skip
    log.info(
        "KV cache: %d rows x %d positions, %.1f GiB (%.1f GiB left for it and the attention over it)",
        rows, context, per_position * (rows + 1) * (context + 1) / 2**30, budget / 2**30,
    )  # fmt: skip
    return context


def _device_memory(device: torch.device, runner: ModelRunner | None):
    """Bytes of the KV cache (reserved up front; on CPU only touched pages are resident) and, on
    CUDA, of torch's allocator."""
    kv = sum(t.numel() * t.element_size() for t in runner.k_cache + runner.v_cache) if runner else 0

    def read() -> dict[str, int]:
        out = {"kv_cache": kv}
        if device.type == "cuda":
            out["allocated"] = torch.cuda.memory_allocated(device)
            out["reserved"] = torch.cuda.memory_reserved(device)
        return out

    return read


def _settle(future: asyncio.Future, error: Exception | None) -> None:
    if not future.done():
        future.set_result(error)


def _warm_up(engine: Engine, tokenizer) -> None:
    """A short generation before /ready, so that first-use costs (kernels loaded, library plans built)
    fall here and not in a first request. With graph_prompt_tokens, a short prompt's step runs graphed
    and never touches the eager prompt path: a second prompt, longer than that, runs it too."""
    t0 = time.monotonic()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    prompts = [list(ids)]
    graphed = getattr(getattr(engine, "runner", None), "graph_prompt_tokens", 0)
    if graphed and getattr(engine.runner, "decoder", None) is not None:
        longer = (list(ids) * (graphed // max(len(ids), 1) + 2))[: min(graphed + 16, engine.max_len - 8)]
        if len(longer) > graphed:
            prompts.append(longer)
    for i, prompt in enumerate(prompts):
        done = threading.Event()
        result: list = []

        def on_event(ev, result=result, done=done) -> None:
            if ev.finish_reason is not None:
                result.append(ev)
                done.set()

        # seeded: the prefix cache is skipped, so the longer prompt is prefilled whole (eagerly)
        params = SamplingParams(max_tokens=4, temperature=0.0, seed=0 if i else None)
        engine.submit(GenerationRequest(f"warmup-{i}", prompt, params), on_event)
        if not done.wait(300) or result[0].error:
            raise RuntimeError(f"warm-up generation failed: {result[0].error if result else 'timed out'}")
    log.info("warm-up generation (%d prompts) done in %.2fs", len(prompts), time.monotonic() - t0)
