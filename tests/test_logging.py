"""Logging: request ids, the access line, text and JSON output, levels, and no secrets or content."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ConnectionRefusedError
from twisted.logger import Logger, LogLevel, globalLogPublisher

from inference.config import LoggingConfig
from inference.logs import make_observer

from .conftest import call, free_port, raw_connect, raw_post, until
from .test_daemon import TWISTD, spawn

MODEL = "qwen2.5-7b-instruct"


@pytest_twisted.ensureDeferred
async def test_request_ids_are_echoed_or_generated(lmstudio):
    given = await call("GET", lmstudio.url + "/v1/models", headers={"X-Request-ID": "client-chosen.id-42"})
    assert given.header("x-request-id") == "client-chosen.id-42"
    made = await call("GET", lmstudio.url + "/v1/models")
    other = await call("GET", lmstudio.url + "/v1/models")
    assert len(made.header("x-request-id")) == 32 and made.header("x-request-id") != other.header("x-request-id")
    hostile = await call("GET", lmstudio.url + "/v1/models", headers={"X-Request-ID": "a b\tfake=line"})
    assert hostile.header("x-request-id") != "a b\tfake=line"  # replaced, not logged as sent


@pytest_twisted.ensureDeferred
async def test_one_access_line_per_request_with_model_ttft_tokens_and_bytes(fake, lmstudio, access_events):
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    reply = await lmstudio.post_chat({"model": MODEL, "stream": True,
                                      "messages": [{"role": "user", "content": "a secret prompt"}]},
                                     headers={"X-Request-ID": "req-1",
                                              "traceparent": f"00-{trace_id}-b7ad6b7169203331-01"})
    await call("GET", lmstudio.url + "/nowhere")
    streamed, missing = access_events
    assert streamed["request_id"] == "req-1" and streamed["trace_id"] == trace_id
    assert (streamed["method"], streamed["route"], streamed["status"]) == ("POST", "/v1/chat/completions", 200)
    assert streamed["model"] == MODEL and streamed["input_tokens"] == 12 and streamed["output_tokens"] == 4
    assert 0 < streamed["ttft_ms"] <= streamed["duration_ms"]
    assert streamed["bytes"] == len(reply.body)
    assert (missing["route"], missing["status"], missing.get("model")) == ("other", 404, None)
    assert "secret" not in repr(access_events)


@pytest_twisted.ensureDeferred
async def test_a_client_that_leaves_is_logged_as_499(fake, lmstudio, access_events):
    await call("GET", lmstudio.url + "/v1/models")  # the model list is cached: the chat goes straight upstream
    fake.chat.mode = "hang"
    arrived, closed = fake.next_arrival(), fake.next_close()
    client = await raw_connect(lmstudio.port.getHost().port)
    client.transport.write(raw_post("/v1/chat/completions", json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()))
    await arrived
    client.transport.loseConnection()
    await closed
    gone = access_events[-1]
    assert gone["status"] == 499 and gone["model"] == MODEL and gone["output_tokens"] is None


def emit(observer: Any, level: LogLevel, text: str, **fields: Any) -> None:
    Logger(namespace="test", observer=observer).emit(level, text, **fields)


def test_json_lines_are_one_object_each_and_filtered_by_level():
    out = io.StringIO()
    observer = make_observer(LoggingConfig(level="warn", format="json"), out)
    emit(observer, LogLevel.info, "quiet {x}", x=1)
    emit(observer, LogLevel.warn, "upstream {url} slow", url="http://h:1", request_id="r1", trace_id="t1")
    emit(observer, LogLevel.error, "broken")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["level"] for line in lines] == ["warn", "error"]
    first = lines[0]
    assert first["message"] == "upstream http://h:1 slow" and first["url"] == "http://h:1"
    assert (first["request_id"], first["trace_id"], first["logger"]) == ("r1", "t1", "test")
    assert first["timestamp"].endswith("Z")


def test_text_lines_name_the_level_logger_and_ids():
    out = io.StringIO()
    observer = make_observer(LoggingConfig(level="debug", format="text"), out)
    emit(observer, LogLevel.debug, "detail {n}", n=3, request_id="r9")
    (line,) = out.getvalue().splitlines()
    assert line.endswith(" debug [test] detail 3 request_id=r9")


@pytest_twisted.ensureDeferred
async def test_text_access_lines_read_as_documented(fake, lmstudio):
    out = io.StringIO()
    observer = make_observer(LoggingConfig(level="info", format="text"), out)
    globalLogPublisher.addObserver(observer)
    try:
        plain = await lmstudio.post_chat({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        streamed = await lmstudio.post_chat({"model": MODEL, "stream": True,
                                             "messages": [{"role": "user", "content": "hi"}]})
    finally:
        globalLogPublisher.removeObserver(observer)
    lines = [line for line in out.getvalue().splitlines() if "[inference.access]" in line]
    pattern = (r'^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z info \[inference\.access\] 127\.0\.0\.1 '
               r'"POST /v1/chat/completions" 200 (\d+)B [\d.]+ms model=qwen2\.5-7b-instruct%s tokens=12/(\d) '
               r'request_id=\w+ trace_id=[0-9a-f]{32}$')
    first, second = re.match(pattern % "", lines[0]), re.match(pattern % r" ttft_ms=[\d.]+", lines[1])
    assert first and second, lines
    assert int(first.group(1)) == len(plain.body) and int(second.group(1)) == len(streamed.body)


@pytest.mark.daemon
@pytest.mark.skipif(TWISTD is None, reason="twistd is not installed next to this Python")
@pytest_twisted.ensureDeferred
async def test_the_daemon_logs_json_lines_with_request_and_trace_ids(tmp_path, fake):
    daemon, transport = spawn(["--listen", "tcp:0:interface=127.0.0.1"],
                              {"INFERENCE_INFERENCE_BASE_URL": fake.url, "INFERENCE_LOGGING_FORMAT": "json",
                               "INFERENCE_SERVER_API_KEYS": "key-that-must-not-leak"}, str(tmp_path))
    url = f"http://127.0.0.1:{await daemon.port()}/v1/chat/completions"
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    reply = await call("POST", url, {"model": MODEL, "messages": [{"role": "user", "content": "private words"}]},
                       headers={"Authorization": "Bearer key-that-must-not-leak",
                                "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    assert reply.status == 200
    transport.signalProcess(signal.SIGTERM)
    assert await daemon.ended == 0
    lines = [json.loads(line) for line in daemon.out.decode().splitlines()]  # every line is one JSON object
    assert all({"timestamp", "level", "message", "request_id", "trace_id"} <= set(line) for line in lines)
    (access,) = [line for line in lines if line["logger"] == "inference.access"]
    assert access["request_id"] == reply.header("x-request-id") and access["trace_id"] == trace_id
    assert access["status"] == 200 and access["model"] == MODEL and access["output_tokens"] == 3
    assert access["message"].startswith('127.0.0.1 "POST /v1/chat/completions" 200 ') and "access_text" not in access
    text = daemon.out.decode()
    assert "key-that-must-not-leak" not in text and "private words" not in text and "Bearer" not in text


@pytest.mark.daemon
@pytest.mark.skipif(TWISTD is None, reason="twistd is not installed next to this Python")
@pytest_twisted.ensureDeferred
async def test_the_log_level_comes_from_the_config(tmp_path):
    port = free_port()
    daemon, transport = spawn([], {"INFERENCE_INFERENCE_PROVIDER": "mock", "INFERENCE_SERVER_PORT": str(port),
                                   "INFERENCE_LOGGING_LEVEL": "warn"}, str(tmp_path))
    url = f"http://127.0.0.1:{port}"
    while True:  # no "starting on" line at level warn: wait for the port to answer
        assert not daemon.ended.called, daemon.err
        try:
            reply = await call("GET", url + "/v1/models")
            break
        except ConnectionRefusedError:
            continue
    assert reply.status == 200
    transport.signalProcess(signal.SIGTERM)
    assert await daemon.ended == 0
    assert daemon.out == b""  # nothing at warn or above happened


async def daemonised(tmp_path: Any, fake: Any, *twistd_args: str, **env: str) -> tuple[str, int]:
    """Start ``twistd TWISTD_ARGS inference`` as a real daemon in ``tmp_path``; its pid file and port."""
    port = free_port()
    launcher, _ = spawn([], {"INFERENCE_INFERENCE_BASE_URL": fake.url, "INFERENCE_SERVER_PORT": str(port), **env},
                        str(tmp_path), twistd_args=("--pidfile", str(tmp_path / "twistd.pid"), *twistd_args))
    assert await launcher.ended == 0, launcher.err  # the launcher exits once the daemon runs on its own
    await until(lambda: (tmp_path / "twistd.pid").exists())
    await until(lambda: _answers(port), timeout=20)
    return str(tmp_path / "twistd.pid"), port


def _answers(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


async def end_daemon(pidfile: str) -> None:
    os.kill(int(Path(pidfile).read_text()), signal.SIGTERM)
    await until(lambda: not os.path.exists(pidfile), timeout=20)  # twistd removes it as it exits


@pytest.mark.skipif(TWISTD is None, reason="twistd is not installed next to this Python")
@pytest_twisted.ensureDeferred
async def test_a_daemon_writes_its_lines_to_the_logfile_and_reopens_it_on_sigusr1(tmp_path, fake):
    log = tmp_path / "inference.log"
    pidfile, port = await daemonised(tmp_path, fake, "--logfile", str(log))
    try:
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        assert (await call("POST", f"http://127.0.0.1:{port}/v1/chat/completions", chat)).status == 200
        await until(lambda: '"POST /v1/chat/completions" 200' in log.read_text())
        log.rename(tmp_path / "inference.log.1")  # what logrotate does, before it signals the daemon
        os.kill(int(Path(pidfile).read_text()), signal.SIGUSR1)
        await until(log.exists)
        assert (await call("GET", f"http://127.0.0.1:{port}/v1/models")).status == 200
        await until(lambda: '"GET /v1/models" 200' in log.read_text())
    finally:
        await end_daemon(pidfile)
    rotated, current = (tmp_path / "inference.log.1").read_text(), log.read_text()
    assert "serving provider lmstudio" in rotated and '"POST /v1/chat/completions" 200' in rotated
    assert '"GET /v1/models" 200' not in rotated and "Server Shut Down" in current
    assert "Starting factory" not in rotated + current  # one per upstream connection would bury the access lines
    assert not (tmp_path / "twistd.log").exists()


@pytest.mark.skipif(TWISTD is None, reason="twistd is not installed next to this Python")
@pytest_twisted.ensureDeferred
async def test_no_line_is_lost_to_a_reopen_or_a_stop_right_after_a_burst(tmp_path, fake):
    """Lines are flushed once per reactor turn: a SIGUSR1 and a SIGTERM sent the moment the answers are in must
    still find every line in its file."""
    log = tmp_path / "inference.log"
    pidfile, port = await daemonised(tmp_path, fake, "--logfile", str(log))
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    pid = int(Path(pidfile).read_text())
    try:
        replies = await DeferredList([Deferred.fromCoroutine(call(
            "POST", f"http://127.0.0.1:{port}/v1/chat/completions", chat)) for _ in range(20)])
        assert [reply.status for _, reply in replies] == [200] * 20
        log.rename(tmp_path / "inference.log.1")  # at once: no waiting for the lines to show
        os.kill(pid, signal.SIGUSR1)
        await until(log.exists)
        assert (await call("GET", f"http://127.0.0.1:{port}/v1/models")).status == 200
    finally:
        await end_daemon(pidfile)  # at once too
    rotated, current = (tmp_path / "inference.log.1").read_text(), log.read_text()
    assert rotated.count('"POST /v1/chat/completions" 200') == 20
    assert '"GET /v1/models" 200' in current and "Server Shut Down" in current


@pytest.mark.skipif(TWISTD is None, reason="twistd is not installed next to this Python")
@pytest_twisted.ensureDeferred
async def test_a_daemon_without_logfile_writes_json_lines_to_twistd_log(tmp_path, fake):
    pidfile, port = await daemonised(tmp_path, fake, INFERENCE_LOGGING_FORMAT="json")
    try:
        reply = await call("GET", f"http://127.0.0.1:{port}/v1/models", headers={"X-Request-ID": "in-the-file"})
        assert reply.status == 200
        log = tmp_path / "twistd.log"
        await until(lambda: log.exists() and "in-the-file" in log.read_text())
    finally:
        await end_daemon(pidfile)
    lines = [json.loads(line) for line in log.read_text().splitlines()]  # every line is one JSON object
    (access,) = [line for line in lines if line["logger"] == "inference.access"]
    assert (access["request_id"], access["route"], access["status"]) == ("in-the-file", "/v1/models", 200)


@pytest.mark.daemon
@pytest.mark.skipif(TWISTD is None, reason="twistd is not installed next to this Python")
@pytest_twisted.ensureDeferred
async def test_a_daemon_cannot_log_to_stdout(tmp_path):
    launcher, _ = spawn([], {"INFERENCE_INFERENCE_PROVIDER": "mock"}, str(tmp_path),
                        twistd_args=("--pidfile", str(tmp_path / "twistd.pid"), "--logfile", "-"))
    assert await launcher.ended != 0
    assert launcher.err.decode().strip().splitlines() == [
        "inference: Daemons cannot log to stdout: use --logfile PATH, or --nodaemon"]


class CountingSink:
    """A sink that counts writes as well as flushes: with ``PYTHONUNBUFFERED=1`` each write is a system call."""

    def __init__(self) -> None:
        self.text, self.writes, self.flushes = "", 0, 0

    def write(self, text: str) -> None:
        self.text += text
        self.writes += 1

    def flush(self) -> None:
        self.flushes += 1


def test_lines_are_written_and_flushed_once_per_reactor_turn_and_warnings_at_once():
    from twisted.internet.task import Clock

    from inference.logs import FlushedPerTurn
    clock, sink = Clock(), CountingSink()
    observer = make_observer(LoggingConfig(level="info", format="text"), FlushedPerTurn(sink, clock))
    for n in range(50):
        emit(observer, LogLevel.info, "access {n}", n=n)
    assert sink.writes == 0 and sink.flushes == 0  # held until the turn ends
    clock.advance(0)
    assert (sink.writes, sink.flushes) == (1, 1)  # the turn's 50 lines in one write and one flush, in order
    assert [line.rpartition(" ")[2] for line in sink.text.splitlines()] == [str(n) for n in range(50)]
    emit(observer, LogLevel.info, "one more")
    emit(observer, LogLevel.error, "broken")
    assert (sink.writes, sink.flushes) == (2, 2)  # an error goes out at once, and the line before it with it
    assert sink.text.splitlines()[-2].endswith("one more") and sink.text.splitlines()[-1].endswith("broken")
    assert sink.flushes == 2 and not clock.getDelayedCalls()  # nothing left to flush: no timer either


def test_a_turn_holds_a_bounded_number_of_lines_and_another_threads_line_goes_out_at_once():
    import threading

    from twisted.internet.task import Clock

    from inference.logs import FlushedPerTurn
    clock, sink = Clock(), CountingSink()
    lines = FlushedPerTurn(sink, clock)
    for n in range(FlushedPerTurn.MAX_HELD + 10):
        lines.write(f"line {n}\n")
    assert sink.writes == 1 and sink.text.count("\n") == FlushedPerTurn.MAX_HELD  # written, not held past the bound
    assert sink.flushes == 0  # still flushed at the turn's end
    other = threading.Thread(target=lines.write, args=("from a thread\n",))
    other.start()
    other.join()
    assert sink.text.splitlines()[-1] == "from a thread" and sink.flushes == 1  # with the held lines before it
    assert sink.text.splitlines() == [f"line {n}" for n in range(FlushedPerTurn.MAX_HELD + 10)] + ["from a thread"]
    clock.advance(0)
    assert sink.writes == 2 and sink.flushes == 2  # the turn's end: nothing held, a flush
