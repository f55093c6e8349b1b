"""``twistd inference`` from the installed package, run as a real process."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
from typing import Any, Optional

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

from .conftest import call

TWISTD = shutil.which("twistd", path=os.path.dirname(sys.executable))
pytestmark = pytest.mark.skipif(TWISTD is None, reason="twistd is not installed next to this Python")


class Daemon(ProcessProtocol):
    """Collects a child's output and notices when its site is up (``port()``) and when it ends."""

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.listening: Deferred[Optional[int]] = Deferred()
        self.ended: Deferred[Optional[int]] = Deferred()
        self.signal: Optional[int] = None

    def outReceived(self, data: bytes) -> None:
        self.out += data
        found = re.search(rb"GatewaySite starting on (\d+)", self.out)
        if found and not self.listening.called:
            self.listening.callback(int(found.group(1)))

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


def spawn(args: list[str], env: dict[str, str], cwd: str) -> tuple[Daemon, Any]:
    daemon = Daemon()
    # A clean environment and a directory outside the repo: the plugin must come from the installed package.
    # Spans are not exported unless a test points them somewhere.
    child_env = {"PATH": os.environ.get("PATH", ""), "HOME": cwd,
                 "INFERENCE_OBSERVABILITY_TRACING_EXPORTER": "none", **env}
    transport = reactor.spawnProcess(daemon, TWISTD, [TWISTD, "-n", "--pidfile=", "inference", *args],
                                     env=child_env, path=cwd)
    return daemon, transport


async def stop(daemon: Daemon, transport: Any) -> bool:
    """SIGTERM the daemon; True when it shut down cleanly (twistd re-raises SIGTERM to exit by it).

    Call it once the daemon has answered a request: before its reactor runs, SIGTERM just kills it.
    """
    if not daemon.ended.called:
        transport.signalProcess(signal.SIGTERM)
    code = await daemon.ended
    return code == 0 or (code is None and daemon.signal == signal.SIGTERM and b"Server Shut Down" in daemon.out)


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
    import socket
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    free: Optional[int] = probe.getsockname()[1]
    probe.close()
    daemon, transport = spawn([], {"INFERENCE_INFERENCE_PROVIDER": "mock", "INFERENCE_SERVER_PORT": str(free)},
                              str(tmp_path))
    try:
        port = await daemon.port()
        assert port == free
        assert (await call("GET", f"http://127.0.0.1:{port}/health/live")).status == 200
    finally:
        assert await stop(daemon, transport)
