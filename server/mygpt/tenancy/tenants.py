"""Tenants at run time: authentication, limits, usage and request metrics, behind one object the API
layer calls."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mygpt.tenancy.auth import Authenticator, Principal
from mygpt.tenancy.config import Tenancy
from mygpt.tenancy.limits import TenantLimiter
from mygpt.tenancy.usage import UsageLedger

if TYPE_CHECKING:
    from mygpt.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class RequestTimes:
    """What the metrics need of a finished request (seconds)."""

    engine_s: float = 0.0  # share of engine busy time (all choices)
    queue_s: float | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    token_gaps: list[float] = field(default_factory=list)


class Ticket:
    """One admitted request: holds its tenant's concurrency slot until finish() (called once)."""

    def __init__(
        self,
        tenants: Tenants,
        principal: Principal,
        model: str,
        adapter: str | None,
        limiter: TenantLimiter | None,
    ):
        self._tenants = tenants
        self.principal = principal
        self.model = model  # as the caller named it (usage rows)
        self.adapter = adapter  # the adapter's name, None for the base model (metrics label)
        self.arrival = time.monotonic()  # when the request arrived (the API may set it earlier)
        self._limiter = limiter
        self._charged = 0  # prompt tokens charged to the limiter
        self.embedding_inputs: int | None = None  # an embeddings request's inputs (its own metrics)
        self._done = False
        self._lock = threading.Lock()

    def charge(self, prompt_tokens: int) -> None:
        if self._limiter is not None:
            self._limiter.charge(prompt_tokens)
            self._charged += prompt_tokens

    def refund(self, prompt_tokens: int) -> None:
        """Gives back charged prompt tokens that were never computed (at most those charged)."""
        amount = min(prompt_tokens, self._charged)
        if self._limiter is not None and amount > 0:
            self._limiter.refund(amount, request=False)
            self._charged -= amount

    def withdraw(self) -> None:
        """The request never ran (another prompt of its batch was refused): what it took from the
        per-minute budgets goes back, and nothing is recorded."""
        with self._lock:
            done = self._done
        if not done and self._limiter is not None:
            self._limiter.refund(self._charged)
        self.finish(None)

    def finish(
        self,
        outcome: str | None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        times: RequestTimes | None = None,
        cached_tokens: int = 0,
    ) -> None:
        """Releases the slot and records usage and metrics; outcome None = refused as bad input (not
        counted); "rejected" = refused for capacity (counted, no tokens). cached_tokens: of the
        prompt's, those the prefix cache reused (priced as cached input on the closed APIs)."""
        with self._lock:
            if self._done:
                return
            self._done = True
        if self._limiter is not None:
            self._limiter.charge(completion_tokens)
            self._limiter.release()
        tenants, tenant = self._tenants, self.principal.label
        if outcome == "rejected":
            tenants.reject(self.principal, self.model, self.adapter)
        elif outcome is not None:
            times = times or RequestTimes()
            cost, closed = 0.0, {}
            if tenants.metrics is not None:
                cost, closed = tenants.metrics.record_request(
                    tenant, self.adapter, outcome, prompt_tokens, completion_tokens, times.engine_s,
                    times.queue_s, times.ttft_s, times.e2e_s, times.token_gaps, cached_tokens,
                    self.embedding_inputs,
                )  # fmt: skip
            tenants.usage.record(tenant, self.model, outcome, prompt_tokens, completion_tokens, cost, closed)
        tenants._finished()


class Tenants:
    def __init__(self, tenancy: Tenancy, metrics: Metrics | None = None):
        self.tenancy = tenancy
        self.metrics = metrics
        self.auth = Authenticator(tenancy)
        self.usage = UsageLedger()
        self.limiters = {name: TenantLimiter(name, t.limits) for name, t in tenancy.tenants.items()}
        self._in_flight = 0
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return list(self.tenancy.tenants)

    def reload(self, tenancy: Tenancy) -> dict[str, list[str]]:
        """Swaps in a new tenancy (keys, tenants, limits) at once; requests in flight finish under the
        limits they were admitted with. Returns the tenants added, removed and with changed limits."""
        with self._lock:
            old = self.tenancy.tenants
            added = sorted(set(tenancy.tenants) - set(old))
            removed = sorted(set(old) - set(tenancy.tenants))
            changed = sorted(
                n for n in set(old) & set(tenancy.tenants) if old[n].limits != tenancy.tenants[n].limits
            )
            limiters = {}
            for name, tenant in tenancy.tenants.items():
                limiter = self.limiters.get(name)
                if limiter is None:
                    limiter = TenantLimiter(name, tenant.limits)
                elif name in changed:
                    limiter.update(tenant.limits)
                limiters[name] = limiter
            self.limiters = limiters
            self.tenancy = tenancy
            self.auth = Authenticator(tenancy)
        return {"added": added, "removed": removed, "limits_changed": changed}

    @property
    def in_flight(self) -> int:
        """Admitted requests not yet finished (the SIGTERM drain waits for 0)."""
        return self._in_flight

    def authenticate(self, authorization: str | None) -> Principal | None:
        return self.auth.authenticate(authorization)

    def capacity(self, principal: Principal) -> int | None:
        """The most requests the caller's limits could ever admit at once (None: no such limit): a
        batch of more can never pass, however long it retries."""
        limiter = self.limiters.get(principal.tenant) if principal.tenant else None
        if limiter is None:
            return None
        caps = [c for c in (limiter.limits.max_concurrent, limiter.limits.requests_per_minute) if c]
        return min(caps) if caps else None

    def admit(self, principal: Principal, model: str, adapter: str | None = None) -> Ticket:
        """A ticket for one request, or RateLimited (counted as rejected)."""
        limiter = self.limiters.get(principal.tenant) if principal.tenant else None
        if limiter is not None:
            try:
                limiter.admit()
            except Exception:
                self.reject(principal, model, adapter)
                raise
        with self._lock:
            self._in_flight += 1
        return Ticket(self, principal, model, adapter, limiter)

    def rate_headers(self, principal: Principal) -> dict[str, str]:
        """The x-ratelimit-* headers of the caller's tenant (none without per-minute limits)."""
        limiter = self.limiters.get(principal.tenant) if principal.tenant else None
        return limiter.headers() if limiter is not None else {}

    def reject(self, principal: Principal, model: str, adapter: str | None = None) -> None:
        self.usage.record(principal.label, model, "rejected", 0, 0)
        if self.metrics is not None:
            self.metrics.record_rejected(principal.label, adapter)

    def _finished(self) -> None:
        with self._lock:
            self._in_flight -= 1
