"""The fleet under faults only processes show (issue 20's fault suite).

Three fake hosts in processes of their own (tests/fakes/host_process.py), two gateway processes in front of them,
and a mixed load of streamed and whole answers through both. Each test injects one fault into host ``a`` while
the load runs, then removes it, and checks:

- no call is lost that had not started streaming; the only exception is a call the gateway had already sent to a
  host that then stopped answering (its first-byte deadline passes: a 504, never re-run, as the README's Retries
  says), at most the host's slots and ``eject_after`` per gateway;
- the calls the other hosts served directly keep their latency: p99 within 20% of the healthy run (+5 ms for the
  clock's grain);
- ``a`` is left out, and back, within the bounds the configuration sets;
- ``/health/ready`` and ``/metrics`` agree about ``a`` in both processes.

``FAULT_REPORT=path`` appends each run's figures as a JSON line.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater

from .conftest import call, scrape
from .test_daemon import TWISTD, spawn, stop

pytestmark = pytest.mark.skipif(TWISTD is None, reason="twistd is not installed next to this Python")

REPO = Path(__file__).resolve().parent.parent
NAMES = ("a", "b", "c")
SLOTS, EJECT_AFTER, EJECT_SECS, MAX_EJECT_SECS, PROBE_SECS = 4, 3, 1.0, 4.0, 0.5
FIRST_BYTE_SECS, CHECK_SECS, DOWN_PROBE_SECS = 1.0, 1.0, 1.0
HEALTHY_CALLS, FAULT_CALLS, AFTER_CALLS, WORKERS = 300, 300, 100, 5  # the phases' calls; workers per gateway


class HostProcess(ProcessProtocol):
    """One fake host's process: started, signalled, killed and restarted on the same port."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.transport: Any = None
        self._listening: Deferred[None] | None = None
        self.ended: Deferred[None] = Deferred()
        self._out = b""

    async def start(self) -> None:
        self._out, self.ended, self._listening = b"", Deferred(), Deferred()
        reactor.spawnProcess(self, sys.executable, [sys.executable, "-m", "tests.fakes.host_process", self.name,
                                                    str(self.port)], env={"PYTHONPATH": str(REPO)}, path=str(REPO))
        await self._listening

    def outReceived(self, data: bytes) -> None:
        self._out += data
        if b"listening" in self._out and self._listening is not None and not self._listening.called:
            self.port = int(self._out.split(b"listening", 1)[1].split()[1])
            self._listening.callback(None)

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def signal(self, number: int) -> None:
        os.kill(self.transport.pid, number)

    async def kill(self) -> None:
        if not self.ended.called:
            self.signal(signal.SIGKILL)
        await self.ended

    async def fault(self, **how: Any) -> None:
        assert (await call("POST", self.url + "/_fault", how)).status == 200

    async def seen(self) -> set[str]:
        return set((await call("GET", self.url + "/_seen")).json())


@dataclass
class Outcome:
    marker: str
    stream: bool
    start: float
    end: float
    status: int
    host: str | None = None  # who answered
    started: bool = False  # a stream whose first content reached the client
    error: str | None = None  # the error's code (a whole answer's, or a stream's error event)

    @property
    def lost(self) -> bool:
        return self.status != 200 or (self.error is not None and not self.started)


def outcome_of(marker: str, stream: bool, start: float, status: int, body: bytes) -> Outcome:
    done = Outcome(marker, stream, start, reactor.seconds(), status)
    if status != 200:
        done.error = json.loads(body)["error"].get("code")
    elif not stream:
        done.host = json.loads(body)["id"].split("-")[1]
    else:
        for line in body.split(b"\n"):
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[len(b"data: "):])
            if "error" in event:
                done.error = event["error"].get("code") or "error"
            elif event.get("choices") and event["choices"][0]["delta"].get("content"):
                done.started = True
                done.host = event["id"].split("-")[1]
    return done


@dataclass
class Load:
    """Workers that call the gateways one call after another, every other call streamed."""

    urls: list[str]
    outcomes: list[Outcome] = field(default_factory=list)
    _stopping: bool = False
    _workers: list[Deferred[None]] = field(default_factory=list)
    _waiting: list[tuple[int, Deferred[None]]] = field(default_factory=list)

    def answered(self, more: int) -> Deferred[None]:
        """Fires once ``more`` calls from now have been answered (the load's own clock: a busy machine runs it
        slower, and each phase still has its share of calls)."""
        d: Deferred[None] = Deferred()
        self._waiting.append((len(self.outcomes) + more, d))
        self._tell()
        return d

    def _tell(self) -> None:
        for entry in [e for e in self._waiting if len(self.outcomes) >= e[0]]:
            self._waiting.remove(entry)
            entry[1].callback(None)

    def start(self) -> None:
        self._workers = [Deferred.fromCoroutine(self._work(g, w)) for g in range(len(self.urls))
                         for w in range(WORKERS)]

    async def _work(self, g: int, w: int) -> None:
        n = 0
        while not self._stopping:
            marker, stream, start = f"call-{g}-{w}-{n}", n % 2 == 1, reactor.seconds()
            reply = await call("POST", self.urls[g] + "/v1/chat/completions", {
                "model": "fault-model", "stream": stream, "messages": [{"role": "user", "content": marker}]})
            self.outcomes.append(outcome_of(marker, stream, start, reply.status, reply.body))
            self._tell()
            n += 1

    async def stop(self) -> None:
        self._stopping = True
        await DeferredList(self._workers, fireOnOneErrback=True)


class Fleet:
    def __init__(self, hosts: list[HostProcess], gateways: list[tuple[Any, Any, str]]) -> None:
        self.hosts = {host.name: host for host in hosts}
        self.gateways = gateways

    @property
    def urls(self) -> list[str]:
        return [url for _, _, url in self.gateways]

    async def states(self, name: str) -> list[str]:
        """``name``'s state in each gateway, from ``/health/ready``."""
        return [(await call("GET", url + "/health/ready")).json()["hosts"][name] for url in self.urls]

    async def agree(self, name: str) -> None:
        """Each gateway's ``/metrics`` says ``name`` is up exactly when its ``/health/ready`` says it serves
        (looked at while the state holds: before and after the scrape)."""
        for url in self.urls:
            for _ in range(5):
                state = (await call("GET", url + "/health/ready")).json()["hosts"][name]
                up = (await scrape(url)).value("inference_upstream_host_up", upstream=name)
                if state == (await call("GET", url + "/health/ready")).json()["hosts"][name]:
                    assert up == (1 if state == "serving" else 0), (url, state, up)
                    break
            else:
                raise AssertionError(f"{name}'s state kept changing in {url}")

    async def wait(self, name: str, serving: bool, within: float) -> float:
        """Seconds until ``name`` is (or is no longer) served by both gateways (then they agree with their
        metrics); fails past ``within``."""
        start = reactor.seconds()
        while True:
            states = await self.states(name)
            if all((state == "serving") == serving for state in states):
                took = reactor.seconds() - start
                await self.agree(name)
                return took
            assert reactor.seconds() - start < within, f"{name} still {states} after {within}s"
            await deferLater(reactor, 0.05, lambda: None)  # (another process's state: it can only be asked again)


@pytest.fixture
def fleet(tmp_path):
    hosts = [HostProcess(name) for name in NAMES]
    gateways: list[tuple[Any, Any, str]] = []
    try:  # whatever fails on the way, every process started is stopped
        pytest_twisted.blockon(DeferredList([Deferred.fromCoroutine(host.start()) for host in hosts],
                                            fireOnOneErrback=True))
        config = tmp_path / "fleet.yaml"
        config.write_text(f"""inference:
  health_check_secs: {CHECK_SECS}
  models_cache_secs: 1
  http: {{timeout_secs: {FIRST_BYTE_SECS}, connect_timeout_secs: 1, max_retries: 0}}
  routing: {{eject_after: {EJECT_AFTER}, eject_secs: {EJECT_SECS}, max_eject_secs: {MAX_EJECT_SECS},
            probe_timeout_secs: {PROBE_SECS}}}
  upstreams:
""" + "".join(f'    - {{name: {h.name}, base_url: "{h.url}", max_concurrent: {SLOTS}}}\n' for h in hosts))
        for _ in range(2):
            daemon, transport = spawn(["--config", str(config), "--listen", "tcp:0:interface=127.0.0.1"], {},
                                      str(tmp_path))
            gateways.append((daemon, transport, ""))
            port = pytest_twisted.blockon(Deferred.fromCoroutine(daemon.port()))
            gateways[-1] = (daemon, transport, f"http://127.0.0.1:{port}")
        running = Fleet(hosts, gateways)
        pytest_twisted.blockon(Deferred.fromCoroutine(running.wait("a", True, 10)))
        yield running
    finally:
        for daemon, transport, _ in gateways:
            pytest_twisted.blockon(Deferred.fromCoroutine(stop(daemon, transport)))
        for host in hosts:
            if host.transport is not None and not host.ended.called:
                host.signal(signal.SIGCONT)
                pytest_twisted.blockon(Deferred.fromCoroutine(host.kill()))


def p99(durations: list[float]) -> float:
    ordered = sorted(durations)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def run(fleet: Fleet, fault: str, inject: Any, remove: Any, out_within: float | None,
              back_within: float | None, timeouts_allowed: bool = False, hold_calls: int = FAULT_CALLS,
              hold_secs: float = 0.0) -> dict[str, Any]:
    """The healthy run, then ``inject`` for ``hold_calls`` answered calls (and at least ``hold_secs``), then
    ``remove``; the figures, once checked."""
    gc.collect()
    gc.disable()  # a full collection of this test process (pytest's heap) stalls every call of the load ~100 ms
    try:
        return await _run(fleet, fault, inject, remove, out_within, back_within, timeouts_allowed, hold_calls,
                          hold_secs)
    finally:
        gc.enable()


async def _run(fleet: Fleet, fault: str, inject: Any, remove: Any, out_within: float | None,
               back_within: float | None, timeouts_allowed: bool, hold_calls: int, hold_secs: float) -> dict[str, Any]:
    load = Load(fleet.urls)
    load.start()
    try:
        await load.answered(HEALTHY_CALLS)
        seen_before = await fleet.hosts["a"].seen()  # (a killed host cannot say, after, which calls it was sent)
        injected = reactor.seconds()
        await inject()
        held = load.answered(hold_calls)
        out_after = await fleet.wait("a", False, out_within) if out_within is not None else None
        await held
        if hold_secs:  # a fault the issue gives a duration (SIGSTOP for 30 s)
            await deferLater(reactor, max(0.0, hold_secs - (reactor.seconds() - injected)), lambda: None)
        removed = reactor.seconds()
        await remove()
        back_after = await fleet.wait("a", True, back_within) if back_within is not None else None
        await load.answered(AFTER_CALLS)
    finally:
        await load.stop()
    if not fleet.hosts["a"].ended.called:
        await fleet.agree("a")  # the load stopped: whatever a's state, both say the same

    seen_by_a = seen_before | (await fleet.hosts["a"].seen() if not fleet.hosts["a"].ended.called else set())
    healthy = [o for o in load.outcomes if o.end < injected]  # (a call in flight when the fault came is the fault's)
    during = [o for o in load.outcomes if injected <= o.start < removed + (back_after or 0)]
    direct = [o.end - o.start for o in during if o.host in ("b", "c") and o.marker not in seen_by_a]
    lost = [o for o in load.outcomes if o.lost]
    figures = {
        "fault": fault, "calls": len(load.outcomes), "healthy_calls": len(healthy), "fault_calls": len(during),
        "healthy_p99_ms": round(p99([o.end - o.start for o in healthy]) * 1000, 1),
        "others_p99_ms": round(p99(direct) * 1000, 1),
        "out_after_secs": round(out_after, 2) if out_after is not None else None,
        "back_after_secs": round(back_after, 2) if back_after is not None else None,
        "lost": len(lost), "lost_codes": sorted({str(o.error) for o in lost}),
        "streams_cut_after_start": sum(o.started and o.error is not None for o in load.outcomes),
        "served_by_a_after": sum(o.host == "a" for o in load.outcomes if o.start >= removed + (back_after or 0)),
    }
    if os.environ.get("FAULT_REPORT"):
        with open(os.environ["FAULT_REPORT"], "a") as report:
            report.write(json.dumps(figures) + "\n")
    assert all(not o.lost for o in healthy), [asdict(o) for o in healthy if o.lost]
    if timeouts_allowed:  # sent to a before it was out: the first-byte deadline's 504, never re-run
        assert all(o.status == 504 and o.error == "upstream_timeout" for o in lost), figures
        # Per gateway: the calls a's slots held and those sent until eject_after of them had failed, then one
        # trial call each time a came back (its model list answers) while the fault lasted.
        assert len(lost) <= 2 * (SLOTS + EJECT_AFTER - 1 + (removed - injected) / EJECT_SECS), figures
    else:
        assert lost == [], (figures, [asdict(o) for o in lost][:5])
    assert figures["others_p99_ms"] <= figures["healthy_p99_ms"] * 1.2 + 5, figures
    return figures


@pytest_twisted.ensureDeferred
async def test_a_host_killed_with_calls_in_flight(fleet):
    host = fleet.hosts["a"]

    async def nothing() -> None:
        pass

    await run(fleet, "kill -9", host.kill, nothing, out_within=CHECK_SECS + PROBE_SECS + 0.5,
              back_within=None)


@pytest_twisted.ensureDeferred
async def test_a_host_killed_and_restarted_at_once_is_back_within_a_second_or_two(fleet):
    host = fleet.hosts["a"]

    async def restart() -> None:
        await host.kill()
        await deferLater(reactor, 0.3, lambda: None)  # (the fault itself: back up 0.3 s after the kill)
        await host.start()

    async def nothing() -> None:
        pass

    figures = await run(fleet, "restart", restart, nothing, hold_calls=0, out_within=None,
                        back_within=DOWN_PROBE_SECS + PROBE_SECS + 1.0)
    assert figures["served_by_a_after"] > 0  # the restarted host serves again


@pytest_twisted.ensureDeferred
async def test_a_host_stopped_for_30_seconds(fleet):
    host = fleet.hosts["a"]

    async def stop_it() -> None:
        host.signal(signal.SIGSTOP)

    async def go_on() -> None:
        host.signal(signal.SIGCONT)

    await run(fleet, "SIGSTOP 30s", stop_it, go_on, hold_secs=30, out_within=EJECT_AFTER * FIRST_BYTE_SECS + 0.5,
              back_within=DOWN_PROBE_SECS + PROBE_SECS + 1.0, timeouts_allowed=True)


@pytest.mark.parametrize("fault, how, out_within, timeouts_allowed", [
    ("500s", {"chat": "error"}, 1.5, False),
    ("headers late", {"latency": FIRST_BYTE_SECS * 3}, EJECT_AFTER * FIRST_BYTE_SECS + 0.5, True),
    ("stream cut", {"chat": "cut"}, 1.5, False),
    ("model list hangs", {"models": "hang"}, None, False),
])
@pytest_twisted.ensureDeferred
async def test_a_host_that_misbehaves_while_it_runs(fleet, fault, how, out_within, timeouts_allowed):
    host = fleet.hosts["a"]
    back_within = MAX_EJECT_SECS + PROBE_SECS + CHECK_SECS + 0.5 if out_within is not None else None
    await run(fleet, fault, lambda: host.fault(**how), lambda: host.fault(chat="normal", latency=0.05,
                                                                           models="normal"),
              out_within=out_within, back_within=back_within, timeouts_allowed=timeouts_allowed)
