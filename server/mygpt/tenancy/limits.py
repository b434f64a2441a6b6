"""Per-tenant limits: requests per minute, tokens per minute (token buckets), concurrent requests."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from mygpt.tenancy.config import Limits


class RateLimited(Exception):
    """Past a limit: answer 429 with Retry-After."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def retry_after(self) -> str:
        return str(max(1, math.ceil(self.retry_after_s)))


class _Bucket:
    """A token bucket holding up to `per_minute`, refilled at per_minute/60 a second; it may go into
    debt (tokens are charged after they are known) and then refuses until it is back above zero."""

    def __init__(self, per_minute: int, clock: Callable[[], float]):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = float(per_minute)
        self.clock = clock
        self.stamp = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` is available (0: now)."""
        self._refill()
        return 0.0 if self.level >= amount else (amount - self.level) / self.rate

    def take(self, amount: float) -> None:
        self._refill()
        self.level -= amount


class TenantLimiter:
    """The limits of one tenant. admit() before any work, charge() the prompt, release() at the end."""

    def __init__(self, tenant: str, limits: Limits, clock: Callable[[], float] = time.monotonic):
        self.tenant = tenant
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._requests = _Bucket(limits.requests_per_minute, clock) if limits.requests_per_minute else None
        self._tokens = _Bucket(limits.tokens_per_minute, clock) if limits.tokens_per_minute else None
        self.active = 0

    def update(self, limits: Limits) -> None:
        """New limits (a config reload): requests in flight stay counted; a bucket whose rate changed
        keeps what was used of it (a limit raised from 2 to 100 after 2 requests leaves 98, not 0), and
        any debt, but is never put deeper in debt by the change."""
        with self._lock:
            rates = (("_requests", limits.requests_per_minute), ("_tokens", limits.tokens_per_minute))
            for attr, per_minute in rates:
                old = getattr(self, attr)
                if old is not None and old.capacity == per_minute:
                    continue
                new = _Bucket(per_minute, self._clock) if per_minute else None
                if new is not None and old is not None:
                    old._refill()
                    used = old.capacity - old.level
                    new.level = max(new.capacity - used, min(old.level, 0.0))
                setattr(self, attr, new)
            self.limits = limits

    def admit(self) -> None:
        """Takes one request and one concurrency slot, or raises RateLimited (nothing taken)."""
        with self._lock:
            max_concurrent = self.limits.max_concurrent
            if max_concurrent is not None and self.active >= max_concurrent:
                raise RateLimited(
                    f"Too many concurrent requests for this API key (limit {max_concurrent}); "
                    "retry when one has finished.",
                    1.0,
                )
            if self._requests is not None and (wait := self._requests.wait_for(1)) > 0:
                raise RateLimited(
                    f"Rate limit reached: {self.limits.requests_per_minute} requests per minute.", wait
                )
            if self._tokens is not None and (wait := self._tokens.wait_for(1e-9)) > 0:
                raise RateLimited(
                    f"Rate limit reached: {self.limits.tokens_per_minute} tokens per minute.", wait
                )
            if self._requests is not None:
                self._requests.take(1)
            self.active += 1

    def wait_s(self, reserve: float = 0.0) -> float:
        """Seconds until admit() would take a request while `reserve` (a share) of each per-minute
        budget stays for other requests; 0: now. The batch runner waits here, as its requests would
        otherwise be refusals, each counted."""
        with self._lock:
            waits = [0.0]
            max_concurrent = self.limits.max_concurrent
            if max_concurrent is not None and self.active >= max_concurrent:
                waits.append(1.0)  # until one finishes: not known
            for bucket, least in ((self._requests, 1.0), (self._tokens, 1e-9)):
                if bucket is not None:
                    waits.append(bucket.wait_for(min(bucket.capacity, least + reserve * bucket.capacity)))
            return max(waits)

    def refund(self, tokens: int, request: bool = True) -> None:
        """Gives back `tokens` charged for a request, and (request) the request itself: it never ran."""
        with self._lock:
            for bucket, amount in ((self._requests, int(request)), (self._tokens, tokens)):
                if bucket is not None and amount:
                    bucket._refill()
                    bucket.level = min(bucket.capacity, bucket.level + amount)

    def charge(self, tokens: int) -> None:
        if self._tokens is not None:
            with self._lock:
                self._tokens.take(tokens)

    def release(self) -> None:
        with self._lock:
            self.active -= 1

    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* response headers for the per-minute limits as they stand: each limit,
        what is left of it (0 while in debt) and the time until it is whole again (LiteLLM's router
        and other clients read them to pace themselves)."""
        out = {}
        with self._lock:
            for kind, bucket in (("requests", self._requests), ("tokens", self._tokens)):
                if bucket is None:
                    continue
                whole_in = bucket.wait_for(bucket.capacity)  # (refills it first)
                out[f"x-ratelimit-limit-{kind}"] = str(int(bucket.capacity))
                out[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(bucket.level)))
                out[f"x-ratelimit-reset-{kind}"] = duration(whole_in)
        return out


def duration(seconds: float) -> str:
    """A wait as OpenAI's headers write it: "120ms", "1s", "6m0s" (rounded up)."""
    ms = math.ceil(max(seconds, 0.0) * 1000)
    if ms < 1000:
        return f"{ms}ms"
    minutes, secs = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"
