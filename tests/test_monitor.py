"""The background upstream probe: a down upstream fails requests at once, and the gateway recovers by itself."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import reactor

from .conftest import call, until

CHAT = {"model": "qwen2.5-7b-instruct", "messages": [{"role": "user", "content": "hi"}]}


def watched(fake, start_gateway, every: str):
    return start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url, "INFERENCE_INFERENCE_HEALTH_CHECK_SECS": every,
                          "INFERENCE_INFERENCE_HTTP_MAX_RETRIES": "0"})


@pytest_twisted.ensureDeferred
async def test_a_down_upstream_fails_fast_and_the_gateway_recovers_by_itself(fake, start_gateway):
    gateway = watched(fake, start_gateway, "0.05")
    monitor = gateway.site.gateway.monitor
    await until(lambda: monitor.up is True)
    assert (await gateway.post_chat(CHAT)).status == 200
    port = fake.port.getHost().port
    await fake.stop()
    await until(lambda: monitor.up is False)
    started = reactor.seconds()
    reply = await gateway.post_chat(CHAT)
    assert reply.status == 502 and reply.error["code"] == "upstream_unreachable"
    assert "is down" in reply.error["message"] and "connection refused" in reply.error["message"]
    assert reactor.seconds() - started < 0.25  # no connection attempt (HostnameEndpoint alone waits 0.3 s)
    ready = await call("GET", gateway.url + "/health/ready")
    assert ready.status == 503 and "connection refused" in ready.json()["error"]
    assert (await gateway.metrics()).value("inference_upstream_up", provider="lmstudio") == 0

    fake.listen(port)  # LM Studio is back
    await until(lambda: monitor.up is True)
    assert (await gateway.post_chat(CHAT)).status == 200
    assert (await call("GET", gateway.url + "/health/ready")).status == 200
    assert (await gateway.metrics()).value("inference_upstream_up", provider="lmstudio") == 1


@pytest_twisted.ensureDeferred
async def test_a_request_that_cannot_connect_makes_the_next_ones_fail_fast(fake, start_gateway):
    gateway = watched(fake, start_gateway, "60")
    monitor = gateway.site.gateway.monitor
    await until(lambda: monitor.up is True)
    await fake.stop()
    first = await gateway.post_chat(CHAT)  # the monitor will not look for a minute; this request finds out
    assert first.status == 502 and "is down" not in first.error["message"]
    await until(lambda: monitor.up is False)  # ... and had the monitor probe at once
    second = await gateway.post_chat(CHAT)
    assert second.status == 502 and "is down" in second.error["message"]
    fake.listen()


@pytest_twisted.ensureDeferred
async def test_ready_answers_from_the_monitor_without_calling_the_upstream(fake, start_gateway):
    gateway = watched(fake, start_gateway, "60")
    await until(lambda: gateway.site.gateway.monitor.up is True)
    probes = len(fake.received)
    for _ in range(5):
        assert (await call("GET", gateway.url + "/health/ready")).status == 200
    assert len(fake.received) == probes
