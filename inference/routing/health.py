"""One host's health as one state machine: whether the fleet routes calls to it, and what brings it back.

    serving   routed to
    checking  out while its model list is asked, at once: a connection to it was refused or cut
    ejected   out for a cool-down: its calls failed ``eject_after`` times in a row
    probing   out while its model list is asked, after a cool-down or while down
    down      out: its model list does not answer; asked again every ``down_probe_secs``

The rules are Envoy's outlier detection, which operators already know:

- Consecutive gateway failures (5xx, "no model loaded", an answer that did not come in time, an answer cut) eject
  a host, unless ``max_ejection_percent`` of the fleet is ejected already: a shared cause (every host failing the
  same bad call) must not empty the fleet. A refused or cut connection also has the host asked at once whether
  it is still there (a crashed host is down, not ejected).
- The cool-down is ``eject_secs`` times the times the host was ejected, up to ``max_eject_secs``; the count starts
  over once the host has served ``max_eject_secs`` without being ejected.
- Busy is not down: a model list that times out while calls are in flight there counts as an answer (llama.cpp's
  Python server, and LM Studio with one slot, answer it after the running generation).
- A host back from an ejection is on trial until it answers a call: one call at a time, and its first failure
  ejects it again (its model list answering says little of its calls; a host whose answers come too late
  would otherwise cost a call per slot each time it came back).
- What calls already in flight report while the host is out does not count: it says nothing new.

Every transition is in the table at the end of :class:`HostHealth`; it has one timer, and at most one model-list
probe in flight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from automat import MethodicalMachine
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..errors import GatewayError, UpstreamTimeout

log = Logger()

Models = list[dict[str, Any]]

SERVING, CHECKING, EJECTED, PROBING, DOWN = "serving", "checking", "ejected", "probing", "down"


@dataclass(frozen=True)
class HealthRules:
    eject_after: int = 3  # failures in a row that eject a host
    eject_secs: float = 5.0  # the first cool-down; the n-th is n times as long
    max_eject_secs: float = 300.0  # the longest cool-down, and the healthy time after which the count starts over
    down_probe_secs: float = 1.0  # between model-list probes of a host that does not answer


class HostHealth:
    """The health of one host.

    ``probe`` asks the host's model list (within the probe deadline); ``busy`` says whether calls are in flight
    there; ``may_eject`` whether the fleet can spare one more ejected host. ``on_change(old, new)`` is told every
    change of state, ``on_models`` every model list the host answered.
    """

    _machine = MethodicalMachine()

    clock: IReactorTime  # its timer's (a test's Clock)

    def __init__(self, clock: IReactorTime, rules: HealthRules, probe: Callable[[], Deferred[Models]],
                 busy: Callable[[], bool], may_eject: Callable[[], bool]) -> None:
        self.clock = clock
        self._rules = rules
        self._probe = probe
        self._busy = busy
        self._may_eject = may_eject
        self.on_change: Callable[[str, str], None] = lambda old, new: None
        self.on_models: Callable[[Models], None] = lambda models: None
        self.failures = 0  # in a row, while serving
        self.on_trial = False  # back from an ejection, and no call answered since
        self.ejections = 0  # times ejected, since the count last started over
        self.cool_down = 0.0  # the last cool-down
        self.why = ""  # why it was last ejected or checked
        self.error: str | None = None  # why its last probe failed
        self.answered = False  # whether its model list ever answered
        self._serving_since: float | None = None  # when it came back (None: serving since the start)
        self._timer: IDelayedCall | None = None
        self._probing: Deferred[Models] | None = None
        self._probe_watchers: list[Deferred[None]] = []
        self._reported = SERVING

    # -- what the fleet tells it ---------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        name: str = self._state_name()
        return name

    @property
    def routed(self) -> bool:
        return self.state == SERVING

    @property
    def next_check_in(self) -> float | None:
        """Seconds until its timer (a cool-down's end, the next probe of a host that is down) fires; None: none."""
        timer = self._timer
        return timer.getTime() - self.clock.seconds() if timer is not None and timer.active() else None

    def call_answered(self) -> None:
        self._feed(self._answered)

    def call_failed(self, why: str) -> None:
        """A call failed in a way another host might not have: counted, and the host ejected at ``eject_after``."""
        if self.state == SERVING:
            self.why = why
        self._feed(self._failed)
        self._eject_if_due()

    def connection_lost(self, why: str) -> None:
        """A connection to it was refused, or broke before the answer ended: counted as a failure, and the host
        asked at once whether it is still there (if it is, the count decides)."""
        if self.state == SERVING:
            self.why = why
        self._feed(self._lost)

    def _eject_if_due(self) -> None:
        if self.state == SERVING and self.failures >= self._rules.eject_after and self._may_eject():
            self.why = f"its trial call failed: {self.why}" if self.on_trial else \
                f"{self.failures} failures in a row, the last: {self.why}"
            self._feed(self._outlier)

    def refresh(self) -> Deferred[None]:
        """Ask a serving host's model list now (hosts that are out ask their own); fires when it answered or
        failed."""
        self._feed(self._refresh)
        if self._probing is None:
            return succeed(None)
        watcher: Deferred[None] = Deferred(lambda d: self._probe_watchers.remove(d))
        self._probe_watchers.append(watcher)
        return watcher

    def stop(self) -> None:
        """At shutdown: no timer left behind, no probe left running."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._probing is not None:
            self._probing.cancel()

    # -- the machine ---------------------------------------------------------------------------------------------

    @_machine.state(initial=True, serialized=SERVING)
    def _serving(self) -> None:
        "Routed to."

    @_machine.state(serialized=CHECKING)
    def _checking(self) -> None:
        "Out while its model list says whether it is still there."

    @_machine.state(serialized=EJECTED)
    def _ejected(self) -> None:
        "Out for a cool-down."

    @_machine.state(serialized=PROBING)
    def _probing_state(self) -> None:
        "Out while its model list says whether it is back."

    @_machine.state(serialized=DOWN)
    def _down(self) -> None:
        "Out: its model list does not answer."

    @_machine.serializer()
    def _state_name(self, state: str) -> str:
        return state

    @_machine.input()
    def _answered(self) -> None:
        "A call it served answered."

    @_machine.input()
    def _failed(self) -> None:
        "A call it served failed (5xx, model not loaded, no answer in time)."

    @_machine.input()
    def _outlier(self) -> None:
        "Its failures in a row reached eject_after, and the fleet can spare it."

    @_machine.input()
    def _lost(self) -> None:
        "A connection to it was refused or cut."

    @_machine.input()
    def _refresh(self) -> None:
        "The fleet refreshes its model lists."

    @_machine.input()
    def _probe_answered(self) -> None:
        "Its model list answered."

    @_machine.input()
    def _probe_busy(self) -> None:
        "Its model list timed out while calls are in flight there: busy, not down."

    @_machine.input()
    def _probe_failed(self) -> None:
        "Its model list failed: refused, reset, or timed out with nothing in flight."

    @_machine.input()
    def _time_is_up(self) -> None:
        "Its cool-down, or the wait between probes of a host that is down, ended."

    @_machine.output()
    def _count(self) -> None:
        self.failures += 1

    @_machine.output()
    def _clear_failures(self) -> None:
        self.failures = 0
        self.on_trial = False

    @_machine.output()
    def _ask(self) -> None:
        """Ask its model list (unless a probe is under way: its answer serves)."""
        if self._probing is not None:
            return
        probing = self._probing = self._probe()
        probing.addCallbacks(self._probe_done, self._probe_error)
        probing.addErrback(lambda failure: failure.trap(CancelledError))  # stopped at shutdown

    @_machine.output()
    def _eject(self) -> None:
        since = self._serving_since
        if since is not None and self.clock.seconds() - since >= self._rules.max_eject_secs:
            self.ejections = 0  # served long enough: a new run
        self.ejections += 1
        self.failures = 0
        self.cool_down = min(self._rules.eject_secs * self.ejections, self._rules.max_eject_secs)
        self._start_timer(self.cool_down)

    @_machine.output()
    def _wait_down(self) -> None:
        self.failures = 0
        self._start_timer(self._rules.down_probe_secs)

    @_machine.output()
    def _back(self) -> None:
        self.on_trial = self.ejections > 0
        self.failures = self._rules.eject_after - 1 if self.on_trial else 0  # on trial: one failure ejects it
        self._serving_since = self.clock.seconds()

    @_machine.output()
    def _still_there(self) -> None:
        """Checked and still there: the failure that had it checked still counts (a host that cuts every answer
        is ejected like one that fails every call)."""

    _serving.upon(_answered, enter=_serving, outputs=[_clear_failures])
    _serving.upon(_failed, enter=_serving, outputs=[_count])
    _serving.upon(_outlier, enter=_ejected, outputs=[_eject])
    _serving.upon(_lost, enter=_checking, outputs=[_count, _ask])
    _serving.upon(_refresh, enter=_serving, outputs=[_ask])
    _serving.upon(_probe_answered, enter=_serving, outputs=[])
    _serving.upon(_probe_busy, enter=_serving, outputs=[])
    _serving.upon(_probe_failed, enter=_down, outputs=[_wait_down])
    _checking.upon(_probe_answered, enter=_serving, outputs=[_still_there])
    _checking.upon(_probe_busy, enter=_serving, outputs=[_still_there])
    _probing_state.upon(_probe_answered, enter=_serving, outputs=[_back])
    _probing_state.upon(_probe_busy, enter=_serving, outputs=[_back])
    for _asking in (_checking, _probing_state):
        _asking.upon(_probe_failed, enter=_down, outputs=[_wait_down])
    _ejected.upon(_time_is_up, enter=_probing_state, outputs=[_ask])
    _down.upon(_time_is_up, enter=_probing_state, outputs=[_ask])
    for _out in (_checking, _ejected, _probing_state, _down):  # what calls in flight say while out: nothing new
        for _ignored in (_answered, _failed, _outlier, _lost, _refresh):
            _out.upon(_ignored, enter=_out, outputs=[])
    for _out in (_ejected, _down):  # a refresh's probe that ended after the host went out
        for _late in (_probe_answered, _probe_busy, _probe_failed):
            _out.upon(_late, enter=_out, outputs=[])
    del _asking, _out, _ignored, _late

    # -- plumbing ------------------------------------------------------------------------------------------------

    def _feed(self, event: Callable[[], Any]) -> None:
        """Give the machine one input, then tell ``on_change`` where it ended up (once, however many inputs a
        probe that answered at once fed on the way)."""
        event()
        now = self.state
        if now != self._reported:
            old, self._reported = self._reported, now
            self.on_change(old, now)

    def _start_timer(self, delay: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self.clock.callLater(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._feed(self._time_is_up)

    def _probe_done(self, models: Models) -> None:
        self._probing = None
        self.error, self.answered = None, True
        self.on_models(models)
        self._feed(self._probe_answered)
        self._eject_if_due()
        self._tell_watchers()

    def _probe_error(self, failure: Failure) -> Failure | None:
        self._probing = None
        if failure.check(CancelledError):
            self._tell_watchers()
            return failure
        if failure.check(UpstreamTimeout) and self._busy():
            self._feed(self._probe_busy)
            self._eject_if_due()
        else:
            error = failure.value
            self.error = error.message if isinstance(error, GatewayError) else repr(error)
            if not isinstance(error, GatewayError):
                log.failure("probing an upstream host failed unexpectedly", failure)
            self._feed(self._probe_failed)
        self._tell_watchers()
        return None

    def _tell_watchers(self) -> None:
        watchers, self._probe_watchers = self._probe_watchers, []
        for watcher in watchers:
            watcher.callback(None)
