"""Model resolution: exact id, unique substring, default, and the upstream list's cache."""

from __future__ import annotations

import pytest
import pytest_twisted
from openai.types import Model

from .conftest import call

USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("requested, resolved", [
    ("qwen2.5-7b-instruct", "qwen2.5-7b-instruct"),   # exact
    ("QWEN2.5-7B-INSTRUCT", "qwen2.5-7b-instruct"),   # case-insensitive
    ("llama", "llama-3.2-3b-instruct"),               # unique substring
    ("Qwen", "qwen2.5-7b-instruct"),
])
@pytest_twisted.ensureDeferred
async def test_requested_names_resolve_to_served_ids(fake, lmstudio, requested, resolved):
    reply = await lmstudio.post_chat({"model": requested, "messages": USER})
    assert reply.status == 200
    assert fake.received[-1].body["model"] == resolved


@pytest_twisted.ensureDeferred
async def test_exact_id_wins_over_substring_matches(fake, lmstudio):
    fake.models = ["qwen3", "qwen3-coder", "qwen3-vl"]
    reply = await lmstudio.post_chat({"model": "qwen3", "messages": USER})
    assert reply.status == 200 and fake.received[-1].body["model"] == "qwen3"


@pytest_twisted.ensureDeferred
async def test_omitted_model_uses_default_model(fake, start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url,
                             "INFERENCE_INFERENCE_DEFAULT_MODEL": "llama-3.2"})
    reply = await gateway.post_chat({"messages": USER})
    assert reply.status == 200 and fake.received[-1].body["model"] == "llama-3.2-3b-instruct"


@pytest_twisted.ensureDeferred
async def test_omitted_model_with_one_served_model_uses_it(fake, lmstudio):
    fake.models = ["only-model"]
    reply = await lmstudio.post_chat({"messages": USER})
    assert reply.status == 200 and fake.received[-1].body["model"] == "only-model"


@pytest_twisted.ensureDeferred
async def test_omitted_model_with_several_and_no_default_match_is_404(fake, lmstudio):
    reply = await lmstudio.post_chat({"messages": USER})
    assert reply.status == 404
    assert "'local-model'" in reply.error["message"]


@pytest_twisted.ensureDeferred
async def test_model_list_is_cached_and_refreshed_on_a_miss(fake, start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url,
                             "INFERENCE_INFERENCE_MODELS_CACHE_SECS": "3600"})
    for _ in range(3):
        assert (await gateway.post_chat({"model": "qwen", "messages": USER})).status == 200
    assert [r.path for r in fake.received].count("/v1/models") == 1
    fake.models.append("mistral-7b")  # a model loaded in LM Studio after the first fetch
    reply = await gateway.post_chat({"model": "mistral-7b", "messages": USER})
    assert reply.status == 200 and fake.received[-1].body["model"] == "mistral-7b"
    assert [r.path for r in fake.received].count("/v1/models") == 2


@pytest_twisted.ensureDeferred
async def test_model_list_failure_is_reported_not_cached(fake, lmstudio):
    fake.listing.mode, fake.listing.status = "error_string", 500
    reply = await lmstudio.post_chat({"model": "qwen", "messages": USER})
    assert reply.status == 500 and reply.error["code"] == "upstream_error"
    fake.listing.mode = "normal"
    assert (await lmstudio.post_chat({"model": "qwen", "messages": USER})).status == 200


@pytest_twisted.ensureDeferred
async def test_model_objects_carry_every_field_openais_schema_requires(fake, start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url, "INFERENCE_INFERENCE_MODELS_CACHE_SECS": "0"})
    fake.models = ["qwen3", "nomic-embed-text"]  # the fake, like LM Studio and llama.cpp, sends no `created`
    first = (await call("GET", gateway.url + "/v1/models")).json()["data"]
    for listed in first:
        strict = Model.model_validate(listed, strict=True)  # as typed clients in Go, Rust or Java read it
        assert strict.object == "model" and isinstance(strict.created, int) and strict.created > 0
        assert listed["owned_by"] == "organization_owner"  # what the upstream sent is kept
    fake.models.append("llama3")
    second = (await call("GET", gateway.url + "/v1/models")).json()["data"]
    assert [m["id"] for m in second] == ["qwen3", "nomic-embed-text", "llama3"]  # fetched again
    assert {m["id"]: m["created"] for m in first}.items() <= {m["id"]: m["created"] for m in second}.items()


KINDS = {"qwen3": "llm", "qwen3-vl": "vlm", "qwen3-embedding": "embeddings", "nomic-embed-text-v1.5": "embeddings"}


@pytest_twisted.ensureDeferred
async def test_lm_studios_native_api_tells_text_models_from_embedding_models(fake, lmstudio):
    fake.models, fake.native_types = list(KINDS), KINDS
    embeddings = await call("POST", lmstudio.url + "/v1/embeddings", {"model": "nomic", "input": "x"})
    assert embeddings.status == 200 and fake.received[-1].body["model"] == "nomic-embed-text-v1.5"
    both = await call("POST", lmstudio.url + "/v1/embeddings", {"model": "qwen", "input": "x"})
    assert both.status == 200 and fake.received[-1].body["model"] == "qwen3-embedding"  # the only embedding qwen
    chat = await lmstudio.post_chat({"model": "qwen3-v", "messages": USER})  # a vision model chats too
    assert chat.status == 200 and fake.received[-1].body["model"] == "qwen3-vl"
    wrong = await lmstudio.post_chat({"model": "nomic-embed-text-v1.5", "messages": USER})
    assert wrong.status == 400 and wrong.error["param"] == "model"
    assert "is an embedding model" in wrong.error["message"] and "/v1/embeddings" in wrong.error["message"]
    also_wrong = await call("POST", lmstudio.url + "/v1/embeddings", {"model": "qwen3", "input": "x"})
    assert also_wrong.status == 400 and "not an embedding model" in also_wrong.error["message"]
    listed = {m["id"]: m for m in (await call("GET", lmstudio.url + "/v1/models")).json()["data"]}
    assert listed["qwen3-vl"]["type"] == "vlm" and listed["qwen3-vl"]["state"] == "loaded"
    assert listed["qwen3-vl"]["max_context_length"] == 4096 and "publisher" not in listed["qwen3-vl"]


@pytest_twisted.ensureDeferred
async def test_without_the_native_api_every_model_is_a_candidate(fake, lmstudio):
    fake.models = list(KINDS)  # and no /api/v0/models (llama.cpp, older LM Studio): kinds are unknown
    reply = await call("POST", lmstudio.url + "/v1/embeddings", {"model": "qwen3-embedding", "input": "x"})
    assert reply.status == 200
    ambiguous = await call("POST", lmstudio.url + "/v1/embeddings", {"model": "qwen", "input": "x"})
    assert ambiguous.status == 400 and ambiguous.error["code"] == "ambiguous_model"
