"""A bounded load test on loopback: 500 concurrent streams through a real daemon (mock provider) with admission
control on. Nothing is lost: every request completes in full or gets the documented 429."""

from __future__ import annotations

import json

import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults

from .conftest import Reply, call, free_port, scrape
from .test_daemon import spawn, stop

STREAMS = 500
SLOTS, QUEUE = 100, 300
PROMPT = "load test number {n} with a handful of words"


def check(n: int, reply: Reply) -> str:
    """'ok' for a whole stream with the right text, 'overloaded' for a proper 429; anything else fails."""
    if reply.status == 429:
        assert reply.error["code"] == "overloaded" and reply.header("Retry-After") == "1"
        return "overloaded"
    assert reply.status == 200, reply.body[:300]
    events = [line[len(b"data: "):] for line in reply.body.split(b"\n\n") if line]
    assert events[-1] == b"[DONE]" and all(not e.startswith(b'{"error"') for e in events)
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "You said: " + PROMPT.format(n=n)
    assert chunks[-1]["usage"]["completion_tokens"] == len(text.split())
    return "ok"


@pytest_twisted.ensureDeferred
async def test_500_concurrent_streams_complete_or_are_refused_cleanly(tmp_path):
    port = free_port()
    daemon, transport = spawn([], {"INFERENCE_INFERENCE_PROVIDER": "mock", "INFERENCE_SERVER_PORT": str(port),
                                   "INFERENCE_INFERENCE_MOCK_TOKEN_DELAY_SECS": "0.01",
                                   "INFERENCE_INFERENCE_MAX_CONCURRENT_REQUESTS": str(SLOTS),
                                   "INFERENCE_INFERENCE_MAX_QUEUE": str(QUEUE)}, str(tmp_path))
    try:
        await daemon.port()
        url = f"http://127.0.0.1:{port}"

        async def one(n: int) -> str:
            body = {"messages": [{"role": "user", "content": PROMPT.format(n=n)}], "stream": True}
            return check(n, await call("POST", url + "/v1/chat/completions", body))

        outcomes = await gatherResults([Deferred.fromCoroutine(one(n)) for n in range(STREAMS)])
        completed = outcomes.count("ok")
        # A 429 means SLOTS were running and QUEUE waiting, and every one of those completes.
        assert completed == STREAMS or completed >= SLOTS + QUEUE
        m = await scrape(url)
        assert m.value("inference_requests_in_flight", provider="mock") == 0
        assert m.value("inference_queue_length", provider="mock") == 0
        chat = "/v1/chat/completions"
        assert m.value("inference_http_requests_total", method="POST", route=chat, code="200") == completed
        assert m.total("inference_http_requests_total", route=chat) == STREAMS
        assert m.value("inference_queue_wait_seconds_count", provider="mock") == completed
    finally:
        assert await stop(daemon, transport)
