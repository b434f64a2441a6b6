"""The adapter store on disk and what is routable: (tenant, name) -> a validated, versioned adapter.

Store layout: `<root>/<tenant>/<name>/` in peft format (safetensors only). A directory that appears
in a tenant's store is found on the next lookup; the admin API loads (a path under another name),
replaces (a new version under a taken name) and unloads. Every version has its own key
"<tenant>/<name>@<version>": the engine keeps an old version resident while requests still use it, and
drops it once they have finished (`on_retire`). Reading and validating happen here, off the engine
thread; concurrent reads of one adapter make one read.
"""

from __future__ import annotations

import collections
import logging
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mygpt.lora.weights import (
    CONFIG,
    WEIGHTS,
    AdapterChanging,
    AdapterError,
    LoRAWeights,
    check_adapter,
    read_adapter,
)

log = logging.getLogger(__name__)

# reads of an adapter whose files change while read (a copy in progress), the waits between them doubling
# from READ_WAIT_S (0.05 + 0.1 + 0.2 + 0.4 + 0.8 s), before it is refused
READ_TRIES = 6
READ_WAIT_S = 0.05
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")  # fullmatch (no trailing newline)


def usable_path(path: str) -> bool:
    """Text that names a path here: UTF-8 (no lone surrogate), no NUL, no component over 255 bytes."""
    try:
        raw = path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return b"\0" not in raw and all(len(part) <= 255 for part in raw.split(b"/"))


class AdapterConflict(AdapterError):
    """A different adapter already has this name: replacing it must be asked for."""


@dataclass
class AdapterEntry:
    tenant: str
    name: str
    path: Path  # the directory, resolved, inside <root>/<tenant>/
    version: int
    source: str  # "store" (found on disk), "config" or "api"
    pinned: bool = False  # resident at all times (never evicted)
    created: int = field(default_factory=lambda: int(time.time()))
    stamp: tuple[int, ...] | None = None  # the files' _stamp when `weights` was read
    weights: LoRAWeights | None = None  # host copy, validated; dropped when the host cache is full
    checked: tuple[tuple[int, ...] | None, str | None] | None = None  # (stamp, problem): problem()

    @property
    def key(self) -> str:
        return f"{self.tenant}/{self.name}@{self.version}"

    def info(self) -> dict:
        w = self.weights
        return {
            "tenant": self.tenant,
            "name": self.name,
            "path": str(self.path),
            "version": self.version,
            "source": self.source,
            "pinned": self.pinned,
            "created": self.created,
            "rank": w.rank if w else None,
            "size_bytes": w.nbytes if w else None,
            "target_modules": sorted({m.rsplit(".", 1)[-1] for m in w.modules}) if w else None,
        }


class AdapterRegistry:
    def __init__(
        self,
        root: Path,
        tenants: Iterable[str],
        module_shapes: dict[str, tuple[int, int]],
        max_rank: int,
        host_cache: int = 64,
        base_name: str | None = None,
    ):
        self.root = Path(root)
        # the served base model's id: an adapter of that name could never be reached (requests naming
        # it get the base model), so a load refuses it and the store's copy lists its problem
        self.base_name = base_name
        self.read_failures = 0  # adapter files refused when read (metrics: mygpt_lora_load_failures_total)
        self.tenants = list(tenants)
        self.module_shapes = module_shapes
        self.max_rank = max_rank
        self.host_cache = host_cache
        self.on_retire: Callable[[str], None] = lambda key: None  # set by the server: engine.retire
        self.prepare: Callable[[LoRAWeights], object] | None = None  # set by the server: pack for slots
        self._entries: dict[tuple[str, str], AdapterEntry] = {}
        self._hidden: set[tuple[str, str]] = set()  # unloaded store adapters, not to be found again
        # versions count on per name for the process's life: a key (tenant/name@version) is never
        # reused, even after an unload, while the engine may still hold the old one
        self._versions: collections.Counter[tuple[str, str]] = collections.Counter()
        self._host_lru: collections.OrderedDict[str, None] = collections.OrderedDict()  # keys with weights
        self._lock = threading.RLock()
        self._flights: dict[tuple[str, str], threading.RLock] = collections.defaultdict(threading.RLock)

    def set_tenants(self, tenants: Iterable[str]) -> None:
        """The tenants after a config reload: a removed tenant's adapters stop routing at once (their
        requests in flight finish on them)."""
        with self._lock:
            self.tenants = list(tenants)
            for (tenant, _), entry in list(self._entries.items()):
                if tenant not in self.tenants:
                    self._remove(entry)

    # ------------------------------------------------------------------ lookups (any thread)
    def store_of(self, tenant: str) -> Path:
        return self.root / tenant

    def get(self, tenant: str, name: str) -> AdapterEntry | None:
        """The routable adapter `name` of `tenant`, finding it in the store if it just appeared."""
        if tenant not in self.tenants or not ADAPTER_NAME.fullmatch(name):
            return None
        with self._lock:
            entry = self._entries.get((tenant, name))
            if entry is None and (tenant, name) not in self._hidden:
                entry = self._discover(tenant, name)
            elif entry is not None and entry.source == "store" and not (entry.path / CONFIG).is_file():
                self._remove(entry)  # deleted from the store
                entry = None
            return entry

    def list(self, tenant: str | None = None) -> list[AdapterEntry]:
        """Routable adapters of `tenant` (of every tenant when None), sorted by tenant and name."""
        tenants = self.tenants if tenant is None else [tenant]
        out = []
        for t in tenants:
            names = {n for (tt, n) in list(self._entries) if tt == t}
            store = self.store_of(t)
            if store.is_dir():
                names |= {p.name for p in store.iterdir() if ADAPTER_NAME.fullmatch(p.name)}
            out += [e for n in sorted(names) if (e := self.get(t, n)) is not None]
        return out

    def problem(self, entry: AdapterEntry) -> str | None:
        """Why a request on `entry` would be refused (the AdapterError a load would raise), or None.
        Weights read from the current files have none; otherwise the load's checks run on the files'
        headers (check_adapter: no tensor read), once per change of the files. A store directory with
        an adapter_config.json is found by get() whatever its weights hold: GET /v1/models lists only
        the adapters without a problem, as a request would find them."""
        if entry.name == self.base_name:
            return self._base_named(entry.name)
        stamp = _stamp(entry.path)
        if entry.weights is not None and entry.stamp == stamp:
            return None
        checked = entry.checked
        if checked is None or checked[0] != stamp:  # (None: a file missing, until it appears)
            try:
                root = self.store_of(entry.tenant)
                check_adapter(entry.name, entry.path, self.module_shapes, self.max_rank, root=root)
                checked = (stamp, None)
            except AdapterError as exc:
                checked = (stamp, str(exc))
            entry.checked = checked
        return checked[1]

    @staticmethod
    def _base_named(name: str) -> str:
        return f"adapter name {name!r} is the base model's: requests naming it get the base model; rename it"

    def _discover(self, tenant: str, name: str) -> AdapterEntry | None:
        """A store directory with an adapter_config.json; one that links out of the tenant's store is
        found too, with that problem (its files are never read: read_adapter and check_adapter refuse a
        path out of the store), so that a request on it is a 400 that says so and the admin list shows
        why it is not served."""
        path = self.store_of(tenant) / name
        if not (path / CONFIG).is_file():
            return None
        entry = AdapterEntry(tenant, name, path.resolve(), self._next_version(tenant, name), source="store")
        self._entries[(tenant, name)] = entry
        return entry

    def _inside(self, tenant: str, path: Path) -> bool:
        real, store = path.resolve(), self.store_of(tenant).resolve()
        return store in real.parents

    # ------------------------------------------------------------------ weights (off the engine thread)
    def weights(self, entry: AdapterEntry) -> tuple[AdapterEntry, LoRAWeights]:
        """Reads and validates the entry's files (once per version; again when they change on disk,
        which makes a new version). Returns the current entry and its weights; AdapterError if bad."""
        with self._flights[(entry.tenant, entry.name)]:  # single flight per adapter
            with self._lock:
                entry = self._entries.get((entry.tenant, entry.name), entry)
            stamp = _stamp(entry.path)
            if entry.weights is not None and entry.stamp == stamp:
                with self._lock:
                    if entry.key in self._host_lru:
                        self._host_lru.move_to_end(entry.key)
                return entry, entry.weights
            weights, stamp = self._read_settled(entry.tenant, entry.name, entry.path)
            with self._lock:
                current = self._entries.get((entry.tenant, entry.name))
                if current is not entry:  # removed or rediscovered while we read (get(), set_tenants)
                    if entry.stamp is None or entry.stamp == stamp:
                        return entry, weights  # what was asked: that version's own files
                    if current is not None and current.path == entry.path and current.weights is None:
                        current.weights, current.stamp = weights, stamp  # the new files' version
                        self._remember(current)
                        return current, weights
                    # never the old version's key with the new files' weights
                    raise AdapterChanging(f"adapter '{entry.name}' changed while it was read; retry")
                if entry.stamp is not None and entry.stamp != stamp:  # changed on disk: a new version
                    entry = self._new_version(entry, entry.path, entry.source)
                entry.weights, entry.stamp = weights, stamp
                self._remember(entry)
            return entry, weights

    def _read_settled(self, tenant: str, name: str, path: Path) -> tuple[LoRAWeights, tuple[int, ...] | None]:
        """The files' weights and the stamp they were read under: read again when the files changed
        during the read (a copy in progress), so that a stamp never stands for other weights than its
        own (a version's key would then map to the new files' weights, or a new stamp to the old ones)."""
        wait = READ_WAIT_S
        for attempt in range(READ_TRIES):
            stamp = _stamp(path)
            try:
                weights = self._read(tenant, name, path)
            except AdapterError:
                if _stamp(path) == stamp or attempt == READ_TRIES - 1:
                    with self._lock:
                        self.read_failures += 1
                    raise  # bad files, not a copy in progress
                weights = None  # torn: a file read half-written
            if weights is not None and _stamp(path) == stamp:
                return weights, stamp
            time.sleep(wait)  # let the copy finish
            wait *= 2
        raise AdapterChanging(f"adapter '{name}': its files kept changing while they were read")

    def _read(self, tenant: str, name: str, path: Path) -> LoRAWeights:
        weights = read_adapter(name, path, self.module_shapes, self.max_rank, root=self.store_of(tenant))
        if self.prepare is not None:
            self.prepare(weights)  # e.g. packed for the device slots, here, off the engine thread
        return weights

    def _remember(self, entry: AdapterEntry) -> None:
        self._host_lru[entry.key] = None
        self._host_lru.move_to_end(entry.key)
        while len(self._host_lru) > self.host_cache:
            key, _ = self._host_lru.popitem(last=False)
            for e in self._entries.values():
                if e.key == key and not e.pinned:
                    e.weights = None  # read again on next use (the device copy is the engine's)

    # ------------------------------------------------------------------ admin (off the engine thread)
    def load(
        self, tenant: str, name: str, path: str | None = None, replace: bool = False, pinned: bool = False,
        source: str = "api",
    ) -> tuple[AdapterEntry, bool]:  # fmt: skip
        """Validates and registers an adapter; returns (entry, changed). Same name and path: a no-op.
        A taken name with another path raises AdapterConflict unless `replace`."""
        if tenant not in self.tenants:
            raise AdapterError(f"unknown tenant '{tenant}'")
        if not ADAPTER_NAME.fullmatch(name):
            raise AdapterError(f"invalid adapter name {name!r}: letters, digits and . _ : - (at most 128)")
        if name == self.base_name:
            raise AdapterError(self._base_named(name))
        where = self.resolve_path(tenant, name, path)
        with self._flights[(tenant, name)]:
            current = self.get(tenant, name)
            if current is not None and current.path == where and not replace:
                current, _ = self.weights(current)  # validated (read now if it never was)
                if source == "config":
                    current.source = "config"  # declared by the config from now on (a reload follows it)
                if pinned and not current.pinned:
                    current.pinned = True
                    return current, True
                return current, False
            if current is not None and current.path != where and not replace:
                raise AdapterConflict(
                    f"adapter '{name}' of tenant '{tenant}' already exists (from {current.path}); "
                    "set replace to load a new version under this name"
                )
            # validation: AdapterError names the problem
            weights, stamp = self._read_settled(tenant, name, where)
            with self._lock:
                if current is not None:
                    entry = self._new_version(current, where, source)
                else:
                    entry = AdapterEntry(tenant, name, where, self._next_version(tenant, name), source=source)
                    self._entries[(tenant, name)] = entry
                entry.weights, entry.stamp, entry.pinned = (
                    weights,
                    stamp,
                    pinned or (current is not None and current.pinned),
                )
                self._hidden.discard((tenant, name))
                self._remember(entry)
            log.info("adapter %s loaded from %s (rank %d)", entry.key, where, weights.rank)
            return entry, True

    def unload(self, tenant: str, name: str) -> AdapterEntry | None:
        """Makes the adapter unroutable at once; requests using it finish on it."""
        with self._flights[(tenant, name)], self._lock:
            entry = self.get(tenant, name)
            if entry is None:
                return None
            self._remove(entry)
            self._hidden.add((tenant, name))
        log.info("adapter %s unloaded", entry.key)
        return entry

    def delete(self, tenant: str, name: str) -> AdapterEntry | None:
        """unload(), then the adapter's directory in the tenant's store is removed, so that it is gone
        after a restart too (a store directory is found again). Requests using it finish on it: their
        weights are in memory. A request that read no weights yet waits for this (the adapter's
        flight lock), then finds it gone."""
        with self._flights[(tenant, name)]:
            entry = self.unload(tenant, name)
            path = self.store_of(tenant) / name
            if path.is_dir() and not path.is_symlink() and self._inside(tenant, path):
                shutil.rmtree(path)
                log.info("adapter %s/%s deleted from the store", tenant, name)
        return entry

    def resolve_path(self, tenant: str, name: str, path: str | None) -> Path:
        if path is not None and not usable_path(path):
            raise AdapterError(f"adapter '{name}': path {path!r} is not a usable file system path")
        store = self.store_of(tenant)
        candidate = Path(path) if path else store / name
        if not candidate.is_absolute():
            # relative paths are taken inside the tenant's store ("support-v2" or "acme/support-v2")
            parts = candidate.parts
            candidate = (
                store / Path(*parts[1:])
                if parts and parts[0] == tenant and len(parts) > 1
                else store / candidate
            )
        if not self._inside(tenant, candidate):
            raise AdapterError(
                f"adapter '{name}': path {path or name!r} is outside the adapter store of tenant '{tenant}'"
            )
        if not candidate.is_dir():
            raise AdapterError(
                f"adapter '{name}': directory {path or name!r} not found in the store of tenant '{tenant}'"
            )
        return candidate.resolve()

    def _new_version(self, old: AdapterEntry, path: Path, source: str) -> AdapterEntry:
        version = self._next_version(old.tenant, old.name)
        entry = AdapterEntry(old.tenant, old.name, path, version, source, pinned=old.pinned)
        self._entries[(old.tenant, old.name)] = entry
        self._forget(old)
        return entry

    def _next_version(self, tenant: str, name: str) -> int:
        self._versions[(tenant, name)] += 1
        return self._versions[(tenant, name)]

    def _remove(self, entry: AdapterEntry) -> None:
        self._entries.pop((entry.tenant, entry.name), None)
        self._forget(entry)

    def _forget(self, entry: AdapterEntry) -> None:
        self._host_lru.pop(entry.key, None)
        entry.weights = None
        self.on_retire(entry.key)


def _stamp(path: Path) -> tuple[int, ...] | None:
    """What changes when the adapter's files do: each file's modification and status-change times, size
    and inode (a copy that keeps the modification times, cp -p or rsync -a, still changes the others)."""
    try:
        stats = [(path / WEIGHTS).stat(), (path / CONFIG).stat()]
    except OSError:
        return None
    return tuple(v for st in stats for v in (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino))
