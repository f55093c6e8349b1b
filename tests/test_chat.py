"""Chat completions and models through the gateway, in front of the fake LM Studio and the mock."""

from __future__ import annotations

import openai
import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from .conftest import call

USER = [{"role": "user", "content": "hello there"}]


def sdk(url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=10)


@pytest_twisted.ensureDeferred
async def test_chat_is_relayed_and_answered(fake, lmstudio):
    reply = await lmstudio.post_chat({"model": "qwen2.5-7b-instruct", "messages": USER})
    assert reply.status == 200
    assert reply.header("content-type") == "application/json"
    answer = reply.json()
    assert answer["choices"][0]["message"]["content"] == "echo: hello there"
    assert answer["usage"] == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    sent = fake.received[-1]
    assert (sent.method, sent.path) == ("POST", "/v1/chat/completions")
    assert sent.body["messages"] == USER


@pytest_twisted.ensureDeferred
async def test_defaults_apply_only_when_omitted(fake, lmstudio):
    await lmstudio.post_chat({"model": "qwen2.5-7b-instruct", "messages": USER})
    assert (fake.received[-1].body["max_tokens"], fake.received[-1].body["temperature"]) == (100, 0.7)
    await lmstudio.post_chat({"model": "qwen2.5-7b-instruct", "messages": USER, "temperature": 0,
                              "max_tokens": 7})
    assert (fake.received[-1].body["max_tokens"], fake.received[-1].body["temperature"]) == (7, 0)
    await lmstudio.post_chat({"model": "qwen2.5-7b-instruct", "messages": USER, "max_completion_tokens": 9})
    assert "max_tokens" not in fake.received[-1].body


@pytest_twisted.ensureDeferred
async def test_configured_defaults_are_used(fake, start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url,
                             "INFERENCE_INFERENCE_DEFAULTS_MAX_TOKENS": "512",
                             "INFERENCE_INFERENCE_DEFAULTS_TEMPERATURE": "0.2"})
    await gateway.post_chat({"model": "qwen2.5-7b-instruct", "messages": USER})
    assert (fake.received[-1].body["max_tokens"], fake.received[-1].body["temperature"]) == (512, 0.2)


@pytest_twisted.ensureDeferred
async def test_extensions_pass_through_untouched(fake, lmstudio):
    body = {"model": "qwen2.5-7b-instruct", "messages": USER, "top_k": 40, "min_p": 0.05,
            "repeat_penalty": 1.1, "mirostat_mode": 2, "mirostat_tau": 5.0, "mirostat_eta": 0.1,
            "cache_prompt": True, "ttl": 300, "draft_model": "qwen2.5-0.5b-instruct",
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "some_future_field": {"nested": [1, 2]},
            "extensions": {"typical_p": 0.9, "dry_multiplier": 0.8}}
    reply = await lmstudio.post_chat(body)
    assert reply.status == 200
    sent = fake.received[-1].body
    for key, value in body.items():
        if key != "extensions":
            assert sent[key] == value, key
    assert sent["typical_p"] == 0.9 and sent["dry_multiplier"] == 0.8
    assert "extensions" not in sent


@pytest_twisted.ensureDeferred
async def test_json_object_response_format_becomes_a_json_schema_for_lmstudio(fake, lmstudio):
    reply = await lmstudio.post_chat({"model": "qwen2.5-7b-instruct", "messages": USER,
                                      "response_format": {"type": "json_object"}})
    assert reply.status == 200
    sent = fake.received[-1].body["response_format"]
    assert sent["type"] == "json_schema"
    assert sent["json_schema"]["schema"] == {"type": "object"}


@pytest_twisted.ensureDeferred
async def test_extra_response_fields_are_kept(fake, lmstudio):
    fake.chat.extra_message_fields = {"reasoning_content": "thinking...", "reasoning": "hmm"}
    reply = await lmstudio.post_chat({"model": "qwen2.5-7b-instruct", "messages": USER})
    message = reply.json()["choices"][0]["message"]
    assert message["reasoning_content"] == "thinking..." and message["reasoning"] == "hmm"
    assert reply.json()["stats"] == {} and reply.json()["runtime"] == "llama.cpp"


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
@pytest_twisted.ensureDeferred
async def test_base_url_with_or_without_v1(fake, start_gateway, suffix):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url + suffix})
    reply = await gateway.post_chat({"model": "qwen2.5-7b-instruct", "messages": USER})
    assert reply.status == 200
    assert [r.path for r in fake.received] == ["/v1/models", "/api/v1/models", "/api/v0/models",
                                               "/v1/chat/completions"]  # (LM Studio's native API: 0.4's, else 0.3's)


@pytest_twisted.ensureDeferred
async def test_models_lists_the_upstream_filtered_by_allowed_models(fake, start_gateway):
    everything = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url})
    reply = await call("GET", everything.url + "/v1/models")
    assert reply.status == 200
    assert reply.json()["object"] == "list"
    assert [m["id"] for m in reply.json()["data"]] == fake.models
    allowed = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url,
                             "INFERENCE_INFERENCE_ALLOWED_MODELS": "llama-3.2-3b-instruct"})
    reply = await call("GET", allowed.url + "/v1/models")
    assert [m["id"] for m in reply.json()["data"]] == ["llama-3.2-3b-instruct"]


@pytest_twisted.ensureDeferred
async def test_openai_sdk_chat_and_models(fake, lmstudio):
    client = sdk(lmstudio.url)
    completion = await deferToThread(lambda: client.chat.completions.create(
        model="qwen2.5-7b-instruct", messages=USER, temperature=0.1, extra_body={"top_k": 20}))
    assert completion.choices[0].message.content == "echo: hello there"
    assert completion.usage.total_tokens == 15
    assert fake.received[-1].body["top_k"] == 20
    models = await deferToThread(lambda: [m.id for m in client.models.list()])
    assert models == fake.models
    model = await deferToThread(lambda: client.models.retrieve("llama-3.2-3b-instruct"))
    assert model.id == "llama-3.2-3b-instruct"


@pytest_twisted.ensureDeferred
async def test_openai_sdk_sees_gateway_errors_as_sdk_exceptions(fake, lmstudio):
    client = sdk(lmstudio.url)
    with pytest.raises(openai.NotFoundError) as info:
        await deferToThread(lambda: client.chat.completions.create(model="gpt-4o", messages=USER))
    assert info.value.code == "model_not_found"
    assert "qwen2.5-7b-instruct" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        await deferToThread(lambda: client.chat.completions.create(model="qwen", messages=USER, temperature=5))
    assert info.value.param == "temperature"


@pytest_twisted.ensureDeferred
async def test_mock_provider_answers_deterministically_without_network(start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_PROVIDER": "mock",
                             "INFERENCE_INFERENCE_MOCK_MODELS": "mock-a,mock-b"})
    client = sdk(gateway.url)
    completion = await deferToThread(lambda: client.chat.completions.create(
        model="mock-b", messages=[{"role": "user", "content": "one two three"}], max_tokens=4))
    assert completion.model == "mock-b"
    assert completion.choices[0].message.content == "You said: one two"
    assert completion.choices[0].finish_reason == "length"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3, 4)
    models = await deferToThread(lambda: [m.id for m in client.models.list()])
    assert models == ["mock-a", "mock-b", "mock-embedding"]
    health = await call("GET", gateway.url + "/health")
    assert health.status == 200 and health.json()["provider"] == "mock"


@pytest_twisted.ensureDeferred
async def test_openai_provider_sends_the_key_and_never_leaks_it(fake, start_gateway, no_logged_failures):
    fake.require_key = "sk-secret-123"
    gateway = start_gateway({"INFERENCE_INFERENCE_PROVIDER": "openai", "INFERENCE_INFERENCE_BASE_URL": fake.url,
                             "OPENAI_API_KEY": "sk-secret-123"})
    reply = await gateway.post_chat({"model": "qwen2.5-7b-instruct", "messages": USER})
    assert reply.status == 200
    assert fake.received[-1].headers["authorization"] == "Bearer sk-secret-123"
    wrong = start_gateway({"INFERENCE_INFERENCE_PROVIDER": "openai", "INFERENCE_INFERENCE_BASE_URL": fake.url,
                           "INFERENCE_INFERENCE_API_KEY": "sk-wrong-456"})
    reply = await call("GET", wrong.url + "/v1/models")
    assert reply.status == 502 and reply.error["code"] == "upstream_unauthorized"  # the gateway's key, not the client's
    assert b"sk-wrong-456" not in reply.body
    health = await call("GET", wrong.url + "/health")
    assert b"sk-wrong-456" not in health.body
