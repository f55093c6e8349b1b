"""POST /v1/completions: text completions through the same pipeline as chat, streamed or not."""

from __future__ import annotations

import pytest
import pytest_twisted
from openai import BadRequestError, OpenAI
from twisted.internet.threads import deferToThread

from .conftest import call, sse_payloads

MODEL = "qwen2.5-7b-instruct"
LABELS = {"operation": "text_completion", "provider": "lmstudio", "model": MODEL}


def client_for(url: str) -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


@pytest_twisted.ensureDeferred
async def test_the_openai_sdk_completes_text_and_streams_it(fake, lmstudio):
    client = client_for(lmstudio.url)

    def complete() -> tuple[object, str, object]:
        answer = client.completions.create(model="qwen", prompt="Once upon", max_tokens=5, suffix="END", echo=False)
        stream = client.completions.create(model="qwen", prompt="Once upon a time", stream=True)
        chunks = list(stream)
        return answer, "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].usage

    answer, streamed, usage = await deferToThread(complete)
    assert answer.object == "text_completion" and answer.model == MODEL
    assert answer.choices[0].text == "echo: Once upon" and answer.choices[0].finish_reason == "stop"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (5, 3)
    assert streamed == "echo: Once upon a time"
    assert usage is not None and usage.completion_tokens == 5
    sent = [r.body for r in fake.received if r.path == "/v1/completions"]
    assert sent[0]["suffix"] == "END" and sent[0]["max_tokens"] == 5 and sent[0]["model"] == MODEL
    assert sent[0]["temperature"] == 0.7  # the configured default, as for chat
    assert sent[1]["stream"] is True and sent[1]["stream_options"] == {"include_usage": True}


@pytest_twisted.ensureDeferred
async def test_completions_are_measured_as_their_own_operation(fake, lmstudio):
    await call("POST", lmstudio.url + "/v1/completions", {"model": MODEL, "prompt": "a b"})
    reply = await call("POST", lmstudio.url + "/v1/completions", {"model": MODEL, "prompt": "a b c", "stream": True})
    assert sse_payloads(reply.body)[-1] == b"[DONE]"
    m = await lmstudio.metrics()
    assert m.value("inference_request_duration_seconds_count", **LABELS, stream="false", outcome="success") == 1
    assert m.value("inference_request_duration_seconds_count", **LABELS, stream="true", outcome="success") == 1
    assert m.value("inference_tokens_total", **LABELS, type="output") == 3 + 4
    assert m.value("inference_time_to_first_token_seconds_count", **LABELS) == 1
    assert m.value("inference_http_requests_total", method="POST", route="/v1/completions", code="200") == 2


@pytest.mark.parametrize("body, param, words", [
    ({"model": MODEL}, "prompt", "'prompt' is required"),
    ({"model": MODEL, "prompt": []}, "prompt", "'prompt' must be a string"),
    ({"model": MODEL, "prompt": [1, "two"]}, "prompt", "'prompt' must be a string"),
    ({"model": MODEL, "prompt": "x", "logprobs": 6}, "logprobs", "between 0 and 5"),
    ({"model": MODEL, "prompt": "x", "echo": "yes"}, "echo", "true or false"),
    ({"model": MODEL, "prompt": "x", "temperature": 3}, "temperature", "between 0 and 2"),
    ({"model": MODEL, "prompt": "x", "best_of": 0}, "best_of", ">= 1"),
])
@pytest_twisted.ensureDeferred
async def test_bad_completion_requests_are_400s_naming_the_field(fake, lmstudio, body, param, words):
    reply = await call("POST", lmstudio.url + "/v1/completions", body)
    assert reply.status == 400 and reply.error["param"] == param and words in reply.error["message"]
    assert not [r for r in fake.received if r.path == "/v1/completions"]


@pytest_twisted.ensureDeferred
async def test_every_prompt_form_reaches_the_upstream_as_sent(fake, lmstudio):
    for prompt in ("text", ["one", "two"], [1, 2, 3], [[1, 2], [3]]):
        reply = await call("POST", lmstudio.url + "/v1/completions", {"model": MODEL, "prompt": prompt})
        assert reply.status == 200, reply.body
        assert [r for r in fake.received if r.path == "/v1/completions"][-1].body["prompt"] == prompt


@pytest_twisted.ensureDeferred
async def test_an_upstream_error_is_relayed_in_openais_shape(fake, lmstudio):
    fake.chat.mode, fake.chat.status, fake.chat.message = "error_object", 400, "prompt too long"
    client = client_for(lmstudio.url)
    with pytest.raises(BadRequestError) as raised:
        await deferToThread(client.completions.create, model=MODEL, prompt="x")
    assert raised.value.status_code == 400 and "prompt too long" in str(raised.value)


@pytest_twisted.ensureDeferred
async def test_the_mock_completes_text(start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_PROVIDER": "mock"})
    client = client_for(gateway.url)

    def complete() -> tuple[str, str]:
        answer = client.completions.create(model="mock-model", prompt="the quick fox")
        chunks = list(client.completions.create(model="mock-model", prompt="the quick fox", stream=True))
        return answer.choices[0].text, "".join(c.choices[0].text for c in chunks if c.choices)

    assert await deferToThread(complete) == ("You said: the quick fox", "You said: the quick fox")
