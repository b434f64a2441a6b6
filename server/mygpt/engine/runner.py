"""ModelRunner: a Llama-family forward pass over a preallocated, slot-indexed KV cache.

The HF model supplies the modules (embeddings, norms, rotary embedding and the projection layers,
plain, bitsandbytes 4-bit or LoRA-wrapped); this file owns attention and the KV cache so that rows of
different lengths can share one decode step without reallocating or copying the cache.

KV cache: k, v: [layers, slots + 1, kv_heads, max_len + 1, head_dim], one tensor each (a row's keys in
every layer are one view; the spare slot and position: see __init__); k_cache[i], v_cache[i] are layer
i's [slots + 1, kv_heads, max_len + 1, head_dim]. A row
owns one slot from admission to finish. Nothing is moved per step: decode writes one position per row
and attends over cache[slots, :, :max_pos] with a length mask.
"""

from __future__ import annotations

import logging
import math
import mmap
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Literal

import torch
import torch._dynamo
import torch.nn.functional as F

from mygpt.engine.graphs import StaticDecoder, batch_buckets
from mygpt.kernels import available as kernels_available
from mygpt.kernels import device_seconds, nf4
from mygpt.kernels import lora as lora_kernels
from mygpt.kernels.nf4 import NF4Product
from mygpt.lora.layers import FusedLinear, set_rows, wrap_model

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# the longest attention span at which a step's prompt chunks run as rows of the static decoder: each
# prompt row copies its slot's keys and values over the span (graphs.py)
GRAPH_PROMPT_SPAN = 1024
# the most tokens of an eager step whose LoRA terms the kernels compute (runner.lora_kernel): each token
# reads its adapter's A and B (2.6 MB a layer at rank 16 on the 8B shape, mostly from L2), where the
# grouped products read each adapter once a step; a short step is bound by its launches, a long prompt
# chunk by those reads
LORA_KERNEL_TOKENS = 128
# the products of one shape that each timed call of runner.choose_nf4_paths runs (one a layer): 8 of the 8B
# shape's q/k/v read 100 MB, past an H100's 50 MB of L2 cache
NF4_PEERS = 8
# a step's prompt chunks attend in one padded call a layer (_Packed): those that end within PACK_SPAN,
# shortest span first, while the keys gathered for them (chunks x longest end) stay within PACK_KEYS
# (x 4 KB of keys and values a layer on the 8B shape: 64 MB at most, transient) and the padded scores
# (chunks x longest chunk x longest end a head) within PACK_SCORES (4 MB a head in float32, where a
# backend writes them out; 32 embedding inputs of 128 tokens take half) or PACK_WASTE x the scores one
# by one; the others attend one by one (a long chunk beside short ones). On the H100 a chunk's
# attention took ~200 us of host time a layer (session 15: an eager step of 8 chunks, 110 ms of wall
# time for 30 ms on the device)
PACK_SPAN = 1024
PACK_KEYS = 16384
PACK_SCORES = 1 << 20
PACK_WASTE = 2.0


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int


def model_shape(config) -> ModelShape:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelShape(
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads or config.num_attention_heads,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        max_position_embeddings=config.max_position_embeddings,
    )


def cache_len(config, max_len: int) -> int:
    """The context a runner serves of max_len: Mistral's sliding window caps it (no sliding-window
    attention here: serve within one window)."""
    window = getattr(config, "sliding_window", None)
    if config.model_type == "mistral" and window and window < max_len:
        return window
    return max_len


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        # Anonymous mmap: the kernel maps zero pages lazily, so RSS grows only with the positions
        # used. Without huge pages: a 2 MiB huge page per (slot, layer, head) would be zeroed on the
        # first write to a new slot (measured: +0.2-0.9 s on that step, +360 MiB per slot here).
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes:
            buffer = mmap.mmap(-1, nbytes)
            if hasattr(mmap, "MADV_NOHUGEPAGE"):
                buffer.madvise(mmap.MADV_NOHUGEPAGE)
            return torch.frombuffer(buffer, dtype=dtype).view(shape)
    return torch.zeros(shape, dtype=dtype, device=device)


class ModelRunner:
    """Runs prefill chunks and batched decode steps of a HF Llama-family causal LM."""

    def __init__(
        self,
        model: torch.nn.Module,
        num_slots: int,
        max_len: int,
        dtype: torch.dtype,
        max_loras: int = 0,
        max_lora_rank: int = 16,
        lm_head_dtype: torch.dtype | None = None,
        exact_attention: bool = False,
        static_decode: bool = False,
        cuda_graphs: bool = False,
        nf4_kernel: bool = False,
        compile_layers: bool = False,
        graph_prompt_tokens: int = 0,
        lora_kernel: bool = False,
    ):
        model_type = model.config.model_type
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        max_len = cache_len(model.config, max_len)
        self.model = model.eval()
        self.shape = model_shape(model.config)
        self.num_slots = num_slots
        self.max_len = max_len
        self.dtype = dtype
        self.device = next(model.parameters()).device
        self._inner = model.model
        self._layers = list(self._inner.layers)
        s = self.shape
        self._gqa = s.num_kv_heads != s.num_heads  # a plain bool: torch.compile keeps it a constant
        # one slot more than handed out: static decode steps park their padding rows there; one position
        # more than served: no attention span is the whole cache, which torch.compile would compile apart
        cache_shape = (s.num_layers, num_slots + 1, s.num_kv_heads, max_len + 1, s.head_dim)
        self._k_all = _zeros(cache_shape, dtype, self.device)
        self._v_all = _zeros(cache_shape, dtype, self.device)
        self.k_cache, self.v_cache = list(self._k_all.unbind(0)), list(self._v_all.unbind(0))
        # the logits GEMV reads the whole [vocab, hidden] matrix every step: a bfloat16 copy halves
        # the bytes (measured 4x faster on the 2-core CPU); None computes in the model's dtype
        head = model.lm_head.weight
        self._lm_head = head.detach().to(lm_head_dtype) if lm_head_dtype not in (None, head.dtype) else head
        # LoRA: every projection wrapped with max_loras stacked adapter slots (none: plain modules)
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        # exact_attention: decode rows attend one by one over exactly their own length, so a row's
        # numerics do not depend on the other rows' lengths (padding changes the attention kernel's
        # blocking); costs one attention call per row and layer (B5/E1 on CPU)
        self.exact_attention = exact_attention
        # a step's prompt chunks attend in one padded call a layer (_Packed) on a GPU, where a step is
        # bound by its launches; checked here at this dtype and head layout against the chunks one by
        # one (off, with a warning, where not). On the CPU the calls cost little against the padding:
        # the default model's embeddings took 11.0 s packed, 10.0 one by one (session 15), so it is off
        self.pack_chunks = self.device.type == "cuda" and self._packing_agrees()
        self.lora_batch, self.lora_layers = (None, {})
        if max_loras:
            self.lora_batch, self.lora_layers = wrap_model(
                model, max_loras, max_lora_rank, dtype, self.device
            )
        # q/k/v and gate/up each run as one product (base and LoRA), o and down on plain tensors
        # (lora/layers.py FusedLinear)
        # nf4_kernel: decode-sized NF4 products by the Triton kernel (kernels/nf4.py; experimental)
        self._proj = [_Projections.of(layer, nf4_kernel) for layer in self._layers]
        # decode-only steps at bucketed static shapes (graphs.py): captured as CUDA graphs on a GPU
        # (cuda_graphs), or run eagerly (static_decode: the same code path, for tests on a CPU)
        self._compiled_layer = self._compiled_qkv = self._compiled_rest = None
        # graph_prompt_tokens: a step whose prompt chunks hold at most this many tokens (at attention
        # spans up to GRAPH_PROMPT_SPAN) runs through the static decoder too, each prompt token a row
        # (graphs.py), not eagerly; 0: every step with a prompt chunk runs eagerly
        self.graph_prompt_tokens = graph_prompt_tokens
        # lora_kernel: the static decoder's steps with adapters take the LoRA kernels (kernels/lora.py),
        # each row on its own slot, not the grouped batched products (experimental); checked here, at
        # this model's shapes, against those products (off, with a warning, where they fail or disagree)
        self.lora_kernel = bool(
            lora_kernel
            and self.lora_batch is not None
            and kernels_available(self.device)
            and lora_kernels.verified(self._lora_groups())
        )
        self.decoder: StaticDecoder | None = None
        capture = cuda_graphs and self.device.type == "cuda"
        if (capture or static_decode) and not exact_attention:
            self.decoder = StaticDecoder(self, capture=capture)
        # nf4_kernel on a GPU: each NF4 product's path at each decode batch size (and past), timed now
        if nf4_kernel and self.device.type == "cuda" and self._nf4_products():
            try:
                self.choose_nf4_paths()
            except Exception:  # no plan: the kernel up to nf4.kernel_rows() rows, bitsandbytes past them
                log.warning(
                    "timing the NF4 products' paths failed: the kernel runs untimed, up to its rows",
                    exc_info=True,
                )
        # compile_layers: the static decode steps run each decoder layer through torch.compile
        self.compile_layers(compile_layers)

    def _packing_agrees(self) -> bool:
        """Whether _Packed's attention runs here and gives the chunks' one-by-one outputs: two chunks
        of random queries over random caches, one after a prefix, at this model's heads and dtype."""
        s, gen = self.shape, torch.Generator().manual_seed(0)

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen).to(self.dtype).to(self.device)

        chunks = [PrefillChunk(0, [1] * 5, 3), PrefillChunk(2, [1] * 2, 0)]
        q = rand(7, s.num_heads, s.head_dim)
        kv = (rand(3, s.num_kv_heads, 9, s.head_dim), rand(3, s.num_kv_heads, 9, s.head_dim), 0)
        attn = SimpleNamespace(scaling=s.head_dim**-0.5)
        try:
            with torch.inference_mode():
                want = self._attend(attn, kv, q, _AttentionPlan.build([], chunks, self.device)).float()
                got = self._attend(
                    attn, kv, q, _AttentionPlan.build([], chunks, self.device, pack=True)
                ).float()
            error = float((got - want).norm() / want.norm())
        except Exception:
            log.warning(
                "a step's prompt chunks attend one by one: the packed attention failed", exc_info=True
            )
            return False
        if not error <= (1e-5 if self.dtype == torch.float32 else 2e-2):
            log.warning(
                "a step's prompt chunks attend one by one: the packed attention is off by %.1e", error
            )
            return False
        return True

    def _lora_groups(self) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        """One layer's projection groups with adapter slots: (A^T stack, the parts' B^T stacks); every
        layer has the same shapes."""
        p = self._proj[0]
        groups = [f for f in (p.qkv, p.o, p.gate_up, p.down) if f is not None and f.batch is not None]
        return [(f.lora_at, f._bts) for f in groups]

    def nf4_kernel(self, on: bool) -> int:
        """Turns the Triton NF4 kernel (kernels/nf4.py) on or off for the products that have it; returns
        how many have it. Captured decode graphs keep the kernels they were captured with: make a new
        StaticDecoder after switching (and with compile_layers, compiled code is guarded on the switch:
        the next steps compile again)."""
        products = self._nf4_products()
        for product in products:
            product.enabled = on
        if on and self.compiled:
            self._verify_nf4()
        return len(products)

    def _nf4_products(self) -> list[NF4Product]:
        return [
            f._fused_base
            for p in self._proj
            for f in (p.qkv, p.o, p.gate_up, p.down)
            if f is not None and isinstance(f._fused_base, NF4Product)
        ]

    def choose_nf4_paths(
        self,
        sizes: list[int] | None = None,
        timer: Callable[[Callable[[], object], int], float] | None = None,
    ) -> dict[tuple[int, int], list[tuple[int, str]]]:
        """Each NF4 product shape's path at each row count (NF4Product.choose: the Triton kernel,
        bitsandbytes once over the joined weights, or layer by layer), measured on the first layer's
        product of that shape, with NF4_PEERS - 1 other layers' run in each timed call (a step reads
        each layer's weights once, never one layer's again from the GPU's cache), and taken by every
        layer's. sizes: the row counts to time; default: the static decoder's batch sizes (the graphed
        steps' rows) or without it the decode batch sizes, and MAX_ROWS. timer: seconds a call at that
        many rows; None: on this runner's GPU, inside a CUDA graph for the row counts the static
        decoder captures, eagerly otherwise. Returns {(N, K): plan}, also logged. Until it runs,
        products take the kernel up to its rows (nf4.kernel_rows). Graphs the static decoder captured already keep
        the paths they were captured with: make a new StaticDecoder after a second call (compiled code
        follows the new plan: it is guarded on it)."""
        decoder = self.decoder
        graphed = decoder.max_rows if decoder is not None and decoder.capture else 0
        if timer is None:

            def timer(fn: Callable[[], object], rows: int) -> float:  # PROMPT_ROWS: as an eager step
                return device_seconds(fn, self.device, graph=rows <= graphed and rows < nf4.PROMPT_ROWS)

        if sizes is None:
            sizes = decoder.batch_sizes if decoder is not None else batch_buckets(self.num_slots)
            sizes = sorted({*sizes, nf4.MAX_ROWS})
        groups: dict[tuple[int, int], list[NF4Product]] = {}
        for product in self._nf4_products():
            groups.setdefault((product.packed.shape[0], product.packed.shape[1] * 2), []).append(product)
        plans: dict[tuple[int, int], list[tuple[int, str]]] = {}
        for key, products in groups.items():
            with torch.inference_mode():
                plans[key] = products[0].choose(self.dtype, sizes, timer, peers=products[1:NF4_PEERS])
            log.info("NF4 products %d x %d: %s", *key, _plan_text(plans[key]))
            for product in products:
                product.paths = plans[key]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the timing graphs' pools
        return plans

    def nf4_changes(self) -> list[int]:
        """The row counts at which some NF4 product's plan changes path (the last of each run of sizes
        that share one), ascending: compiled code takes another branch past each (graphs.py
        warm_compile compiles both sides before the first request)."""
        return sorted(
            {most for p in self._nf4_products() if p.enabled and p.paths for most, _ in p.paths[:-1]}
        )

    def _verify_nf4(self) -> None:
        """Each NF4 product shape's kernel checked in all its configurations before compiled code calls it
        (NF4Product.verify); a product whose check fails runs bitsandbytes there (a warning)."""
        for product in self._nf4_products():
            if product.enabled:
                product.verify(self.dtype)  # a shape checked already: NF4Product._checked answers

    def compile_layers(self, on: bool) -> bool:
        """Turns torch.compile (inductor) of the decoder layers on or off; returns whether it is on
        (never without a static decoder: the GPU's path). Regional compilation: one compiled function
        runs every layer, which share its code and guards (so a 32-layer model compiles one layer's
        graph per kind of step, not 32), and inductor fuses the element-wise ops between the matrix
        products (norms, rotary, activation, residual and LoRA adds, casts) into a few kernels.
        Decode-only steps run the whole layer compiled, and CUDA graphs capture that. Steps with prompt
        chunks (eager: their shapes follow the prompts) run the layer in three pieces, the projections,
        norms and MLP compiled and the attention between them eager: where an eager step of an 8B
        model spent most of its time launching ~70 small kernels a layer from Python, and every new
        request takes one such step while the running rows wait. bitsandbytes' ops are traced as they
        are; mygpt's kernels (nf4_kernel, lora_kernel) are called as opaque ops, each NF4 product shape
        checked first in all its configurations (NF4Product.verify). A step whose compiled run fails
        runs uncompiled, and compiling is turned off (a warning). As with nf4_kernel: make a new
        StaticDecoder after switching."""
        if not on or self.decoder is None:
            self._compiled_layer = self._compiled_qkv = self._compiled_rest = None
            return False
        if self._compiled_layer is None:
            self._verify_nf4()
            config = torch._dynamo.config
            # a kind of step (batch, span, adapter grouping) may compile a few times before its sizes
            # go dynamic: past this limit torch.compile would silently run eagerly
            config.recompile_limit = max(config.recompile_limit, 64)
            self._compiled_layer = torch.compile(self._layer)
            self._compiled_qkv, self._compiled_rest = torch.compile(self._qkv), torch.compile(self._rest)
        return True

    @property
    def compiled(self) -> bool:
        """Whether the static decode steps run the compiled layers (compile_layers, not failed)."""
        return self._compiled_layer is not None

    # ---------------------------------------------------------------- public API
    @torch.inference_mode()
    def step(
        self, decode: list[DecodeRow], chunks: list[PrefillChunk], invariant: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One forward for every decode row and prefill chunk together.

        The projections and MLPs run once over all the step's tokens (the weights are read once);
        attention runs batched for the decode rows and per chunk for the prefills. Returns the decode
        rows' logits [Bd, V] and, for each chunk, its last position's logits [1, V], or every
        position's [c, V] for a chunk with all_logits (prompt logprobs), or an embedding chunk's pooled
        hidden states [1, hidden] (PrefillChunk.pool). invariant: every row's result
        independent of the others (the LoRA products' batch-invariant layout; the rest already is, on
        the CPU); the static decoder's steps ignore it.
        """
        if self.decoder is not None and decode and not chunks:
            return self.decoder.run(decode), []
        if self.decoder is not None and not invariant and self._prompt_rows_fit(decode, chunks):
            return self._static_step(decode, chunks)
        tokens = [r.token for r in decode] + [t for c in chunks for t in c.token_ids]
        positions = [r.position for r in decode] + [
            p for c in chunks for p in range(c.start, c.start + len(c.token_ids))
        ]
        loras = [r.lora_slot for r in decode] + [c.lora_slot for c in chunks for _ in c.token_ids]
        # compiled pieces (_layer_pieces); a step of one token (a lone 1-token chunk) would compile apart
        pieces = bool(chunks) and self._compiled_qkv is not None and len(tokens) > 1
        layer_fn = self._layer_pieces if pieces else None
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)  # [1, N]
        pos = torch.tensor([positions], dtype=torch.long, device=self.device)  # [1, N]
        # (an invariant step's chunks attend one by one: the padding would tie one's numerics to another's)
        plan = _AttentionPlan.build(decode, chunks, self.device, pack=self.pack_chunks and not invariant)
        if self.exact_attention:  # each decode row's keys and values, every layer: [L, 1, Hkv, len, hd]
            plan.row_kv = [
                (self._k_all[:, r.slot : r.slot + 1, :, : r.position + 1],
                 self._v_all[:, r.slot : r.slot + 1, :, : r.position + 1])
                for r in decode
            ]  # fmt: skip
        try:
            self._set_lora(loras, pieces, invariant)  # inside: the finally clears it whatever fails
            try:
                hidden = self._forward(ids, pos, plan, layer_fn)[0]  # [N, hidden]
            except Exception as exc:
                if not pieces or isinstance(exc, torch.OutOfMemoryError):  # not the compiler's fault
                    raise
                log.warning("a compiled step failed: steps run uncompiled", exc_info=True)
                self.compile_layers(False)  # graphs captured already keep their compiled kernels
                self._set_lora(loras, invariant=invariant)
                hidden = self._forward(ids, pos, plan)[0]  # writes the same keys and values again
        finally:  # the wrapped layers are the model's own: leave no adapter mask behind
            self._set_lora([])
        rows, sizes, pooled = list(range(len(decode))), [], {}
        for i, (c, o) in enumerate(zip(chunks, plan.chunk_offsets, strict=True)):
            end = len(decode) + o + len(c.token_ids)
            if c.pool is not None:  # an embedding: hidden states, no logits
                h = hidden[end - len(c.token_ids) : end] if c.pool == "sum" else hidden[end - 1 : end]
                pooled[i] = h.float().sum(0, keepdim=True)
                continue
            rows += range(end - len(c.token_ids), end) if c.all_logits else [end - 1]
            sizes.append(len(c.token_ids) if c.all_logits else 1)
        logits = self._logits(hidden[torch.tensor(rows, dtype=torch.long, device=self.device)])
        split = iter(logits[len(decode) :].split(sizes))
        return logits[: len(decode)], [pooled[i] if i in pooled else next(split) for i in range(len(chunks))]

    def prefill(self, slot: int, token_ids: list[int], start: int, lora_slot: int = -1) -> torch.Tensor:
        """Feeds token_ids at positions start.. of `slot`; returns the last position's logits [V]."""
        return self.step([], [PrefillChunk(slot, token_ids, start, lora_slot)])[1][0][-1]

    def decode(
        self,
        slots: list[int],
        token_ids: list[int],
        positions: list[int],
        lora_slots: list[int] | None = None,
        invariant: bool = False,
    ) -> torch.Tensor:
        """One token for each row (slot, token, position, adapter slot or -1); returns logits [B, V]."""
        loras = lora_slots or [-1] * len(slots)
        rows = [DecodeRow(*r) for r in zip(slots, token_ids, positions, loras, strict=True)]
        return self.step(rows, [], invariant)[0]

    @torch.inference_mode()
    def decode_ahead(self, rows: list[DecodeRow], ids: torch.Tensor) -> torch.Tensor:
        """A decode-only step through the static decoder whose tokens are a device tensor [len(rows)]
        (the rows' DecodeRow.token is not read): launched before the host has read those tokens, it
        runs on the device while the host handles the step before. Returns logits [len(rows), V]."""
        if self.decoder is None:
            raise RuntimeError("decode_ahead needs the static decoder (cuda_graphs or static_decode)")
        return self.decoder.run(rows, ids)

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copies the first `length` cached positions of src into dst (n choices share a prefill)."""
        for k, v in zip(self.k_cache, self.v_cache, strict=True):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    # ---------------------------------------------------------------- internals
    def _prompt_rows_fit(self, decode: list[DecodeRow], chunks: list[PrefillChunk]) -> bool:
        """Whether a step with prompt chunks runs in the static decoder (its prompt tokens as rows): few
        enough of them, and a span (every row's: the step's attention gathers each row's slot over the
        longest) up to GRAPH_PROMPT_SPAN."""
        prompt = sum(len(c.token_ids) for c in chunks)
        if any(c.pool is not None for c in chunks):  # the graphs give logits only
            return False
        if not 0 < prompt <= self.graph_prompt_tokens or len(decode) + prompt > self.decoder.max_rows:
            return False
        ends = [c.start + len(c.token_ids) for c in chunks] + [r.position + 1 for r in decode]
        return max(ends) <= GRAPH_PROMPT_SPAN

    def _static_step(
        self, decode: list[DecodeRow], chunks: list[PrefillChunk]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """runner.step through the static decoder: every prompt token one more row at its own position
        of its chunk's slot (graphs.py: written before any row attends, each row masked at its own
        position, so the chunk attends causally). The logits as step() returns them."""
        rows = list(decode)
        for c in chunks:
            rows += [DecodeRow(c.slot, t, c.start + i, c.lora_slot) for i, t in enumerate(c.token_ids)]
        logits = self.decoder.run(rows)
        self.decoder.stats.prompt_steps += 1
        out, at = [], len(decode)
        for c in chunks:
            at += len(c.token_ids)
            out.append(logits[at - len(c.token_ids) : at] if c.all_logits else logits[at - 1 : at])
        return logits[: len(decode)], out

    def _set_lora(self, lora_slots: list[int], compiled: bool = False, invariant: bool = False) -> None:
        """The step's adapter grouping; compiled: for the compiled pieces, always as index tensors and
        at least 2 x 2 (sizes torch.compile takes as dynamic, not one compile each: _dynamic);
        invariant: lora.layers' batch-invariant layout. With the LoRA kernels (lora_kernel), steps of up
        to LORA_KERNEL_TOKENS tokens, compiled pieces too, hand the layers each token's slot instead: an
        eager step is bound by its launches, and they take 8-11 a layer where the grouped products take
        ~35; each row's term depends on that row alone, so the step is batch-invariant as it is."""
        b = self.lora_batch
        if b is None:
            return
        b.clear()
        few = len(lora_slots) <= LORA_KERNEL_TOKENS
        if self.lora_kernel and few and any(s >= 0 for s in lora_slots):
            b.rows = torch.tensor(lora_slots, dtype=torch.int32, device=self.device)
            return
        at_least = 2 if compiled else 1
        invariant = invariant and self.device.type == "cpu"  # measured there; B5 is not claimed on CUDA
        set_rows(
            b, lora_slots, self.max_lora_rank, self.dtype, self.device, at_least, self.max_loras, invariant
        )

    def _forward(
        self, ids: torch.Tensor, position_ids: torch.Tensor, plan: _AttentionPlan, layer_fn=None
    ) -> torch.Tensor:
        # ids, position_ids: [1, N] - every token of the step, decode rows first; layer_fn: how each
        # layer runs (compile_layers: _compiled_layer for static decode steps, _layer_pieces for steps
        # with prompt chunks; None: _layer, uncompiled)
        hidden = self._inner.embed_tokens(ids)
        cos, sin = self._inner.rotary_emb(hidden, position_ids=position_ids)  # [1, N, hd]
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # [N, 1, hd]: broadcast over heads
        layers = self._layers
        normed, hidden = self._add_norm(None, hidden, layers[0].input_layernorm)
        if layer_fn is None:
            layer_fn = self._layer
        else:  # compiled: the sizes that vary from step to step, dynamic before the first compile
            for t, dims in ((normed, (1,)), (hidden, (1,)), (cos, (0,)), (sin, (0,)), (plan.slot_t, (0,)),
                            (plan.pos_t, (0,)), (plan.decode_mask, (0, 3))):  # fmt: skip
                _dynamic(t, *dims)
            b = self.lora_batch
            if b is not None and b.valid is not None:  # the adapter grouping (always tensors then)
                _dynamic(b.gather, 0), _dynamic(b.valid, 0, 1), _dynamic(b.scatter, 0)
            if b is not None:  # each token's adapter slot (the LoRA kernels)
                _dynamic(b.rows, 0)
        for i, layer in enumerate(layers):
            # the next layer's input norm (the model's final norm after the last layer)
            nxt = layers[i + 1].input_layernorm if i + 1 < len(layers) else self._inner.norm
            kv = (self.k_cache[i], self.v_cache[i], i)
            normed, hidden = layer_fn(layer, self._proj[i], kv, nxt, normed, hidden, cos, sin, plan)
        return normed

    def _layer(self, layer, proj, kv, nxt, normed, hidden, cos, sin, plan):
        """One decoder layer: (nxt(hidden'), hidden'), hidden' the residual stream after it. Everything
        that differs between layers comes in as an argument: one compiled function serves every layer
        (regional compilation). kv: the layer's key and value caches and its index (read only by exact
        attention, which is never compiled)."""
        q = self._qkv(layer.self_attn, proj, kv, normed, cos, sin, plan.slot_t, plan.pos_t)
        return self._rest(layer, proj, nxt, self._attend(layer.self_attn, kv, q, plan), hidden)

    def _layer_pieces(self, layer, proj, kv, nxt, normed, hidden, cos, sin, plan):
        """_layer for steps with prompt chunks, with compile_layers: the projections, norms and MLP
        through torch.compile (sizes dynamic in the step's token count), the attention between them
        eager (its shape follows the step's chunks)."""
        q = self._compiled_qkv(layer.self_attn, proj, kv, normed, cos, sin, plan.slot_t, plan.pos_t)
        attended = self._attend(layer.self_attn, kv, q, plan)
        _dynamic(attended, 0)
        return self._compiled_rest(layer, proj, nxt, attended, hidden)

    def _rest(self, layer, proj, nxt, attended, hidden):
        """The layer after attention: the output projection, the residual, the MLP, the next norm."""
        x = proj.o(attended[None])[0]
        normed, hidden = self._add_norm(x, hidden, layer.post_attention_layernorm)
        if proj.gate_up is None:
            x = layer.mlp(normed)
        else:  # the Llama MLP: down(act(gate(x)) * up(x))
            gate, up = proj.gate_up(normed)
            x = proj.down(layer.mlp.act_fn(gate) * up)[0]
        return self._add_norm(x, hidden, nxt)  # the residual sum, and the next norm of it

    def _add_norm(
        self, x: torch.Tensor | None, residual: torch.Tensor, norm: torch.nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x); x None: (norm(residual), residual)."""
        total = residual if x is None else residual + x
        return _norm(norm, total), total

    def _qkv(self, attn, proj, kv, x, cos, sin, slot_t, pos_t) -> torch.Tensor:
        """The queries [N, H, hd] of the step's tokens x [1, N, D]; their keys and values go into the
        layer's cache at (slot_t, pos_t)."""
        n, hd, heads = x.shape[1], self.shape.head_dim, self.shape.num_heads
        qkv = proj.qkv
        y = None if hasattr(attn, "q_norm") else qkv.joined(x)
        if y is not None:  # q and k side by side: one rotary embedding for both
            qk = _rope(y[0, :, : (heads + self.shape.num_kv_heads) * hd].view(n, -1, hd), cos, sin)
            q, k, v = qk[:, :heads], qk[:, heads:], y[0, :, qk.shape[1] * hd :].view(n, -1, hd)
        else:
            q, k, v = (t.view(n, -1, hd) for t in qkv(x))  # [N, H or Hkv, hd]
            if hasattr(attn, "q_norm"):  # qwen3
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        kc, vc, _ = kv
        kc[slot_t, :, pos_t] = k.to(kc.dtype)  # write every token's key/value: [N, Hkv, hd]
        vc[slot_t, :, pos_t] = v.to(vc.dtype)
        return q

    def _attend(self, attn, kv, q: torch.Tensor, plan: _AttentionPlan) -> torch.Tensor:
        """Attention of the step's queries q [N, H, hd] over the cache: [N, H * hd]."""
        kc, vc, i = kv
        gqa = self._gqa
        outs = []
        # (torch.compile: no test of the int num_decode on the static path, which would compile each value)
        if self.exact_attention and plan.num_decode:  # each row alone over its own length: no padding
            bd, same = plan.num_decode, kc.dtype == q.dtype
            rows = [
                F.scaled_dot_product_attention(
                    qr,
                    kr[i] if same else kr[i].to(q.dtype),
                    vr[i] if same else vr[i].to(q.dtype),
                    scale=attn.scaling,
                    enable_gqa=gqa,
                )
                for qr, (kr, vr) in zip(q[:bd, None, :, None, :].unbind(0), plan.row_kv, strict=True)
            ]  # each [1, H, 1, hd]
            outs.append(torch.cat(rows).view(bd, -1))
        elif plan.decode_mask is not None:  # q: [Bd, H, 1, hd] over each row's cache, length-masked
            bd, end = plan.decode_mask.shape[0], plan.decode_mask.shape[-1]  # sizes, not ints (as above)
            keys, values = kc[plan.decode_rows, :, :end], vc[plan.decode_rows, :, :end]
            out = F.scaled_dot_product_attention(
                q[:bd, :, None, :], keys.to(q.dtype), values.to(q.dtype), attn_mask=plan.decode_mask,
                scale=attn.scaling, enable_gqa=gqa,
            )  # fmt: skip
            outs.append(out.reshape(bd, -1))
        # the packed chunks' outputs, in the step's order (every chunk's: nothing left one by one)
        packed = plan.packed.attend(attn, kc, vc, q, gqa) if plan.packed is not None else None
        chunks = zip(plan.chunks, plan.chunk_offsets, plan.chunk_masks, strict=True)
        if plan.packed is not None and plan.packed.every:
            outs.append(packed)
            chunks = iter(())
        at = 0
        for c, o, mask in chunks:
            if mask is None:  # packed: its rows are the next of `packed`
                outs.append(packed[at : at + len(c.token_ids)])
                at += len(c.token_ids)
                continue
            lo, hi, end = (
                plan.num_decode + o,
                plan.num_decode + o + len(c.token_ids),
                c.start + len(c.token_ids),
            )
            keys, values = kc[c.slot : c.slot + 1, :, :end], vc[c.slot : c.slot + 1, :, :end]
            qc = q[lo:hi].transpose(0, 1)[None]  # [1, H, c, hd]
            out = F.scaled_dot_product_attention(
                qc, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask, scale=attn.scaling, enable_gqa=gqa
            )
            outs.append(out[0].transpose(0, 1).reshape(hi - lo, -1))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden.to(self._lm_head.dtype), self._lm_head).float()


@dataclass(frozen=True)
class DecodeRow:
    slot: int  # KV cache slot
    token: int  # the token to feed
    position: int  # its position
    lora_slot: int = -1  # adapter slot, -1 = base


@dataclass(frozen=True)
class PrefillChunk:
    slot: int
    token_ids: list[int]  # prompt tokens fed at positions start..
    start: int
    lora_slot: int = -1
    all_logits: bool = False  # every position's logits, not only the last (prompt logprobs)
    # an embedding's chunk: its final hidden states (after the last norm) instead of logits, "sum"med
    # over its positions or the "last" one's, float32 [1, hidden]
    pool: Literal["sum", "last"] | None = None


@dataclass
class _AttentionPlan:
    """Index tensors and masks shared by every layer of one step."""

    num_decode: int
    decode: list[DecodeRow]
    decode_rows: slice | torch.Tensor  # cache rows of the decode rows (a view when contiguous)
    decode_mask: torch.Tensor | None  # bool [Bd, 1, 1, end]
    chunks: list[PrefillChunk]
    chunk_offsets: list[int]  # each chunk's first token among the chunk tokens
    chunk_masks: list[
        torch.Tensor | None
    ]  # bool [1, 1, c, end]: causal with the chunk's offset (None: packed)
    slot_t: torch.Tensor  # [N] cache slot of every token
    pos_t: torch.Tensor  # [N] position of every token
    row_kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # exact attention's views
    packed: _Packed | None = None  # the chunks that attend in one call

    @staticmethod
    def build(
        decode: list[DecodeRow], chunks: list[PrefillChunk], device, pack: bool = False
    ) -> _AttentionPlan:
        slots = [r.slot for r in decode] + [c.slot for c in chunks for _ in c.token_ids]
        positions = [r.position for r in decode] + [
            p for c in chunks for p in range(c.start, c.start + len(c.token_ids))
        ]
        decode_mask, decode_rows, end = None, slice(0, 0), 0
        if decode:
            end = max(r.position for r in decode) + 1
            dpos = torch.tensor([r.position for r in decode], device=device)
            decode_mask = (torch.arange(end, device=device)[None, :] <= dpos[:, None])[:, None, None, :]
            dslots = [r.slot for r in decode]
            first = dslots[0]
            contiguous = dslots == list(range(first, first + len(dslots)))
            decode_rows = (
                slice(first, first + len(dslots)) if contiguous else torch.tensor(dslots, device=device)
            )
        offsets, masks, o = [], [], 0
        for c in chunks:
            offsets.append(o)
            o += len(c.token_ids)
        packed = _Packed.build(len(decode), chunks, offsets, device) if pack else None
        for i, c in enumerate(chunks):
            if packed is not None and i in packed.members:
                masks.append(None)
                continue
            cpos = torch.arange(c.start, c.start + len(c.token_ids), device=device)
            masks.append(
                (torch.arange(c.start + len(c.token_ids), device=device)[None, :] <= cpos[:, None])[
                    None, None
                ]
            )
        return _AttentionPlan(
            num_decode=len(decode), decode=decode, decode_rows=decode_rows, decode_mask=decode_mask,
            chunks=chunks, chunk_offsets=offsets, chunk_masks=masks, slot_t=torch.tensor(slots, device=device),
            pos_t=torch.tensor(positions, device=device), packed=packed,
        )  # fmt: skip


@dataclass(frozen=True)
class _Packed:
    """A step's prompt chunks attending in one call a layer: each chunk one batch row, its queries and
    its slot's keys padded to the longest (the queries gathered from the step's, the keys from the
    cache), masked causally at each chunk's offset; the outputs gathered back in the step's order. One
    attention call and a few gathers a layer, where the chunks one by one take ~6 ops each."""

    members: frozenset[int]  # the chunks' indices in the step
    every: bool  # every chunk of the step
    queries: torch.Tensor  # [B * Lq] the step row of each padded query (a pad repeats its chunk's last)
    slots: torch.Tensor  # [B] each chunk's cache slot
    mask: torch.Tensor  # bool [B, 1, Lq, Lk]
    rows: torch.Tensor  # [their tokens] each one's padded query, in the step's order
    shape: tuple[int, int, int]  # B, Lq, Lk

    @staticmethod
    def build(num_decode: int, chunks: list[PrefillChunk], offsets: list[int], device) -> _Packed | None:
        """The chunks that end within PACK_SPAN, shortest span first while chunks x longest end stays
        within PACK_KEYS and the padded scores within PACK_SCORES or PACK_WASTE x those one by one;
        None where fewer than 2 are left (they attend one by one)."""
        ends = [c.start + len(c.token_ids) for c in chunks]
        members: list[int] = []
        longest = work = 0  # the members' longest chunk, and their attention one by one (queries x keys)
        for i in sorted(range(len(chunks)), key=ends.__getitem__):
            if ends[i] > PACK_SPAN or (len(members) + 1) * ends[i] > PACK_KEYS:
                break  # (the ends only grow from here)
            n = len(chunks[i].token_ids)
            padded = (len(members) + 1) * max(longest, n) * ends[i]
            if padded > PACK_SCORES and padded > PACK_WASTE * (work + n * ends[i]):
                continue  # its padding (or the others' beside it) would cost more than the calls it saves
            members.append(i)
            longest, work = max(longest, n), work + n * ends[i]
        if len(members) < 2:
            return None
        members.sort()  # the step's order
        lq, lk = max(len(chunks[i].token_ids) for i in members), max(ends[i] for i in members)
        queries, rows, last_pos = [], [], []
        for b, i in enumerate(members):
            c, at, n = chunks[i], num_decode + offsets[i], len(chunks[i].token_ids)
            queries += [at + min(j, n - 1) for j in range(lq)]
            rows += range(b * lq, b * lq + n)
            last_pos += [c.start + min(j, n - 1) for j in range(lq)]  # a pad row attends as the last
        pos = torch.tensor(last_pos, device=device).view(len(members), lq, 1)
        mask = (torch.arange(lk, device=device) <= pos)[:, None]  # [B, 1, Lq, Lk]
        return _Packed(
            members=frozenset(members),
            every=len(members) == len(chunks),
            queries=torch.tensor(queries, device=device),
            slots=torch.tensor([chunks[i].slot for i in members], device=device),
            mask=mask,
            rows=torch.tensor(rows, device=device),
            shape=(len(members), lq, lk),
        )

    def attend(self, attn, kc: torch.Tensor, vc: torch.Tensor, q: torch.Tensor, gqa: bool) -> torch.Tensor:
        """The chunks' attention outputs [their tokens, H * hd] from the step's queries q [N, H, hd]."""
        b, lq, lk = self.shape
        heads, hd = q.shape[1], q.shape[2]
        qp = q.index_select(0, self.queries).view(b, lq, heads, hd).transpose(1, 2)  # [B, H, Lq, hd]
        keys = kc[:, :, :lk].index_select(0, self.slots)  # [B, Hkv, Lk, hd]: only the span is copied
        values = vc[:, :, :lk].index_select(0, self.slots)
        out = F.scaled_dot_product_attention(
            qp, keys.to(q.dtype), values.to(q.dtype), attn_mask=self.mask, scale=attn.scaling, enable_gqa=gqa
        )  # [B, H, Lq, hd]
        return out.transpose(1, 2).reshape(b * lq, heads * hd).index_select(0, self.rows)


@dataclass(frozen=True)
class _Projections:
    """One decoder layer's projections as the runner calls them."""

    qkv: FusedLinear
    o: FusedLinear
    gate_up: FusedLinear | None  # None (not a Llama-style MLP): the MLP runs as the model wrote it
    down: FusedLinear | None

    @staticmethod
    def of(layer: torch.nn.Module, nf4_kernel: bool = False) -> _Projections:
        attn, mlp = layer.self_attn, layer.mlp
        k = nf4_kernel
        qkv, o = FusedLinear([attn.q_proj, attn.k_proj, attn.v_proj], k), FusedLinear([attn.o_proj], k)
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return _Projections(qkv, o, None, None)
        return _Projections(
            qkv, o, FusedLinear([mlp.gate_proj, mlp.up_proj], k), FusedLinear([mlp.down_proj], k)
        )


def _plan_text(plan: list[tuple[int, str]]) -> str:
    """An NF4 product's plan in words: "kernel at 1-8 rows, fused at 9-32 rows, layers past 32"."""
    parts, low = [], 1
    for i, (most, way) in enumerate(plan):
        if i + 1 < len(plan) and plan[i + 1][1] == way:
            continue  # one phrase for a run of sizes that take the same path
        if i + 1 == len(plan):
            parts.append(f"{way} past {low - 1}" if low > 1 else f"{way} at every size")
        else:
            parts.append(
                f"{way} at {low}-{most} rows" if low < most else f"{way} at {most} row{'s' * (most > 1)}"
            )
        low = most + 1
    return ", ".join(parts)


def _dynamic(t: torch.Tensor | None, *dims: int) -> None:
    """Marks sizes that vary between steps (batch or token count, attention span, adapter grouping) as
    dynamic for torch.compile before it first compiles (compile_layers): one compile serves every size
    of the kind, where torch.compile would otherwise compile the first size met as a constant and
    again once a second size shows the dimension varies. Sizes of 1 are still compiled apart."""
    if t is not None:
        for d in dims:
            torch._dynamo.maybe_mark_dynamic(t, d)


def _norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A model's RMSNorm; in float32 as torch's one rms_norm op, bit for bit the same as HF's
    eight-op module on the CPU (tested; on CUDA torch may fuse it: equal within rounding). bfloat16
    and float16 run the module: there the op rounds differently."""
    eps = getattr(norm, "variance_epsilon", None)
    if x.dtype == torch.float32 and eps is not None and type(norm).__name__.endswith("RMSNorm"):
        return F.rms_norm(x, norm.weight.shape, norm.weight, eps)
    return norm(x)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, hd] * cos + rotate_half(x) * sin."""
    return x * cos + _rotate_half(x) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)
