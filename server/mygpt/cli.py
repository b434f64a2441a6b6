"""Command line: `mygpt serve ...`. The only place with start-up side effects."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import uvicorn
from pydantic import ValidationError

from mygpt.config import Settings

log = logging.getLogger("mygpt")


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI-compatible API")
    p.add_argument(
        "--model", help="'default' (embedded SmolLM2-135M-Instruct), a hub id, a directory or a .gguf"
    )
    p.add_argument("--served-model-name", help="model id shown in the API")
    p.add_argument("--quantization", choices=["auto", "nf4", "none"])
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--cache-dir", help="where converted models are cached")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--max-model-len", type=int, help="context length served (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, help="rows in the running batch")
    p.add_argument(
        "--gpu-memory-utilization", type=float, help="share of the GPU's memory to use (default 0.9)"
    )
    p.add_argument("--max-num-batched-tokens", type=int, help="prompt tokens prefilled per step")
    p.add_argument(
        "--graph-prompt-tokens", type=int,
        help="experimental: with CUDA graphs, steps with at most this many prompt tokens run graphed (default 0: eagerly)",
    )  # fmt: skip
    p.add_argument("--max-waiting", type=int, help="queued requests before 429")
    p.add_argument(
        "--embedding-pooling", choices=["prompt", "mean", "last"],
        help="/v1/embeddings: 'prompt' (an instruction around each input, its last token: for chat models; "
        "default), the final hidden states' 'mean', or the 'last' token's (embedding models trained so)",
    )  # fmt: skip
    p.add_argument(
        "--embedding-step-tokens", type=int,
        help="embedding tokens a step takes at most while streams decode (default: max-num-batched-tokens / 4)",
    )  # fmt: skip
    p.add_argument("--num-threads", type=int, help="torch CPU threads")
    p.add_argument("--engine", choices=["batched", "naive"], help="naive: the generate() baseline")
    p.add_argument("--adapter-dir", help="the adapter store: <dir>/<name>/ in peft format")
    p.add_argument("--max-loras", type=int, help="adapter slots resident at once (0: no LoRA)")
    p.add_argument("--max-lora-rank", type=int, help="largest LoRA rank accepted")
    p.add_argument("--config", help="tenancy config (YAML): tenants, keys, adapters, limits; admin keys")
    p.add_argument("--keys-dir", help="directory of key files '<tenant>' and 'admin' (a mounted Secret)")
    p.add_argument(
        "--api-key", help="without --config: the key the one tenant must present (prefer MYGPT_API_KEY)"
    )
    p.add_argument("--admin-key", help="without --config: the admin key (prefer MYGPT_ADMIN_KEY)")
    p.add_argument("--cost-per-hour-usd", type=float, help="what the server costs per hour (metrics, usage)")
    p.add_argument(
        "--price-table", help="YAML of closed-API prices per 1M tokens (default: the shipped table)"
    )
    p.add_argument("--metrics-max-adapters", type=int, help="adapter label values in metrics before 'other'")
    p.add_argument("--shutdown-timeout-s", type=float, help="SIGTERM: how long in-flight requests may finish")
    p.add_argument(
        "--cors-allow-origins",
        help="comma-separated web origins allowed to call the API from a browser, or '*'",
    )
    p.add_argument(
        "--no-finetune", dest="finetune", action="store_const", const=False,
        help="no files and fine-tuning APIs on this replica",
    )  # fmt: skip
    p.add_argument("--max-file-bytes", type=int, help="largest training file accepted")
    p.add_argument("--finetune-cpu-threads", type=int, help="CPU threads of a training process (niced)")
    p.add_argument(
        "--no-train", dest="train", action="store_const", const=False,
        help="run no fine-tuning jobs here (the APIs stay; a replica that trains, sharing the store, runs them)",
    )  # fmt: skip
    for flag, text in (  # on/off flags whose default is the Settings field's
        ("--cuda-graphs", "replay decode steps as CUDA graphs on a GPU (default on)"),
        ("--prefix-caching", "reuse the KV of a cached prompt prefix (same adapter and tenant; default on)"),
        (
            "--overlap-steps",
            "experimental: launch each decode step before the host reads the last one's tokens",
        ),
        ("--compile", "experimental: torch.compile the decoder layers of the graphed decode steps"),
        (
            "--nf4-kernel",
            "experimental: each NF4 product takes the fastest of mygpt's Triton kernel and bitsandbytes' "
            "paths at each batch size, timed on the GPU at start-up",
        ),
        (
            "--lora-kernel",
            "experimental: the LoRA terms of graphed steps by mygpt's Triton kernels (a GPU; helps with --compile)",
        ),
    ):
        p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
    p.add_argument(
        "--no-warmup", dest="warmup", action="store_const", const=False, help="skip the warm-up generation"
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positives(text: str) -> list[int]:
    """A comma-separated list of whole numbers of at least 1 (bench's --concurrency)."""
    return [_positive(part) for part in text.split(",")]


def _bench_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="load-test an OpenAI-compatible server (mygpt or a baseline)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument(
        "--models", default="SmolLM2-135M-Instruct", help="comma-separated; requests rotate over them"
    )
    p.add_argument("--concurrency", type=_positives, default=[1], help="comma-separated list, e.g. 1,4,16")
    p.add_argument("--requests", type=int, help="requests per concurrency level (default: 2x concurrency)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-words", type=int, default=32)
    p.add_argument("--repeat", type=_positive, default=1, help="runs per level; the median is reported")
    p.add_argument("--label", default="mygpt")
    p.add_argument("--extra-body", help="JSON merged into each request (e.g. a logit_bias)")
    p.add_argument(
        "--embeddings", type=_positive, metavar="N",
        help="load /v1/embeddings instead: requests of N texts of --prompt-words words (the first model)",
    )  # fmt: skip
    p.add_argument("--out", help="write the results as JSON here")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Environment (MYGPT_*) first, then any flag given on the command line."""
    overrides = {k: v for k, v in vars(args).items() if v is not None and k != "command"}
    try:
        return Settings(**overrides)
    except ValidationError as exc:  # one line a bad setting, before anything loads (as argparse's errors)
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else "settings"
        sys.exit(f"mygpt: --{name.replace('_', '-')} (MYGPT_{name.upper()}): {err['msg']}")


def _finetune_parsers(sub: Any) -> None:
    p = sub.add_parser("finetune", help="fine-tune an adapter on a running server (OpenAI's fine-tuning API)")
    p.add_argument("training_file", help='chat examples, one JSON object a line: {"messages": [...]}')
    p.add_argument("--validation-file")
    p.add_argument("--suffix", help="part of the model name: ft:<base>:<tenant>:<suffix>:<job>")
    p.add_argument("--model", help="the base model (default: the server's)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr-multiplier", type=float)
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", help="default: MYGPT_API_KEY, then OPENAI_API_KEY")
    p = sub.add_parser("eval", help="validation loss of the base model and an adapter on a chat file")
    p.add_argument("file", help="chat examples (the fine-tuning format)")
    p.add_argument("--adapter", required=True, help="an adapter directory, or a name in the tenant's store")
    p.add_argument("--tenant", default="default")
    p.add_argument("--adapter-dir", help="default: the server's (MYGPT_ADAPTER_DIR, else adapters)")
    p.add_argument("--model", help="the base model, as for serve (default: MYGPT_MODEL, else the default)")
    p.add_argument("--cache-dir", help="default: the server's (MYGPT_CACHE_DIR, else ~/.cache/mygpt)")
    p.add_argument("--samples", type=int, default=3, help="answers to show side by side")


def _keygen_parser(sub: Any) -> None:
    p = sub.add_parser("keygen", help="make a new API key and print it with the hash to put in the config")
    p.add_argument("--hash", metavar="KEY", help="print only the hash of this existing key")


def _quiet_known_noise() -> None:
    """What a server log should not carry at every start: bitsandbytes' warning that its optional CPU
    kernel (fetched from the Hugging Face hub, which this server never does) is missing, and, in a log
    that is not a terminal, transformers' progress bars (a line of carriage returns per model load)."""

    def not_the_hub_kernel(record: logging.LogRecord) -> bool:
        return "from kernels-community" not in record.getMessage()

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(not_the_hub_kernel)
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def serve(settings: Settings) -> None:
    from mygpt.api.request_ids import RequestIdLogFilter
    from mygpt.app import build_app
    from mygpt.tenancy.config import ConfigError, load_tenancy_from

    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s%(request)s: %(message)s",  # request: " [<X-Request-Id>]"
        stream=sys.stderr,
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdLogFilter())
    _quiet_known_noise()
    try:
        tenancy = load_tenancy_from(settings, os.environ)
    except ConfigError as exc:
        sys.exit(f"mygpt: {exc}")
    app = build_app(settings, tenancy=tenancy)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        timeout_graceful_shutdown=3,  # after our own drain (below): only idle or overdue connections remain
    )  # fmt: skip
    state = app.state.mygpt
    if hasattr(signal, "SIGHUP"):  # reload the tenancy config and keys, as POST /v1/admin/reload does
        hup = threading.Event()
        threading.Thread(target=_reloader, args=(state, hup), name="mygpt-sighup", daemon=True).start()
        signal.signal(signal.SIGHUP, lambda *_: hup.set())  # the handler only sets a flag: never blocks
    server = _DrainingServer(config, state, settings.shutdown_timeout_s)
    state.on_failure = server.stop_after_failure
    server.run()
    if state.failure:  # the model or the engine never came up: a supervisor restarts or reports it
        sys.exit(f"mygpt: start-up failed: {state.failure}")


def _reloader(state: Any, hup: threading.Event) -> None:
    from mygpt.tenancy.config import ConfigError

    while True:
        hup.wait()
        hup.clear()
        try:
            state.reload_tenancy()
        except ConfigError as exc:
            log.error("SIGHUP: the tenancy config was not reloaded (the old one stays): %s", exc)
        except Exception:
            log.exception("SIGHUP: reloading the tenancy config failed")


class _DrainingServer(uvicorn.Server):
    """uvicorn's Server with a drain on SIGTERM/SIGINT (G2): /ready turns 503 and new requests get 503
    with Retry-After while in-flight requests finish (at most `timeout` seconds); then uvicorn shuts
    down and the process exits 0 (the signal is not re-raised). A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, state: Any, timeout: float):
        super().__init__(config)
        self.state, self.timeout = state, timeout

    def stop_after_failure(self) -> None:
        """Start-up failed (the model, the engine, a pinned adapter): nothing would ever be served, so
        the process stops and exits non-zero (main), where it stayed up with /ready 503 until killed and
        then exited 0, which no supervisor restarts."""
        self.state.draining = True
        self.should_exit = True

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.state.draining:  # a second signal: stop now
            self.should_exit = self.force_exit = True
            return
        self.state.draining = True
        log.info(
            "draining: %d requests in flight, waiting up to %.0fs", self.state.tenants.in_flight, self.timeout
        )
        threading.Thread(target=self._drain, name="mygpt-drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.timeout
        if self.state.jobs is not None:  # a trainer checkpoints while requests finish
            threading.Thread(target=self.state.jobs.stop, name="mygpt-finetune-stop", daemon=True).start()
        while self.state.tenants.in_flight > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.state.tenants.in_flight > 0 and self.state.engine is not None:
            # past the timeout: the engine ends what still runs with an error event (A10: the SDK raises,
            # where a cut connection would leave half an answer), and those events get a moment to go out
            log.warning(
                "drain timeout: %d requests still in flight end with an error", self.state.tenants.in_flight
            )
            self.state.engine.stop()
            grace = time.monotonic() + 2.0
            while self.state.tenants.in_flight > 0 and time.monotonic() < grace:
                time.sleep(0.05)
        self.should_exit = True


def keygen(args: argparse.Namespace) -> None:
    import secrets

    from mygpt.tenancy.config import hash_key

    if args.hash:
        print(f"sha256:{hash_key(args.hash)}")
        return
    key = "sk-mygpt-" + secrets.token_urlsafe(32)
    print(f"key:  {key}\nhash: sha256:{hash_key(key)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mygpt", description="a self-hosted private GPT server")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _bench_parser(sub)
    _keygen_parser(sub)
    _finetune_parsers(sub)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(settings_from_args(args))
    elif args.command == "bench":
        from mygpt import bench

        bench.main(args)
    elif args.command == "keygen":
        keygen(args)
    elif args.command == "finetune":
        from mygpt.finetune import cli as ft

        key = args.api_key or os.environ.get("MYGPT_API_KEY") or os.environ.get("OPENAI_API_KEY") or "none"
        _one_line_errors("finetune", lambda: ft.finetune(args, key), args.base_url)
    elif args.command == "eval":
        from mygpt.finetune import cli as ft

        served = Settings()  # the server's own settings (MYGPT_*, as in its container) where no flag says
        args.adapter_dir = args.adapter_dir or str(served.adapter_dir)
        args.cache_dir = args.cache_dir or str(served.cache_dir)
        args.model = args.model or served.model
        _one_line_errors("eval", lambda: ft.evaluate(args))


def _one_line_errors(command: str, run: Any, base_url: str | None = None) -> None:
    """A user's mistake (a file that is not there, a server that refuses or does not answer) as one
    line and status 1, the server's own message where it gave one; anything else as a traceback."""
    import openai

    try:
        run()
    except openai.APIConnectionError:
        sys.exit(f"mygpt {command}: cannot reach the server at {base_url}")
    except openai.APIStatusError as exc:
        body = exc.body if isinstance(exc.body, dict) else {}
        sys.exit(
            f"mygpt {command}: the server answered {exc.status_code}: {body.get('message') or exc.message}"
        )
    except OSError as exc:
        sys.exit(f"mygpt {command}: {exc}")


if __name__ == "__main__":
    main()
