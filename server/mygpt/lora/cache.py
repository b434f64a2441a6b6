"""Adapter residency: a fixed number of device slots, LRU eviction of unpinned adapters (engine thread)."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from mygpt.lora.layers import LoRALinear
from mygpt.lora.weights import LoRAWeights

log = logging.getLogger(__name__)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    load_failures: int = 0


class AdapterCache:
    """Which adapter version (key) sits in which slot. Policy (LRU, pins) here; the copy into slots is
    LoRALinear's.

    acquire() pins a key (copying its weights into a slot, evicting the least recently used unpinned
    key if all slots are taken); release() unpins. A key in use is never evicted; a pinned adapter
    (pin()) never. retire() drops a key as soon as nothing uses it (an unloaded or replaced version).
    Only the engine thread changes it; snapshot() may be read from any thread.
    """

    def __init__(self, layers: dict[str, LoRALinear], num_slots: int):
        self.layers = layers
        self.num_slots = num_slots
        self.stats = CacheStats()
        self._slot: dict[str, int] = {}  # resident key -> slot
        self._weights: dict[str, LoRAWeights] = {}  # resident key -> the weights in its slot
        self._pins: collections.Counter[str] = collections.Counter()  # rows using the key
        self._pinned: set[str] = set()  # pinned by configuration: never evicted
        self._retired: set[str] = set()  # resident keys to drop once unused
        self._lru: collections.OrderedDict[str, None] = collections.OrderedDict()  # least recent first
        self._free = list(range(num_slots - 1, -1, -1))
        self._lock = threading.Lock()  # for snapshot() from other threads
        self.on_load: Callable[[float], None] | None = None  # seconds each load took (metrics)
        first = next(iter(layers.values()), None)  # every slot buffer has one device and dtype
        self._device, self._dtype = (first.lora_at.device, first.lora_at.dtype) if first else (None, None)

    @property
    def resident(self) -> list[str]:
        return list(self._slot)

    def pinned(self, key: str) -> int:
        return self._pins[key]

    def _evictable(self, key: str) -> bool:
        return self._pins[key] == 0 and key not in self._pinned

    def can_pin(self, key: str) -> bool:
        """Pinning leaves at least one slot unpinned, so that every other adapter can still get one."""
        return key in self._pinned or len(self._pinned) < self.num_slots - 1

    def can_acquire(self, key: str) -> bool:
        return key in self._slot or bool(self._free) or any(self._evictable(k) for k in self._slot)

    def acquire(self, key: str, weights: LoRAWeights) -> int:
        """Pins `key` and returns its slot, loading `weights` into a slot if it is not resident."""
        if key in self._slot:
            self.stats.hits += 1
        else:
            self.stats.misses += 1
            self._load(key, weights)
        self._pins[key] += 1
        self._lru.move_to_end(key)
        return self._slot[key]

    def release(self, key: str) -> None:
        self._pins[key] -= 1
        if self._pins[key] <= 0:
            del self._pins[key]
            if key in self._retired:
                self.evict(key)

    def pin(self, key: str, weights: LoRAWeights) -> int:
        """Makes `key` resident for good (a pinned adapter)."""
        slot = self.acquire(key, weights)
        self.release(key)
        self._pinned.add(key)
        return slot

    def retire(self, key: str) -> None:
        """`key` is no longer routable: evict it now if unused, else when its last row finishes."""
        self._pinned.discard(key)
        if key in self._slot and not self.evict(key):
            self._retired.add(key)

    def _load(self, key: str, weights: LoRAWeights) -> None:
        t0 = time.perf_counter()
        if not self._free:
            self._evict_lru()
        slot = self._free.pop()
        try:
            if self.layers:
                packed = weights.packed(self._dtype, pin=self._device.type == "cuda")
                flat = packed.buffer.to(self._device, non_blocking=True)  # one copy for the whole adapter
                for path, layer in self.layers.items():
                    at = packed.index.get(path)
                    if at is None:
                        layer.set_slot(slot, None, None)
                        continue
                    a_at, a_shape, bt_at, bt_shape = at
                    a = flat[a_at : a_at + a_shape.numel()].view(a_shape)
                    bt = flat[bt_at : bt_at + bt_shape.numel()].view(bt_shape)
                    layer.set_slot(slot, a, bt.T)
        except Exception:
            self.stats.load_failures += 1
            for layer in self.layers.values():
                layer.set_slot(slot, None, None)
            self._free.append(slot)
            raise
        with self._lock:
            self._slot[key] = slot
            self._weights[key] = weights
        self._lru[key] = None
        self.stats.loads += 1
        if self.on_load is not None:
            self.on_load(time.perf_counter() - t0)
        log.info(
            "adapter %s loaded into slot %d (rank %d, %.1f MB)", key, slot, weights.rank, weights.nbytes / 1e6
        )

    def _evict_lru(self) -> None:
        victim = next((k for k in self._lru if self._evictable(k)), None)
        if victim is None:
            raise RuntimeError("every adapter slot is in use")  # callers check can_acquire first
        self.evict(victim)

    def evict(self, key: str) -> bool:
        """Frees the slot of an unused, unpinned key; False if it is in use, pinned or not resident."""
        if key not in self._slot or not self._evictable(key):
            return False
        with self._lock:
            slot = self._slot.pop(key)
            self._weights.pop(key, None)
        self._retired.discard(key)
        del self._lru[key]
        for layer in self.layers.values():
            layer.set_slot(slot, None, None)
        self._free.append(slot)
        self.stats.evictions += 1
        log.info("adapter %s evicted from slot %d", key, slot)
        return True

    def snapshot(self) -> dict[str, dict]:
        """key -> {slot, in_use (rows), pinned}: for the admin API (any thread)."""
        with self._lock:
            slots = dict(self._slot)
        pins, pinned = dict(self._pins), set(self._pinned)
        return {k: {"slot": s, "in_use": pins.get(k, 0), "pinned": k in pinned} for k, s in slots.items()}
