"""Requests are freed as they end, not left for the garbage collector (inference/resource.py)."""

from __future__ import annotations

import gc

import pytest_twisted

from inference.request import GatewayRequest

from .conftest import call


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
