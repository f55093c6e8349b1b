"""Tenants' limits counted in Redis, so that every gateway process (and machine) using it shares them exactly.

Each admission is one Lua script (check every limit, then count the call), so two processes can never both take
the last request of a window. Calls at once are a sorted set of leases that expire (a process that dies does not
hold its tenants' slots for ever). txredisapi is a Twisted client: nothing blocks the reactor.

When Redis cannot be reached (an error, or no answer within ``TIMEOUT_SECS``) the gateway keeps serving: each
process counts alone, to its limits divided by ``expected_processes``; it says so once in the log and in
``inference_limits_store_up``, looks for Redis again every ``PROBE_SECS`` (txredisapi reconnects at most 10 s
apart), and says so again when it is back.
"""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import urlsplit

import txredisapi  # type: ignore[import-untyped]
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from .quota import DAY, MINUTE, MemoryQuotaStore, Standing
from .reactor import IGatewayReactor
from .telemetry.metrics import Metrics
from .tenants import TenantLimits

log = Logger()

TIMEOUT_SECS = 0.5  # the longest a call waits for Redis before counting in this process
PROBE_SECS = 2.0  # how often Redis is looked for again while it cannot be reached
LEASE_SECS = 900  # a call's place among its tenant's calls at once expires after this (its process died)

_ADMIT = """
local limits = {tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])}
local now = tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local used = {redis.call('ZCARD', KEYS[4]), tonumber(redis.call('GET', KEYS[1]) or '0'),
              tonumber(redis.call('GET', KEYS[2]) or '0'), tonumber(redis.call('GET', KEYS[3]) or '0')}
local names = {'concurrent', 'requests_per_minute', 'tokens_per_minute', 'tokens_per_day'}
for i = 1, 4 do
  if limits[i] >= 0 and used[i] >= limits[i] then
    return {names[i], used[2], used[3], used[4], used[1]}
  end
end
used[2] = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], 120)
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[6]), ARGV[7])
redis.call('EXPIRE', KEYS[4], tonumber(ARGV[6]))
return {'', used[2], used[3], used[4], used[1] + 1}
"""

_SPEND = """
redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], 120)
redis.call('INCRBY', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], 172800)
return 1
"""


class RedisQuotaStore:
    """Counts in Redis at ``url`` (``redis://host:port/db``), or in this process while Redis is away."""

    def __init__(self, url: str, expected_processes: int, reactor: IGatewayReactor, metrics: Metrics) -> None:
        parts = urlsplit(url)
        db = int(parts.path.strip("/") or 0)
        self._redis: Any = txredisapi.lazyConnectionPool(
            parts.hostname, parts.port or 6379, dbid=db, poolsize=4, password=parts.password,
            connectTimeout=TIMEOUT_SECS, replyTimeout=TIMEOUT_SECS)
        self._where = f"{parts.hostname}:{parts.port or 6379}/{db}"  # (no password in what is said)
        self._reactor = reactor
        self._fallback = MemoryQuotaStore(expected_processes)
        self._expected = expected_processes
        self._up_gauge = metrics.limits_store_up.labels("redis")
        self._up_gauge.set(1)
        self.up = True
        self._probe: IDelayedCall | None = None
        self._leases: dict[str, list[str]] = {}  # tenant -> lease ids of calls counted in Redis

    async def admit(self, tenant: str, limits: TenantLimits, now: float) -> tuple[Standing, str | None]:
        if not self.up:
            return self._fallback.admit_now(tenant, limits, now)
        lease = uuid.uuid4().hex
        keys = [_key(tenant, "requests", int(now // MINUTE)), _key(tenant, "tokens", int(now // MINUTE)),
                _key(tenant, "tokens_day", int(now // DAY)), _key(tenant, "calls", 0)]
        args = [_limit(limits.concurrent), _limit(limits.requests_per_minute), _limit(limits.tokens_per_minute),
                _limit(limits.tokens_per_day), now, LEASE_SECS, lease]
        try:
            answer = await self._timed(self._redis.eval(_ADMIT, keys, args))
            refused, requests, tokens_minute, tokens_day, calls = answer
        except Exception as e:  # whatever Redis or the connection says: count here, and say so once
            self._lost(e)
            return self._fallback.admit_now(tenant, limits, now)
        if not refused:
            self._leases.setdefault(tenant, []).append(lease)
        return Standing(int(requests), int(tokens_minute), int(tokens_day), int(calls)), (refused or None)

    def spend(self, tenant: str, tokens: int, now: float) -> None:
        if not self.up:
            return self._fallback.spend(tenant, tokens, now)
        keys = [_key(tenant, "tokens", int(now // MINUTE)), _key(tenant, "tokens_day", int(now // DAY))]
        self._timed(self._redis.eval(_SPEND, keys, [tokens])).addErrback(self._lost_failure)

    def release(self, tenant: str) -> None:
        leases = self._leases.get(tenant)
        if not leases:  # a call counted in this process (Redis was away when it came)
            return self._fallback.release(tenant)
        lease = leases.pop(0)
        if not leases:
            del self._leases[tenant]
        self._timed(self._redis.zrem(_key(tenant, "calls", 0), lease)).addErrback(lambda failure: None)

    def _timed(self, d: Deferred[Any]) -> Deferred[Any]:
        timer = self._reactor.callLater(TIMEOUT_SECS, d.cancel)
        return d.addBoth(_stop_timer, timer)

    def _lost_failure(self, failure: Failure) -> None:
        self._lost(failure.value or Exception(failure.getErrorMessage()))

    def _lost(self, error: BaseException) -> None:
        if not self.up:
            return
        self.up = False
        self._up_gauge.set(0)
        why = f"no answer within {TIMEOUT_SECS:g}s" if isinstance(error, CancelledError) else \
            str(error)[:200] or type(error).__name__
        log.error("limits store: Redis at {where} cannot be reached ({why}); counting tenants' limits in this "
                  "process, each divided by {expected} (inference.limits.expected_processes), until it is back",
                  where=self._where, why=why, expected=self._expected)
        self._probe = self._reactor.callLater(PROBE_SECS, self._look_again)

    def _look_again(self) -> None:
        self._probe = None
        self._timed(self._redis.ping()).addCallbacks(self._back, self._wait_again)

    def _wait_again(self, failure: Failure) -> None:
        self._probe = self._reactor.callLater(PROBE_SECS, self._look_again)

    def _back(self, answer: Any) -> None:
        self.up = True
        self._up_gauge.set(1)
        log.info("limits store: Redis at {where} is back; tenants' limits are shared again", where=self._where)

    async def close(self) -> None:
        if self._probe is not None and self._probe.active():
            self._probe.cancel()
        await self._redis.disconnect()


def _key(tenant: str, kind: str, window: int) -> str:
    return f"inference:limits:{tenant}:{kind}:{window}"


def _limit(value: int | None) -> int:
    return -1 if value is None else value


def _stop_timer(result: Any, timer: IDelayedCall) -> Any:
    if timer.active():
        timer.cancel()
    return result
