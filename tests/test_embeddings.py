"""POST /v1/embeddings: strings, lists and token arrays, float or base64, bounded, measured, and the mock's vectors."""

from __future__ import annotations

import base64
import math
import struct

import pytest
import pytest_twisted
from openai import OpenAI
from twisted.internet.threads import deferToThread

from .conftest import call

MODEL = "qwen2.5-7b-instruct"


def client_for(url: str) -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


@pytest_twisted.ensureDeferred
async def test_the_openai_sdk_embeds_strings_and_lists(fake, lmstudio):
    client = client_for(lmstudio.url)

    def embed() -> tuple[object, object]:
        one = client.embeddings.create(model="qwen", input="hello", encoding_format="float")
        many = client.embeddings.create(model="qwen", input=["a", "bcd"], dimensions=3)  # the SDK asks for base64
        return one, many

    one, many = await deferToThread(embed)
    assert one.model == MODEL and one.data[0].embedding == [5.0, 0.5, -0.25]
    assert one.usage.prompt_tokens == 2
    assert [d.embedding for d in many.data] == [[1.0, 0.5, -0.25], [3.0, 0.5, -0.25]]  # decoded by the SDK
    sent = [r.body for r in fake.received if r.path == "/v1/embeddings"]
    assert sent[0] == {"model": MODEL, "input": "hello", "encoding_format": "float"}
    assert sent[1]["encoding_format"] == "base64" and sent[1]["dimensions"] == 3
    assert "temperature" not in sent[1] and "max_tokens" not in sent[1]  # no generation defaults here


@pytest_twisted.ensureDeferred
async def test_base64_is_relayed_as_the_upstream_sent_it(fake, lmstudio):
    reply = await call("POST", lmstudio.url + "/v1/embeddings",
                       {"model": MODEL, "input": [[1, 2, 3]], "encoding_format": "base64"})
    encoded = reply.json()["data"][0]["embedding"]
    assert struct.unpack("<3f", base64.b64decode(encoded)) == (3.0, 0.5, -0.25)


@pytest.mark.parametrize("body, words", [
    ({"model": MODEL}, "'input' is required"),
    ({"model": MODEL, "input": ""}, "empty string"),
    ({"model": MODEL, "input": ["ok", ""]}, "empty string"),
    ({"model": MODEL, "input": [1, "x"]}, "'input' must be a string"),
    ({"model": MODEL, "input": {"text": "x"}}, "'input' must be a string"),
    ({"model": MODEL, "input": "x", "encoding_format": "int8"}, "one of float, base64"),
    ({"model": MODEL, "input": "x", "dimensions": 0}, "'dimensions' must be an integer >= 1"),
    ({"model": MODEL, "input": ["a", "b", "c", "d"]}, "at most 3 per request (server.max_embedding_inputs)"),
    ({"model": MODEL, "input": ["abcdef", "ghijkl"]}, "at most 10 per request (server.max_embedding_size)"),
    ({"model": MODEL, "input": list(range(11))}, "at most 10 per request (server.max_embedding_size)"),
])
@pytest_twisted.ensureDeferred
async def test_bad_or_oversized_inputs_are_400s(fake, start_gateway, body, words):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url, "INFERENCE_SERVER_MAX_EMBEDDING_INPUTS": "3",
                             "INFERENCE_SERVER_MAX_EMBEDDING_SIZE": "10"})
    reply = await call("POST", gateway.url + "/v1/embeddings", body)
    assert reply.status == 400 and words in reply.error["message"], reply.error
    assert reply.error["param"] in ("input", "encoding_format", "dimensions")
    assert not [r for r in fake.received if r.path == "/v1/embeddings"]


@pytest_twisted.ensureDeferred
async def test_embeddings_are_measured_and_traced_as_their_own_operation(fake, lmstudio):
    await call("POST", lmstudio.url + "/v1/embeddings", {"model": MODEL, "input": ["a", "b"]})
    m = await lmstudio.metrics()
    labels = {"operation": "embeddings", "provider": "lmstudio", "model": MODEL}
    assert m.value("inference_request_duration_seconds_count", **labels, stream="false", outcome="success") == 1
    assert m.value("inference_tokens_total", **labels, type="input") == 4
    assert m.value("inference_tokens_total", **labels, type="output") is None
    assert m.value("inference_http_requests_total", method="POST", route="/v1/embeddings", code="200") == 1


@pytest_twisted.ensureDeferred
async def test_the_mocks_vectors_are_unit_length_and_the_same_for_the_same_text(start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_PROVIDER": "mock"})
    unnamed = await call("POST", gateway.url + "/v1/embeddings", {"input": "x"})  # the one embedding model answers
    assert unnamed.status == 200 and unnamed.json()["model"] == "mock-embedding"
    client = client_for(gateway.url)

    def embed() -> list[list[float]]:
        first = client.embeddings.create(model="mock-embedding", input=["same text", "other text"])
        again = client.embeddings.create(model="mock-embedding", input="same text", dimensions=8,
                                         encoding_format="float")
        return [d.embedding for d in first.data] + [again.data[0].embedding]

    same, other, short = await deferToThread(embed)
    assert len(same) == 64 and len(short) == 8
    assert all(math.isclose(math.fsum(x * x for x in v), 1.0, rel_tol=1e-5) for v in (same, other, short))
    assert same != other
    again = await deferToThread(lambda: client.embeddings.create(model="mock-embedding", input="same text"))
    assert again.data[0].embedding == same
