"""POST /v1/responses relayed to an upstream that serves OpenAI's Responses API (LM Studio 0.3.29 and later)."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from openai import OpenAI
from twisted.internet.threads import deferToThread

from .conftest import call, named_events, raw_connect, raw_post

MODEL = "qwen2.5-7b-instruct"


def client_for(url: str) -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def sdk_round_trip(client: OpenAI, model: str, **more: str) -> tuple[object, list[str], list[str], object]:
    """One answer and one stream through the openai SDK's own parsers."""
    answer = client.responses.create(model=model, input="tell me a story", instructions="Be brief.",
                                     max_output_tokens=50, **more)
    kinds, deltas, completed = [], [], None
    for event in client.responses.create(model=model, input=[{"role": "user", "content": "hello there"}],
                                         stream=True):
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        if event.type == "response.completed":
            completed = event.response
    return answer, kinds, deltas, completed


@pytest_twisted.ensureDeferred
async def test_the_openai_sdk_reads_answers_and_streams_relayed_from_lm_studio(fake, lmstudio):
    fake.responses.append("resp_earlier")  # a response it gave before
    answer, kinds, deltas, completed = await deferToThread(sdk_round_trip, client_for(lmstudio.url), "qwen",
                                                           previous_response_id="resp_earlier")
    assert answer.output_text == "echo: tell me a story" and answer.model == MODEL and answer.status == "completed"
    assert "".join(deltas) == "echo: hello there" and completed.usage.output_tokens == 3
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    sent = [r.body for r in fake.received if r.path == "/v1/responses"]
    assert sent[0]["previous_response_id"] == "resp_earlier" and sent[0]["instructions"] == "Be brief."
    assert sent[0]["model"] == MODEL and "temperature" not in sent[0]  # no chat defaults added here
    assert "stream_options" not in sent[1]  # chat's include_usage is not a Responses API parameter


@pytest_twisted.ensureDeferred
async def test_the_stream_is_relayed_with_its_event_names_and_no_done(fake, lmstudio):
    reply = await call("POST", lmstudio.url + "/v1/responses", {"model": MODEL, "input": "a b", "stream": True})
    events = named_events(reply.body)
    assert all(name.startswith("response.") and isinstance(data, dict) for name, data in events)
    assert events[-1][1]["type"] == "response.completed"
    assert "[DONE]" not in reply.body.decode()


@pytest_twisted.ensureDeferred
async def test_responses_are_measured_and_traced_as_their_own_operation(fake, lmstudio, access_events):
    await call("POST", lmstudio.url + "/v1/responses", {"model": MODEL, "input": "one two", "stream": True})
    m = await lmstudio.metrics()
    labels = {"operation": "responses", "provider": "lmstudio", "model": MODEL}
    assert m.value("inference_request_duration_seconds_count", **labels, stream="true", outcome="success") == 1
    assert m.value("inference_tokens_total", **labels, type="input") == 5
    assert m.value("inference_tokens_total", **labels, type="output") == 3
    assert m.value("inference_time_to_first_token_seconds_count", **labels) == 1
    assert access_events[0]["route"] == "/v1/responses" and access_events[0]["output_tokens"] == 3


@pytest_twisted.ensureDeferred
async def test_a_failure_mid_stream_is_the_responses_apis_error_event(fake, lmstudio):
    fake.chat.stream = "error_event"
    reply = await call("POST", lmstudio.url + "/v1/responses", {"model": MODEL, "input": "a b", "stream": True})
    assert reply.status == 200
    events = named_events(reply.body)
    (name, error), (last, failed) = events[-2], events[-1]
    assert name == "error" and "[DONE]" not in reply.body.decode()
    assert error["type"] == "error" and error["code"] == "upstream_error" and "model crashed" in error["message"]
    assert events[-3][0] == "response.output_text.delta"  # what came first
    assert error["sequence_number"] == events[-3][1]["sequence_number"] + 1  # numbered after the last one relayed
    assert last == "response.failed" and failed["sequence_number"] == error["sequence_number"] + 1
    assert failed["response"]["status"] == "failed" and failed["response"]["id"] == events[0][1]["response"]["id"]
    m = await lmstudio.metrics()
    assert m.value("inference_request_duration_seconds_count", operation="responses", provider="lmstudio",
                   model=MODEL, stream="true", outcome="error") == 1


@pytest_twisted.ensureDeferred
async def test_an_upstream_error_before_the_stream_is_a_plain_http_error(fake, lmstudio):
    reply = await call("POST", lmstudio.url + "/v1/responses", {"model": MODEL, "input": "x", "stream": True,
                                                                  "previous_response_id": "resp_gone"})
    assert reply.status == 400 and reply.error["code"] == "previous_response_not_found"
    assert reply.error["message"] == "Previous response with id 'resp_gone' not found."


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL}, "input"),
    ({"model": MODEL, "input": []}, "input"),
    ({"model": MODEL, "input": ["not an item"]}, "input"),
    ({"model": MODEL, "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": MODEL, "input": "x", "temperature": 2.5}, "temperature"),
    ({"model": MODEL, "input": "x", "previous_response_id": 7}, "previous_response_id"),
    ({"model": MODEL, "input": "x", "tool_choice": 3}, "tool_choice"),
])
@pytest_twisted.ensureDeferred
async def test_bad_responses_requests_are_400s_naming_the_field(fake, lmstudio, body, param):
    reply = await call("POST", lmstudio.url + "/v1/responses", body)
    assert reply.status == 400 and reply.error["param"] == param
    assert not [r for r in fake.received if r.path == "/v1/responses"]


@pytest_twisted.ensureDeferred
async def test_the_mock_answers_the_responses_api(start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_PROVIDER": "mock"})
    answer, kinds, deltas, completed = await deferToThread(sdk_round_trip, client_for(gateway.url), "mock-model")
    assert answer.output_text == "You said: tell me a story" and answer.usage.input_tokens == 4 + 2  # instructions
    assert "".join(deltas) == "You said: hello there" and completed.status == "completed"
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * 4, "response.output_text.done",
                     "response.content_part.done", "response.output_item.done", "response.completed"]
    short = await deferToThread(lambda: client_for(gateway.url).responses.create(
        model="mock-model", input="one two three", max_output_tokens=2))
    assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"


@pytest_twisted.ensureDeferred
async def test_a_client_leaving_a_response_stream_aborts_the_upstream(fake, lmstudio):
    await call("GET", lmstudio.url + "/v1/models")
    fake.chat.mode = "hang"
    arrived, closed = fake.next_arrival(), fake.next_close()
    client = await raw_connect(lmstudio.port.getHost().port)
    client.transport.write(raw_post("/v1/responses", json.dumps({"model": MODEL, "input": "x"}).encode()))
    await arrived
    client.transport.loseConnection()
    await closed
