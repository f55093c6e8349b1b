"""The background upstream probe: a down upstream fails requests at once, and the gateway recovers by itself."""

from __future__ import annotations

from .conftest import FAKE_URL

CHAT = {"model": "qwen2.5-7b-instruct", "messages": [{"role": "user", "content": "hi"}]}


def watched(in_memory, every: str):
    return in_memory({"INFERENCE_INFERENCE_HEALTH_CHECK_SECS": every, "INFERENCE_INFERENCE_HTTP_MAX_RETRIES": "0"})


def test_a_down_upstream_fails_fast_and_the_gateway_recovers_by_itself(in_memory):
    gateway = watched(in_memory, "0.05")
    gateway.gateway.start()
    monitor, upstream = gateway.gateway.monitor, gateway.upstreams[FAKE_URL]
    gateway.settle()
    assert monitor.up is True and gateway.post_chat(CHAT).status == 200
    upstream.stop()
    gateway.advance(0.05)  # the next probe finds it down
    assert monitor.up is False
    attempts = upstream.attempts
    reply = gateway.post_chat(CHAT)
    assert reply.status == 502 and reply.error["code"] == "upstream_unreachable"
    assert "is down" in reply.error["message"] and "connection refused" in reply.error["message"]
    assert upstream.attempts == attempts  # failed fast: no connection attempt of its own
    ready = gateway.call("GET", "/health/ready")
    assert ready.status == 503 and "connection refused" in ready.json()["error"]
    assert gateway.metrics().value("inference_upstream_up", provider="lmstudio") == 0

    upstream.start()  # LM Studio is back
    gateway.advance(0.05)
    assert monitor.up is True
    assert gateway.post_chat(CHAT).status == 200
    assert gateway.call("GET", "/health/ready").status == 200
    assert gateway.metrics().value("inference_upstream_up", provider="lmstudio") == 1


def test_a_request_that_cannot_connect_makes_the_next_ones_fail_fast(in_memory):
    gateway = watched(in_memory, "60")
    gateway.gateway.start()
    monitor, upstream = gateway.gateway.monitor, gateway.upstreams[FAKE_URL]
    gateway.settle()
    assert monitor.up is True
    upstream.stop()
    first = gateway.post_chat(CHAT)  # the monitor will not look for a minute; this request finds out
    assert first.status == 502 and "is down" not in first.error["message"]
    assert monitor.up is False  # ... and had the monitor probe at once
    second = gateway.post_chat(CHAT)
    assert second.status == 502 and "is down" in second.error["message"]


def test_ready_answers_from_the_monitor_without_calling_the_upstream(fake, in_memory):
    gateway = watched(in_memory, "60")
    gateway.gateway.start()
    gateway.settle()
    assert gateway.gateway.monitor.up is True
    probes = len(fake.received)
    for _ in range(5):
        assert gateway.call("GET", "/health/ready").status == 200
    assert len(fake.received) == probes
