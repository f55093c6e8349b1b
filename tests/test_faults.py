"""Fault injection: an upstream that fails in every way we know of. Each failure reaches the client as the
documented status or SSE error; the gateway keeps serving; load gauges return to 0; and no socket or timer is
left behind (counted before and after)."""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor

from .conftest import Reply, until
from .fakes.lmstudio import FakeLMStudio

MODEL = "qwen2.5-7b-instruct"
TIMEOUT = "0.5"


def chat(stream: bool = False) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "one two"}], "stream": stream}


def open_sockets() -> int:
    return sum(1 for fd in os.listdir("/proc/self/fd") if _is_socket(fd))


def _is_socket(fd: str) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    except OSError:  # closed meanwhile (the listdir's own fd)
        return False


def pending_timers() -> int:
    return sum(1 for call in reactor.getDelayedCalls() if call.active())


@dataclass
class Fault:
    name: str
    inject: Callable[[FakeLMStudio], Any]
    stream: bool
    status: int
    code: str  # the error code the client sees (in the JSON error, or in the SSE error event)
    midway: Callable[[FakeLMStudio], None] | None = None  # done once the client has the first words
    timeout: str = TIMEOUT  # http.timeout_secs: short, for the faults that are about time


def behave(**fields: Any) -> Callable[[FakeLMStudio], None]:
    """Set the fake's chat behaviour (``mode=`` for the answer, ``stream=`` for a 200 stream, and its details)."""
    def inject(fake: FakeLMStudio) -> None:
        for key, value in fields.items():
            setattr(fake.chat, key, value)
    return inject


async def refuse(fake: FakeLMStudio) -> None:
    await fake.stop()  # nothing listens on the upstream port any more


FAULTS = [
    Fault("refuse", refuse, False, 502, "upstream_unreachable"),
    Fault("refuse-stream", refuse, True, 502, "upstream_unreachable"),
    Fault("reset", behave(mode="reset"), False, 500, "upstream_error"),
    Fault("drop", behave(mode="drop"), False, 500, "upstream_error"),
    Fault("hang-before-headers", behave(mode="hang"), False, 504, "upstream_timeout"),
    Fault("hang-before-headers-stream", behave(mode="hang"), True, 504, "upstream_timeout"),
    Fault("hang-mid-body", behave(mode="stall_body"), False, 504, "upstream_timeout"),
    Fault("truncated-json", behave(mode="truncated"), False, 500, "upstream_error"),
    Fault("invalid-json", behave(mode="invalid_json"), False, 500, "upstream_error"),
    Fault("not-a-completion", behave(mode="not_json_object"), False, 500, "upstream_error"),
    # (Reading 33 MiB can take longer than half a second on a busy machine: this fault is about size, not time.)
    Fault("enormous-body", behave(mode="huge", huge_bytes=33 * 1024 * 1024), False, 500, "upstream_error",
          timeout="30"),
    Fault("429", behave(mode="error_object", status=429, code="rate_limited"), False, 429, "rate_limited"),
    Fault("500", behave(mode="error_string", status=500), False, 500, "upstream_error"),
    Fault("503", behave(mode="error_object", status=503), False, 500, "upstream_error"),
    Fault("503-stream", behave(mode="error_object", status=503), True, 500, "upstream_error"),
    Fault("hang-mid-stream", behave(stream="stall"), True, 200, "upstream_timeout"),
    Fault("reset-mid-stream", behave(stream="stall"), True, 200, "upstream_error", midway=FakeLMStudio.reset_held),
    Fault("die-mid-stream", behave(stream="die"), True, 200, "upstream_error"),
    Fault("invalid-sse", behave(stream="garbage"), True, 200, "upstream_error"),
    Fault("enormous-event", behave(stream="huge_event", huge_bytes=5 * 1024 * 1024), True, 200, "upstream_error",
          timeout="30"),
    Fault("empty-stream", behave(stream="empty"), True, 200, "context_length_exceeded"),  # asked again whole
    Fault("error-event", behave(stream="error_event"), True, 200, "upstream_error"),
]


def error_code(stream: bool, status: int, body: bytes) -> str | None:
    """The error the client was told about: in the JSON answer, or in the stream's one error event."""
    if status != 200:
        return json.loads(body)["error"]["code"]
    if not stream:
        return None
    events = [line[len(b"data: "):] for line in body.split(b"\n\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]", body[-300:]
    errors = [json.loads(e)["error"] for e in events[:-1] if b'"error"' in e]
    assert len(errors) <= 1 and all(set(e) == {"message", "type", "param", "code"} for e in errors)
    return errors[0]["code"] if errors else None


async def post_and_interfere(url: str, body: Any, midway: Callable[[], None]) -> Reply:
    """POST a stream and call ``midway`` as soon as the first generated words have reached the client."""
    response = await treq.post(url + "/v1/chat/completions", json=body, persistent=False)
    received: list[bytes] = []

    def collect(data: bytes) -> None:
        seen_before = any(b"echo" in r for r in received)
        received.append(data)
        if b"echo" in data and not seen_before:
            midway()

    await treq.collect(response, collect)
    return Reply(response.code, response.headers, b"".join(received))


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
@pytest_twisted.ensureDeferred
async def test_each_upstream_fault_is_reported_and_leaves_nothing_behind(fault, fake, start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url, "INFERENCE_INFERENCE_HTTP_MAX_RETRIES": "0",
                             "INFERENCE_INFERENCE_HTTP_TIMEOUT_SECS": fault.timeout,
                             "INFERENCE_INFERENCE_HTTP_CONNECT_TIMEOUT_SECS": TIMEOUT,
                             "INFERENCE_INFERENCE_MAX_CONCURRENT_REQUESTS": "2"})
    port = fake.port.getHost().port
    # Warm up (models cached, one pooled upstream connection), then take the baseline.
    assert (await gateway.post_chat(chat())).status == 200
    await until(lambda: len(fake.connections.open) == 1)
    sockets, timers = open_sockets(), pending_timers()

    injected = fault.inject(fake)
    if inspect.isawaitable(injected):
        await injected
    if fault.midway is None:
        reply = await gateway.post_chat(chat(fault.stream))
    else:
        reply = await post_and_interfere(gateway.url, chat(fault.stream), lambda: fault.midway(fake))
    assert reply.status == fault.status, reply.body[:300]
    assert error_code(fault.stream, reply.status, reply.body) == fault.code

    # The upstream recovers (or restarts on the same port): the gateway serves again, with no restart of its own.
    if fault.inject is refuse:
        fake.listen(port)
    fake.chat.mode, fake.chat.stream = "normal", "normal"
    for stream in (False, True):
        again = await gateway.post_chat(chat(stream))
        assert again.status == 200 and error_code(stream, 200, again.body) is None
    m = await gateway.metrics()
    assert m.value("inference_requests_in_flight", provider="lmstudio") == 0
    assert m.value("inference_queue_length", provider="lmstudio") == 0
    # Back to one pooled upstream connection, and no more sockets or timers than before the fault (fewer is
    # possible: what earlier tests left behind may finish closing meanwhile).
    await until(lambda: len(fake.connections.open) == 1 and open_sockets() <= sockets)
    assert pending_timers() <= timers  # checked at once: a forgotten timer would expire if we waited


@pytest_twisted.ensureDeferred
async def test_an_upstream_restart_between_requests_is_invisible(fake, start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url, "INFERENCE_INFERENCE_HTTP_MAX_RETRIES": "0"})
    port = fake.port.getHost().port
    assert (await gateway.post_chat(chat())).status == 200
    await fake.stop()  # the pooled keep-alive connection dies with it
    fake.listen(port)
    for stream in (False, True, False):
        assert (await gateway.post_chat(chat(stream))).status == 200
