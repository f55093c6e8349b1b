"""A host's health, driven on a Clock without sockets: each input the fleet gives it, and where it leads."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from inference.errors import UpstreamTimeout, UpstreamUnreachable
from inference.routing.health import HealthRules, HostHealth

MODELS = [{"id": "qwen"}]


class Host:
    """A host whose model-list probes the test answers, and whose health it watches."""

    def __init__(self, rules: HealthRules | None = None, may_eject: bool = True) -> None:
        self.clock = Clock()
        self.probes: list[Deferred] = []
        self.in_flight = 0
        self.may_eject = may_eject
        self.changes: list[tuple[str, str]] = []
        self.health = HostHealth(self.clock, rules or HealthRules(eject_after=3, eject_secs=5, max_eject_secs=30),
                                 probe=self._probe, busy=lambda: self.in_flight > 0,
                                 may_eject=lambda: self.may_eject)
        self.health.on_change = lambda old, new: self.changes.append((old, new))

    def _probe(self) -> Deferred:
        d: Deferred = Deferred()
        self.probes.append(d)
        return d

    def answer(self) -> None:
        self.probes.pop(0).callback(MODELS)

    def refuse(self) -> None:
        self.probes.pop(0).errback(UpstreamUnreachable("connection refused"))

    def time_out(self) -> None:
        self.probes.pop(0).errback(UpstreamTimeout("no answer within 2s"))

    def fail(self, times: int) -> None:
        for _ in range(times):
            self.health.call_failed("HTTP 500")

    def timers(self) -> list[float]:
        return [call.getTime() - self.clock.seconds() for call in self.clock.getDelayedCalls()]


def test_failures_in_a_row_eject_a_host_for_a_cool_down_that_grows_with_each_ejection_up_to_a_cap():
    host = Host()
    host.fail(2)
    host.health.call_answered()  # an answer in between: the run starts over
    host.fail(2)
    assert host.health.state == "serving"
    host.fail(1)
    assert host.health.state == "ejected" and host.timers() == [5.0]
    cool_downs = [5.0]
    for _ in range(7):  # back after each cool-down, and failing again at once
        host.clock.advance(host.timers()[0])
        assert host.health.state == "probing" and len(host.probes) == 1
        host.answer()
        assert host.health.state == "serving" and host.timers() == []
        host.fail(3)
        cool_downs.append(host.timers()[0])
    assert cool_downs == [5, 10, 15, 20, 25, 30, 30, 30]  # eject_secs x times ejected, up to max_eject_secs


def test_the_count_of_ejections_starts_over_after_a_host_served_as_long_as_the_longest_cool_down():
    host = Host()
    host.fail(3)
    host.clock.advance(5)
    host.answer()
    host.clock.advance(29)
    host.fail(3)
    assert host.timers() == [10.0]  # back for less than max_eject_secs: the second ejection in the run
    host.clock.advance(10)
    host.answer()
    host.clock.advance(30)
    host.fail(3)
    assert host.timers() == [5.0]  # served 30 s: a new run


def test_a_refused_or_cut_connection_has_the_host_checked_at_once_and_out_while_it_is():
    host = Host()
    host.health.connection_lost("connection refused")
    assert host.health.state == "checking" and not host.health.routed and len(host.probes) == 1
    host.answer()
    assert host.health.state == "serving" and host.health.routed
    host.health.connection_lost("the answer was cut")
    host.refuse()
    assert host.health.state == "down" and host.timers() == [1.0]
    assert host.changes == [("serving", "checking"), ("checking", "serving"), ("serving", "checking"),
                            ("checking", "down")]


def test_a_crashed_host_that_restarts_is_back_within_a_second_and_not_punished_for_what_failed_meanwhile():
    host = Host()
    host.in_flight = 4
    host.health.connection_lost("killed")  # its four calls in flight were cut ...
    host.refuse()
    host.in_flight = 0
    for _ in range(3):
        host.health.connection_lost("cut")  # ... and they say so while it is down: nothing new
        host.health.call_failed("cut")
    assert host.health.state == "down" and host.probes == [] and host.timers() == [1.0]
    host.clock.advance(1)
    host.refuse()  # still restarting
    host.clock.advance(1)
    host.answer()
    assert host.health.state == "serving" and host.health.ejections == 0 and host.timers() == []
    host.fail(3)  # ejected later: the first cool-down, not one doubled by the crash
    assert host.timers() == [5.0]


def test_a_probe_that_times_out_while_calls_are_in_flight_is_busy_not_down():
    host = Host()
    host.in_flight = 1
    host.health.refresh()
    host.time_out()
    assert host.health.state == "serving"
    host.health.connection_lost("cut")
    host.time_out()  # still busy with the others
    assert host.health.state == "serving"
    host.in_flight = 0
    host.health.refresh()
    host.time_out()  # nothing in flight, and no answer: down
    assert host.health.state == "down" and host.health.error == "no answer within 2s"


def test_an_ejected_host_whose_model_list_does_not_answer_is_down_and_asked_every_second():
    host = Host()
    host.fail(3)
    host.clock.advance(5)
    host.refuse()
    assert host.health.state == "down" and host.timers() == [1.0]
    host.clock.advance(1)
    assert host.health.state == "probing"
    host.answer()
    assert host.health.routed


def test_no_more_hosts_are_ejected_than_the_fleet_can_spare():
    host = Host(may_eject=False)
    host.fail(10)
    assert host.health.state == "serving" and host.health.routed  # a shared cause: it keeps serving
    host.may_eject = True
    host.fail(1)  # the next failure, once the fleet can spare it
    assert host.health.state == "ejected"


def test_a_refresh_asks_a_serving_host_once_and_leaves_hosts_that_are_out_to_their_own_probes():
    host = Host()
    first, second = host.health.refresh(), host.health.refresh()
    assert len(host.probes) == 1 and not first.called  # one probe serves both
    host.answer()
    assert first.called and second.called
    host.fail(3)
    assert host.health.refresh().called and host.probes == []  # ejected: its cool-down decides


def test_failures_while_ejected_or_probing_do_not_count():
    host = Host()
    host.fail(3)
    host.fail(5)
    host.health.call_answered()
    assert host.health.state == "ejected" and host.timers() == [5.0]
    host.clock.advance(5)
    host.fail(3)
    host.health.connection_lost("cut")
    assert host.health.state == "probing" and len(host.probes) == 1
    host.answer()
    assert host.health.state == "serving" and host.health.on_trial and host.health.failures == 2


def test_a_host_back_from_an_ejection_is_on_trial_until_it_answers_a_call():
    host = Host()
    host.fail(3)
    host.clock.advance(5)
    host.answer()
    assert host.health.routed and host.health.on_trial
    host.fail(1)  # its first failure: out again
    assert host.health.state == "ejected" and host.timers() == [10.0]
    host.clock.advance(10)
    host.answer()
    host.health.call_answered()  # proven: no longer on trial, and a new run of failures
    assert not host.health.on_trial and host.health.failures == 0
    host.fail(2)
    assert host.health.state == "serving"


def test_a_host_back_from_down_is_not_on_trial():
    host = Host()
    host.health.connection_lost("refused")
    host.refuse()
    host.clock.advance(1)
    host.answer()
    assert host.health.routed and not host.health.on_trial


def test_stopping_leaves_no_timer_and_no_probe():
    host = Host()
    host.fail(3)
    host.health.stop()
    assert host.clock.getDelayedCalls() == []
    host.health.connection_lost("cut")
    other = Host()
    other.health.refresh()
    probe = other.probes[0]
    other.health.stop()
    assert probe.called  # cancelled


def test_a_host_that_cuts_every_answer_but_stays_up_is_ejected_like_one_that_fails_every_call():
    host = Host()
    for _ in range(3):
        host.health.connection_lost("the answer was cut")
        assert host.health.state == "checking"
        host.answer()  # still there: back, with the cut counted
    assert host.health.state == "ejected" and host.timers() == [5.0]
    assert "3 failures in a row" in host.health.why and "cut" in host.health.why


def test_an_answer_after_a_cut_starts_the_count_over():
    host = Host()
    host.health.connection_lost("cut")
    host.answer()
    host.fail(1)
    host.health.call_answered()
    host.health.connection_lost("cut")
    host.answer()
    host.fail(1)
    assert host.health.state == "serving" and host.health.failures == 2
