"""Context- and capability-aware routing (issue 21): a call goes to a host whose loaded context holds it and whose
model has the capabilities it needs; a prompt no host can hold is a 400 before any upstream call."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import DeferredList

from .conftest import call
from .fakes.lmstudio import FakeLMStudio

QWEN = "qwen3-8b"
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}
PIXEL = "data:image/png;base64," + "iVBORw0KGgo" * 100_000  # 1.1 MB of image data: not tokens of the prompt


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": QWEN, "messages": [{"role": "user", "content": text}], **extra}


@pytest.fixture
def pair() -> Any:
    """Two LM Studio 0.4 hosts with QWEN loaded, told apart by what each test sets."""
    fakes = [FakeLMStudio([QWEN]), FakeLMStudio([QWEN])]
    for fake in fakes:
        fake.native_types, fake.native_versions = {QWEN: "llm"}, ("v1",)
        fake.listen()
    yield fakes
    pytest_twisted.blockon(DeferredList([fake.stop() for fake in fakes]))


def fleet(start_gateway: Any, tmp_path: Any, fakes: list[FakeLMStudio]) -> Any:
    path = tmp_path / "fleet.yaml"
    path.write_text("inference:\n  upstreams:\n" + "".join(
        f'    - {{name: host{i}, base_url: "{fake.url}"}}\n' for i, fake in enumerate(fakes)))
    return start_gateway({}, str(path))


def served_by(fakes: list[FakeLMStudio]) -> list[int]:
    """Which host each call reached, in order."""
    calls = sorted((r.at, i) for i, fake in enumerate(fakes) for r in fake.received if r.path.startswith("/v1/")
                   and r.method == "POST")
    return [i for _, i in calls]


@pytest_twisted.ensureDeferred
async def test_a_long_prompt_goes_to_the_host_whose_context_holds_it(pair, start_gateway, tmp_path):
    pair[0].contexts, pair[1].contexts = {QWEN: 4096}, {QWEN: 32768}
    gateway = fleet(start_gateway, tmp_path, pair)
    long = "word " * 6000  # 30,000 characters: about 10,000 tokens
    for i in range(3):
        assert (await gateway.post_chat(chat(f"{i} {long}"))).status == 200
    assert served_by(pair) == [1, 1, 1]
    # The Responses API with no output limit of its own: the host where the output has the most room.
    reply = await call("POST", gateway.url + "/v1/responses", {"model": QWEN, "input": "x" * 6000})
    assert reply.status == 200 and served_by(pair)[-1] == 1
    # Short calls go to both (by load and conversation), the small host's output limit kept to its context.
    for i in range(8):
        assert (await gateway.post_chat(chat(f"short {i}", max_tokens=100))).status == 200
    assert set(served_by(pair)[4:]) == {0, 1}


@pytest_twisted.ensureDeferred
async def test_a_prompt_no_host_can_hold_is_a_400_before_any_upstream_call(pair, start_gateway, tmp_path):
    pair[0].contexts, pair[1].contexts = {QWEN: 4096}, {QWEN: 32768}
    gateway = fleet(start_gateway, tmp_path, pair)
    await call("GET", gateway.url + "/v1/models")
    for fake in pair:
        fake.received.clear()
    huge = "word " * 24000  # 120,000 characters: about 40,000 tokens
    reply = await gateway.post_chat(chat(huge))
    assert reply.status == 400 and reply.error["code"] == "context_length_exceeded"
    assert "32768" in reply.error["message"] and reply.error["param"] == "messages"
    anthropic = await call("POST", gateway.url + "/v1/messages", {
        "model": QWEN, "max_tokens": 100, "messages": [{"role": "user", "content": huge}]})
    assert anthropic.status == 400 and anthropic.json()["type"] == "error"
    assert anthropic.json()["error"]["type"] == "invalid_request_error"
    assert anthropic.json()["error"]["message"].startswith("prompt is too long")  # what Claude Code compacts on
    assert [r.path for fake in pair for r in fake.received] == []


@pytest_twisted.ensureDeferred
async def test_one_host_refuses_a_prompt_beyond_its_context_and_does_not_count_image_data(fake, start_gateway):
    fake.models, fake.native_types, fake.native_versions = [QWEN], {QWEN: "vlm"}, ("v1",)
    fake.contexts = {QWEN: 4096}
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url})
    reply = await gateway.post_chat(chat("word " * 3000))  # 15,000 characters: about 5,000 tokens
    assert reply.status == 400 and reply.error["code"] == "context_length_exceeded" and "4096" in reply.error["message"]
    assert not [r for r in fake.received if r.path == "/v1/chat/completions"]
    picture = [{"type": "text", "text": "What is in this picture?"}, {"type": "image_url", "image_url": {"url": PIXEL}}]
    reply = await gateway.post_chat({"model": QWEN, "messages": [{"role": "user", "content": picture}]})
    assert reply.status == 200


@pytest_twisted.ensureDeferred
async def test_tools_go_to_a_host_whose_model_was_trained_for_them_and_images_to_one_with_vision(
        pair, start_gateway, tmp_path):
    pair[0].no_tools = {QWEN}  # host0's copy says it was not trained for tool use
    gateway = fleet(start_gateway, tmp_path, pair)
    for i in range(4):
        assert (await gateway.post_chat(chat(f"weather {i}?", tools=[TOOL]))).status == 200
    assert served_by(pair) == [1, 1, 1, 1]
    for i in range(6):  # without tools, either host
        assert (await gateway.post_chat(chat(f"hello {i}"))).status == 200
    assert set(served_by(pair)[4:]) == {0, 1}

    pair[0].no_tools, pair[0].native_types = set(), {QWEN: "vlm"}  # now host0 alone has vision
    await call("GET", gateway.url + "/health")  # (the hosts' lists are read again)
    picture = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": PIXEL}}]
    for _ in range(3):
        reply = await gateway.post_chat({"model": QWEN, "messages": [{"role": "user", "content": picture}]})
        assert reply.status == 200
    assert served_by(pair)[-3:] == [0, 0, 0]


@pytest_twisted.ensureDeferred
async def test_when_no_host_says_it_has_the_capability_the_call_is_passed_on(pair, start_gateway, tmp_path):
    for fake in pair:
        fake.no_tools = {QWEN}  # (some chat templates call tools without the flag)
    gateway = fleet(start_gateway, tmp_path, pair)
    reply = await gateway.post_chat(chat("weather?", tools=[TOOL]))
    assert reply.status == 200 and reply.json()["choices"][0]["message"]["tool_calls"]


@pytest_twisted.ensureDeferred
async def test_a_tool_schema_with_a_property_named_type_is_estimated_not_a_500(fake, start_gateway):
    """Claude Code's tools have properties named "type" (an object where the estimate looks for a type name)."""
    fake.models, fake.native_types, fake.native_versions = [QWEN], {QWEN: "llm"}, ("v1",)
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url})
    schema = {"type": "object", "properties": {"type": {"type": "string", "enum": ["file", "dir"]}}}
    reply = await call("POST", gateway.url + "/v1/messages", {
        "model": QWEN, "max_tokens": 50, "messages": [{"role": "user", "content": "list the files"}],
        "tools": [{"name": "list", "description": "List entries", "input_schema": schema}]})
    assert reply.status == 200, reply.body
