"""The Responses API and Anthropic's Messages API served through chat completions, for upstreams that lack them
(llama.cpp, older LM Studio, OpenAI for /v1/messages), read by the official SDKs' own parsers."""

from __future__ import annotations

import json

import anthropic
import pytest
import pytest_twisted
from openai import OpenAI
from twisted.internet.threads import deferToThread

from .conftest import call, named_events, raw_connect, raw_post
from .test_tracing import collector  # noqa: F401 (a fixture)

MODEL = "qwen2.5-7b-instruct"
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@pytest.fixture
def chat_only(fake, start_gateway):
    """A gateway in front of a fake LM Studio that serves chat completions and not the two typed-event APIs."""
    fake.chat_only = True
    return start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url, "INFERENCE_INFERENCE_HTTP_TIMEOUT_SECS": "2"})


@pytest.fixture
def mock(start_gateway):
    return start_gateway({"INFERENCE_INFERENCE_PROVIDER": "mock"})


def openai_client(url: str) -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def anthropic_client(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)


def chat_calls(fake) -> list:
    return [r.body for r in fake.received if r.path == "/v1/chat/completions"]


# -- the Responses API ---------------------------------------------------------------------------------------------

def responses_round_trip(client: OpenAI, model: str) -> dict:
    """A text answer, a stream read by ``responses.stream`` (the SDK's accumulator) and by ``create(stream=True)``."""
    answer = client.responses.create(model=model, instructions="Be brief.", max_output_tokens=50,
                                     input=[{"role": "developer", "content": "Use French."},
                                            {"role": "user", "content": [{"type": "input_text",
                                                                          "text": "tell me a story"}]}])
    with client.responses.stream(model=model, input="hello there") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    kinds = [event.type for event in client.responses.create(model=model, input="one two", stream=True)]
    return {"answer": answer, "deltas": deltas, "final": final, "kinds": kinds}


@pytest_twisted.ensureDeferred
async def test_the_openai_sdk_reads_responses_translated_from_chat(fake, chat_only):
    got = await deferToThread(responses_round_trip, openai_client(chat_only.url), "qwen")
    answer, final = got["answer"], got["final"]
    assert answer.output_text == "echo: tell me a story" and answer.status == "completed" and answer.model == MODEL
    assert answer.usage.input_tokens == 12 and answer.usage.output_tokens == 3 and answer.id.startswith("resp_")
    assert "".join(got["deltas"]) == "echo: hello there" == final.output_text
    assert final.usage.output_tokens == 3 and final.status == "completed"
    assert got["kinds"] == ["response.created", "response.in_progress", "response.output_item.added",
                            "response.content_part.added", *["response.output_text.delta"] * 3,
                            "response.output_text.done", "response.content_part.done", "response.output_item.done",
                            "response.completed"]
    first = chat_calls(fake)[0]
    assert first["messages"] == [{"role": "system", "content": "Be brief."},
                                 {"role": "system", "content": "Use French."},
                                 {"role": "user", "content": [{"type": "text", "text": "tell me a story"}]}]
    assert first["max_tokens"] == 50 and "input" not in first and "instructions" not in first
    assert chat_calls(fake)[1]["stream_options"] == {"include_usage": True}  # so usage reaches response.completed


def responses_tool_loop(client: OpenAI, model: str) -> dict:
    """The model calls a function; its result goes back as a function_call_output; streamed, the call's arguments
    arrive as deltas."""
    tools = [{"type": "function", "name": "get_weather", "description": "The weather in a city",
              "parameters": WEATHER}]
    first = client.responses.create(model=model, input="weather in Paris", tools=tools, tool_choice="required")
    calls = [item for item in first.output if item.type == "function_call"]
    follow_up = [{"role": "user", "content": "weather in Paris"}, *[c.model_dump() for c in calls],
                 {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny, 21C"}]
    second = client.responses.create(model=model, input=follow_up, tools=tools)
    with client.responses.stream(model=model, input="weather in Rome", tools=tools) as stream:
        argument_deltas = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        streamed = stream.get_final_response()
    return {"calls": calls, "second": second, "argument_deltas": argument_deltas, "streamed": streamed}


@pytest_twisted.ensureDeferred
async def test_function_calls_go_both_ways_through_chat(fake, chat_only):
    got = await deferToThread(responses_tool_loop, openai_client(chat_only.url), "qwen")
    (called,) = got["calls"]
    assert called.name == "get_weather" and json.loads(called.arguments) == {"echo": "weather in Paris"}
    assert called.call_id == "call_fake1" and got["second"].output_text == "echo: sunny, 21C"
    assert len(got["argument_deltas"]) == 2  # the chat stream's two pieces, relayed as they came
    (streamed,) = got["streamed"].output
    assert streamed.type == "function_call" and json.loads(streamed.arguments) == {"echo": "weather in Rome"}
    sent = chat_calls(fake)
    assert sent[0]["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city", "parameters": WEATHER}}]
    assert sent[0]["tool_choice"] == "required"
    assert sent[1]["messages"][1:] == [
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_fake1", "type": "function", "function": {
            "name": "get_weather", "arguments": called.arguments}}]},
        {"role": "tool", "tool_call_id": "call_fake1", "content": "sunny, 21C"}]


@pytest_twisted.ensureDeferred
async def test_the_mock_serves_responses_and_function_calls(mock):
    got = await deferToThread(responses_round_trip, openai_client(mock.url), "mock-model")
    assert got["answer"].output_text == "You said: tell me a story"
    assert got["final"].output_text == "You said: hello there"
    loop = await deferToThread(responses_tool_loop, openai_client(mock.url), "mock-model")
    (called,) = loop["calls"]
    assert called.name == "get_weather" and json.loads(called.arguments) == {"city": "weather in Paris"}
    assert loop["second"].output_text == "The tool said: sunny, 21C"
    assert json.loads(loop["streamed"].output[0].arguments) == {"city": "weather in Rome"}
    assert "".join(loop["argument_deltas"]) == loop["streamed"].output[0].arguments


@pytest_twisted.ensureDeferred
async def test_reasoning_streams_as_a_reasoning_item_before_the_message(fake, chat_only):
    fake.chat.stream = "reasoning"

    def stream() -> object:
        with openai_client(chat_only.url).responses.stream(model="qwen", input="hi") as events:
            return events.get_final_response()

    final = await deferToThread(stream)
    reasoning, message = final.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == "let me think"
    assert message.type == "message" and final.output_text == "echo: hi"


@pytest.mark.parametrize("body, param", [
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]}]},
     "input[0].content[0]"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ({"input": "x", "text": {"format": {"type": "grammar"}}}, "text.format"),
])
@pytest_twisted.ensureDeferred
async def test_what_chat_cannot_carry_is_a_400_naming_the_field(fake, chat_only, body, param):
    reply = await call("POST", chat_only.url + "/v1/responses", {"model": MODEL, **body})
    assert reply.status == 400 and reply.error["param"] == param and reply.error["type"] == "invalid_request_error"
    assert not chat_calls(fake)


@pytest_twisted.ensureDeferred
async def test_a_chat_failure_mid_stream_is_the_responses_apis_error_event(fake, chat_only):
    fake.chat.stream = "error_event"
    reply = await call("POST", chat_only.url + "/v1/responses", {"model": MODEL, "input": "a b c", "stream": True})
    assert reply.status == 200 and "[DONE]" not in reply.body.decode()
    names = [name for name, _ in named_events(reply.body)]
    at = names.index("error")  # the spec's ending: the error, the open item closed as cut short, response.failed
    assert names[at - 1] == "response.output_text.delta" and names[at + 1:] == [
        "response.output_text.done", "response.content_part.done", "response.output_item.done", "response.failed"]
    events = [event for _, event in named_events(reply.body)]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert "model crashed" in events[at]["message"] and events[at + 3]["item"]["status"] == "incomplete"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and "model crashed" in failed["error"]["message"]
    assert failed["output"][0]["content"][0]["text"] == "echo: a"  # what was generated before, kept

    def final() -> object:  # the SDK's accumulator ends the stream as failed, with what was generated
        with openai_client(chat_only.url).responses.stream(model=MODEL, input="a b c") as stream:
            for event in stream:
                if event.type == "response.failed":
                    return event.response
        return None

    response = await deferToThread(final)
    assert response.status == "failed" and response.output[0].content[0].text == "echo: a"


# -- Anthropic's Messages API --------------------------------------------------------------------------------------

def messages_round_trip(client: anthropic.Anthropic, model: str) -> dict:
    answer = client.messages.create(model=model, max_tokens=50, system=[{"type": "text", "text": "Be brief."}],
                                    stop_sequences=["END"], messages=[
                                        {"role": "user", "content": "tell me a story"}])
    with client.messages.stream(model=model, max_tokens=50, messages=[
            {"role": "user", "content": [{"type": "text", "text": "hello there"}]}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    return {"answer": answer, "text": text, "final": final}


@pytest_twisted.ensureDeferred
async def test_the_anthropic_sdk_reads_messages_translated_from_chat(fake, chat_only):
    got = await deferToThread(messages_round_trip, anthropic_client(chat_only.url), "qwen")
    answer, final = got["answer"], got["final"]
    assert answer.content[0].text == "echo: tell me a story" and answer.stop_reason == "end_turn"
    assert answer.usage.input_tokens == 12 and answer.usage.output_tokens == 3 and answer.id.startswith("msg_")
    assert got["text"] == "echo: hello there" and final.stop_reason == "end_turn"
    assert final.usage.input_tokens == 12 and final.usage.output_tokens == 3  # from message_delta
    first = chat_calls(fake)[0]
    assert first["messages"] == [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "tell me a story"}]
    assert first["max_tokens"] == 50 and first["stop"] == ["END"] and "stop_sequences" not in first


def messages_tool_loop(client: anthropic.Anthropic, model: str) -> dict:
    tools = [{"name": "get_weather", "description": "The weather in a city", "input_schema": WEATHER}]
    ask = {"role": "user", "content": "weather in Paris"}
    first = client.messages.create(model=model, max_tokens=50, tools=tools, messages=[ask],
                                   tool_choice={"type": "any", "disable_parallel_tool_use": True})
    (use,) = [block for block in first.content if block.type == "tool_use"]
    second = client.messages.create(model=model, max_tokens=50, tools=tools, messages=[
        ask, {"role": "assistant", "content": [block.model_dump() for block in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 21C"}]}])
    with client.messages.stream(model=model, max_tokens=50, tools=tools, messages=[
            {"role": "user", "content": "weather in Rome"}]) as stream:
        partial = [e.partial_json for e in stream if e.type == "input_json"]
        streamed = stream.get_final_message()
    return {"first": first, "use": use, "second": second, "partial": partial, "streamed": streamed}


@pytest_twisted.ensureDeferred
async def test_tool_use_goes_both_ways_through_chat(fake, chat_only):
    got = await deferToThread(messages_tool_loop, anthropic_client(chat_only.url), "qwen")
    use = got["use"]
    assert got["first"].stop_reason == "tool_use" and use.name == "get_weather"
    assert use.input == {"echo": "weather in Paris"} and use.id == "toolu_fake1"
    assert got["second"].content[0].text == "echo: sunny, 21C" and got["second"].stop_reason == "end_turn"
    (streamed,) = got["streamed"].content
    assert streamed.type == "tool_use" and streamed.input == {"echo": "weather in Rome"} and len(got["partial"]) == 2
    assert got["streamed"].stop_reason == "tool_use"
    sent = chat_calls(fake)
    assert sent[0]["tool_choice"] == "required" and sent[0]["parallel_tool_calls"] is False
    assert sent[0]["tools"][0]["function"]["parameters"] == WEATHER
    assert sent[1]["messages"][1:] == [
        {"role": "assistant", "content": "", "tool_calls": [{"id": "toolu_fake1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"echo": "weather in Paris"})}}]},
        {"role": "tool", "tool_call_id": "toolu_fake1", "content": "sunny, 21C"}]


@pytest_twisted.ensureDeferred
async def test_the_mock_serves_messages_and_tool_use(mock):
    got = await deferToThread(messages_round_trip, anthropic_client(mock.url), "mock-model")
    assert got["answer"].content[0].text == "You said: tell me a story" and got["text"] == "You said: hello there"
    loop = await deferToThread(messages_tool_loop, anthropic_client(mock.url), "mock-model")
    assert loop["use"].input == {"city": "weather in Paris"}
    assert loop["second"].content[0].text == "The tool said: sunny, 21C"
    assert loop["streamed"].content[0].input == {"city": "weather in Rome"}


@pytest_twisted.ensureDeferred
async def test_images_reach_chat_as_image_parts(fake, chat_only):
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    reply = await call("POST", chat_only.url + "/v1/messages", {
        "model": MODEL, "max_tokens": 10,
        "messages": [{"role": "user", "content": [image, {"type": "text", "text": "what is it"}]}]})
    assert reply.status == 200
    (sent,) = chat_calls(fake)
    assert sent["messages"][0]["content"] == [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                                        "iVBORw0KGgo="}},
                                              {"type": "text", "text": "what is it"}]


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}]},
     "messages[0].content[0].source"),
    ({"tool_choice": {"type": "sometimes"}}, "tool_choice"),
])
@pytest_twisted.ensureDeferred
async def test_what_chat_cannot_carry_is_an_anthropic_400(fake, chat_only, body, param):
    request = {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}], **body}
    reply = await call("POST", chat_only.url + "/v1/messages", request)
    assert reply.status == 400 and reply.json() == {"type": "error", "request_id": reply.json()["request_id"],
                                                    "error": {"type": "invalid_request_error",
                                                              "message": reply.json()["error"]["message"]}}
    assert f"'{param}'" in reply.json()["error"]["message"]  # Anthropic's errors have no param: the text names it
    assert not chat_calls(fake)


@pytest.mark.parametrize("route, body", [
    ("/v1/messages", {"max_tokens": 10, "messages": [{"role": "user", "content": "one two"}]}),
    ("/v1/responses", {"input": "one two"}),
])
@pytest_twisted.ensureDeferred
async def test_a_chat_stream_without_usage_invents_no_prompt_count(fake, chat_only, access_events, route, body):
    fake.chat.stream = "no_usage"  # llama.cpp's Python server
    reply = await call("POST", chat_only.url + route, {"model": MODEL, "stream": True, **body})
    assert reply.status == 200
    line = access_events[0]
    assert (line["input_tokens"], line["output_tokens"], line["via"]) == (None, 3, "/v1/chat/completions")
    m = await chat_only.metrics()
    labels = {"operation": route.rpartition("/")[2], "provider": "lmstudio", "model": MODEL}
    assert m.value("inference_tokens_total", **labels, type="input") is None
    assert m.value("inference_tokens_total", **labels, type="output") == 3


@pytest_twisted.ensureDeferred
async def test_a_chat_stream_cut_short_is_anthropics_error_event(fake, chat_only):
    fake.chat.stream = "die"
    reply = await call("POST", chat_only.url + "/v1/messages", {
        "model": MODEL, "max_tokens": 10, "stream": True, "messages": [{"role": "user", "content": "a b c"}]})
    name, error = named_events(reply.body)[-1]
    assert reply.status == 200 and name == "error" and error["type"] == "error"
    assert "message_stop" not in reply.body.decode()


@pytest.mark.parametrize("route, body", [
    ("/v1/messages", {"max_tokens": 10, "messages": [{"role": "user", "content": "a b c"}]}),
    ("/v1/responses", {"input": "a b c"}),
])
def test_a_translated_stream_that_times_out_ends_as_a_passthrough_one_does(fake, in_memory, route, body):
    """Both endings are built from the one error: the timeout's type (Anthropic's ``timeout_error``) and code
    (``upstream_timeout``) reach the client whichever path served it."""
    fake.chat_only = True
    fake.chat.stream = "stall"
    gateway = in_memory({"INFERENCE_INFERENCE_HTTP_TIMEOUT_SECS": "5"})
    pending = gateway.send("POST", route, {"model": MODEL, "stream": True, **body})
    gateway.settle()
    assert not gateway.answered(pending)
    gateway.advance(5)
    reply = gateway.result(pending)
    events = named_events(reply.body)
    assert reply.status == 200
    if route == "/v1/messages":
        name, error = events[-1]
        assert name == "error" and error["error"]["type"] == "timeout_error" and "5" in error["error"]["message"]
    else:
        names = [name for name, _ in events]
        error, (last, failed) = events[names.index("error")][1], events[-1]
        assert error["code"] == "upstream_timeout"
        assert last == "response.failed" and failed["response"]["error"]["code"] == "server_error"
        assert failed["response"]["output"][0]["content"][0]["text"].startswith("echo:")  # what came, kept


# -- which path served a call --------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_missing_route_is_remembered_and_the_call_is_marked_translated(fake, chat_only, access_events):
    for _ in range(2):
        reply = await call("POST", chat_only.url + "/v1/responses", {"model": MODEL, "input": "hi"})
        assert reply.status == 200 and reply.json()["output"][0]["content"][0]["text"] == "echo: hi"
    assert [r.path for r in fake.received if r.method == "POST"] == [
        "/v1/responses", "/v1/chat/completions", "/v1/chat/completions"]  # asked once, then straight to chat
    assert [e.get("via") for e in access_events] == ["/v1/chat/completions"] * 2
    m = await chat_only.metrics()
    labels = {"operation": "responses", "provider": "lmstudio", "model": MODEL}
    assert m.value("inference_tokens_total", **labels, type="input") == 24
    assert m.value("inference_request_duration_seconds_count", **labels, stream="false", outcome="success") == 2


@pytest_twisted.ensureDeferred
async def test_the_route_is_asked_again_after_models_cache_secs(fake, start_gateway):
    fake.chat_only = True
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url, "INFERENCE_INFERENCE_MODELS_CACHE_SECS": "0"})
    for _ in range(2):
        assert (await call("POST", gateway.url + "/v1/messages", {
            "model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})).status == 200
    fake.chat_only = False  # LM Studio was upgraded
    reply = await call("POST", gateway.url + "/v1/messages", {
        "model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    assert reply.json()["id"] == "msg_fake123"  # LM Studio's own answer
    assert [r.path for r in fake.received if r.method == "POST"] == [
        "/v1/messages", "/v1/chat/completions", "/v1/messages", "/v1/chat/completions", "/v1/messages"]


@pytest_twisted.ensureDeferred
async def test_spans_say_whether_the_call_was_translated(fake, start_gateway, collector):  # noqa: F811
    fake.chat_only = True
    gateway = start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.url,
                             "INFERENCE_OBSERVABILITY_TRACING_EXPORTER": "otlp",
                             "INFERENCE_OBSERVABILITY_TRACING_ENDPOINT": collector.grpc_endpoint})
    await call("POST", gateway.url + "/v1/responses", {"model": MODEL, "input": "hi", "stream": True})
    fake.chat_only = False
    await call("POST", gateway.url + "/v1/messages", {"model": MODEL, "max_tokens": 5,
                                                      "messages": [{"role": "user", "content": "hi"}]})
    await gateway.site.gateway.telemetry.tracing.flush()
    await collector.wait_for(lambda spans: len(collector.named(f"chat {MODEL}")) >= 2)
    translated, native = collector.named(f"chat {MODEL}")
    assert translated.attributes["inference.api"] == "responses"
    assert translated.attributes["inference.api.translated"] is True
    assert translated.attributes["gen_ai.usage.output_tokens"] == 2  # from the translated response.completed
    assert native.attributes["inference.api"] == "messages" and native.attributes["inference.api.translated"] is False


@pytest_twisted.ensureDeferred
async def test_a_client_leaving_a_translated_stream_aborts_the_upstream(fake, chat_only):
    fake.chat.stream = "stall"
    client = await raw_connect(chat_only.port.getHost().port)
    closed = fake.next_close()
    client.transport.write(raw_post("/v1/messages", json.dumps({
        "model": MODEL, "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "a b c"}]}).encode()))
    await client.received(b"content_block_delta")  # the chat stream's first words, translated
    client.transport.loseConnection()
    await closed  # the gateway closed its upstream request
