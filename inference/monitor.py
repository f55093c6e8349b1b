"""Upstream health, watched in the background: a down upstream fails requests at once, and recovery is noticed.

Without it every request to a dead LM Studio waits for its own connection attempt (and retries) before the 502.
The monitor probes the model list every ``inference.health_check_secs``, every second while the upstream is
down, and at once when a request could not connect; ``/health/ready`` and ``inference_upstream_up`` follow it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from .errors import UpstreamUnreachable

log = Logger()

DOWN_RETRY_SECS = 1.0


class UpstreamMonitor:
    """Probes the upstream with ``probe`` (which answers ``{"reachable", "error", "models"}``)."""

    def __init__(self, probe: Callable[[], Awaitable[dict[str, Any]]], clock: IReactorTime, interval: float,
                 base_url: str) -> None:
        self._probe = probe
        self._clock = clock
        self._interval = interval
        self._base_url = base_url
        self._timer: IDelayedCall | None = None
        self._running: Deferred[Any] | None = None
        self.up: bool | None = None  # None until the first probe answered
        self.error: str | None = None
        self.models: list[str] = []

    @property
    def enabled(self) -> bool:
        return self._interval > 0

    def start(self) -> None:
        if self.enabled:
            self.check_now()

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._running is not None:
            self._running.cancel()

    def check_now(self) -> None:
        """Probe now (unless a probe is under way), e.g. because a request could not connect."""
        if not self.enabled or self._running is not None:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        running = Deferred.fromCoroutine(self._check())
        if not running.called:  # a probe that answers at once (the mock) is already done
            self._running = running
            running.addBoth(self._finished)
        running.addErrback(lambda failure: failure.trap(CancelledError))

    def suspect(self) -> None:
        """A request could not connect: probe now, unless the upstream is known to be down already (it is asked
        again on the monitor's own schedule: a probe per failed request would hammer a host that is down)."""
        if self.up is not False:
            self.check_now()

    def _finished(self, result: Any) -> Any:
        self._running = None
        return result

    async def _check(self) -> None:
        self._record(await self._probe())
        delay = self._interval if self.up else min(self._interval, DOWN_RETRY_SECS)
        self._timer = self._clock.callLater(delay, self.check_now)

    def _record(self, result: dict[str, Any]) -> None:
        was = self.up
        self.up, self.error, self.models = result["reachable"], result["error"], result["models"]
        if self.up and was is not True:
            log.info("upstream {upstream} {state}, serving {models}", upstream=self._base_url,
                     state="answers" if was is None else "is back",
                     models=", ".join(self.models) or "no models yet")
        elif not self.up and was is not False:
            log.warn("upstream {upstream} does not answer ({error}); chat requests fail at once with 502 until "
                     "it does (checked every {every:g}s)", upstream=self._base_url, error=self.error,
                     every=min(self._interval, DOWN_RETRY_SECS))

    def require_up(self) -> None:
        """Raise the 502 now when the last probe found the upstream down."""
        if self.up is False:
            raise UpstreamUnreachable(f"upstream at {self._base_url} is down ({self.error}); the gateway checks "
                                      "it every second and serves again as soon as it answers")
