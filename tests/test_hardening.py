"""No request may make the gateway build an answer larger than a bound it states, nor pass on what no upstream
reads (issue 20, defects 1 and 5); hosts that ask for a key get it (defect 4); a reused connection lost before
any answer byte costs no call (defect 9)."""

from __future__ import annotations

import json
import re

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol

from .conftest import RawClient, call, raw_connect
from .fakes.lmstudio import FakeLMStudio

MODEL = "qwen2.5-7b-instruct"
USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("dimensions, status", [(8192, 200), (8193, 400), (1_000_000_000, 400)])
@pytest_twisted.ensureDeferred
async def test_embedding_dimensions_are_bounded(start_gateway, dimensions, status):
    gateway = start_gateway({"INFERENCE_INFERENCE_PROVIDER": "mock"})
    reply = await call("POST", gateway.url + "/v1/embeddings", {"model": "mock-embedding", "input": "hi",
                                                                "dimensions": dimensions})
    assert reply.status == status
    if status == 400:
        assert reply.error["param"] == "dimensions" and "server.max_embedding_dimensions" in reply.error["message"]
    else:
        assert len(reply.json()["data"][0]["embedding"]) == 8192


@pytest_twisted.ensureDeferred
async def test_the_mocks_embeddings_answer_is_bounded(start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_PROVIDER": "mock"})
    reply = await call("POST", gateway.url + "/v1/embeddings", {"model": "mock-embedding", "input": ["a"] * 64,
                                                                "dimensions": 8192})
    assert reply.status == 400 and "at most 262144" in reply.error["message"]


@pytest.mark.parametrize("route, body, param", [
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "max_tokens": 10 ** 400}, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "seed": 2 ** 63}, "seed"),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "extensions": {"top_k": -(2 ** 63) - 1}}, "top_k"),
    ("/v1/responses", {"model": MODEL, "input": "hi", "max_output_tokens": 10 ** 30}, "max_output_tokens"),
    ("/v1/messages", {"model": MODEL, "messages": USER, "max_tokens": 2 ** 64}, "max_tokens"),
])
@pytest_twisted.ensureDeferred
async def test_checked_integers_beyond_64_bits_are_a_400_not_forwarded(fake, lmstudio, route, body, param):
    reply = await call("POST", lmstudio.url + route, body)
    assert reply.status == 400 and "64 bits" in reply.json()["error"]["message"]
    assert reply.json()["error"].get("param", param) == param
    assert not [r for r in fake.received if r.method == "POST"]
    fine = await call("POST", lmstudio.url + "/v1/chat/completions",
                      {"model": MODEL, "messages": USER, "seed": 2 ** 63 - 1})
    assert fine.status == 200  # the largest 64-bit integer is one


@pytest.mark.parametrize("route, template", [
    ("/v1/chat/completions", b'{"model": "%s", "messages": [{"role": "user", "content": "hi \\ud800"}]}'),
    ("/v1/embeddings", b'{"model": "%s", "input": "\\udfff"}'),
    ("/v1/responses", b'{"model": "%s", "input": "x", "user": "\\ud83d"}'),
    ("/v1/messages", b'{"model": "%s", "max_tokens": 5, "messages": [{"role": "user", "content": "\\ud800"}]}'),
])
@pytest_twisted.ensureDeferred
async def test_a_lone_surrogate_is_a_400_in_the_routes_shape(fake, lmstudio, route, template):
    reply = await call("POST", lmstudio.url + route, raw=template % MODEL.encode())
    assert reply.status == 400
    body = reply.json()
    error = body["error"]
    if route == "/v1/messages":
        assert body["type"] == "error" and error["type"] == "invalid_request_error"
    else:
        assert error["code"] == "invalid_json"
    assert "lone surrogate" in error["message"]
    assert not [r for r in fake.received if r.method == "POST"]
    pair = await call("POST", lmstudio.url + "/v1/chat/completions", raw=b'{"model": "%s", "messages": [{"role": '
                      b'"user", "content": "\\ud83d\\ude00"}]}' % MODEL.encode())
    assert pair.status == 200  # a surrogate pair is a character (an emoji)


@pytest_twisted.ensureDeferred
async def test_lm_studio_hosts_get_their_key_on_every_route(fake, start_gateway):
    fake.require_key = "lm-token-1"  # LM Studio 0.4 with authentication on
    fake.native_types = {MODEL: "llm"}
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url, "INFERENCE_INFERENCE_API_KEY": "lm-token-1"})
    assert (await gateway.post_chat({"model": MODEL, "messages": USER})).status == 200
    asked = {r.path: r.headers.get("authorization") for r in fake.received}
    assert asked == {"/v1/models": "Bearer lm-token-1", "/api/v1/models": "Bearer lm-token-1",
                     "/api/v0/models": "Bearer lm-token-1", "/v1/chat/completions": "Bearer lm-token-1"}


@pytest_twisted.ensureDeferred
async def test_each_fleet_host_gets_its_own_key_and_no_openai_key_reaches_lm_studio(start_gateway, tmp_path):
    hosts = [FakeLMStudio([MODEL]), FakeLMStudio([MODEL])]
    for host, key in zip(hosts, ("key-a", "key-b"), strict=True):
        host.require_key = key
        host.listen()
    config = tmp_path / "fleet.yaml"
    config.write_text(f"""inference:
  upstreams:
    - {{name: a, base_url: "{hosts[0].url}", api_key: key-a}}
    - {{name: b, base_url: "{hosts[1].url}", api_key: key-b}}
""")
    try:
        gateway = start_gateway({"INFERENCE_INFERENCE_HTTP_MAX_RETRIES": "0"}, str(config))
        for i in range(4):
            assert (await gateway.post_chat({"model": MODEL, "messages": [
                {"role": "user", "content": f"conversation {i}"}]})).status == 200
        for host, key in zip(hosts, ("key-a", "key-b"), strict=True):
            assert {r.headers.get("authorization") for r in host.received} == {f"Bearer {key}"}
        lm_studio = FakeLMStudio([MODEL])
        lm_studio.listen()
        mixed = tmp_path / "mixed.yaml"
        mixed.write_text(f"""inference:
  provider: openai
  upstreams:
    - {{name: cloud, base_url: "{hosts[0].url}", api_key: key-a}}
    - {{name: box, base_url: "{lm_studio.url}", provider: lmstudio}}
""")
        mixed_gateway = start_gateway({"OPENAI_API_KEY": "sk-openai-secret"}, str(mixed))
        assert (await call("GET", mixed_gateway.url + "/health")).status == 200
        assert lm_studio.received and all("authorization" not in r.headers for r in lm_studio.received)
        await lm_studio.stop()
    finally:
        for host in hosts:
            await host.stop()


@pytest.mark.parametrize("route, body, named", [
    ("/v1/messages", {"tools": [{"name": "f", "input_schema": "object"}]}, "tools[0].input_schema"),
    ("/v1/messages", {"tools": [{"name": "f", "input_schema": {"type": "object"}}],
                      "tool_choice": {"type": "tool", "name": {}}}, "tool_choice.name"),
    ("/v1/messages", {"tools": [{"name": "f", "input_schema": {"type": "object"}}],
                      "tool_choice": {"type": "tool", "name": "g"}}, "tool_choice.name"),
    ("/v1/messages", {"tool_choice": {"type": "tool", "name": "f"}}, "tool_choice.name"),
    ("/v1/messages", {"thinking": {"type": "enabled", "budget_tokens": -1}}, "thinking.budget_tokens"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}],
                              "tool_choice": {"type": "function", "function": {"name": "g"}}},
     "tool_choice.function.name"),
    ("/v1/responses", {"tools": [{"type": "function", "name": "f"}],
                       "tool_choice": {"type": "function", "name": "g"}}, "tool_choice.name"),
    ("/v1/responses", {"tools": [{"type": "function", "name": "f", "parameters": 5}]}, "tools[0].parameters"),
    ("/v1/responses", {"tools": [{"type": "namespace", "name": "n", "tools": [
        {"type": "function", "name": "f", "parameters": []}]}]}, "tools[0].tools[0].parameters"),
])
@pytest_twisted.ensureDeferred
async def test_checked_tool_fields_that_no_api_accepts_are_400s(fake, lmstudio, route, body, named):
    base = {"model": MODEL, "max_tokens": 2000, "messages": USER} if route == "/v1/messages" else \
        {"model": MODEL, "messages": USER} if route == "/v1/chat/completions" else {"model": MODEL, "input": "hi"}
    reply = await call("POST", lmstudio.url + route, {**base, **body})
    assert reply.status == 400 and f"'{named}" in reply.json()["error"]["message"]
    assert not [r for r in fake.received if r.method == "POST"]


@pytest.mark.parametrize("path", ["/v1/models/%ff", "/%c3%28", "/v1/chat/completions%80"])
@pytest_twisted.ensureDeferred
async def test_a_path_that_is_not_utf8_is_a_json_400(lmstudio, path):
    reply = await call("GET", lmstudio.url + path)
    assert reply.status == 400 and reply.header(b"content-type") == b"application/json"
    assert reply.error["code"] == "invalid_url" and "UTF-8" in reply.error["message"]
    assert (await call("GET", lmstudio.url + "/v1/models/qwen%32.5-7b-instruct")).status == 200  # escapes are fine


class OneAnswerPerConnection(Protocol):
    """Answers the first request on a connection and keeps it open, then closes it without a byte when the next
    request arrives: what llama-cpp-python's server did after a stream it aborted."""

    def __init__(self, dropped: list[bytes]) -> None:
        self.dropped = dropped
        self.answered = False
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        head, complete, body = self.buffer.partition(b"\r\n\r\n")
        if self.answered:
            self.dropped.append(head.split(b" ")[1])
            self.transport.loseConnection()
            return
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        if not complete or len(body) < (int(length.group(1)) if length else 0):
            return  # not all of it yet
        path = head.split(b" ")[1]
        answer = {b"/v1/models": {"object": "list", "data": [{"id": MODEL, "object": "model"}]},
                  b"/v1/chat/completions": {"id": "c", "object": "chat.completion", "model": MODEL, "choices": [
                      {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}}
        payload = json.dumps(answer.get(path, {"error": "no such route"})).encode()
        status = b"200 OK" if path in answer else b"404 Not Found"
        self.transport.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        self.answered, self.buffer = True, b""


@pytest_twisted.ensureDeferred
async def test_a_reused_connection_the_upstream_closes_before_answering_is_retried_once_on_a_new_one(
        start_gateway):
    dropped: list[bytes] = []
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: OneAnswerPerConnection(dropped)),
                             interface="127.0.0.1")
    try:
        gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": f"http://127.0.0.1:{port.getHost().port}",
                                 "INFERENCE_INFERENCE_HTTP_MAX_RETRIES": "0"})
        for _ in range(3):
            reply = await call("POST", gateway.url + "/v1/chat/completions", {"model": MODEL, "messages": USER})
            assert reply.status == 200 and reply.json()["choices"][0]["message"]["content"] == "hi"
        assert dropped.count(b"/v1/chat/completions") >= 2  # each went out on a reused connection first
    finally:
        await port.stopListening()


def refusal(data: bytes) -> tuple[int, dict]:
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)["error"]


@pytest_twisted.ensureDeferred
async def test_a_content_length_over_the_limit_is_a_413_at_once(lmstudio):
    client = await raw_connect(lmstudio.port.getHost().port)  # server.read_timeout_secs is 30: no waiting for it
    client.transport.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 99999999999\r\n\r\n{\"model\": ")
    await client.lost
    status, error = refusal(client.data)
    assert status == 413 and error["code"] == "request_too_large" and "server.max_body_bytes" in error["message"]


class EndlessChunkedBody(RawClient):
    """Sends a chunked body, 64 KiB a reactor turn, until the server answers or hangs up."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0

    def connectionMade(self) -> None:
        self.transport.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")
        self.pump()

    def pump(self) -> None:
        if self.data or self.lost.called:
            return
        chunk = b" " * 65536
        self.transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.sent += len(chunk)
        reactor.callLater(0, self.pump)


@pytest_twisted.ensureDeferred
async def test_an_endless_chunked_body_is_a_413_as_soon_as_it_passes_the_limit(fake, start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url, "INFERENCE_SERVER_MAX_BODY_BYTES": "1000000",
                             "INFERENCE_SERVER_READ_TIMEOUT_SECS": "5"})
    client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", gateway.port.getHost().port),
                                   EndlessChunkedBody())
    await client.lost
    status, error = refusal(client.data)
    assert status == 413 and error["code"] == "request_too_large"  # not the read timeout's 408
    assert client.sent < 8_000_000  # what was in flight when the answer came; nothing after it
    assert (await gateway.post_chat({"model": MODEL, "messages": USER})).status == 200
    assert not any(r.path == "/v1/chat/completions" and r.body.get("messages") != USER for r in fake.received)
