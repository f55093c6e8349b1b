"""Requests are freed as they end, not left for the garbage collector (inference/resource.py); they are counted
while they are answered, and a lone answer is sent at once (inference/request.py)."""

from __future__ import annotations

import gc
import json

import pytest_twisted

from inference import request as request_module
from inference.request import GatewayRequest

from .conftest import call, raw_connect, raw_post, until


def live_requests() -> int:
    return sum(isinstance(o, GatewayRequest) for o in gc.get_objects())


@pytest_twisted.ensureDeferred
async def test_a_request_that_ended_is_freed_at_once_whatever_its_answer(start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_PROVIDER": "mock"})
    chat = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}
    assert (await gateway.post_chat(chat)).status == 200
    gc.collect()
    gc.disable()  # what is left now is what reference counting alone did not free
    try:
        before = live_requests()
        for _ in range(10):
            assert (await gateway.post_chat(chat)).status == 200
            assert (await gateway.post_chat({**chat, "stream": True})).status == 200
            assert (await gateway.post_chat({"messages": "not a list"})).status == 400  # an error handler's answer
            assert (await call("GET", gateway.url + "/nowhere")).status == 404
        left = live_requests() - before
    finally:
        gc.enable()
    assert left <= 2  # (the last requests of the client's kept-alive connections may still be referenced)


@pytest_twisted.ensureDeferred
async def test_requests_relayed_from_lm_studio_are_freed_at_once_too(fake, lmstudio):
    chat = {"model": fake.models[0], "messages": [{"role": "user", "content": "hi"}]}
    assert (await lmstudio.post_chat(chat)).status == 200
    gc.collect()
    gc.disable()
    try:
        before = live_requests()
        for _ in range(10):
            assert (await lmstudio.post_chat(chat)).status == 200
            assert (await lmstudio.post_chat({**chat, "stream": True})).status == 200
            assert (await call("POST", lmstudio.url + "/v1/messages", {**chat, "max_tokens": 5})).status == 200
        left = live_requests() - before
    finally:
        gc.enable()
    assert left <= 2


@pytest_twisted.ensureDeferred
async def test_the_requests_being_answered_are_counted_until_each_ends_however_it_ends(fake, start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url, "INFERENCE_SERVER_CORS_ORIGINS": "*",
                             "INFERENCE_SERVER_MAX_BODY_BYTES": "4096"})
    chat = {"model": fake.models[0], "messages": [{"role": "user", "content": "hi"}]}
    assert (await gateway.post_chat(chat)).status == 200
    assert (await gateway.post_chat({**chat, "stream": True})).status == 200
    assert (await gateway.post_chat({"messages": "not a list"})).status == 400
    assert (await call("GET", gateway.url + "/nowhere")).status == 404
    assert (await call("OPTIONS", gateway.url + "/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})).status == 204
    assert (await call("POST", gateway.url + "/v1/chat/completions", raw=b"x" * 5000)).status == 413
    fake.chat.mode = "hang"  # a client that leaves while its answer is awaited
    arrived, closed = fake.next_arrival(), fake.next_close()
    client = await raw_connect(gateway.port.getHost().port)
    client.transport.write(raw_post("/v1/chat/completions", json.dumps(chat).encode()))
    await arrived
    assert gateway.site.answering == 1
    client.transport.loseConnection()
    await closed
    assert gateway.site.answering == 0


@pytest_twisted.ensureDeferred
async def test_a_lone_answer_is_sent_before_its_access_line_and_answers_together_wait_for_the_turn(
        fake, lmstudio, monkeypatch):
    held: list[int] = []  # the bytes of the answer its connection still held when its access line was written

    def log_access(request, status):
        held.append(request.transport._tempDataLen)

    monkeypatch.setattr(request_module, "log_access", log_access)
    body = json.dumps({"model": fake.models[0], "messages": [{"role": "user", "content": "hi"}]}).encode()
    port = lmstudio.port.getHost().port
    clients = [await raw_connect(port) for _ in range(2)]  # kept alive, as the SDKs' connections are
    clients[0].transport.write(raw_post("/v1/chat/completions", body))
    await clients[0].received(b"echo: hi")
    assert held == [0]
    fake.chat.mode = "hang"
    for client in clients:
        client.transport.write(raw_post("/v1/chat/completions", body))
    await until(lambda: len(fake.pending) == 2)
    fake.chat.mode = "normal"
    fake.release()
    for client in clients:
        await until(lambda client=client: client.data.count(b"echo: hi") == (2 if client is clients[0] else 1))
        client.transport.loseConnection()
    assert held[1] > 0 and held[2] == 0  # the first waited for the reactor's turn; the last, alone, went at once
