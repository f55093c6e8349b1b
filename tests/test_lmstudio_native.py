"""LM Studio's own API (issue 21, first part): each host's model state from 0.4's /api/v1/models, else 0.3's
/api/v0/models, else the OpenAI list alone; the host's token on every native call; a host that refuses the
gateway's token says so."""

from __future__ import annotations

import pytest
import pytest_twisted

from .conftest import call

MODEL, EMBEDDER, VISION = "qwen2.5-7b-instruct", "text-embedding-nomic", "qwen2-vl-7b"


def native_paths(fake) -> list[str]:
    return [r.path for r in fake.received if r.path.startswith("/api/")]


@pytest.mark.parametrize("versions, asked_first, asked_later", [
    (("v1", "v0"), ["/api/v1/models"], ["/api/v1/models"]),  # 0.4 answers both: v1 is read
    (("v1",), ["/api/v1/models"], ["/api/v1/models"]),  # v1 only
    (("v0",), ["/api/v1/models", "/api/v0/models"], ["/api/v0/models"]),  # 0.3: v1 is a 404, once
    ((), ["/api/v1/models", "/api/v0/models"], []),  # llama.cpp: neither, and not asked again
])
@pytest_twisted.ensureDeferred
async def test_each_hosts_native_api_is_found_once_and_remembered(fake, lmstudio, versions, asked_first,
                                                                   asked_later):
    fake.models = [MODEL, EMBEDDER]
    fake.native_types, fake.native_versions = {MODEL: "llm", EMBEDDER: "embeddings"}, versions
    provider = lmstudio.site.gateway.provider
    await provider.list_models()
    assert native_paths(fake) == asked_first
    fake.received.clear()
    models = {m["id"]: m for m in await provider.list_models()}
    assert native_paths(fake) == asked_later
    if versions:
        assert models[EMBEDDER]["type"] == "embeddings" and models[MODEL]["state"] == "loaded"
        reply = await call("POST", lmstudio.url + "/v1/embeddings", {"model": "nomic", "input": "hi"})
        assert reply.status == 200 and fake.received[-1].body["model"] == EMBEDDER  # the kind found the model
    else:
        assert "type" not in models[MODEL] and "state" not in models[MODEL]


@pytest_twisted.ensureDeferred
async def test_v1_gives_instances_slots_context_and_capabilities(fake, lmstudio):
    fake.models = [MODEL, VISION, "not-loaded-model"]
    fake.native_types, fake.native_versions = {MODEL: "llm", VISION: "vlm", "not-loaded-model": "llm"}, ("v1",)
    fake.loaded_context, fake.parallel, fake.not_loaded = 8192, 4, {"not-loaded-model"}
    models = {m["id"]: m for m in (await call("GET", lmstudio.url + "/v1/models")).json()["data"]}
    qwen = models[MODEL]
    assert qwen["state"] == "loaded" and qwen["loaded_context_length"] == 8192 and qwen["max_context_length"] == 32768
    assert qwen["instances"] == [{"id": MODEL, "context_length": 8192, "parallel": 4}]
    assert qwen["capabilities"] == {"vision": False, "trained_for_tool_use": True}
    assert models[VISION]["type"] == "vlm"  # vision capability: what v0 calls a vlm
    assert models["not-loaded-model"]["state"] == "not-loaded" and models["not-loaded-model"]["instances"] == []
    # The loaded context bounds the output a call may ask for (max_output_tokens defaults to it).
    reply = await lmstudio.post_chat({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 100000})
    assert reply.status == 200 and fake.received[-1].body["max_tokens"] == 8192


@pytest_twisted.ensureDeferred
async def test_a_host_that_stops_answering_its_native_api_is_asked_again(fake, lmstudio):
    fake.native_types, fake.native_versions = {MODEL: "llm"}, ("v1",)
    provider = lmstudio.site.gateway.provider
    await provider.list_models()
    fake.native_versions = ("v0",)  # downgraded (or replaced) behind the same address
    assert "state" not in (await provider.list_models())[0] and provider.native_api is None  # forgotten
    assert (await provider.list_models())[0]["state"] == "loaded" and provider.native_api == "v0"  # found again
    fake.received.clear()
    models = await provider.list_models()
    assert native_paths(fake) == ["/api/v0/models"] and models[0]["state"] == "loaded"


@pytest_twisted.ensureDeferred
async def test_the_hosts_token_goes_on_the_native_api_and_a_refused_token_is_the_gateways_problem(
        fake, start_gateway):
    fake.native_types, fake.native_versions, fake.require_key = {MODEL: "llm"}, ("v1",), "lm-token"
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url, "INFERENCE_INFERENCE_API_KEY": "lm-token"})
    assert (await gateway.post_chat({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})).status == 200
    assert {r.path: r.headers.get("authorization") for r in fake.received} == {
        "/v1/models": "Bearer lm-token", "/api/v1/models": "Bearer lm-token", "/v1/chat/completions": "Bearer lm-token"}
    wrong = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url, "INFERENCE_INFERENCE_API_KEY": "not-it"})
    reply = await wrong.post_chat({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status == 502 and reply.error["code"] == "upstream_unauthorized"  # not the client's key
    assert "api_key" in reply.error["message"] and "not-it" not in reply.body.decode()


@pytest_twisted.ensureDeferred
async def test_a_fleet_hosts_slots_come_from_lm_studios_parallel_unless_the_operator_sets_them(
        start_gateway, tmp_path):
    from twisted.internet.defer import Deferred, DeferredList

    from .conftest import until
    from .fakes.lmstudio import FakeLMStudio

    fakes = [FakeLMStudio([MODEL]), FakeLMStudio([MODEL])]
    for fake, parallel in zip(fakes, (2, 8), strict=True):
        fake.native_types, fake.native_versions, fake.parallel = {MODEL: "llm"}, ("v1",), parallel
        fake.listen()
    config = tmp_path / "fleet.yaml"
    config.write_text(f"""inference:
  upstreams:
    - {{name: says, base_url: "{fakes[0].url}"}}
    - {{name: overridden, base_url: "{fakes[1].url}", max_concurrent: 1}}
""")
    try:
        gateway = start_gateway({}, str(config))
        listed = (await call("GET", gateway.url + "/v1/models")).json()["data"]
        assert listed[0]["hosts"] == [
            {"name": "says", "state": "loaded", "context_length": 4096, "instances": 1, "slots": 2},
            {"name": "overridden", "state": "loaded", "context_length": 4096, "instances": 1, "slots": 8}]
        health = (await call("GET", gateway.url + "/health")).json()
        slots = {host["name"]: host["max_concurrent"] for host in health["upstream"]["hosts"]}
        assert slots == {"says": 2, "overridden": 1}  # LM Studio's parallel; the operator's number wins
        for fake in fakes:
            fake.chat.mode = "hang"
        replies = [Deferred.fromCoroutine(gateway.post_chat({"model": MODEL, "messages": [
            {"role": "user", "content": f"conversation {i}"}]})) for i in range(4)]
        await until(lambda: gateway.site.gateway.provider.waiting() == 1 and sum(len(f.pending) for f in fakes) == 3)
        assert [len(fake.pending) for fake in fakes] == [2, 1]  # 2 + 1 slots in use, the fourth call waits
        for fake in fakes:
            fake.chat.mode = "normal"
            fake.release()
        assert all(ok and reply.status == 200 for ok, reply in await DeferredList(replies))
    finally:
        await DeferredList([fake.stop() for fake in fakes])
