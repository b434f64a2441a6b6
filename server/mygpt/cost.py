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
CLOSED_API_PRICES: dict[str, tuple[float, float]] = {
    "openai/gpt-4o": (2.50, 10.00),
    "openai/gpt-4o-mini": (0.15, 0.60),
    "openai/gpt-4-8k": (30.00, 60.00),
    "openai/gpt-3.5-turbo-16k": (3.00, 4.00),
    "anthropic/claude-sonnet": (3.00, 15.00),
    "anthropic/claude-2.1": (8.00, 24.00),
}


@dataclass
class CostModel:
    per_hour_usd: float = DEFAULT_COST_PER_HOUR_USD
    prices: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(CLOSED_API_PRICES))

    def serving_usd(self, engine_seconds: float) -> float:
        return engine_seconds * self.per_hour_usd / 3600.0

    def closed_api_usd(self, prompt_tokens: int, completion_tokens: int) -> dict[str, float]:
        return {m: (prompt_tokens * i + completion_tokens * o) / 1e6 for m, (i, o) in self.prices.items()}


def load_price_table(path: Path) -> dict[str, tuple[float, float]]:
    """A YAML map `provider/model: {input: USD per 1M, output: USD per 1M}` replacing the shipped table."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a map of provider/model -> {{input, output}}")
    table = {}
    for name, price in raw.items():
        if not isinstance(price, dict) or not {"input", "output"} <= set(price):
            raise ValueError(f"{path}: {name}: give 'input' and 'output' (USD per 1M tokens)")
        table[str(name)] = (float(price["input"]), float(price["output"]))
    return table
