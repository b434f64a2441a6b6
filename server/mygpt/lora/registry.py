"""The adapter store on disk: names -> validated host weights (single-flight, small host cache)."""

from __future__ import annotations

import collections
import re
import threading
from pathlib import Path

from mygpt.lora.weights import CONFIG, WEIGHTS, AdapterError, LoRAWeights, read_adapter

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class AdapterRegistry:
    """Adapters are directories `<root>/<name>/` in peft format (safetensors only).

    load() validates and reads them into host memory, outside the generation loop; concurrent loads
    of one adapter make one read; a changed weights file is read again.
    """

    def __init__(
        self, root: Path, module_shapes: dict[str, tuple[int, int]], max_rank: int, host_cache: int = 64
    ):
        self.root = Path(root)
        self.module_shapes = module_shapes
        self.max_rank = max_rank
        self._host: collections.OrderedDict[str, tuple[float, LoRAWeights]] = collections.OrderedDict()
        self._host_cache = host_cache
        self._locks: dict[str, threading.Lock] = collections.defaultdict(threading.Lock)
        self._guard = threading.Lock()

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if _NAME.match(p.name) and (p / CONFIG).is_file())

    def exists(self, name: str) -> bool:
        return bool(_NAME.match(name)) and (self.root / name / CONFIG).is_file()

    def load(self, name: str) -> LoRAWeights:
        if not self.exists(name):
            raise AdapterError(f"adapter '{name}' not found")
        with self._guard:
            lock = self._locks[name]
        with lock:  # single flight per adapter
            path = self.root / name
            stamp = _stamp(path)
            cached = self._host.get(name)
            if cached is not None and cached[0] == stamp:
                self._host.move_to_end(name)
                return cached[1]
            weights = read_adapter(name, path, self.module_shapes, self.max_rank, root=self.root)
            self._host[name] = (stamp, weights)
            while len(self._host) > self._host_cache:
                self._host.popitem(last=False)
            return weights


def _stamp(path: Path) -> float:
    try:
        return (path / WEIGHTS).stat().st_mtime_ns + (path / CONFIG).stat().st_mtime_ns
    except OSError:
        return -1.0
