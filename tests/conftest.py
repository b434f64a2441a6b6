"""Shared fixtures: a tiny random Llama with the default model's tokenizer, and real server processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

if not torch.cuda.is_available():
    # kernels/nf4.py's Triton kernel runs in Triton's interpreter here (tests/unit/test_nf4_kernel.py);
    # Triton reads this once, when bitsandbytes or transformers first import it
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CACHE = ARTIFACTS / "cache"  # converted default model, shared by all tests and runs


@pytest.fixture(scope="session")
def default_checkpoint() -> Path:
    """The embedded default model converted to a HF checkpoint (done once, cached)."""
    from mygpt.engine.loader import convert_gguf, default_gguf_path

    return convert_gguf(default_gguf_path(), CACHE)


@pytest.fixture(scope="session")
def tokenizer(default_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_checkpoint)


def build_tiny_model(path: Path, tokenizer, model_type: str = "llama", seed: int = 0) -> Path:
    """A 2-layer random model of the given family with the default model's tokenizer and template."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if (path / "config.json").exists():
        return path
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.5,  # large weights: varied, visible text instead of one repeated token
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = AutoModelForCausalLM.from_config(config)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer) -> Path:
    return build_tiny_model(ARTIFACTS / "tiny-llama", tokenizer)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`mygpt serve` as a real process on a free loopback port."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, name: str = "server"):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = ARTIFACTS / f"{name}-{self.port}.log"
        ARTIFACTS.mkdir(exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "mygpt",
            "serve",
            "--port",
            str(self.port),
            "--cache-dir",
            str(CACHE),
            *args,
        ]
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )

    def wait_ready(self, timeout: float = 300.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.base_url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def default_server(default_checkpoint):
    """The real default model (SmolLM2-135M-Instruct, as `make serve` runs it)."""
    server = ServerProcess("--max-num-seqs", "16", name="default").wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir):
    """A tiny random model: fast, for wire-format and error tests. Keep-alive every 0.2 s."""
    server = ServerProcess(
        "--model", str(tiny_model_dir), "--served-model-name", "tiny", "--max-num-seqs", "8", name="tiny",
        env={"MYGPT_KEEPALIVE_S": "0.2"},
    ).wait_ready()  # fmt: skip
    yield server
    server.stop()


@pytest.fixture
def anyio_backend():
    return "asyncio"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
