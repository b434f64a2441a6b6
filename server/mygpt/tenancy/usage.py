"""Usage accounting per tenant and model: tokens and requests by outcome, since the process started."""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field

OUTCOMES = ("stop", "length", "cancelled", "error", "rejected")


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: collections.Counter[str] = field(default_factory=collections.Counter)
    cost_usd: float = 0.0  # share of engine busy time at the server's hourly price
    closed_api_usd: collections.Counter[str] = field(default_factory=collections.Counter)

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "requests": {o: self.requests[o] for o in OUTCOMES},
            "cost_usd": round(self.cost_usd, 9),
            "closed_api_equivalent_usd": {m: round(v, 9) for m, v in sorted(self.closed_api_usd.items())},
        }


class UsageLedger:
    """(tenant, model) -> Usage. Models are the ids the tenant used (the base model or its adapters)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._usage: dict[tuple[str, str], Usage] = collections.defaultdict(Usage)

    def record(
        self, tenant: str, model: str, outcome: str, prompt_tokens: int, completion_tokens: int,
        cost_usd: float = 0.0, closed_api_usd: dict[str, float] | None = None,
    ) -> None:  # fmt: skip
        assert outcome in OUTCOMES, outcome
        with self._lock:
            u = self._usage[(tenant, model)]
            u.prompt_tokens += prompt_tokens
            u.completion_tokens += completion_tokens
            u.requests[outcome] += 1
            u.cost_usd += cost_usd
            u.closed_api_usd.update(closed_api_usd or {})

    def report(self, tenant: str | None = None) -> list[dict]:
        """Rows {tenant, model, prompt_tokens, ...}; every tenant's when tenant is None."""
        with self._lock:
            items = sorted(self._usage.items())
            return [
                {"tenant": t, "model": m, **u.as_dict()}
                for (t, m), u in items
                if tenant is None or t == tenant
            ]
