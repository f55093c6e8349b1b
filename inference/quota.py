"""Tenants' limits: calls at once, requests per minute, tokens per minute and per day, counted in fixed windows (the
UTC minute, the UTC day) in a store that one process (memory) or several (Redis) share.

A call is counted when it is admitted; its tokens (input + output) when it ends, as OpenAI counts them, so a call
admitted just under a token limit may pass it by its own tokens. Every answer to a limited tenant carries the
limits' headers (OpenAI's ``x-ratelimit-*``, Anthropic's ``anthropic-ratelimit-*`` on ``/v1/messages``), and a
refused call is a 429 ``rate_limit_exceeded`` with ``Retry-After`` (and ``x-should-retry: false`` when the wait is
longer than SDKs would wait, so that they give up rather than retry in vain).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .config import LimitsConfig
from .errors import RateLimited
from .reactor import IGatewayReactor
from .telemetry.metrics import Metrics
from .tenants import LIMITS, Caller, TenantLimits

log = Logger()

MINUTE, DAY = 60, 86400
SDK_MAX_RETRY_WAIT = 60
"""The longest ``Retry-After`` the OpenAI and Anthropic SDKs wait for; past it they back off on their own."""


@dataclass(frozen=True)
class Standing:
    """A tenant's use of its limits in the current windows, its own call included."""

    requests: int = 0  # requests this minute
    tokens_minute: int = 0
    tokens_day: int = 0
    concurrent: int = 0


class QuotaStore(Protocol):
    """Where the counts live: this process's memory, or Redis for several processes."""

    def admit(self, tenant: str, limits: TenantLimits, now: float) -> Awaitable[tuple[Standing, str | None]]:
        """Count one call of ``tenant`` unless a limit is reached: (its standing, the limit that refused it)."""

    def spend(self, tenant: str, tokens: int, now: float) -> None:
        """Add ``tokens`` to ``tenant``'s windows (a call ended); never fails a call."""

    def release(self, tenant: str) -> None:
        """One of ``tenant``'s calls ended (its concurrent count)."""

    async def close(self) -> None:
        """Let go of connections (at shutdown)."""


def refused_by(limits: TenantLimits, standing: Standing) -> str | None:
    """The limit a new call would pass, given the standing before it; None when it may go."""
    for name, used in (("concurrent", standing.concurrent), ("requests_per_minute", standing.requests),
                       ("tokens_per_minute", standing.tokens_minute), ("tokens_per_day", standing.tokens_day)):
        limit = getattr(limits, name)
        if limit is not None and used >= limit:
            return name
    return None


@dataclass
class _Windows:
    minute: int = -1
    requests: int = 0
    tokens_minute: int = 0
    day: int = -1
    tokens_day: int = 0
    concurrent: int = 0

    def at(self, now: float) -> _Windows:
        minute, day = int(now // MINUTE), int(now // DAY)
        if minute != self.minute:
            self.minute, self.requests, self.tokens_minute = minute, 0, 0
        if day != self.day:
            self.day, self.tokens_day = day, 0
        return self


class MemoryQuotaStore:
    """Counts in this process (one window of each kind per tenant), limits divided by ``share`` (the processes
    that stand in for a shared store that cannot be reached)."""

    def __init__(self, share: int = 1) -> None:
        self._share = share
        self._tenants: dict[str, _Windows] = {}

    async def admit(self, tenant: str, limits: TenantLimits, now: float) -> tuple[Standing, str | None]:
        return self.admit_now(tenant, limits, now)

    def admit_now(self, tenant: str, limits: TenantLimits, now: float) -> tuple[Standing, str | None]:
        counts = self._tenants.setdefault(tenant, _Windows()).at(now)
        refused = refused_by(_divided(limits, self._share), _standing(counts))
        if refused is None:
            counts.requests += 1
            counts.concurrent += 1
        return _standing(counts), refused

    def spend(self, tenant: str, tokens: int, now: float) -> None:
        counts = self._tenants.setdefault(tenant, _Windows()).at(now)
        counts.tokens_minute += tokens
        counts.tokens_day += tokens

    def release(self, tenant: str) -> None:
        counts = self._tenants.get(tenant)
        if counts is not None and counts.concurrent > 0:
            counts.concurrent -= 1

    async def close(self) -> None:
        pass


def _standing(counts: _Windows) -> Standing:
    return Standing(counts.requests, counts.tokens_minute, counts.tokens_day, counts.concurrent)


def _divided(limits: TenantLimits, share: int) -> TenantLimits:
    if share == 1:
        return limits
    return TenantLimits(**{name: None if getattr(limits, name) is None else max(1, getattr(limits, name) // share)
                           for name in LIMITS})


class Lease:
    """A limited tenant's admitted call: the headers its answer carries, and its end (tokens, concurrency)."""

    def __init__(self, quota: Quota, caller: Caller, headers: dict[str, str]) -> None:
        self._quota: Quota | None = quota
        self.caller = caller
        self.headers = headers  # the limits' headers every answer of the call carries

    def end(self, tokens: int | None) -> None:
        """The call ended having used ``tokens`` (input + output; None: not known)."""
        if self._quota is not None:
            self._quota.ended(self.caller, tokens or 0)
            self._quota = None


class Quota:
    """Admits a tenant's calls within its limits, counted in ``store``."""

    def __init__(self, store: QuotaStore, clock: IReactorTime) -> None:
        self.store = store
        self._clock = clock

    async def admit(self, caller: Caller, anthropic: bool = False) -> Lease | None:
        """A lease for ``caller``'s call (None: its tenant has no limit); :class:`RateLimited` when a limit is
        reached, with the headers and wait that say so (Anthropic's headers when ``anthropic``, else OpenAI's)."""
        limits = caller.tenant.limits
        if not limits.any:
            return None
        now = self._clock.seconds()
        standing, refused = await self.store.admit(caller.tenant.name, limits, now)
        headers = rate_limit_headers(limits, standing, now, anthropic)
        if refused is not None:
            raise limited(caller, refused, headers, now)
        return Lease(self, caller, headers)

    def ended(self, caller: Caller, tokens: int) -> None:
        name = caller.tenant.name
        self.store.release(name)
        if tokens:
            self.store.spend(name, tokens, self._clock.seconds())


_WHAT = {"concurrent": "calls at once", "requests_per_minute": "requests per minute",
         "tokens_per_minute": "tokens per minute", "tokens_per_day": "tokens per day"}


def limited(caller: Caller, refused: str, headers: dict[str, str], now: float) -> RateLimited:
    """The 429 for ``refused``: when to retry (the window's end), and whether an SDK should wait that long."""
    wait = 1 if refused == "concurrent" else _until_reset(now, DAY if refused == "tokens_per_day" else MINUTE)
    headers = {**headers, "Retry-After": str(wait), "retry-after-ms": str(wait * 1000)}
    if wait > SDK_MAX_RETRY_WAIT:
        headers["x-should-retry"] = "false"
    return RateLimited(f"Rate limit reached for tenant '{caller.tenant.name}' on {_WHAT[refused]}: limit "
                       f"{getattr(caller.tenant.limits, refused)}. Please try again in {_duration(wait)}.",
                       headers=headers)


def _until_reset(now: float, window: int) -> int:
    return max(1, math.ceil((math.floor(now / window) + 1) * window - now))


def _duration(seconds: float) -> str:
    """OpenAI's way of writing a wait: ``20s``, ``6m0s``, ``5h3m2s``."""
    whole = max(0, math.ceil(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def rate_limit_headers(limits: TenantLimits, standing: Standing, now: float, anthropic: bool) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``, or Anthropic's
    ``anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}``, for the limits a tenant has (tokens: the
    per-minute limit, else the per-day one)."""
    headers: dict[str, str] = {}
    tokens = (limits.tokens_per_minute, standing.tokens_minute, MINUTE) if limits.tokens_per_minute else \
        (limits.tokens_per_day, standing.tokens_day, DAY)
    for kind, (limit, used, window) in (("requests", (limits.requests_per_minute, standing.requests, MINUTE)),
                                        ("tokens", tokens)):
        if limit is None:
            continue
        wait = _until_reset(now, window)
        reset_at = datetime.fromtimestamp(math.floor(now / window) * window + window, tz=timezone.utc)
        remaining = str(max(0, limit - used))
        if anthropic:
            headers.update({f"anthropic-ratelimit-{kind}-limit": str(limit),
                            f"anthropic-ratelimit-{kind}-remaining": remaining,
                            f"anthropic-ratelimit-{kind}-reset": reset_at.strftime("%Y-%m-%dT%H:%M:%SZ")})
        else:
            headers.update({f"x-ratelimit-limit-{kind}": str(limit), f"x-ratelimit-remaining-{kind}": remaining,
                            f"x-ratelimit-reset-{kind}": _duration(wait)})
    return headers


def quota_store(config: LimitsConfig, reactor: IGatewayReactor, metrics: Metrics) -> QuotaStore:
    """The store ``inference.limits.store`` names."""
    if config.store == "memory":
        return MemoryQuotaStore()
    from .quota_redis import RedisQuotaStore

    return RedisQuotaStore(config.store, config.expected_processes, reactor, metrics)
