"""Shared fixtures: a fake LM Studio and gateways on real loopback sockets, plus a small HTTP client."""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted
import treq
from prometheus_client.openmetrics import parser as openmetrics_parser
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from twisted.web.client import Agent, HTTPConnectionPool

from inference.config import load
from inference.service import GatewaySite, build_site

from .fakes.lmstudio import FakeLMStudio
from .memory import MemoryGateway

FAKE_URL = "http://lmstudio.test:1234"  # where an in-memory gateway finds the ``fake``

# Tests that are slow or need what a quick run may lack, by module (single tests elsewhere carry the mark
# themselves): ``pytest -m "not daemon and not prometheus and not fuzz and not clients"`` is the quick set.
MODULE_MARKS = {
    "daemon": {"test_daemon", "test_fleet_faults", "test_systemd", "test_load",  # real twistd processes
               "test_shared_limits"},
    "prometheus": {"test_prometheus"},  # a real Prometheus server scraping the gateway
    "fuzz": {"test_properties"},  # hypothesis property tests
    "clients": {"test_agent_clis", "test_agents", "test_sdk_loops", "test_conformance",  # SDKs and agent CLIs
                "test_tenant_clients"},
}
PLUGIN_CHECK = ("from twisted.plugin import IPlugin, getPlugins\n"
                "import sys\n"
                "sys.exit(0 if any(getattr(p, 'tapname', '') == 'inference' for p in getPlugins(IPlugin)) else 1)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__.rpartition(".")[2] if item.module is not None else ""
        for mark, modules in MODULE_MARKS.items():
            if module in modules:
                item.add_marker(mark)
    if any(item.get_closest_marker("daemon") for item in items):
        _require_the_installed_plugin()


def _require_the_installed_plugin() -> None:
    """Stop at once, with one line, when ``twistd`` cannot find the plugin (an editable install hides it): else
    every daemon test fails with twistd's usage text and no hint why."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as outside:  # (not the repo, whose twisted/plugins would be found)
        found = subprocess.run([sys.executable, "-c", PLUGIN_CHECK], cwd=outside, env={"PATH": os.environ.get(
            "PATH", "")}, capture_output=True, timeout=60).returncode == 0
    if not found:
        pytest.exit("twistd cannot find the inference plugin in this environment: install with `pip install .` "
                    "(`pip install -e .` hides twisted/plugins; use `pip install -e . --config-settings "
                    "editable_mode=compat`), or deselect the daemon tests with -m 'not daemon'", returncode=4)


@dataclass
class Reply:
    status: int
    headers: Any
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        """The ``error`` object of an OpenAI-shaped error answer (asserting the shape on the way)."""
        payload = self.json()
        assert set(payload) == {"error"}, payload
        assert set(payload["error"]) == {"message", "type", "param", "code"}, payload
        return payload["error"]

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None


async def call(method: str, url: str, body: Any = None, *, raw: bytes | None = None,
               headers: dict[str, str] | None = None) -> Reply:
    """One HTTP request over a fresh connection, returning the whole answer."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = treq.client.HTTPClient(Agent(reactor, pool=pool))
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    response = await client.request(method, url, data=data, headers=headers or {})
    content = await treq.content(response)
    return Reply(response.code, response.headers, content)


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Let the reactor run until ``predicate()`` holds (for state that has no event of its own)."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        assert reactor.seconds() < deadline, "condition not reached in time"
        await deferLater(reactor, 0.005, lambda: None)


class RawClient(Protocol):
    """A bare TCP client, for what HTTP libraries hide: half-sent requests, hang-ups, exact bytes."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.lost: Deferred[None] = Deferred()
        self._waiting: list[tuple[bytes, Deferred[None]]] = []

    def dataReceived(self, data: bytes) -> None:
        start = len(self.data)
        self.data += data
        for marker, d in list(self._waiting):
            if marker in self.data[max(0, start - len(marker)):]:  # only the new bytes: streams are long
                self._waiting.remove((marker, d))
                d.callback(None)

    def received(self, marker: bytes) -> Deferred[None]:
        """Fires once ``marker`` is among the bytes received."""
        d: Deferred[None] = Deferred()
        if marker in self.data:
            d.callback(None)
        else:
            self._waiting.append((marker, d))
        return d

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


async def raw_connect(port: int) -> RawClient:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    return await connectProtocol(endpoint, RawClient())


def raw_post(path: str, body: bytes) -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body))


def sse_payloads(body: bytes) -> list[bytes]:
    """The ``data`` payloads of an SSE body, checking the framing on the way."""
    assert body.endswith(b"\n\n"), body[-200:]
    events = body[:-2].split(b"\n\n")
    assert all(e.startswith(b"data: ") and b"\n" not in e for e in events), events
    return [e[len(b"data: "):] for e in events]


def named_events(body: bytes) -> list[tuple[str, Any]]:
    """The events of a typed-event SSE body (Responses, Messages) as (``event:`` name, decoded ``data``)."""
    events = []
    for event in body.decode().strip().split("\n\n"):
        head, data = event.split("\ndata: ", 1)
        assert head.startswith("event: "), event
        events.append((head[len("event: "):], json.loads(data)))
    return events


class Scrape:
    """One ``/metrics`` answer, parsed: look samples up by name and labels."""

    def __init__(self, text: str, content_type: str) -> None:
        self.text = text
        self.content_type = content_type
        if content_type.startswith("application/openmetrics-text"):
            families = openmetrics_parser.text_string_to_metric_families(text)
        else:
            families = text_string_to_metric_families(text)
        self.samples = [sample for family in families for sample in family.samples]

    def value(self, name: str, **labels: str) -> float | None:
        """The sample with exactly these labels (besides ``le`` for buckets), or None when absent."""
        found = [s.value for s in self.samples if s.name == name and s.labels == labels]
        assert len(found) <= 1, (name, labels, found)
        return found[0] if found else None

    def total(self, name: str, **labels: str) -> float:
        """The sum of every sample of ``name`` whose labels include ``labels``."""
        return sum(s.value for s in self.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def label_values(self, name: str, label: str) -> set[str]:
        return {s.labels[label] for s in self.samples if s.name == name and label in s.labels}


async def scrape(url: str, accept: str | None = None, path: str = "/metrics") -> Scrape:
    reply = await call("GET", url + path, headers={"Accept": accept} if accept else None)
    assert reply.status == 200, reply.body
    return Scrape(reply.body.decode(), reply.header("content-type") or "")


@dataclass
class RunningGateway:
    site: GatewaySite
    port: Any

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"

    async def post_chat(self, body: Any, headers: dict[str, str] | None = None) -> Reply:
        return await call("POST", self.url + "/v1/chat/completions", body, headers=headers)

    async def metrics(self, accept: str | None = None) -> Scrape:
        return await scrape(self.url, accept)


async def hold_the_slot(gateway: RunningGateway, fake: FakeLMStudio, body: Any) -> Deferred[Reply]:
    """Send ``body`` and let the fake hold it (``hang``); return its pending reply once it reached the upstream."""
    fake.chat.mode = "hang"
    arrived = fake.next_arrival()
    reply = Deferred.fromCoroutine(gateway.post_chat(body))
    await arrived
    return reply


async def queue_behind(gateway: RunningGateway, body: Any) -> Deferred[Reply]:
    """Send ``body``; return its pending reply once it waits in the admission queue."""
    admission = gateway.site.gateway.admission
    waiting = admission.queued + 1
    reply = Deferred.fromCoroutine(gateway.post_chat(body))
    await until(lambda: admission.queued == waiting)
    return reply


@pytest.fixture
def fake() -> Any:
    server = FakeLMStudio()
    server.listen()
    yield server
    pytest_twisted.blockon(server.stop())


@pytest.fixture
def start_gateway() -> Callable[..., RunningGateway]:
    """Start a gateway on port 0 from ``INFERENCE_*`` settings (and an optional YAML file)."""
    running: list[RunningGateway] = []

    def start(env: dict[str, str] | None = None, config_path: str | None = None) -> RunningGateway:
        # Spans are made but not exported, and the upstream is not probed in the background (tests count what
        # reaches the fake), unless a test asks.
        env = {"INFERENCE_OBSERVABILITY_TRACING_EXPORTER": "none", "INFERENCE_INFERENCE_HEALTH_CHECK_SECS": "0",
               **(env or {})}
        site = build_site(load(config_path, env), reactor, environ=env)
        site.gateway.start()
        gateway = RunningGateway(site, reactor.listenTCP(0, site, interface="127.0.0.1"))
        running.append(gateway)
        return gateway

    yield start
    for gateway in running:
        pytest_twisted.blockon(DeferredList([
            gateway.port.stopListening(),
            Deferred.fromCoroutine(gateway.site.gateway.close()),
        ]))


@pytest.fixture
def in_memory(fake: FakeLMStudio) -> Any:
    """Make gateways on a fake clock, all in memory (``tests/memory.py``), in front of ``fake`` at ``FAKE_URL``
    (and of other upstreams passed by base URL)."""
    made: list[MemoryGateway] = []

    def make(env: dict[str, str] | None = None, upstreams: dict[str, Any] | None = None,
             config_path: str | None = None) -> MemoryGateway:
        gateway = MemoryGateway({FAKE_URL: fake, **(upstreams or {})},
                                {"INFERENCE_INFERENCE_BASE_URL": FAKE_URL, **(env or {})}, config_path)
        made.append(gateway)
        return gateway

    yield make
    for gateway in made:
        gateway.close()


@pytest.fixture
def lmstudio(fake: FakeLMStudio, start_gateway: Callable[..., RunningGateway]) -> RunningGateway:
    """A gateway in front of the fake LM Studio with default settings and short deadlines."""
    return start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url,
                          "INFERENCE_INFERENCE_HTTP_TIMEOUT_SECS": "2"})


@pytest.fixture
def access_events() -> Any:
    """The access-line events logged while the test runs."""
    events: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace") == "inference.access":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


@pytest.fixture(autouse=True)
def no_logged_failures() -> Any:
    """Fail a test whose run logged an unhandled error (pytest-twisted does not, unlike trial)."""
    failures: list[Any] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    yield failures
    globalLogPublisher.removeObserver(observe)
    assert not failures, [str(e.get("log_failure") or e) for e in failures]


class ServerProcess(ProcessProtocol):
    """A server a test starts (Redis, PostgreSQL): ``ready`` fires once ``marker`` is in its output, ``ended`` when
    it exits (``ready`` fails with its last output if it exits first)."""

    def __init__(self, marker: bytes) -> None:
        self.marker = marker
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self._output = b""

    def outReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's)
        self._seen(data)

    def errReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's)
        self._seen(data)

    def _seen(self, data: bytes) -> None:
        self._output += data
        if self.marker in self._output and not self.ready.called:
            self.ready.callback(None)

    def processEnded(self, reason: Any) -> None:  # noqa: N802 (Twisted's)
        if not self.ready.called:
            self.ready.errback(AssertionError(self._output.decode(errors="replace")[-800:]))
        self.ended.callback(None)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a process that must be told its port before it starts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tool(name: str, package: str = "prometheus") -> str:
    """The path of a command the test needs; skipped when missing, unless INFERENCE_REQUIRE_TOOLS=1 (CI)."""
    path = shutil.which(name)
    if path is None and os.environ.get("INFERENCE_REQUIRE_TOOLS") == "1":
        pytest.fail(f"{name} is required (INFERENCE_REQUIRE_TOOLS=1) but not installed (Debian: {package})")
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package {package})")
    return path


async def run_tool(cwd: Any, *command: str, stdin: bytes = b"",
                   env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run a command in ``cwd`` without blocking the reactor: its exit code and its output (stdout + stderr)."""
    collector = _Collect(stdin)
    reactor.spawnProcess(collector, command[0], list(command), env={**os.environ, **(env or {})}, path=str(cwd))
    return await collector.done


class _Collect(ProcessProtocol):
    def __init__(self, stdin: bytes) -> None:
        self._stdin = stdin
        self.output = b""
        self.done: Deferred[tuple[int, str]] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self._stdin)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.done.callback((reason.value.exitCode or 0, self.output.decode()))
