"""Reading a peft LoRA directory into validated host tensors (never inside the generation loop)."""

from __future__ import annotations

import json
import math
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter that cannot be served; the message names the problem."""


class AdapterChanging(AdapterError):
    """An adapter whose files changed while they were read (a copy or a replacement in progress): a
    moment's matter, to retry, not a bad adapter."""


@dataclass
class ModuleLoRA:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r], scaling folded in


@dataclass
class LoRAWeights:
    name: str
    path: Path
    rank: int  # largest rank over modules
    modules: dict[str, ModuleLoRA]  # module path in the base model ("model.layers.0.self_attn.q_proj")
    base_model: str | None  # base_model_name_or_path from the config
    _packed: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _pack_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    @property
    def nbytes(self) -> int:
        return sum(m.a.nbytes + m.b.nbytes for m in self.modules.values())

    def packed(self, dtype: torch.dtype, pin: bool) -> PackedLoRA:
        """Every module's A [r, in] and B^T [r, out] in `dtype`, back to back in one host buffer
        (page-locked if `pin`), so that loading into a device slot is one host-to-device copy instead
        of two synchronous copies per module. Made once per dtype and kept."""
        with self._pack_lock:
            if (dtype, pin) not in self._packed:
                parts, index, at = [], {}, 0
                for path, m in self.modules.items():
                    a, bt = m.a.to(dtype), m.b.T.to(dtype)
                    index[path] = (at, a.shape, at + a.numel(), bt.shape)
                    parts += [a.reshape(-1), bt.reshape(-1)]
                    at += a.numel() + bt.numel()
                buffer = torch.cat(parts) if parts else torch.empty(0, dtype=dtype)
                self._packed[(dtype, pin)] = PackedLoRA(buffer.pin_memory() if pin else buffer, index)
            return self._packed[(dtype, pin)]


@dataclass(frozen=True)
class PackedLoRA:
    buffer: torch.Tensor  # flat, in the slots' dtype
    index: dict[
        str, tuple[int, torch.Size, int, torch.Size]
    ]  # path -> (A offset, A shape, B^T offset, shape)


def read_adapter(
    name: str,
    path: Path,
    module_shapes: dict[str, tuple[int, int]],
    max_rank: int,
    root: Path | None = None,
) -> LoRAWeights:
    """Loads and validates a peft LoRA directory.

    module_shapes: the base model's LoRA-capable modules, path -> (in_features, out_features).
    root: the adapter store; the directory (symlinks resolved) must stay inside it.
    """
    path = Path(path)
    config = _check_files(name, path, root)
    tensors = _read_tensors(name, path / WEIGHTS)
    plan = _plan(name, config, {k: tuple(t.shape) for k, t in tensors.items()}, module_shapes, max_rank)
    modules = {
        module: ModuleLoRA(a=tensors[a].float().contiguous(), b=(tensors[b].float() * scaling).contiguous())
        for module, (a, b, scaling) in plan.items()
    }
    return LoRAWeights(
        name=name,
        path=path,
        rank=max(m.a.shape[0] for m in modules.values()),
        modules=modules,
        base_model=config.get("base_model_name_or_path"),
    )


def check_adapter(
    name: str,
    path: Path,
    module_shapes: dict[str, tuple[int, int]],
    max_rank: int,
    root: Path | None = None,
) -> None:
    """Every check read_adapter makes, from the weights file's header (no tensor is read): AdapterError
    names the problem. For listings: GET /v1/models shows only adapters a request can use."""
    path = Path(path)
    config = _check_files(name, path, root)
    _plan(name, config, _header_shapes(name, path / WEIGHTS), module_shapes, max_rank)


def _check_files(name: str, path: Path, root: Path | None) -> dict:
    """The directory inside the store, safetensors weights there, and a config we serve: the config."""
    if root is not None:
        real, real_root = path.resolve(), Path(root).resolve()
        if real != real_root and real_root not in real.parents:
            raise AdapterError(f"adapter '{name}': path is outside the adapter store")
    if not path.is_dir():
        raise AdapterError(f"adapter '{name}': directory {path.name!r} not found")
    if root is not None:
        real_root = Path(root).resolve()
        for file in (path / CONFIG, path / WEIGHTS):
            if file.exists() and real_root not in file.resolve().parents:
                raise AdapterError(f"adapter '{name}': {file.name} links outside the adapter store")
    if not (path / WEIGHTS).is_file():
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        if pickled:
            raise AdapterError(
                f"adapter '{name}': pickle weights ({pickled[0]}) are refused; use safetensors"
            )
        raise AdapterError(f"adapter '{name}': {WEIGHTS} is missing")
    return _read_config(name, path)


def _plan(
    name: str,
    config: dict,
    shapes: dict[str, tuple[int, ...]],
    module_shapes: dict[str, tuple[int, int]],
    max_rank: int,
) -> dict[str, tuple[str, str, float]]:
    """The served modules from the weights' names and shapes: module -> (its lora_A key, its lora_B key,
    the scaling folded into B); AdapterError for anything the server cannot serve as peft would."""
    pairs: dict[str, dict[str, str]] = {}
    for key in shapes:
        m = _KEY.match(key)
        if not m:
            raise AdapterError(
                f"adapter '{name}': unexpected tensor {key!r} (only LoRA A/B weights are served)"
            )
        pairs.setdefault(m["module"], {})[m["ab"]] = key
    if not pairs:
        raise AdapterError(f"adapter '{name}': no LoRA weights found")
    alpha = config.get("lora_alpha", config.get("r", 8))
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not -1e30 < alpha < 1e30:
        raise AdapterError(f"adapter '{name}': lora_alpha {repr(alpha)[:40]} is not a usable number")
    plan: dict[str, tuple[str, str, float]] = {}
    for module, ab in sorted(pairs.items()):
        if module not in module_shapes:
            raise AdapterError(f"adapter '{name}': target module {module!r} does not exist in the base model")
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"adapter '{name}': {module} has lora_{next(iter(ab))} without its pair")
        a, b = shapes[ab["A"]], shapes[ab["B"]]
        in_f, out_f = module_shapes[module]
        if len(a) != 2 or len(b) != 2 or a[0] == 0:
            raise AdapterError(
                f"adapter '{name}': {module} has lora_A of shape {a} and lora_B of shape "
                f"{b}: each must be a matrix of rank 1 or more"
            )
        r = a[0]
        if a != (r, in_f) or b != (out_f, r):
            trained_on = config.get("base_model_name_or_path") or "another base model"
            raise AdapterError(
                f"adapter '{name}': base model mismatch: {module} has shapes A{a} "
                f"B{b}, the served base model needs A(r, {in_f}) B({out_f}, r) "
                f"(the adapter was trained on {trained_on})"
            )
        if r > max_rank:
            raise AdapterError(
                f"adapter '{name}': rank {r} exceeds the server's maximum LoRA rank {max_rank}"
            )
        plan[module] = (ab["A"], ab["B"], alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)
    return plan


def _read_config(name: str, path: Path) -> dict:
    try:
        config = json.loads((path / CONFIG).read_text())
    except FileNotFoundError:
        raise AdapterError(f"adapter '{name}': {CONFIG} is missing") from None
    except OSError as exc:  # a directory, no permission
        raise AdapterError(f"adapter '{name}': {CONFIG} cannot be read ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"adapter '{name}': {CONFIG} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"adapter '{name}': {CONFIG} is not a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"adapter '{name}': peft_type {peft_type} is not supported (LoRA only)")
    if config.get("modules_to_save"):
        raise AdapterError(f"adapter '{name}': modules_to_save {config['modules_to_save']} is not supported")
    if config.get("use_dora"):
        raise AdapterError(f"adapter '{name}': DoRA is not supported")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"adapter '{name}': LoRA bias {config['bias']!r} is not supported")
    if config.get("alpha_pattern"):
        raise AdapterError(f"adapter '{name}': alpha_pattern is not supported")
    return config


def _read_tensors(name: str, file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterError(f"adapter '{name}': {WEIGHTS} is corrupt ({exc})") from None


def _header_shapes(name: str, file: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape from a safetensors header (the file's size checked against it), no data read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 - safe_open is no dict
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterError(f"adapter '{name}': {WEIGHTS} is corrupt ({exc})") from None
