"""POST /v1/messages: Anthropic's Messages API relayed to an upstream that serves it (LM Studio 0.4.1 and later),
with Anthropic's error and event shapes, read by the anthropic SDK."""

from __future__ import annotations

import json

import anthropic
import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from .conftest import call

MODEL = "qwen2.5-7b-instruct"


def client_for(url: str, key: str = "unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=key, max_retries=0)


def sdk_round_trip(client: anthropic.Anthropic, model: str) -> tuple[object, str, object]:
    answer = client.messages.create(model=model, max_tokens=50, system="Be brief.",
                                    messages=[{"role": "user", "content": "tell me a story"}])
    with client.messages.stream(model=model, max_tokens=50,
                                messages=[{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]
                                ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    return answer, text, final


@pytest_twisted.ensureDeferred
async def test_the_anthropic_sdk_reads_messages_and_streams_relayed_from_lm_studio(fake, start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url, "INFERENCE_SERVER_API_KEYS": "gw-key"})
    answer, text, final = await deferToThread(sdk_round_trip, client_for(gateway.url, "gw-key"), "qwen")
    assert answer.content[0].text == "echo: tell me a story" and answer.model == MODEL
    assert answer.stop_reason == "end_turn" and answer.usage.output_tokens == 5
    assert text == "echo: hello there" and final.usage.output_tokens == 3 and final.stop_reason == "end_turn"
    sent = [r for r in fake.received if r.path == "/v1/messages"]
    assert sent[0].body["system"] == "Be brief." and sent[0].body["model"] == MODEL
    assert sent[0].headers["anthropic-version"]  # passed on as the client sent it
    assert "stream_options" not in sent[1].body and sent[1].body["stream"] is True
    assert all("gw-key" not in json.dumps(r.headers) for r in sent)  # the client's key stays at the gateway


@pytest.mark.parametrize("body, headers, status, kind", [
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}, {}, 400, "invalid_request_error"),
    ({"model": MODEL, "max_tokens": 5, "messages": []}, {}, 400, "invalid_request_error"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, {}, 400,
     "invalid_request_error"),  # system messages alone: nothing to answer
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "tool", "content": "x"}]}, {}, 400,
     "invalid_request_error"),
    ({"model": MODEL, "max_tokens": 5, "temperature": 1.5, "messages": [{"role": "user", "content": "x"}]}, {},
     400, "invalid_request_error"),
    ({"model": "nonexistent", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, {}, 404,
     "not_found_error"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, {"x-api-key": "wrong"},
     401, "authentication_error"),
])
@pytest_twisted.ensureDeferred
async def test_errors_on_this_route_are_in_anthropics_shape(fake, start_gateway, body, headers, status, kind):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url, "INFERENCE_SERVER_API_KEYS": "gw-key"})
    reply = await call("POST", gateway.url + "/v1/messages", body, headers={"x-api-key": "gw-key", **headers})
    assert reply.status == status
    error = reply.json()
    assert set(error) == {"type", "error", "request_id"} and error["type"] == "error"
    assert error["error"]["type"] == kind and error["error"]["message"]
    assert error["request_id"] == reply.headers.getRawHeaders(b"request-id")[0].decode()  # as Anthropic names it


@pytest_twisted.ensureDeferred
async def test_a_failure_mid_stream_is_anthropics_error_event(fake, lmstudio):
    fake.chat.stream = "error_event"
    client = client_for(lmstudio.url)

    def consume() -> tuple[str, Exception | None]:
        received = []
        try:
            with client.messages.stream(model=MODEL, max_tokens=20,
                                        messages=[{"role": "user", "content": "a b c"}]) as stream:
                for text in stream.text_stream:
                    received.append(text)
        except anthropic.APIStatusError as error:
            return "".join(received), error
        return "".join(received), None

    text, error = await deferToThread(consume)
    assert text == "echo:" and error is not None and "model crashed" in str(error)
    m = await lmstudio.metrics()
    assert m.value("inference_request_duration_seconds_count", operation="messages", provider="lmstudio",
                   model=MODEL, stream="true", outcome="error") == 1


@pytest_twisted.ensureDeferred
async def test_messages_are_measured_as_their_own_operation(fake, lmstudio):
    await call("POST", lmstudio.url + "/v1/messages",
               {"model": MODEL, "max_tokens": 9, "stream": True, "messages": [{"role": "user", "content": "a b"}]})
    m = await lmstudio.metrics()
    labels = {"operation": "messages", "provider": "lmstudio", "model": MODEL}
    assert m.value("inference_tokens_total", **labels, type="input") == 5
    assert m.value("inference_tokens_total", **labels, type="output") == 3
    assert m.value("inference_time_to_first_token_seconds_count", **labels) == 1


@pytest_twisted.ensureDeferred
async def test_the_mock_answers_the_messages_api(start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_PROVIDER": "mock"})
    answer, text, final = await deferToThread(sdk_round_trip, client_for(gateway.url), "mock-model")
    assert answer.content[0].text == "You said: tell me a story" and answer.usage.input_tokens == 4 + 2  # system too
    assert text == "You said: hello there" and final.stop_reason == "end_turn"
    short = await deferToThread(lambda: client_for(gateway.url).messages.create(
        model="mock-model", max_tokens=2, messages=[{"role": "user", "content": "one two three"}]))
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 2
