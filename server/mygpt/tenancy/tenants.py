"""Tenants at run time: authentication, limits and usage, behind one object the API layer calls."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from mygpt.tenancy.auth import Authenticator, Principal
from mygpt.tenancy.config import Tenancy
from mygpt.tenancy.limits import TenantLimiter
from mygpt.tenancy.usage import UsageLedger

log = logging.getLogger(__name__)


class Ticket:
    """One admitted request: holds its tenant's concurrency slot until finish() (called once)."""

    def __init__(self, tenants: Tenants, principal: Principal, model: str, limiter: TenantLimiter | None):
        self._tenants = tenants
        self.principal = principal
        self.model = model
        self._limiter = limiter
        self._done = False
        self._lock = threading.Lock()

    def charge(self, prompt_tokens: int) -> None:
        if self._limiter is not None:
            self._limiter.charge(prompt_tokens)

    def finish(self, outcome: str | None, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        """Releases the slot and records usage; outcome None = refused as bad input (not counted)."""
        with self._lock:
            if self._done:
                return
            self._done = True
        if self._limiter is not None:
            self._limiter.charge(completion_tokens)
            self._limiter.release()
        if outcome is not None:
            self._tenants.usage.record(
                self.principal.label, self.model, outcome, prompt_tokens, completion_tokens
            )
        self._tenants._finished()


class Tenants:
    def __init__(self, tenancy: Tenancy):
        self.tenancy = tenancy
        self.auth = Authenticator(tenancy)
        self.usage = UsageLedger()
        self.limiters = {name: TenantLimiter(name, t.limits) for name, t in tenancy.tenants.items()}
        self._in_flight = 0
        self._lock = threading.Lock()
        self.on_change: Callable[[], None] = lambda: None

    @property
    def names(self) -> list[str]:
        return list(self.tenancy.tenants)

    @property
    def in_flight(self) -> int:
        """Admitted requests not yet finished (the SIGTERM drain waits for 0)."""
        return self._in_flight

    def authenticate(self, authorization: str | None) -> Principal | None:
        return self.auth.authenticate(authorization)

    def admit(self, principal: Principal, model: str) -> Ticket:
        """A ticket for one request, or RateLimited (counted as rejected)."""
        limiter = self.limiters.get(principal.tenant) if principal.tenant else None
        if limiter is not None:
            try:
                limiter.admit()
            except Exception:
                self.reject(principal, model)
                raise
        with self._lock:
            self._in_flight += 1
        return Ticket(self, principal, model, limiter)

    def reject(self, principal: Principal, model: str) -> None:
        self.usage.record(principal.label, model, "rejected", 0, 0)

    def _finished(self) -> None:
        with self._lock:
            self._in_flight -= 1
