"""``twistd inference`` from the installed package, run as a real process."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import error, reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

from .conftest import call, free_port, raw_connect, raw_post, scrape, sse_payloads

TWISTD = shutil.which("twistd", path=os.path.dirname(sys.executable))
pytestmark = pytest.mark.skipif(TWISTD is None, reason="twistd is not installed next to this Python")


class Daemon(ProcessProtocol):
    """Collects a child's output and notices when its site is up (``port()``) and when it ends."""

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.listening: Deferred[int | None] = Deferred()
        self.ended: Deferred[int | None] = Deferred()
        self.signal: int | None = None
        self._said: list[tuple[bytes, Deferred[None]]] = []

    def outReceived(self, data: bytes) -> None:
        self.out += data
        found = re.search(rb"GatewaySite starting on (\d+)", self.out)
        if found and not self.listening.called:
            self.listening.callback(int(found.group(1)))
        for marker, d in list(self._said):
            if marker in self.out:
                self._said.remove((marker, d))
                d.callback(None)

    def said(self, marker: bytes) -> Deferred[None]:
        """Fires once the daemon has logged ``marker``."""
        d: Deferred[None] = Deferred()
        self._said.append((marker, d))
        self.outReceived(b"")
        return d

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        code, self.signal = reason.value.exitCode, reason.value.signal
        if not self.listening.called:
            self.listening.callback(None)
        self.ended.callback(code)

    async def port(self) -> int:
        """The port the daemon listens on, once it does."""
        port = await self.listening
        assert port is not None, f"daemon exited: {self.err.decode()}{self.out.decode()}"
        return port


def spawn(args: list[str], env: dict[str, str], cwd: str,
          twistd_args: tuple[str, ...] = ("-n", "--pidfile=")) -> tuple[Daemon, Any]:
    """``twistd TWISTD_ARGS inference ARGS`` in ``cwd``; by default in the foreground, logging to stdout."""
    daemon = Daemon()
    # A clean environment and a directory outside the repo: the plugin must come from the installed package.
    # Spans are not exported unless a test points them somewhere.
    child_env = {"PATH": os.environ.get("PATH", ""), "HOME": cwd,
                 "INFERENCE_OBSERVABILITY_TRACING_EXPORTER": "none", **env}
    transport = reactor.spawnProcess(daemon, TWISTD, [TWISTD, *twistd_args, "inference", *args],
                                     env=child_env, path=cwd)
    return daemon, transport


async def stop(daemon: Daemon, transport: Any) -> bool:
    """SIGTERM the daemon; True when it shut down cleanly: exit status 0.

    Call it once the daemon has answered a request: before its reactor runs, SIGTERM just kills it.
    """
    if not daemon.ended.called:
        transport.signalProcess(signal.SIGTERM)
    code = await daemon.ended
    return code == 0 and b"Server Shut Down" in daemon.out


@pytest_twisted.ensureDeferred
async def test_twistd_inference_serves_the_mock(tmp_path):
    daemon, transport = spawn(["--listen", "tcp:0:interface=127.0.0.1"],
                              {"INFERENCE_INFERENCE_PROVIDER": "mock"}, str(tmp_path))
    try:
        port = await daemon.port()
        health = await call("GET", f"http://127.0.0.1:{port}/health")
        assert health.status == 200 and health.json()["status"] == "healthy"
        reply = await call("POST", f"http://127.0.0.1:{port}/v1/chat/completions",
                           {"messages": [{"role": "user", "content": "ping"}]})
        assert reply.json()["choices"][0]["message"]["content"] == "You said: ping"
    finally:
        assert await stop(daemon, transport)
    assert b"reactor class: inference.epoll.GatewayReactor" in daemon.out


@pytest_twisted.ensureDeferred
async def test_a_reactor_chosen_with_twistd_is_the_one_used(tmp_path):
    daemon, transport = spawn(["--listen", "tcp:0:interface=127.0.0.1"], {"INFERENCE_INFERENCE_PROVIDER": "mock"},
                              str(tmp_path), twistd_args=("-n", "--pidfile=", "--reactor=poll"))
    try:
        port = await daemon.port()
        reply = await call("POST", f"http://127.0.0.1:{port}/v1/chat/completions",
                           {"messages": [{"role": "user", "content": "ping"}]})
        assert reply.status == 200
    finally:
        assert await stop(daemon, transport)
    assert b"reactor class: twisted.internet.pollreactor.PollReactor" in daemon.out


@pytest_twisted.ensureDeferred
async def test_twistd_inference_reads_a_config_file_and_reaches_lmstudio(tmp_path, fake):
    config = tmp_path / "inference.yaml"
    config.write_text(f"inference:\n  base_url: {fake.url}/v1\n  http: {{timeout_secs: 5}}\n")
    daemon, transport = spawn(["--config", str(config), "--listen", "tcp:0:interface=127.0.0.1"], {},
                              str(tmp_path))
    try:
        port = await daemon.port()
        health = (await call("GET", f"http://127.0.0.1:{port}/health")).json()
        assert health["upstream"]["models"] == fake.models
        assert health["http_config"]["timeout_secs"] == 5
    finally:
        assert await stop(daemon, transport)


@pytest.mark.parametrize("args, env, message", [
    ([], {"INFERENCE_INFERENCE_HTTP_TIMEOUT_SECS": "soon"},
     "config error: inference.http.timeout_secs = 'soon' from INFERENCE_INFERENCE_HTTP_TIMEOUT_SECS: "
     "expected a number"),
    ([], {"INFERENCE_SERVER_PROT": "3000"}, "unknown environment variable INFERENCE_SERVER_PROT"),
    (["--config", "missing.yaml"], {}, "cannot read config file missing.yaml"),
    (["--listen", "carrier-pigeon:7"], {}, "--listen 'carrier-pigeon:7' is not a Twisted endpoint"),
    ([], {"INFERENCE_OBSERVABILITY_TRACING_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
     "config error: OTEL_EXPORTER_OTLP_PROTOCOL = 'http/json': expected one of grpc, http/protobuf"),
    ([], {"INFERENCE_OBSERVABILITY_TRACING_EXPORTER": "otlp", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "lots"},
     "config error: OTEL_BSP_MAX_EXPORT_BATCH_SIZE = 'lots': expected a whole number >= 1"),
])
@pytest_twisted.ensureDeferred
async def test_bad_config_stops_the_daemon_with_one_line(tmp_path, args, env, message):
    daemon, _ = spawn(args, env, str(tmp_path))
    code = await daemon.ended
    assert code != 0
    lines = daemon.err.decode().strip().splitlines()
    assert len(lines) == 1, daemon.err
    assert message in lines[0]
    assert b"Traceback" not in daemon.out + daemon.err


@pytest_twisted.ensureDeferred
async def test_port_from_environment(tmp_path):
    free = free_port()
    daemon, transport = spawn([], {"INFERENCE_INFERENCE_PROVIDER": "mock", "INFERENCE_SERVER_PORT": str(free)},
                              str(tmp_path))
    try:
        port = await daemon.port()
        assert port == free
        assert (await call("GET", f"http://127.0.0.1:{port}/health/live")).status == 200
    finally:
        assert await stop(daemon, transport)


def dechunk(raw: bytes) -> bytes:
    """The body of a raw HTTP/1.1 chunked response."""
    body, rest = b"", raw.split(b"\r\n\r\n", 1)[1]
    while rest:
        size, rest = rest.split(b"\r\n", 1)
        if int(size, 16) == 0:
            break
        body, rest = body + rest[:int(size, 16)], rest[int(size, 16) + 2:]
    return body


def mock_daemon(tmp_path, **settings: str) -> tuple[Daemon, Any]:
    """A daemon on the mock; on a port of its own choosing unless ``server_port`` is set."""
    env = {"INFERENCE_INFERENCE_PROVIDER": "mock", **{"INFERENCE_" + k.upper(): v for k, v in settings.items()}}
    args = [] if "server_port" in settings else ["--listen", "tcp:0:interface=127.0.0.1"]
    return spawn(args, env, str(tmp_path))


def words(count: int) -> str:
    return " ".join(f"w{i}" for i in range(count))


@pytest_twisted.ensureDeferred
async def test_sigterm_lets_a_running_stream_finish_then_exits_0(tmp_path):
    daemon, transport = mock_daemon(tmp_path, inference_mock_token_delay_secs="0.05")
    port = await daemon.port()
    client = await raw_connect(port)
    client.transport.write(raw_post("/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": words(12)}], "stream": True}).encode()))
    await client.received(b'"You"')
    transport.signalProcess(signal.SIGTERM)
    await daemon.said(b"no longer accepting")
    with pytest.raises(error.ConnectionRefusedError):  # the port is closed while the stream goes on
        await raw_connect(port)
    await client.lost
    assert await daemon.ended == 0
    body = bytes(client.data)
    assert body.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")  # every event, then the chunked end
    assert b" w11" in body and b'"error"' not in body
    assert b"all requests finished" in daemon.out


@pytest_twisted.ensureDeferred
async def test_sigterm_ends_requests_that_outlive_the_timeout_with_an_error(tmp_path):
    daemon, transport = mock_daemon(tmp_path, inference_mock_token_delay_secs="0.2",
                                    server_shutdown_timeout_secs="0.3")
    port = await daemon.port()
    streaming = await raw_connect(port)
    streaming.transport.write(raw_post("/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": words(30)}], "stream": True}).encode()))
    await streaming.received(b'"You"')
    waiting = await raw_connect(port)
    waiting.transport.write(raw_post("/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": words(30)}]}).encode()))
    metrics = f"http://127.0.0.1:{port}"
    while (await scrape(metrics)).value("inference_requests_in_flight", provider="mock") != 2:
        pass  # both requests are being served (each scrape is a round trip to the daemon)
    transport.signalProcess(signal.SIGTERM)
    await streaming.lost
    await waiting.lost
    assert await daemon.ended == 0
    events = sse_payloads(dechunk(bytes(streaming.data)))
    assert events[-1] == b"[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "shutting_down" and "shutdown_timeout_secs" in error["message"]
    assert all(json.loads(e).get("choices") is not None for e in events[:-2])  # whole events before it
    assert b"HTTP/1.1 503" in bytes(waiting.data) and b"shutting_down" in bytes(waiting.data)
    assert b"2 request(s) still running after 0.3s were ended with an error" in daemon.out


@pytest_twisted.ensureDeferred
async def test_two_processes_share_one_port_and_both_serve(tmp_path):
    port = free_port()
    daemons = []
    try:
        for _ in (1, 2):
            daemon, transport = mock_daemon(tmp_path, server_port=str(port), server_reuse_port="true",
                                            observability_metrics_port=str(free_port()))
            daemons.append((daemon, transport))
            assert await daemon.port() == port
        metrics_ports = [int(re.search(rb"MetricsSite starting on (\d+)", d.out).group(1)) for d, _ in daemons]
        served = [0, 0]
        for _ in range(200):  # the kernel spreads new connections; stop once both processes answered
            reply = await call("POST", f"http://127.0.0.1:{port}/v1/chat/completions",
                               {"messages": [{"role": "user", "content": "hi"}]})
            assert reply.status == 200
            served = [(await scrape(f"http://127.0.0.1:{p}")).total("inference_http_requests_total")
                      for p in metrics_ports]
            if all(served):
                break
        assert all(served), served
        assert (await call("GET", f"http://127.0.0.1:{port}/metrics")).status == 404  # only on the metrics ports
    finally:  # both are stopped, whatever the first says
        stopped = [await stop(daemon, transport) for daemon, transport in daemons]
        assert all(stopped), stopped


@pytest_twisted.ensureDeferred
async def test_a_port_in_use_stops_the_daemon_with_one_line(tmp_path):
    first, transport = mock_daemon(tmp_path)
    port = await first.port()
    try:
        second, _ = mock_daemon(tmp_path, server_port=str(port))  # no reuse_port: the port is taken
        assert await second.ended == 1
        assert f"critical [inference.service] cannot listen on 127.0.0.1:{port}: Address already in use".encode() \
            in second.out
        assert b"Traceback" not in second.out + second.err
    finally:
        assert await stop(first, transport)
