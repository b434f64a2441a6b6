"""Adapter residency: a fixed number of device slots, LRU eviction of unpinned adapters (engine thread)."""

from __future__ import annotations

import collections
import logging
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
    """Which adapter sits in which slot. Policy (LRU, pins) here; the copy into slots is LoRALinear's.

    acquire() pins an adapter (loading it, evicting the least recently used unpinned one if all slots
    are taken); release() unpins. An adapter in use is never evicted. Only the engine thread calls it.
    """

    def __init__(self, layers: dict[str, LoRALinear], num_slots: int, loader: Callable[[str], LoRAWeights]):
        self.layers = layers
        self.num_slots = num_slots
        self.loader = loader
        self.stats = CacheStats()
        self._slot: dict[str, int] = {}  # resident adapter -> slot
        self._version: dict[str, object] = {}  # resident adapter -> the LoRAWeights object it holds
        self._pins: collections.Counter[str] = collections.Counter()
        self._lru: collections.OrderedDict[str, None] = collections.OrderedDict()  # least recent first
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def resident(self) -> list[str]:
        return list(self._slot)

    def pinned(self, name: str) -> int:
        return self._pins[name]

    def can_acquire(self, name: str) -> bool:
        return name in self._slot or bool(self._free) or any(self._pins[n] == 0 for n in self._slot)

    def acquire(self, name: str) -> int:
        """Pins `name` and returns its slot; raises what the loader raises (AdapterError)."""
        if name in self._slot:
            self.stats.hits += 1
        else:
            self.stats.misses += 1
            self._load(name)
        self._pins[name] += 1
        self._lru.move_to_end(name)
        return self._slot[name]

    def release(self, name: str) -> None:
        self._pins[name] -= 1
        if self._pins[name] <= 0:
            del self._pins[name]

    def _load(self, name: str) -> None:
        try:
            weights = self.loader(name)
        except Exception:
            self.stats.load_failures += 1
            raise
        if not self._free:
            self._evict_lru()
        slot = self._free.pop()
        for path, layer in self.layers.items():
            m = weights.modules.get(path)
            layer.set_slot(slot, m.a if m else None, m.b if m else None)
        self._slot[name] = slot
        self._version[name] = weights
        self._lru[name] = None
        self.stats.loads += 1
        log.info(
            "adapter %s loaded into slot %d (rank %d, %.1f MB)",
            name,
            slot,
            weights.rank,
            weights.nbytes / 1e6,
        )

    def _evict_lru(self) -> None:
        victim = next((n for n in self._lru if self._pins[n] == 0), None)
        if victim is None:
            raise RuntimeError("every adapter slot is in use")  # callers check can_acquire first
        self.evict(victim)

    def evict(self, name: str) -> bool:
        """Frees the slot of an unpinned adapter; False if it is in use or not resident."""
        if name not in self._slot or self._pins[name] > 0:
            return False
        slot = self._slot.pop(name)
        self._version.pop(name, None)
        del self._lru[name]
        for layer in self.layers.values():
            layer.set_slot(slot, None, None)
        self._free.append(slot)
        self.stats.evictions += 1
        log.info("adapter %s evicted from slot %d", name, slot)
        return True
