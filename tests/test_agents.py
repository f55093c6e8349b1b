"""Coding agents unmodified: requests recorded from Claude Code and Codex CLI, replayed through the gateway over an
upstream that serves their APIs natively, one that serves chat completions only, and one that behaves like
llama-cpp-python's server (the quirks of tests/fakes/lmstudio.py ``like_llama_cpp_python``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from .conftest import call, named_events
from .test_tracing import collector, spans_of  # noqa: F401 (a fixture)

FIXTURES = Path(__file__).parent / "fixtures" / "agents"
MODEL = "qwen2.5-7b-instruct"


def recorded(name: str, **changes: Any) -> tuple[str, dict[str, str], dict[str, Any]]:
    """A request an agent sent (path, the headers that matter, body), for the fake's model."""
    fixture = json.loads((FIXTURES / f"{name}.json").read_text())
    return fixture["path"], fixture["headers"], {**fixture["body"], "model": MODEL, **changes}


def upstream(fake, mode: str):
    if mode == "chat-only":
        fake.chat_only = True
    elif mode == "llama-cpp-python":
        fake.like_llama_cpp_python()
    return fake


async def replay(gateway, name: str, **changes: Any) -> tuple[dict[str, Any], Any]:
    path, headers, body = recorded(name, **changes)
    reply = await call("POST", gateway.url + path, body, headers={**headers, "x-api-key": "unused"})
    return body, reply


def chat_calls(fake) -> list[dict[str, Any]]:
    return [r.body for r in fake.received if r.path == "/v1/chat/completions"]


MODES = ["native", "chat-only", "llama-cpp-python"]


# -- Claude Code ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["claude_code_turn1", "claude_code_turn2", "claude_code_plan_turn2"])
@pytest_twisted.ensureDeferred
async def test_a_claude_code_turn_is_answered_as_anthropics_stream(fake, start_gateway, mode, name):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": upstream(fake, mode).url})
    body, reply = await replay(gateway, name)
    assert reply.status == 200, reply.body
    names = [event for event, _ in named_events(reply.body)]
    assert names[0] == "message_start" and names[-1] == "message_stop" and "error" not in names
    if mode == "native":  # passed on as Claude Code sent it: system turns, thinking, context management
        (sent,) = [r for r in fake.received if r.path == "/v1/messages"]
        assert sent.body["messages"] == body["messages"] and sent.body["thinking"] == {"type": "adaptive"}
        assert sent.body["context_management"] == body["context_management"]
        assert "mid-conversation-system" in sent.headers["anthropic-beta"]
        return
    sent = chat_calls(fake)[-1]
    roles = [m["role"] for m in sent["messages"]]
    if mode == "chat-only":  # a system turn keeps its place
        assert roles[:3] == ["system", "user", "system"]
    else:  # the template refused it: folded into the user's turn, in a marked block
        assert roles.count("system") == 1 and roles[:2] == ["system", "user"]
        assert any("<system>\nAvailable agent types" in part.get("text", "") for m in sent["messages"]
                   if m["role"] == "user" and isinstance(m["content"], list) for part in m["content"])
    assert not any(m.get("content") is None for m in sent["messages"])  # tool-call turns say ""
    assert "thinking" not in sent and "context_management" not in sent and "output_config" not in sent


@pytest_twisted.ensureDeferred
async def test_a_refused_late_system_turn_is_remembered_for_the_model(fake, start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.like_llama_cpp_python().url})
    for _ in range(2):
        _, reply = await replay(gateway, "claude_code_turn2")
        assert reply.status == 200
    first, folded, second = chat_calls(fake)  # the first refused, then folded: asked again, and at once after
    assert [m["role"] for m in first["messages"]].count("system") == 2
    assert [m["role"] for m in folded["messages"]].count("system") == 1
    assert second["messages"] == folded["messages"]


@pytest_twisted.ensureDeferred
async def test_the_cap_lowers_claude_codes_output_limit(fake, start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url,
                             "INFERENCE_INFERENCE_LIMITS_MAX_OUTPUT_TOKENS": "4096"})
    body, reply = await replay(gateway, "claude_code_turn1")
    assert reply.status == 200 and body["max_tokens"] == 32000
    assert [r.body["max_tokens"] for r in fake.received if r.path == "/v1/messages"] == [4096]


@pytest_twisted.ensureDeferred
async def test_what_a_translated_call_leaves_out_is_named_on_its_span(fake, start_gateway, collector):  # noqa: F811
    fake.chat_only = True
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url, "INFERENCE_OBSERVABILITY_TRACING_EXPORTER":
                             "otlp", "INFERENCE_OBSERVABILITY_TRACING_ENDPOINT": collector.grpc_endpoint})
    _, reply = await replay(gateway, "claude_code_turn1")
    _, codex = await replay(gateway, "codex_get_goal_turn1")
    assert reply.status == 200 and codex.status == 200
    spans = await spans_of(gateway, collector, 4)
    dropped = [span.attributes.get("inference.translation.dropped") for span in spans if span.kind == "CLIENT"]
    assert sorted(map(tuple, dropped)) == [("thinking", "context_management", "output_config"), ("web_search",)]


# -- Codex CLI -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["codex_get_goal_turn1", "codex_get_goal_turn2", "codex_namespace_turn2"])
@pytest_twisted.ensureDeferred
async def test_a_codex_turn_is_answered_as_a_responses_stream(fake, start_gateway, mode, name):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": upstream(fake, mode).url})
    body, reply = await replay(gateway, name)
    assert reply.status == 200, reply.body
    events = named_events(reply.body)
    assert events[0][0] == "response.created" and events[-1][0] == "response.completed"
    if mode == "native":  # passed on as Codex sent it
        (sent,) = [r for r in fake.received if r.path == "/v1/responses"]
        assert sent.body["tools"] == body["tools"] and sent.body["store"] is False
        return
    sent = chat_calls(fake)[-1]
    names = [tool["function"]["name"] for tool in sent["tools"]]
    assert "multi_agent_v1__spawn_agent" in names and "get_goal" in names  # a namespace's functions, flattened
    assert all(tool["type"] == "function" for tool in sent["tools"])  # web_search left out
    assert sent["max_tokens"] == 32768  # Codex asks no limit: the Responses route fills in the cap
    assert not any(m.get("content") is None for m in sent["messages"])


@pytest.mark.parametrize("mode", ["chat-only", "llama-cpp-python"])
@pytest_twisted.ensureDeferred
async def test_a_namespaced_call_comes_back_with_its_namespace(fake, start_gateway, mode):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": upstream(fake, mode).url})
    _, reply = await replay(gateway, "codex_namespace_turn1", tool_choice={
        "type": "function", "namespace": "multi_agent_v1", "name": "close_agent"})
    assert reply.status == 200
    done = [event["item"] for name, event in named_events(reply.body) if name == "response.output_item.done"]
    assert [(item["type"], item["name"], item["namespace"]) for item in done] == [
        ("function_call", "close_agent", "multi_agent_v1")]
    assert chat_calls(fake)[-1]["tool_choice"] == {"type": "function",
                                                   "function": {"name": "multi_agent_v1__close_agent"}}


@pytest_twisted.ensureDeferred
async def test_hosted_tools_are_refused_when_the_operator_says_so(fake, start_gateway):
    fake.chat_only = True
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url,
                             "INFERENCE_INFERENCE_TRANSLATION_UNSUPPORTED_TOOLS": "reject"})
    _, codex = await replay(gateway, "codex_get_goal_turn1")
    assert codex.status == 400 and codex.error["param"] == "tools[8].type" and "web_search" in codex.error["message"]
    reply = await call("POST", gateway.url + "/v1/messages", {
        "model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "web_search_20250305", "name": "web_search"}]})
    assert reply.status == 400 and "'tools[0]'" in reply.json()["error"]["message"]
    assert not chat_calls(fake)


# -- llama-cpp-python's streamed tool calls ------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_tool_call_the_upstream_cannot_stream_is_asked_whole_and_streamed(fake, start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.like_llama_cpp_python().url})
    for _ in range(2):
        _, reply = await replay(gateway, "codex_get_goal_turn1")
        assert reply.status == 200
        events = named_events(reply.body)
        kinds = [name for name, _ in events]
        assert "response.function_call_arguments.done" in kinds and kinds[-1] == "response.completed"
        (call_item,) = [e["item"] for name, e in events if name == "response.output_item.done"]
        assert call_item["type"] == "function_call" and call_item["name"] == "exec_command"
    # The first stream came back empty and was asked again whole; the second was asked whole at once.
    assert [body.get("stream") for body in chat_calls(fake)] == [True, None, None]


@pytest_twisted.ensureDeferred
async def test_a_chat_client_streaming_a_tool_call_from_llama_cpp_python_gets_its_chunks(fake, start_gateway):
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.like_llama_cpp_python().url})
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    reply = await gateway.post_chat({"model": MODEL, "stream": True, "tools": tools,
                                     "messages": [{"role": "user", "content": "weather in Paris"}]})
    chunks = [json.loads(p) for p in reply.body.split(b"data: ")[1:] if not p.startswith(b"[DONE]")]
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks if c["choices"] and
             c["choices"][0]["delta"].get("tool_calls")]
    assert calls == [{"index": 0, "id": "call_fake1", "type": "function",
                      "function": {"name": "get_weather", "arguments": '{"echo": "weather in Paris"}'}}]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"
    assert reply.body.endswith(b"data: [DONE]\n\n")


# -- busy is not down ----------------------------------------------------------------------------------------------

def test_a_one_slot_upstream_busy_with_a_generation_is_not_called_down(fake, in_memory):
    fake.like_llama_cpp_python()
    gateway = in_memory({"INFERENCE_INFERENCE_HEALTH_CHECK_SECS": "0.05",
                         "INFERENCE_INFERENCE_HTTP_CONNECT_TIMEOUT_SECS": "0.2"})
    gateway.gateway.start()
    monitor = gateway.gateway.monitor
    gateway.settle()
    assert monitor.up is True
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "a long answer"}]}
    fake.chat.mode = "hang"
    running = gateway.send("POST", "/v1/chat/completions", chat)
    gateway.settle()
    assert len(fake.pending) == 1
    probes = sum(r.path == "/v1/models" for r in fake.received)
    gateway.advance(1)  # probes every 0.05 s, each waiting for the generation until its 0.2 s deadline
    assert sum(r.path == "/v1/models" for r in fake.received) >= probes + 2  # ... timed out: busy, not down
    assert monitor.up is True and gateway.call("GET", "/health/ready").status == 200
    side_call = gateway.send("POST", "/v1/chat/completions", chat)  # an agent's side call waits its turn
    gateway.settle()
    assert len(fake.pending) == 2
    fake.release()
    assert gateway.result(running).status == 200 and gateway.result(side_call).status == 200
    # With nothing in flight, a probe that times out means down.
    fake.chat.mode = "normal"
    fake.generating_elsewhere = True  # a generation another client asked: the list waits, and no call is in flight
    gateway.advance(1)
    assert monitor.up is False
    fake.generating_elsewhere = False
    fake.release()
    gateway.settle()


# -- the rest of what agents need ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest_twisted.ensureDeferred
async def test_the_root_says_what_this_server_is(lmstudio, method):
    reply = await call(method, lmstudio.url + "/")
    assert reply.status == 200 and reply.header(b"content-type") == b"application/json"
    if method == "GET":
        assert reply.json()["name"] == "inference" and "POST /v1/messages" in reply.json()["routes"]
    else:
        assert reply.body == b""


@pytest.mark.parametrize("asked, sent", [(None, 32768), (50, 50), (100000, 32768)])
@pytest_twisted.ensureDeferred
async def test_responses_calls_get_the_cap_chat_calls_keep_the_default(fake, lmstudio, asked, sent):
    fake.chat_only = True
    limit = {"max_output_tokens": asked} if asked else {}
    assert (await call("POST", lmstudio.url + "/v1/responses", {"model": MODEL, "input": "hi", **limit})).status == 200
    chat = {"max_tokens": asked} if asked else {}
    assert (await lmstudio.post_chat({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                      **chat})).status == 200
    translated, direct = chat_calls(fake)
    assert translated["max_tokens"] == sent and direct["max_tokens"] == (asked and sent or 100)


@pytest_twisted.ensureDeferred
async def test_the_cap_is_the_models_loaded_context_where_lm_studio_says_it(fake, lmstudio):
    fake.native_types = {MODEL: "llm"}
    fake.loaded_context = 8192
    reply = await call("POST", lmstudio.url + "/v1/responses", {"model": MODEL, "input": "hi",
                                                               "max_output_tokens": 20000})
    assert reply.status == 200
    assert [r.body["max_output_tokens"] for r in fake.received if r.path == "/v1/responses"] == [8192]


@pytest_twisted.ensureDeferred
async def test_an_empty_stream_from_a_prompt_too_long_is_not_taken_for_a_tool_call(fake, lmstudio):
    fake.chat.stream = "empty"  # LM Studio: an empty stream, and a whole answer that says the context overflows
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    for _ in range(2):
        reply = await lmstudio.post_chat({"model": MODEL, "stream": True, "tools": tools,
                                          "messages": [{"role": "user", "content": "a very long prompt"}]})
        error = json.loads(reply.body.split(b"data: ")[1])["error"]
        assert error["code"] == "context_length_exceeded" and "context length" in error["message"]
    assert [body.get("stream") for body in chat_calls(fake)] == [True, None, True, None]  # streamed again
