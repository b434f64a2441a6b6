"""Static-shape decode steps, replayed as CUDA graphs on a GPU.

On the H100 an eager decode step of the 8B-shaped model spends ~9 ms on the GPU and ~55 ms in Python
and kernel launches (hundreds of small kernels per layer, docs/benchmarks.md). A CUDA graph records a
step's kernels once and replays them with one launch, but it fixes every shape and every buffer
address. So a decode step is padded to a bucket:

    batch     rows, rounded up to 1, 2, 4, 8, then a multiple of 8 up to the slot count (always a
              bucket); past it (prompt rows, below) a multiple of 16 up to max_rows, the slot count
              plus the runner's graph_prompt_tokens. Padding rows are base-model rows feeding token 0
              at position 0 of a spare KV-cache slot that no row reads.
    kv_len    the attention span: the longest row rounded up to a multiple of kv_block (256) up to
              2,048, then of an eighth of the next power of two: 2560, 3072, 3584, 4096, 5120, ...,
              so four spans per doubling of the context, padding at most kv_block or a quarter.
    lora      S adapter slots x M rows per slot of the grouped LoRA product (lora/layers.py): powers
              of two (S capped at the slot count); 0 x 0 when no row uses an adapter. With the LoRA
              kernels (runner.lora_kernel, kernels/lora.py), 1 x 0 for any step with an adapter: the
              kernels read each row's slot from the input buffer, so one graph serves every grouping.

The server captures every batch bucket's graph for base-model rows up to 512 positions at start-up
(with the LoRA kernels, also the one shape with adapters),
with its warm-up (precapture); the first step of any other bucket captures its graph (after one eager warm-up run on a
side stream, as CUDA graphs require); later steps copy their inputs into fixed buffers (one host-to-device copy) and
replay it. At most max_graphs graphs are kept (least recently used out), all in one memory pool.

Steps with short prompt chunks run here too (runner.step, graph_prompt_tokens): each prompt token is one
more row, at its own position of its request's slot. A step writes every row's key and value before any
row attends, and each row's mask ends at its own position, so a chunk's rows attend causally to one
another and to the cached prefix, as the eager chunk attention does. It costs each prompt row a copy of its
slot's keys and values over the span (the decode rows' gather), hence short chunks only; longer ones run
eagerly (their shapes change with every prompt). On a CPU the same static step
runs without capture (tests compare it with the eager path). A bucket whose capture fails runs its
static step eagerly from then on (slower, never wrong); after three failures capturing is turned off.
Models whose rotary embedding reads the positions on the host (dynamic and longrope scaling) are never
captured.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mygpt.engine.runner import DecodeRow, ModelRunner

log = logging.getLogger(__name__)

MAX_GRAPHS = 64  # decode graphs kept (each holds its own logits buffer: rows x vocabulary, float32)


@dataclass(frozen=True)
class DecodeShape:
    batch: int  # rows, padding included
    kv_len: int  # attention span
    lora_slots: int = 0  # S: adapter slots in the grouped LoRA product (0: no adapter)
    lora_rows: int = 0  # M: rows per adapter slot; 0 with lora_slots 1: the LoRA kernels (any grouping)


@dataclass(frozen=True)
class LoRAPlan:
    """Rows grouped by adapter slot into S x M positions (see lora/layers.py)."""

    slots: int  # S
    rows: int  # M
    gather: list[int]  # [S*M] the row at each position (padding: row 0)
    valid: list[int]  # [S*M] 1 where a position holds a row
    scatter: list[int]  # [batch] each row's position (a base-model row: an empty position)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def kv_bucket(end: int, kv_block: int, max_len: int) -> int:
    """The attention span for rows up to position end - 1 (see the module docstring)."""
    step = max(kv_block, _pow2(end) // 8)
    return min(max_len, math.ceil(end / step) * step)


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, ... up to max_batch (always included)."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8))
    return sizes + [max_batch]


def plan_lora(lora_slots: list[int], batch: int, max_slots: int, at_least: int = 1) -> LoRAPlan | None:
    """Groups rows by adapter slot for a batch of `batch` rows (rows past len(lora_slots) are padding,
    which like slot -1 means the base model). None when no row uses an adapter. at_least: the fewest
    slots (as far as max_slots allows) and rows per slot; 2 spares torch.compile the compiles it makes
    for sizes of 1 (runner.compile_layers), for one more slot's adapter weights read per step."""
    adapted = [(i, s) for i, s in enumerate(lora_slots) if s >= 0]
    if not adapted:
        return None
    slots = min(max(_pow2(max(s for _, s in adapted) + 1), at_least), max_slots)
    rows = max(_pow2(max(collections.Counter(s for _, s in adapted).values())), at_least)
    if len(adapted) < batch and slots * rows == len(adapted):
        rows *= 2  # base-model rows read their (zero) LoRA term from an empty position
    gather, valid, scatter = [0] * (slots * rows), [0] * (slots * rows), [0] * batch
    filled: collections.Counter[int] = collections.Counter()
    for i, s in adapted:
        at = s * rows + filled[s]
        filled[s] += 1
        gather[at], valid[at], scatter[i] = i, 1, at
    if len(adapted) < batch:
        empty = valid.index(0)
        for i in range(batch):
            if i >= len(lora_slots) or lora_slots[i] < 0:
                scatter[i] = empty
    return LoRAPlan(slots, rows, gather, valid, scatter)


@dataclass
class GraphStats:
    captures: int = 0
    replays: int = 0
    eager: int = 0  # static steps run without a graph
    evictions: int = 0
    failures: int = 0  # captures that failed (their buckets run eagerly)
    prompt_steps: int = 0  # steps with prompt chunks run here (their tokens as rows)


class StaticDecoder:
    """Runs a ModelRunner's decode-only steps at bucketed static shapes, as CUDA graphs if `capture`."""

    def __init__(self, runner: ModelRunner, capture: bool, kv_block: int = 256, max_graphs: int = MAX_GRAPHS):
        self.runner = runner
        rope = str(getattr(getattr(runner._inner, "rotary_emb", None), "rope_type", "default"))
        if capture and ("dynamic" in rope or rope == "longrope"):
            log.info("rope type %s reads positions on the host: decode steps are not captured", rope)
            capture = False
        self.capture = capture
        self.kv_block = kv_block
        self.max_graphs = max_graphs
        self.stats = GraphStats()
        # rows per step: the slots' decode rows, and prompt tokens as rows (runner.graph_prompt_tokens)
        self.max_rows = runner.num_slots + runner.graph_prompt_tokens
        # decode rows' buckets as ever; past the slot count (prompt rows), multiples of 16
        more = range(16 * (runner.num_slots // 16 + 1), self.max_rows, 16)
        self.batch_sizes = sorted({*batch_buckets(runner.num_slots), *more, self.max_rows})
        self.spare_slot = runner.num_slots  # the runner keeps one KV slot more than it hands out
        b = self.max_rows
        self._max_lora_slots = runner.max_loras
        g = max(runner.max_loras, 1) * 2 * _pow2(b)  # the largest S*M plan_lora can produce
        # every input in one int64 buffer: ids | positions | slots | scatter | gather | valid | each row's
        # adapter slot (the LoRA kernels', -1: none)
        self._layout = {"ids": (0, b), "pos": (b, b), "slots": (2 * b, b), "scatter": (3 * b, b)}
        self._layout |= {"gather": (4 * b, g), "valid": (4 * b + g, g), "lora": (4 * b + 2 * g, b)}
        n = 5 * b + 2 * g
        on_gpu = runner.device.type == "cuda"
        self._host = torch.zeros(n, dtype=torch.long, pin_memory=on_gpu)
        self._dev = torch.zeros(n, dtype=torch.long, device=runner.device)
        self._graphs: collections.OrderedDict[DecodeShape, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = (
            collections.OrderedDict()
        )
        self._failed: set[DecodeShape] = set()
        self._pool = None
        self._copied: torch.cuda.Event | None = None  # the last input copy: _host may be rewritten after it

    def _buf(self, name: str, on_device: bool = True) -> torch.Tensor:
        start, size = self._layout[name]
        return (self._dev if on_device else self._host)[start : start + size]

    def shape_of(self, rows: list[DecodeRow]) -> tuple[DecodeShape, LoRAPlan | None]:
        batch = next(b for b in self.batch_sizes if b >= len(rows))
        kv_len = kv_bucket(max(r.position for r in rows) + 1, self.kv_block, self.runner.max_len)
        lora = None
        if self._lora_kernel():  # one shape with adapters, whatever their grouping: no plan
            return DecodeShape(batch, kv_len, int(any(r.lora_slot >= 0 for r in rows)), 0), None
        if self.runner.lora_batch is not None:
            at_least = 2 if self.runner.compiled else 1
            lora = plan_lora([r.lora_slot for r in rows], batch, self._max_lora_slots, at_least)
        shape = DecodeShape(batch, kv_len, lora.slots if lora else 0, lora.rows if lora else 0)
        return shape, lora

    def _lora_kernel(self) -> bool:
        """Whether steps with adapters take the LoRA kernels (runner.lora_kernel), compiled or not."""
        r = self.runner
        return r.lora_batch is not None and r.lora_kernel

    def run(self, rows: list[DecodeRow], ids: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step for `rows`; returns their logits [len(rows), V] (float32). ids: the rows'
        tokens as a device tensor [len(rows)] (their DecodeRow.token is then not read): the engine
        launches the next step from the sampled tokens before it reads them (Engine overlap)."""
        shape, lora = self.shape_of(rows)
        pad = shape.batch - len(rows)
        host = {
            "ids": [r.token for r in rows] + [0] * pad,
            "pos": [r.position for r in rows] + [0] * pad,
            "slots": [r.slot for r in rows] + [self.spare_slot] * pad,
        }
        if shape.lora_slots and not shape.lora_rows:  # the LoRA kernels' shape: they read each row's slot
            host["lora"] = [r.lora_slot for r in rows] + [-1] * pad
        if lora is not None:
            host |= {"scatter": lora.scatter, "gather": lora.gather, "valid": lora.valid}
        on_gpu = self.runner.device.type == "cuda"
        # streams, events and capture on the model's own device, whatever the thread's current one
        with torch.cuda.device(self.runner.device) if on_gpu else contextlib.nullcontext():
            if self._copied is not None:
                self._copied.synchronize()  # the previous step's copy has read _host (free in the engine)
            for name, values in host.items():
                self._buf(name, on_device=False)[: len(values)] = torch.tensor(values, dtype=torch.long)
            self._dev.copy_(self._host, non_blocking=True)  # one copy; ordered before the step's kernels
            if on_gpu:
                self._copied = torch.cuda.Event()
                self._copied.record()
            if ids is not None:  # after the host's copy, in stream order: these ids win
                self._buf("ids")[: len(rows)].copy_(ids)
            out = self._replay(shape) if self.capture and shape not in self._failed else None
            if out is None:
                self.stats.eager += 1
                out = self._forward(shape)
            return out[: len(rows)].clone()  # the graph's output buffer is overwritten by the next replay

    @torch.inference_mode()  # as the runner's steps, which run the captured graphs
    def precapture(self, max_end: int = 512) -> int:
        """Captures the graph of every batch bucket (decode rows, and the larger ones of steps with prompt
        rows), for base-model rows (no adapter; with the LoRA kernels, also with adapters, one shape for
        any of them) at each attention span up to max_end positions, before the first request. A bucket met for the first time inside
        requests costs an eager warm-up, a capture and an instantiation while every row waits: the
        H100 end-to-end run (docs/benchmarks.md) had inter-token p99 of 627 ms at 32 streams against a
        median of 11.5 ms. Every padding row writes only the spare KV slot. Returns the number captured
        (0 without capture: on a CPU)."""
        self.warm_compile()
        if not self.capture:
            return 0
        spans = sorted({kv_bucket(end, self.kv_block, self.runner.max_len) for end in range(1, max_end + 1)})
        self._buf("ids", on_device=False).zero_()
        self._buf("pos", on_device=False).zero_()
        self._buf("slots", on_device=False).fill_(self.spare_slot)
        self._buf("lora", on_device=False).fill_(-1)
        before = self.stats.captures
        on_gpu = self.runner.device.type == "cuda"
        with torch.cuda.device(self.runner.device) if on_gpu else contextlib.nullcontext():
            self._dev.copy_(self._host)
            # the decode rows' buckets first (the largest first), then those of steps with prompt rows,
            # should max_graphs cut the list
            b = self.runner.num_slots
            order = [s for s in reversed(self.batch_sizes) if s <= b] + [s for s in self.batch_sizes if s > b]
            # with the LoRA kernels, steps with adapters have one shape per batch and span: captured too
            # (their rows here are all on the base model: the kernels read slots from the buffer)
            loras = [0, 1] if self._lora_kernel() else [0]
            for batch in order:
                for span in spans:
                    for lora in loras:
                        shape = DecodeShape(batch, span, lora)
                        if not self.capture or len(self._graphs) >= self.max_graphs:
                            break  # capturing failed three times (turned off), or the cache is full
                        if shape not in self._failed:
                            self._replay(shape)
            if on_gpu:
                torch.cuda.synchronize(self.runner.device)
        return self.stats.captures - before

    @torch.inference_mode()
    def warm_compile(self) -> int:
        """With the runner's compile_layers on: runs the static step, uncaptured, once for each kind of
        shape torch.compile compiles separately, so that it compiles before the first request and not
        inside one (each compile of a layer takes seconds). The varying sizes are dynamic from the first
        compile (runner._forward) and adapter groups are at least 2 x 2 (plan_lora), so the kinds are:
        batch 1 or more, with or without adapters (grouped, or the LoRA kernels' one shape), and with
        the NF4 kernel, up to its rows (kernel_rows) or more, or with measured NF4 plans, on each side of
        every change of path. Each is run at two sizes of everything that
        varies, so a size compiled as a constant would show here, and at the most rows a step takes.
        Then the compiled pieces of steps with prompt chunks (runner._layer_pieces): chunks of two
        lengths (and one past each kernel's rows), alone and beside a decode row, with and without an
        adapter. Padding rows and chunks only: they write the spare KV slot, and their LoRA positions
        are all empty (the kernels' rows: -1). Returns the number of steps run (0 without
        compile_layers)."""
        from mygpt.engine.runner import LORA_KERNEL_TOKENS, DecodeRow, PrefillChunk
        from mygpt.kernels.nf4 import MAX_ROWS, kernel_rows

        r = self.runner
        if not r.compiled:
            return 0
        b = r.num_slots
        spans = sorted({kv_bucket(end, self.kv_block, r.max_len) for end in (1, self.kv_block + 1)})
        lora = [(0, 0)]
        if self._lora_kernel():
            lora.append((1, 0))
        elif r.lora_batch is not None:  # S x M within the buffers: S up to the slots, M up to 2 x the batch
            cap, most = self._max_lora_slots, 2 * _pow2(b)
            lora += [(s, m) for s in sorted({min(2, cap), min(4, cap)}) for m in sorted({2, min(4, most)})]
        lengths = {7, 19}
        if any(p.enabled and p.compiled_ok for p in r._nf4_products()) and kernel_rows() == MAX_ROWS:
            # bitsandbytes' products, past the plane kernels' rows (the bytes kernel takes any)
            lengths.add(MAX_ROWS + 8)
        # the NF4 products' measured plans (runner.choose_nf4_paths): both sides of each change of path
        changes = {n for c in r.nf4_changes() for n in (c, c + 1)}
        lengths |= changes
        if r.lora_kernel:
            lengths.add(LORA_KERNEL_TOKENS + 8)  # the grouped products, past the kernels' tokens
        on_gpu = r.device.type == "cuda"
        steps = 0
        with torch.cuda.device(r.device) if on_gpu else contextlib.nullcontext():
            if self._copied is not None:
                self._copied.synchronize()  # a step's input copy has read _host
            self._host.zero_()
            self._buf("slots", on_device=False).fill_(self.spare_slot)
            self._buf("lora", on_device=False).fill_(-1)
            self._dev.copy_(self._host)
            batches = {self.max_rows, b, min(2, b), 1} | {n for n in changes if n <= self.max_rows}
            for batch in sorted(batches, reverse=True):
                for span in spans:
                    for s, m in lora:
                        self._forward(DecodeShape(batch, span, s, m))
                        steps += 1
            spare, rows = self.spare_slot, r.graph_prompt_tokens
            r.graph_prompt_tokens = 0  # these steps are for the eager path's compiled pieces
            try:
                room = r.max_len - 1  # positions 1.. of the spare slot
                for adapter in [-1] + ([0] if r.lora_batch is not None else []):
                    for length in sorted(lengths):
                        # a step longer than one chunk can be (a short context): several chunks, as
                        # several requests' make such a step; all on the spare slot, the same positions
                        chunks = [
                            PrefillChunk(spare, [0] * min(room, length - at), 1, adapter)
                            for at in range(0, length, room)
                        ]
                        if sum(len(c.token_ids) for c in chunks) < 2:
                            continue  # a one-token step compiles apart, and is not a prompt piece
                        r.step([], chunks)
                        r.step([DecodeRow(spare, 0, 0, adapter)], chunks)
                        steps += 2
            finally:
                r.graph_prompt_tokens = rows
            if on_gpu:
                torch.cuda.synchronize(r.device)
        return steps

    # ------------------------------------------------------------------ internals
    def _forward(self, shape: DecodeShape) -> torch.Tensor:
        """The static step itself: only fixed-size views of the input buffers, no host reads."""
        from mygpt.engine.runner import _AttentionPlan

        r, b = self.runner, shape.batch
        ids, pos, slots = self._buf("ids")[:b], self._buf("pos")[:b], self._buf("slots")[:b]
        span = torch.arange(shape.kv_len, device=r.device)
        mask = (span[None, :] <= pos[:, None])[:, None, None, :]  # [B, 1, 1, kv_len]
        plan = _AttentionPlan(
            num_decode=b, decode=[], decode_rows=slots, decode_mask=mask,
            chunks=[], chunk_offsets=[], chunk_masks=[], slot_t=slots, pos_t=pos,
        )  # fmt: skip
        batch = r.lora_batch
        if batch is not None:  # nothing of another step's adapters (say, one that failed before its reset)
            batch.clear()
        if batch is not None and shape.lora_slots and not shape.lora_rows:  # the LoRA kernels
            batch.rows = self._buf("lora")[:b]
        elif batch is not None and shape.lora_slots:
            s, m = shape.lora_slots, shape.lora_rows
            batch.slots = s
            batch.gather = self._buf("gather")[: s * m]
            batch.valid = self._buf("valid")[: s * m].view(s, m, 1).to(r.dtype)
            batch.scatter = self._buf("scatter")[:b]
        try:
            try:
                hidden = r._forward(ids[None], pos[None], plan, r._compiled_layer)[0]
            except Exception as exc:
                if not r.compiled or isinstance(exc, torch.OutOfMemoryError):  # not the compiler's fault
                    raise
                log.warning("a compiled decode step failed: decode steps run uncompiled", exc_info=True)
                r.compile_layers(False)
                if r.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                    raise  # this capture fails (its bucket runs eagerly), not a graph of both attempts
                hidden = r._forward(ids[None], pos[None], plan)[0]
        finally:  # the LoRA layers are shared with the eager path
            if batch is not None:
                batch.clear()
        return r._logits(hidden)

    def _replay(self, shape: DecodeShape) -> torch.Tensor | None:
        entry = self._graphs.get(shape)
        if entry is None:
            try:
                entry = self._capture(shape)
            except Exception:
                self.stats.failures += 1
                self._failed.add(shape)
                log.warning("CUDA graph capture failed for %s: it runs eagerly", shape, exc_info=True)
                if self.stats.failures >= 3:
                    log.warning("three CUDA graph captures failed: decode steps are no longer captured")
                    self.capture = False
                    self._graphs.clear()
                return None
        else:
            self._graphs.move_to_end(shape)
        entry[0].replay()
        self.stats.replays += 1
        return entry[1]

    def _capture(self, shape: DecodeShape) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        if len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
            self.stats.evictions += 1
        # warm-up outside the capture (lazy cuBLAS/bitsandbytes initialisation), on a side stream; it
        # writes the same keys and values the replay will, at the same places
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward(shape)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = self._forward(shape)
        self._graphs[shape] = (graph, out)
        self.stats.captures += 1
        log.debug("captured a decode graph for %s", shape)
        return graph, out
