"""Every row of docs/design.md's error table, answered in OpenAI's error shape with the right status."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import reactor

from .conftest import call, hold_the_slot, queue_behind, raw_post

MODEL = "qwen2.5-7b-instruct"
USER = [{"role": "user", "content": "hi"}]


def chat(**extra):
    return {"model": MODEL, "messages": USER, **extra}


@pytest_twisted.ensureDeferred
async def test_malformed_json_is_400_invalid_json(lmstudio):
    reply = await call("POST", lmstudio.url + "/v1/chat/completions", raw=b'{"model": "x", "messages": [')
    assert reply.status == 400
    assert reply.error["type"] == "invalid_request_error" and reply.error["code"] == "invalid_json"
    assert "not valid JSON" in reply.error["message"]


@pytest.mark.parametrize("body, param", [
    (chat(temperature=2.5), "temperature"),
    (chat(temperature="hot"), "temperature"),
    (chat(top_p=1.5), "top_p"),
    (chat(presence_penalty=-3), "presence_penalty"),
    (chat(frequency_penalty=2.1), "frequency_penalty"),
    (chat(max_tokens=0), "max_tokens"),
    (chat(max_tokens=1.5), "max_tokens"),
    (chat(stop=["a", "b", "c", "d", "e"]), "stop"),
    (chat(stop=5), "stop"),
    (chat(seed="x"), "seed"),
    (chat(stream="yes"), "stream"),
    (chat(model=7), "model"),
    (chat(model=""), "model"),
    (chat(top_k="x"), "top_k"),
    (chat(min_p=2), "min_p"),
    (chat(repeat_penalty=0), "repeat_penalty"),
    (chat(mirostat_mode=3), "mirostat_mode"),
    (chat(extensions={"min_p": -1}), "min_p"),
    (chat(extensions={"temperature": 1}, temperature=0.5), "extensions.temperature"),  # the same twice is no conflict
    (chat(extensions=[1]), "extensions"),
    (chat(response_format="json"), "response_format"),
    ({"model": MODEL}, "messages"),
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": ["hi"]}, "messages[0]"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"model": MODEL, "messages": [{"role": "user"}]}, "messages[0].content"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
])
@pytest_twisted.ensureDeferred
async def test_bad_parameters_are_400_naming_the_parameter(lmstudio, fake, body, param):
    reply = await lmstudio.post_chat(body)
    assert reply.status == 400, reply.body
    assert reply.error["code"] == "invalid_parameter"
    assert reply.error["param"] == param
    assert [r.path for r in fake.received if r.path.endswith("completions")] == []


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"text"', b"", b"\xff\xfe",
                                 b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
                                 b'{"messages": [{"role": "user", "content": "x"}], "foo": -Infinity}',
                                 b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"])
@pytest_twisted.ensureDeferred
async def test_body_that_is_not_a_json_object_is_400(lmstudio, raw):
    reply = await call("POST", lmstudio.url + "/v1/chat/completions", raw=raw)
    assert reply.status == 400 and reply.error["code"] == "invalid_json"


@pytest_twisted.ensureDeferred
async def test_whole_numbers_written_as_floats_are_sent_on_as_integers(lmstudio, fake):
    reply = await lmstudio.post_chat({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                      "max_tokens": 5.0, "seed": 7.0})
    assert reply.status == 200
    sent = [r for r in fake.received if r.path.endswith("completions")][-1].body
    assert (sent["max_tokens"], sent["seed"]) == (5, 7) and isinstance(sent["max_tokens"], int)
    assert (await lmstudio.post_chat({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                      "max_tokens": 5.5})).error["param"] == "max_tokens"
    # Integers beyond 64 bits: no model server reads one, so they are a 400 (tests/test_hardening.py), and the
    # largest 64-bit one reaches the upstream exactly as sent.
    await lmstudio.post_chat({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "seed": 2**63 - 1})
    assert [r for r in fake.received if r.path.endswith("completions")][-1].body["seed"] == 2**63 - 1


@pytest_twisted.ensureDeferred
async def test_assistant_message_with_tool_calls_needs_no_content(lmstudio):
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    reply = await lmstudio.post_chat({"model": MODEL, "messages": messages})
    assert reply.status == 200


@pytest_twisted.ensureDeferred
async def test_ambiguous_model_is_400(fake, lmstudio):
    reply = await lmstudio.post_chat(chat(model="instruct"))
    assert reply.status == 400
    assert reply.error["code"] == "ambiguous_model" and reply.error["param"] == "model"
    assert "qwen2.5-7b-instruct" in reply.error["message"] and "llama-3.2-3b-instruct" in reply.error["message"]


@pytest_twisted.ensureDeferred
async def test_api_keys_are_required_when_configured(fake, start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url, "INFERENCE_SERVER_API_KEYS": "k1,k2"})
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic k1"}, {"Authorization": "k1"}):
        reply = await gateway.post_chat(chat(), headers=headers)
        assert reply.status == 401, headers
        assert reply.error["type"] == "authentication_error" and reply.error["code"] == "invalid_api_key"
        assert (await call("GET", gateway.url + "/v1/models", headers=headers)).status == 401
    assert (await gateway.post_chat(chat(), headers={"Authorization": "Bearer k2"})).status == 200
    assert (await call("GET", gateway.url + "/v1/models", headers={"Authorization": "bearer k1"})).status == 200
    assert (await call("GET", gateway.url + "/health/live")).status == 200
    assert not [r for r in fake.received if r.path.endswith("completions")][1:]


@pytest_twisted.ensureDeferred
async def test_unknown_model_is_404_naming_the_available_models(lmstudio):
    reply = await lmstudio.post_chat(chat(model="gpt-4o"))
    assert reply.status == 404
    assert reply.error["code"] == "model_not_found" and reply.error["param"] == "model"
    assert "qwen2.5-7b-instruct, llama-3.2-3b-instruct" in reply.error["message"]
    reply = await call("GET", lmstudio.url + "/v1/models/gpt-4o")
    assert reply.status == 404 and reply.error["code"] == "model_not_found"


@pytest_twisted.ensureDeferred
async def test_model_not_allowed_is_404(fake, start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url,
                             "INFERENCE_INFERENCE_ALLOWED_MODELS": "llama-3.2-3b-instruct"})
    reply = await gateway.post_chat(chat())
    assert reply.status == 404 and reply.error["code"] == "model_not_found"
    assert "not allowed" in reply.error["message"] and "llama-3.2-3b-instruct" in reply.error["message"]


@pytest_twisted.ensureDeferred
async def test_model_not_loaded_upstream_is_404(fake, lmstudio):
    fake.chat.mode, fake.chat.status, fake.chat.message = "error_string", 404, "Model qwen2.5 is not loaded"
    reply = await lmstudio.post_chat(chat())
    assert reply.status == 404 and reply.error["code"] == "model_not_found"
    assert reply.error["message"] == "Model qwen2.5 is not loaded"


@pytest_twisted.ensureDeferred
async def test_unknown_route_and_wrong_method(lmstudio):
    reply = await call("GET", lmstudio.url + "/v1/nothing")
    assert reply.status == 404 and reply.error["code"] == "not_found"
    reply = await call("GET", lmstudio.url + "/v1/chat/completions")
    assert reply.status == 405 and reply.error["code"] == "method_not_allowed"
    assert reply.header("allow") == "POST"


@pytest_twisted.ensureDeferred
async def test_body_too_large_is_413(fake, start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url, "INFERENCE_SERVER_MAX_BODY_BYTES": "1000"})
    reply = await gateway.post_chat(chat(messages=[{"role": "user", "content": "x" * 2000}]))
    assert reply.status == 413 and reply.error["code"] == "request_too_large"
    assert (await gateway.post_chat(chat())).status == 200


@pytest_twisted.ensureDeferred
async def test_queue_full_is_429_with_retry_after(fake, start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url,
                             "INFERENCE_INFERENCE_MAX_CONCURRENT_REQUESTS": "1",
                             "INFERENCE_INFERENCE_MAX_QUEUE": "1"})
    await gateway.post_chat(chat())  # warm the model cache so requests go straight to the slot
    first = await hold_the_slot(gateway, fake, chat())
    second = await queue_behind(gateway, chat())
    third = await gateway.post_chat(chat())
    assert third.status == 429
    assert third.error["type"] == "rate_limit_error" and third.error["code"] == "overloaded"
    assert third.header("retry-after") == "1"
    fake.chat.mode = "normal"
    arrived = fake.next_arrival()
    for request in list(fake.pending):  # the upstream drops the first's (reused) connection before answering
        request.channel.transport.abortConnection()
    await arrived
    assert (await first).status == 200  # no answer byte had come: sent once more, on a new connection
    assert (await second).status == 200  # then the slot is the second's


def test_a_queued_request_whose_client_leaves_leaves_the_queue(fake, in_memory):
    gateway = in_memory({"INFERENCE_INFERENCE_MAX_CONCURRENT_REQUESTS": "1"})
    assert gateway.post_chat(chat()).status == 200
    fake.chat.mode = "hang"
    first = gateway.send("POST", "/v1/chat/completions", chat())
    quitter, send = gateway.raw()
    never_mind = {"model": MODEL, "messages": [{"role": "user", "content": "never mind"}]}
    send(raw_post("/v1/chat/completions", json.dumps(never_mind).encode()))
    gateway.settle()
    assert len(fake.pending) == 1 and gateway.gateway.admission.queued == 1
    quitter.transport.loseConnection()
    gateway.settle()
    assert gateway.gateway.admission.queued == 0
    fake.chat.mode = "normal"
    fake.release()
    assert gateway.result(first).status == 200
    following = {"model": MODEL, "messages": [{"role": "user", "content": "next"}]}
    assert gateway.post_chat(following).status == 200  # the slot was not kept for the quitter


@pytest.mark.parametrize("mode, status, code", [
    ("error_string", 400, None),
    ("error_object", 422, "context_length_exceeded"),
    ("error_object", 429, "rate_limited"),
])
@pytest_twisted.ensureDeferred
async def test_upstream_4xx_keeps_its_status_with_a_normalised_error(fake, lmstudio, mode, status, code):
    fake.chat.mode, fake.chat.status, fake.chat.code = mode, status, code
    fake.chat.message = "Trying to keep the first 5000 tokens when context overflows"
    reply = await lmstudio.post_chat(chat())
    assert reply.status == status
    assert reply.error["message"] == fake.chat.message
    assert reply.error["type"] == "invalid_request_error" and reply.error["code"] == code


@pytest.mark.parametrize("mode, status, words", [
    ("error_string", 500, "HTTP 500"),
    ("error_object", 503, "HTTP 503"),
    ("error_in_200", 200, "something went wrong"),
    ("invalid_json", 200, "not JSON"),
    ("not_json_object", 200, "not an object"),
    ("drop", 200, "closed the connection"),
])
@pytest_twisted.ensureDeferred
async def test_upstream_failure_or_invalid_answer_is_500(fake, lmstudio, mode, status, words):
    fake.chat.mode, fake.chat.status = mode, status
    reply = await lmstudio.post_chat(chat())
    assert reply.status == 500
    assert reply.error["type"] == "api_error" and reply.error["code"] == "upstream_error"
    assert words in reply.error["message"]
    fake.chat.mode = "normal"
    assert (await lmstudio.post_chat(chat())).status == 200  # and the gateway keeps serving


@pytest_twisted.ensureDeferred
async def test_unreachable_upstream_is_502(fake, start_gateway):
    url = fake.url
    await fake.stop()
    fake.listen()  # the fixture stops it again; the gateway points at the old, closed port
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": url, "INFERENCE_INFERENCE_HTTP_MAX_RETRIES": "0"})
    reply = await gateway.post_chat(chat())
    assert reply.status == 502
    assert reply.error["type"] == "api_error" and reply.error["code"] == "upstream_unreachable"
    assert url in reply.error["message"] and "connection refused" in reply.error["message"]
    assert (await call("GET", gateway.url + "/v1/models")).status == 502


@pytest.mark.parametrize("mode", ["hang", "stall_body"])
@pytest_twisted.ensureDeferred
async def test_upstream_timeout_is_504_even_when_the_body_stalls(fake, start_gateway, mode):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url,
                             "INFERENCE_INFERENCE_HTTP_TIMEOUT_SECS": "0.3"})
    await gateway.post_chat(chat())
    fake.chat.mode = mode
    closed = fake.next_close()
    started = reactor.seconds()
    reply = await gateway.post_chat(chat())
    assert reply.status == 504
    assert reply.error["type"] == "timeout_error" and reply.error["code"] == "upstream_timeout"
    assert 0.3 <= reactor.seconds() - started < 2
    await closed  # the upstream request was aborted, not left generating
    assert len([r for r in fake.received if r.path.endswith("completions")]) == 2  # a timeout is not retried
