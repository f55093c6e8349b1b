"""Limits on what one client can ask of the gateway: sizes, counts, and time, each with a readable error."""

from __future__ import annotations

import json

import pytest_twisted

from .conftest import call, raw_connect, raw_post

MODEL = "qwen2.5-7b-instruct"


def chat(count: int = 1, **extra):
    return {"model": MODEL, "messages": [{"role": "user", "content": f"m{i}"} for i in range(count)], **extra}


def response_of(data: bytes) -> tuple[int, dict]:
    """Status and JSON body of one complete HTTP/1.1 answer in ``data``."""
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    assert int(headers[b"Content-Length"]) == len(body) and headers[b"Connection"] == b"close", head
    return int(lines[0].split(b" ")[1]), json.loads(body)["error"]


async def refused(port: int, request: bytes) -> tuple[int, dict]:
    client = await raw_connect(port)
    client.transport.write(request)
    await client.lost  # the gateway answers and hangs up
    return response_of(client.data)


@pytest_twisted.ensureDeferred
async def test_oversized_urls_and_headers_and_malformed_requests_get_json_errors(fake, start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url, "INFERENCE_SERVER_MAX_URL_BYTES": "100",
                             "INFERENCE_SERVER_MAX_HEADER_BYTES": "2048"})
    port = gateway.port.getHost().port
    status, error = await refused(port, b"GET /v1/models?" + b"x" * 200 + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (status, error["code"]) == (414, "url_too_long") and "server.max_url_bytes" in error["message"]

    many = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"y" * 100) for i in range(30))  # 30 short lines, 3 kB
    status, error = await refused(port, b"GET /v1/models HTTP/1.1\r\nHost: a\r\n" + many + b"\r\n")
    assert (status, error["code"]) == (431, "headers_too_large") and "server.max_header_bytes" in error["message"]

    status, error = await refused(port, b"GET /v1/models HTTP/1.1\r\nCookie: " + b"z" * 5000)  # no newline yet
    assert (status, error["code"]) == (431, "headers_too_large")

    status, error = await refused(port, b"GET /v1/models HTTP/1.1\r\nContent-Length: lots\r\n\r\n")
    assert (status, error["type"], error["code"]) == (400, "invalid_request_error", "bad_request")

    assert (await call("GET", gateway.url + "/v1/models")).status == 200  # and the gateway serves on
    m = await gateway.metrics()
    assert [m.value("inference_http_requests_total", method="GET", route="/v1/models", code=code)
            for code in ("414", "431", "400", "200")] == [1, 2, 1, 1]


@pytest_twisted.ensureDeferred
async def test_too_many_messages_is_a_parameter_error(fake, start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url, "INFERENCE_SERVER_MAX_MESSAGES": "3"})
    assert (await gateway.post_chat(chat(3))).status == 200
    reply = await gateway.post_chat(chat(4))
    assert reply.status == 400 and reply.error["param"] == "messages"
    assert "at most 3 (server.max_messages)" in reply.error["message"]


def test_a_slow_client_times_out_without_holding_a_slot(fake, in_memory):
    gateway = in_memory({"INFERENCE_SERVER_READ_TIMEOUT_SECS": "0.5", "INFERENCE_INFERENCE_MAX_QUEUE": "0",
                         "INFERENCE_INFERENCE_MAX_CONCURRENT_REQUESTS": "1"})
    request = raw_post("/v1/chat/completions", json.dumps(chat()).encode())
    slow, send_slow = gateway.raw()
    send_slow(request[:-10])  # all but the last bytes of the body
    # A slow-loris client that keeps sending a byte now and then does not reset the clock.
    dribbler, drip = gateway.raw()
    drip(b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\n")
    assert gateway.post_chat(chat()).status == 200  # meanwhile the one upstream slot is free for everybody else
    assert gateway.gateway.admission.active == 0
    for _ in range(9):
        gateway.advance(0.05)
        drip(b"X-Drip: 1\r\n")
    assert not slow.lost and not dribbler.lost
    gateway.advance(0.06)  # 0.5 s after each began
    for client in (slow, dribbler):
        status, error = response_of(client.data)
        assert client.lost and (status, error["code"]) == (408, "request_read_timeout")
        assert "server.read_timeout_secs" in error["message"]
    assert [r.path for r in fake.received].count("/v1/chat/completions") == 1


def test_idle_connections_are_closed(in_memory):
    gateway = in_memory({"INFERENCE_SERVER_IDLE_TIMEOUT_SECS": "0.2"})
    client, send = gateway.raw()
    send(b"GET /health/live HTTP/1.1\r\nHost: a\r\n\r\n")
    gateway.settle()
    assert client.data.endswith(b'{"status":"ok"}') and not client.lost  # kept alive after the answer
    gateway.advance(0.19)
    assert not client.lost
    gateway.advance(0.02)
    assert client.lost and client.data.count(b"HTTP/1.1 200") == 1  # then closed for idling


def test_the_request_deadline_covers_the_upstream_call(fake, in_memory):
    gateway = in_memory({"INFERENCE_SERVER_REQUEST_TIMEOUT_SECS": "0.4"})
    fake.chat.mode = "hang"
    closed = fake.next_close()
    reply = gateway.send("POST", "/v1/chat/completions", chat())
    gateway.advance(0.39)
    assert len(fake.pending) == 1 and not gateway.answered(reply)
    gateway.advance(0.01)
    reply = gateway.result(reply)
    assert reply.status == 504 and reply.error["type"] == "timeout_error"
    assert reply.error["code"] == "request_timeout" and "server.request_timeout_secs" in reply.error["message"]
    assert closed.called  # the upstream call was cancelled, not left running
    assert gateway.metrics().value("inference_requests_in_flight", provider="lmstudio") == 0


def test_the_request_deadline_covers_the_wait_in_the_queue(fake, in_memory):
    gateway = in_memory({"INFERENCE_INFERENCE_HTTP_TIMEOUT_SECS": "30", "INFERENCE_SERVER_REQUEST_TIMEOUT_SECS": "0.4",
                         "INFERENCE_INFERENCE_MAX_CONCURRENT_REQUESTS": "1"})
    fake.chat.stream = "stall"  # a stream that has started holds the only slot past the deadline
    stream, send = gateway.raw()
    send(raw_post("/v1/chat/completions", json.dumps(chat(stream=True)).encode()))
    gateway.settle()
    assert b'" m0"' in stream.data
    queued = gateway.send("POST", "/v1/chat/completions", chat())
    gateway.settle()
    assert gateway.gateway.admission.queued == 1
    gateway.advance(0.4)
    reply = gateway.result(queued)
    assert reply.status == 504 and reply.error["code"] == "request_timeout"
    assert [r.path for r in fake.received].count("/v1/chat/completions") == 1  # the queued one never went upstream
    assert gateway.metrics().value("inference_queue_length", provider="lmstudio") == 0
    closed = fake.next_close()
    stream.transport.loseConnection()
    gateway.settle()
    assert closed.called
    assert gateway.metrics().value("inference_requests_in_flight", provider="lmstudio") == 0


def test_a_stream_may_outlast_the_deadline_once_it_has_started(in_memory):
    gateway = in_memory({"INFERENCE_INFERENCE_PROVIDER": "mock", "INFERENCE_INFERENCE_MOCK_TOKEN_DELAY_SECS": "0.05",
                         "INFERENCE_SERVER_REQUEST_TIMEOUT_SECS": "0.2"})
    words = " ".join(f"w{i}" for i in range(12))  # 13 tokens at 50 ms: longer than the deadline
    reply = gateway.send("POST", "/v1/chat/completions",
                         {"messages": [{"role": "user", "content": words}], "stream": True})
    gateway.advance(0.3)
    assert not gateway.answered(reply)  # still streaming past the deadline
    gateway.advance(1)
    reply = gateway.result(reply)
    assert reply.status == 200 and reply.body.endswith(b"data: [DONE]\n\n") and b'"error"' not in reply.body


@pytest_twisted.ensureDeferred
async def test_a_431s_status_line_names_it(fake, start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url, "INFERENCE_SERVER_MAX_HEADER_BYTES": "2048"})
    client = await raw_connect(gateway.port.getHost().port)
    many = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"y" * 100) for i in range(30))  # 3 kB of headers
    client.transport.write(b"GET /v1/models HTTP/1.1\r\nHost: a\r\n" + many + b"\r\n")
    await client.lost
    assert bytes(client.data).startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
