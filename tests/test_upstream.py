"""The upstream client: pool settings, deadlines, retries, cancellation, and health."""

from __future__ import annotations

import json
import socket

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.logger import globalLogPublisher

from inference.config import load

from .conftest import call, raw_connect, raw_post, sse_payloads, until
from .fakes.lmstudio import Behaviour, FakeLMStudio

MODEL = "qwen2.5-7b-instruct"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


@pytest_twisted.ensureDeferred
async def test_pool_keeps_at_most_max_idle_connections_and_reuses_them(fake, start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url,
                             "INFERENCE_INFERENCE_HTTP_MAX_IDLE_CONNECTIONS": "2"})
    assert (await gateway.post_chat(CHAT)).status == 200
    fake.chat.mode = "hang"
    replies = [Deferred.fromCoroutine(gateway.post_chat(CHAT)) for _ in range(5)]
    await until(lambda: len(fake.pending) == 5)
    assert len(fake.connections.open) == 5  # concurrency is not capped by the idle limit
    fake.chat.mode = "normal"
    fake.release()
    assert [r.status for r in await gatherResults(replies)] == [200] * 5
    await fake.connections.wait_open(2)
    assert len(fake.connections.open) == 2
    before = fake.connections.total
    for _ in range(3):
        assert (await gateway.post_chat(CHAT)).status == 200
    assert fake.connections.total == before  # sequential requests reuse the idle connections


@pytest_twisted.ensureDeferred
async def test_by_default_the_pool_keeps_a_connection_for_each_call_that_ran_at_once(fake, start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url})
    assert (await gateway.post_chat(CHAT)).status == 200

    async def at_once(n: int) -> None:
        fake.chat.mode = "hang"
        replies = [Deferred.fromCoroutine(gateway.post_chat(CHAT)) for _ in range(n)]
        await until(lambda: len(fake.pending) == n)
        fake.chat.mode = "normal"
        fake.release()
        assert [r.status for r in await gatherResults(replies)] == [200] * n

    await at_once(64)
    opened = fake.connections.total
    assert len(fake.connections.open) == 64  # all kept (a pool of 10 closed 54 of them)
    await at_once(64)
    assert fake.connections.total == opened  # the next 64 at once reuse them: no connection opened or closed


def test_the_default_idle_pool_follows_the_calls_that_can_be_in_flight():
    one = load(None, {"INFERENCE_INFERENCE_BASE_URL": "http://a:1234"}).inference
    assert one.idle_connections(one.hosts()[0]) == 256  # nothing bounds the calls in flight
    limited = load(None, {"INFERENCE_INFERENCE_MAX_CONCURRENT_REQUESTS": "32"}).inference
    assert limited.idle_connections(limited.hosts()[0]) == 32
    fleet = load(None, {"INFERENCE_INFERENCE_UPSTREAMS": "http://a:1234,http://b:1234"}).inference
    assert [fleet.idle_connections(host) for host in fleet.hosts()] == [32, 32]  # the slots they report, up to 32
    fixed = load(None, {"INFERENCE_INFERENCE_HTTP_MAX_IDLE_CONNECTIONS": "10"}).inference
    assert fixed.idle_connections(fixed.hosts()[0]) == 10


@pytest_twisted.ensureDeferred
async def test_idle_connections_close_after_keep_alive(fake, start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url,
                             "INFERENCE_INFERENCE_HTTP_KEEP_ALIVE_SECS": "0.2"})
    assert (await gateway.post_chat(CHAT)).status == 200
    idle_since = reactor.seconds()
    assert len(fake.connections.open) == 1
    await fake.connections.wait_open(0)
    assert reactor.seconds() - idle_since >= 0.15


@pytest_twisted.ensureDeferred
async def test_connect_timeout_is_applied(start_gateway):
    # A listening socket whose accept queue is full drops new SYNs: connecting hangs until our timeout.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(server.getsockname())
        fillers.append(filler)
    try:
        gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": f"http://127.0.0.1:{server.getsockname()[1]}",
                                 "INFERENCE_INFERENCE_HTTP_CONNECT_TIMEOUT_SECS": "0.3",
                                 "INFERENCE_INFERENCE_HTTP_MAX_RETRIES": "0"})
        started = reactor.seconds()
        reply = await call("GET", gateway.url + "/v1/models")
        assert reply.status == 502 and reply.error["code"] == "upstream_unreachable"
        assert "connect timed out" in reply.error["message"]
        assert 0.25 <= reactor.seconds() - started < 5
    finally:
        for s in fillers + [server]:
            s.close()


@pytest_twisted.ensureDeferred
async def test_refused_connections_are_retried_with_backoff(fake, start_gateway):
    """The upstream comes back while the gateway backs off: the request succeeds on a retry."""
    port_number = fake.port.getHost().port
    await fake.stop()
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url, "INFERENCE_INFERENCE_HTTP_MAX_RETRIES": "2"})
    retries = []

    def on_retry(event):
        if "retry" in event.get("log_format", "") and not retries:
            retries.append(event)
            fake.listen(port_number)  # LM Studio is back before the next attempt

    globalLogPublisher.addObserver(on_retry)
    try:
        reply = await gateway.post_chat(CHAT)
    finally:
        globalLogPublisher.removeObserver(on_retry)
    assert reply.status == 200
    assert retries and retries[0]["attempt"] == 1 and "connection refused" in retries[0]["error"]


@pytest_twisted.ensureDeferred
async def test_retries_give_up_after_max_retries(fake, start_gateway):
    url = fake.url
    await fake.stop()
    fake.listen()
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": url, "INFERENCE_INFERENCE_HTTP_MAX_RETRIES": "2"})
    attempts = []

    def observer(event):
        if "retry" in event.get("log_format", ""):
            attempts.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        reply = await call("GET", gateway.url + "/v1/models")
    finally:
        globalLogPublisher.removeObserver(observer)
    assert reply.status == 502
    assert [e["attempt"] for e in attempts] == [1, 2]
    assert [e["delay"] for e in attempts] == [0.1, 0.2]


@pytest_twisted.ensureDeferred
async def test_client_disconnect_aborts_the_upstream_request(fake, lmstudio):
    assert (await lmstudio.post_chat(CHAT)).status == 200
    fake.chat.mode = "hang"
    arrived, closed = fake.next_arrival(), fake.next_close()
    client = await raw_connect(lmstudio.port.getHost().port)
    client.transport.write(raw_post("/v1/chat/completions", json.dumps(CHAT).encode()))
    await arrived
    started = reactor.seconds()
    client.transport.loseConnection()
    await closed
    assert reactor.seconds() - started < 1
    fake.chat.mode = "normal"
    assert (await lmstudio.post_chat(CHAT)).status == 200


@pytest_twisted.ensureDeferred
async def test_health_reports_config_upstream_and_models(fake, lmstudio):
    reply = await call("GET", lmstudio.url + "/health")
    assert reply.status == 200
    health = reply.json()
    assert health["status"] == "healthy" and health["provider"] == "lmstudio"
    assert health["base_url"] == fake.url
    assert health["http_config"] == {"timeout_secs": 2.0, "connect_timeout_secs": 10.0,
                                     "keep_alive_secs": 30.0, "max_idle_connections": None}
    assert health["upstream"] == {"reachable": True, "error": None, "models": fake.models}
    assert (await call("GET", lmstudio.url + "/health/ready")).status == 200


@pytest_twisted.ensureDeferred
async def test_health_is_503_when_the_upstream_is_down(fake, lmstudio):
    port_number = fake.port.getHost().port
    await fake.stop()
    reply = await call("GET", lmstudio.url + "/health")
    assert reply.status == 503
    health = reply.json()
    assert health["status"] == "unhealthy" and health["upstream"]["reachable"] is False
    assert "connection refused" in health["upstream"]["error"]
    assert set(health["http_config"]) == {"timeout_secs", "connect_timeout_secs", "keep_alive_secs",
                                          "max_idle_connections"}
    ready = await call("GET", lmstudio.url + "/health/ready")
    assert ready.status == 503 and ready.json()["status"] == "not ready"
    assert (await call("GET", lmstudio.url + "/health/live")).status == 200
    fake.listen(port_number)
    assert (await call("GET", lmstudio.url + "/health/ready")).status == 200


@pytest_twisted.ensureDeferred
async def test_concurrent_requests_share_one_model_list_fetch(fake, lmstudio):
    replies = await DeferredList([Deferred.fromCoroutine(lmstudio.post_chat(CHAT)) for _ in range(10)])
    assert [ok and r.status for ok, r in replies] == [200] * 10
    assert [r.path for r in fake.received].count("/v1/models") == 1


@pytest_twisted.ensureDeferred
async def test_redirects_are_not_followed_and_the_key_never_reaches_another_host(fake, start_gateway):
    elsewhere = FakeLMStudio()
    elsewhere.listen()
    try:
        gateway = start_gateway({"INFERENCE_INFERENCE_PROVIDER": "openai", "INFERENCE_INFERENCE_BASE_URL": fake.url,
                                 "INFERENCE_INFERENCE_API_KEY": "sk-upstream-secret"})
        assert (await call("GET", gateway.url + "/v1/models")).status == 200
        fake.chat = Behaviour(mode="redirect", location=elsewhere.url + "/v1/chat/completions")
        for stream in (False, True):
            reply = await gateway.post_chat({**CHAT, "stream": stream})
            assert reply.status == 502 and reply.error["code"] == "upstream_error"
            assert "307" in reply.error["message"] and "does not follow redirects" in reply.error["message"]
            assert "sk-upstream-secret" not in reply.body.decode()
        assert fake.received[-1].headers["authorization"] == "Bearer sk-upstream-secret"
        assert elsewhere.received == []
        fake.chat = Behaviour()
        assert (await gateway.post_chat(CHAT)).status == 200  # the redirect's connection was left usable
        assert fake.connections.total == 1
    finally:
        await elsewhere.stop()


@pytest_twisted.ensureDeferred
async def test_gzip_answers_are_decoded(fake, lmstudio):
    fake.gzip = True
    reply = await lmstudio.post_chat(CHAT)
    assert reply.status == 200 and reply.json()["choices"][0]["message"]["content"] == "echo: hi"
    assert "gzip" in fake.received[-1].headers["accept-encoding"]
    streamed = await lmstudio.post_chat({**CHAT, "stream": True})
    payloads = sse_payloads(streamed.body)
    assert payloads[-1] == b"[DONE]"
    assert "".join(json.loads(p)["choices"][0]["delta"].get("content", "") for p in payloads[:-1]
                   if json.loads(p)["choices"]) == "echo: hi"


@pytest_twisted.ensureDeferred
async def test_each_request_names_the_upstream_host_once_and_goes_to_its_path(fake, lmstudio):
    # (the Host header is the client's own and the Agent keeps each URL it parsed: neither may repeat or stick)
    port = fake.port.getHost().port
    assert (await lmstudio.post_chat(CHAT)).status == 200
    assert (await call("GET", lmstudio.url + "/v1/models?refresh=true")).status == 200
    assert (await lmstudio.post_chat(CHAT)).status == 200
    calls = [(r.method, r.path) for r in fake.received]
    assert calls.count(("POST", "/v1/chat/completions")) == 2 and ("GET", "/v1/models") in calls
    for received in fake.received:
        assert [value for name, value in received.every_header if name == "host"] == [f"127.0.0.1:{port}"]


@pytest_twisted.ensureDeferred
async def test_an_upstream_at_an_ipv6_address_is_reached_and_named_in_brackets(start_gateway):
    fake = FakeLMStudio()
    fake.listen(interface="::1")
    try:
        gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url})
        reply = await gateway.post_chat(CHAT)
        assert reply.status == 200 and reply.json()["choices"][0]["message"]["content"] == "echo: hi"
        assert fake.received[-1].headers["host"] == f"[::1]:{fake.port.getHost().port}"
    finally:
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_cookies_an_upstream_sets_are_not_sent_back(fake, lmstudio):
    fake.set_cookie = "session=client-a; Path=/"
    assert (await lmstudio.post_chat(CHAT)).status == 200
    assert (await lmstudio.post_chat(CHAT)).status == 200
    assert all("cookie" not in received.headers for received in fake.received)
