"""Translated answers are what the APIs' specs say: every event and final object of each case, served through chat
completions, validates against the official SDKs' types in strict mode (right types, no field the type lacks),
and the streams replayed through the SDKs' own accumulators end with the answer the client would get whole."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest
import pytest_twisted
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from openai import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent

from .conftest import call, named_events

MODEL = "qwen2.5-7b-instruct"
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
IMAGE = "data:image/png;base64,iVBORw0KGgo="


def strict(kind: Any, value: dict[str, Any]) -> Any:
    """``value`` read as the SDK type ``kind`` in pydantic's strict mode; no field may be one the type lacks."""
    parsed = pydantic.TypeAdapter(kind).validate_python(value, strict=True)
    _no_extra(parsed, kind)
    return parsed


def _no_extra(model: Any, where: Any) -> None:
    if isinstance(model, pydantic.BaseModel):
        assert not model.__pydantic_extra__, f"{type(model).__name__} has fields its type lacks: " \
                                             f"{sorted(model.__pydantic_extra__)}"
        for name in type(model).model_fields:
            _no_extra(getattr(model, name), where)
    elif isinstance(model, list):
        for item in model:
            _no_extra(item, where)


# -- the Responses API ---------------------------------------------------------------------------------------------

TOOLS = [{"type": "function", "name": "get_weather", "parameters": WEATHER},
         {"type": "function", "name": "get_time", "parameters": WEATHER}]
CALLED = [{"type": "function_call", "call_id": "call_fake1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
          {"type": "function_call_output", "call_id": "call_fake1", "output": "sunny"}]
RESPONSES_CASES = {
    "text": ({"input": "hello there"}, {}),
    "max tokens": ({"input": "one two three four", "max_output_tokens": 2}, {}),
    "tool call": ({"input": "weather in Paris", "tools": TOOLS[:1]}, {}),
    "tool result": ({"input": [{"role": "user", "content": "weather in Paris"}, *CALLED], "tools": TOOLS[:1]}, {}),
    "parallel calls": ({"input": "weather and time in Paris", "tools": TOOLS}, {"parallel_calls": True}),
    "reasoning": ({"input": "think first"}, {"stream": "reasoning"}),
    "image": ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "what is it"},
                                                      {"type": "input_image", "image_url": IMAGE}]}]}, {}),
    "mid-stream failure": ({"input": "a b c"}, {"stream": "error_event"}),
    "namespace call": ({"input": "weather in Paris", "tools": [
        {"type": "namespace", "name": "meteo", "description": "Weather tools", "tools": TOOLS[:1]}]}, {}),
    "custom tool call": ({"input": "patch it", "tools": [
        {"type": "custom", "name": "apply_patch", "description": "Apply a patch"}]}, {}),
    "hosted tool dropped": ({"input": "hello", "tools": [{"type": "web_search"}]}, {}),
}


def misbehave(fake, how: dict[str, Any]) -> None:
    fake.chat_only = True
    fake.parallel_calls = how.get("parallel_calls", False)
    fake.chat.stream = how.get("stream", "normal")
    if fake.chat.stream == "reasoning":  # the whole answer reasons too
        fake.chat.extra_message_fields = {"reasoning_content": "let me think"}


@pytest.mark.parametrize("case", RESPONSES_CASES)
@pytest_twisted.ensureDeferred
async def test_responses_events_and_answers_are_the_spec(fake, lmstudio, case):
    body, how = RESPONSES_CASES[case]
    misbehave(fake, how)
    request = {"model": MODEL, **body}
    streamed = await call("POST", lmstudio.url + "/v1/responses", {**request, "stream": True})
    assert streamed.status == 200
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=body.get("tools", []), text_format=omit)
    final = None
    for name, event in named_events(streamed.body):
        assert name == event["type"]
        parsed = strict(ResponseStreamEvent, event)
        state.handle_event(parsed)
        if name in ("response.completed", "response.incomplete", "response.failed"):
            final = strict(Response, event["response"])
    assert final is not None
    snapshot = state._ResponseStreamState__current_snapshot  # type: ignore[attr-defined]  # the accumulator's own
    assert _said(snapshot.output) == _said(final.output)  # what the accumulator built from the deltas is the answer
    if case == "mid-stream failure":
        assert final.status == "failed" and final.output[0].status == "incomplete"
        return
    whole = await call("POST", lmstudio.url + "/v1/responses", request)
    assert whole.status == 200
    answer = strict(Response, whole.json())
    assert [i.type for i in answer.output] == [i.type for i in final.output] and answer.status == final.status
    assert answer.output_text == final.output_text
    if case == "max tokens":
        assert answer.status == "incomplete" and answer.output[-1].status == "incomplete"
        assert answer.incomplete_details.reason == "max_output_tokens"
    if case == "parallel calls":
        assert [i.name for i in answer.output] == ["get_weather", "get_time"]
    if case == "reasoning":
        assert answer.output[0].type == "reasoning" and answer.usage.output_tokens == 3
    if case == "namespace call":
        assert (answer.output[0].namespace, answer.output[0].name) == ("meteo", "get_weather")
    if case == "custom tool call":
        assert answer.output[0].type == "custom_tool_call" and answer.output[0].input == '{"echo": "patch it"}'
    if case == "hosted tool dropped":
        assert answer.output_text == "echo: hello"


def _said(output: list[Any]) -> list[Any]:
    """The text and the calls of output items (what the SDK's accumulator builds from the deltas)."""
    return [(item.type, [getattr(part, "text", None) for part in item.content] if item.type == "message" else
             getattr(item, "arguments", None)) for item in output if item.type != "reasoning"]


@pytest_twisted.ensureDeferred
async def test_a_responses_error_before_the_stream_is_the_apis_error(fake, lmstudio):
    fake.chat_only = True
    fake.chat.mode, fake.chat.status, fake.chat.message = "error_object", 400, "bad things"
    reply = await call("POST", lmstudio.url + "/v1/responses", {"model": MODEL, "input": "x", "stream": True})
    assert reply.status == 400 and reply.error["message"] == "bad things"


# -- Anthropic's Messages API --------------------------------------------------------------------------------------

ANTHROPIC_WEATHER = {"name": "get_weather", "input_schema": WEATHER}
USED = [{"role": "user", "content": "weather in Paris"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_fake1", "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_fake1", "content": "sunny"}]}]
MESSAGES_CASES = {
    "text": ({"messages": [{"role": "user", "content": "hello there"}]}, {}),
    "max tokens": ({"messages": [{"role": "user", "content": "one two three four"}], "max_tokens": 2}, {}),
    "tool call": ({"messages": [{"role": "user", "content": "weather in Paris"}], "tools": [ANTHROPIC_WEATHER]}, {}),
    "tool result": ({"messages": USED, "tools": [ANTHROPIC_WEATHER]}, {}),
    "parallel calls": ({"messages": [{"role": "user", "content": "weather and time"}],
                        "tools": [ANTHROPIC_WEATHER, {**ANTHROPIC_WEATHER, "name": "get_time"}]},
                       {"parallel_calls": True}),
    "reasoning": ({"messages": [{"role": "user", "content": "think first"}]}, {"stream": "reasoning"}),
    "image": ({"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "text", "text": "what is it"}]}]}, {}),
    "system turns": ({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "Be brief."}]},
                     {}),
}


@pytest.mark.parametrize("case", MESSAGES_CASES)
@pytest_twisted.ensureDeferred
async def test_messages_events_and_answers_are_the_spec(fake, lmstudio, case):
    body, how = MESSAGES_CASES[case]
    misbehave(fake, how)
    request = {"model": MODEL, "max_tokens": 50, **body}
    streamed = await call("POST", lmstudio.url + "/v1/messages", {**request, "stream": True})
    assert streamed.status == 200
    snapshot, buffers = None, {}
    for name, event in named_events(streamed.body):
        assert name == event["type"]
        parsed = strict(RawMessageStreamEvent, event)
        snapshot = accumulate_event(event=parsed, current_snapshot=snapshot, json_bufs=buffers)
    assert snapshot is not None
    whole = await call("POST", lmstudio.url + "/v1/messages", request)
    assert whole.status == 200 and whole.header(b"request-id")
    answer = strict(Message, whole.json())
    streamed_answer = snapshot.model_dump(exclude={"id"})
    whole_answer = answer.model_dump(exclude={"id"})
    for block in streamed_answer["content"] + whole_answer["content"]:
        block.pop("id", None)  # each answer names its calls anew
    assert streamed_answer["content"] == whole_answer["content"]
    assert streamed_answer["stop_reason"] == whole_answer["stop_reason"]
    assert snapshot.usage.input_tokens == answer.usage.input_tokens  # the prompt's count, from message_delta
    for block in answer.content:
        if block.type == "tool_use":
            assert block.id.startswith("toolu_")
        if block.type == "thinking":
            assert block.signature
    if case == "max tokens":
        assert answer.stop_reason == "max_tokens"
    if case == "parallel calls":
        assert [b.name for b in answer.content] == ["get_weather", "get_time"]


@pytest_twisted.ensureDeferred
async def test_a_messages_stream_that_fails_midway_ends_with_anthropics_error(fake, lmstudio):
    misbehave(fake, {"stream": "error_event"})
    reply = await call("POST", lmstudio.url + "/v1/messages", {
        "model": MODEL, "max_tokens": 50, "stream": True, "messages": [{"role": "user", "content": "a b c"}]})
    events = named_events(reply.body)
    for _, event in events[:-1]:
        strict(RawMessageStreamEvent, event)
    name, error = events[-1]
    assert name == "error" and set(error) == {"type", "error"} and error["error"]["type"] == "api_error"
    assert "model crashed" in error["error"]["message"]
