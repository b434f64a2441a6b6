"""Cost model: what the server's tokens cost, and what the same tokens would cost on closed APIs.

The server's cost per hour is a setting (default below). A request's cost is its share of engine busy
time: each engine step's duration is split over the requests in it by the tokens each one had
computed in that step (prompt tokens of its chunk, or one decoded token). Idle time is attributed to
nobody; the dashboard shows both the busy-share price and the all-in price (hourly cost over tokens
served).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

# An H100 on demand: Lambda's list price for 1x H100 SXM, $3.78/hour, as verified on 2026-05-07 from
# Lambda's public pricing page (reported by techbytes.app, "Serverless GPU Pricing Matrix 2026").
DEFAULT_COST_PER_HOUR_USD = 3.78

# USD per 1M input / output tokens: the list prices OpenAI and Anthropic published for these models
# (GPT-4 8k, GPT-3.5-turbo-16k and Claude 2.1 at their last published prices; GPT-4 8k and
# GPT-3.5-turbo-16k cross-checked on lmmarketcap.com's model pages). Written down on 2026-11-26 without
# access to the live pricing pages: check them for your date and override with --price-table.
# A third price, where the provider has one, is for cached input: prompt tokens its own prompt caching
# found (OpenAI bills them at half the input price for the gpt-4o family, Anthropic cache reads at a
# tenth; written down 2026-11-27 under the same caveat). The tokens our prefix cache reused are priced
# so on the closed API too: conservative, as OpenAI caches prefixes of 1,024 tokens or more only and
# Anthropic only where the client marks them (and bills cache writes at 1.25x, not counted here).
CLOSED_API_PRICES: dict[str, tuple[float, ...]] = {
    "openai/gpt-4o": (2.50, 10.00, 1.25),
    "openai/gpt-4o-mini": (0.15, 0.60, 0.075),
    "openai/gpt-4-8k": (30.00, 60.00),
    "openai/gpt-3.5-turbo-16k": (3.00, 4.00),
    "anthropic/claude-sonnet": (3.00, 15.00, 0.30),
    "anthropic/claude-2.1": (8.00, 24.00),
}
# USD per 1M input tokens of closed embedding models (OpenAI's list prices, written down 2026-11-27
# under the same caveat): what /v1/embeddings' tokens are priced at, not the chat models above.
CLOSED_EMBEDDING_PRICES: dict[str, float] = {
    "openai/text-embedding-3-small": 0.02,
    "openai/text-embedding-3-large": 0.13,
}


@dataclass
class CostModel:
    per_hour_usd: float = DEFAULT_COST_PER_HOUR_USD
    prices: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(CLOSED_API_PRICES))
    embedding_prices: dict[str, float] = field(default_factory=lambda: dict(CLOSED_EMBEDDING_PRICES))

    def serving_usd(self, engine_seconds: float) -> float:
        return engine_seconds * self.per_hour_usd / 3600.0

    def closed_api_usd(
        self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
    ) -> dict[str, float]:
        """What each closed API would charge; cached_tokens of the prompt at its cached-input price
        (the input price where it has none)."""
        out = {}
        for model, (i, o, *cached) in self.prices.items():
            c = cached[0] if cached else i
            out[model] = (
                (prompt_tokens - cached_tokens) * i + cached_tokens * c + completion_tokens * o
            ) / 1e6
        return out

    def closed_embedding_usd(self, tokens: int) -> dict[str, float]:
        """What each closed embedding model would charge for embedding `tokens` input tokens."""
        return {model: tokens * price / 1e6 for model, price in self.embedding_prices.items()}


def load_price_table(path: Path) -> tuple[dict[str, tuple[float, ...]], dict[str, float]]:
    """A YAML map `provider/model: {input: USD per 1M, output: USD per 1M, cached_input: optional}`,
    or `{embedding: USD per 1M}` for an embedding model, replacing the shipped tables (chat and
    embedding models: a table without embedding models keeps the shipped ones)."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a map of provider/model -> {{input, output}}")
    table, embedding = {}, {}
    for name, price in raw.items():
        if isinstance(price, dict) and set(price) == {"embedding"}:
            embedding[str(name)] = float(price["embedding"])
            continue
        if not isinstance(price, dict) or not {"input", "output"} <= set(price):
            raise ValueError(
                f"{path}: {name}: give 'input' and 'output', or 'embedding' alone (USD per 1M tokens)"
            )
        table[str(name)] = (float(price["input"]), float(price["output"])) + (
            (float(price["cached_input"]),) if price.get("cached_input") is not None else ()
        )
    return table, embedding or dict(CLOSED_EMBEDDING_PRICES)
