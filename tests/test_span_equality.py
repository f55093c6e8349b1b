"""Lean spans are the SDK's spans: the same calls through the gateway, traced by both at once, export the same bytes.

Each test drives an in-memory gateway whose tracer is a tee: every span the gateway starts is started in the lean
tracer and in the OpenTelemetry SDK's tracer (``tracing.implementation: sdk``) with the same arguments, the same
clock and ids drawn from two identical generators, and every change is made to both. What each exports is then
compared as the official OTLP encoder writes it (names, kinds, ids, parents, attributes, events, status, times),
and as the lean path sends it over gRPC (each span encoded as it ended).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as official_encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.trace import Span, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.util.types import Attributes, AttributeValue

from inference.telemetry.otlp import encode_request, encode_span_field
from inference.telemetry.spans import SCOPE, LeanSpan, StartAttributes, make_tracer, start_attributes, traceparent
from inference.telemetry.tracing import Tracing
from inference.tenants import key_hash

from .fakes.lmstudio import FakeLMStudio
from .memory import MemoryGateway

MODEL = "qwen2.5-7b-instruct"


class SeededIds(IdGenerator):
    """Ids from a seeded generator: two of them with one seed draw the same ids in the same order."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)

    def generate_span_id(self) -> int:
        return self._random.getrandbits(64) or 1

    def generate_trace_id(self) -> int:
        return self._random.getrandbits(128) or 1

    def is_trace_id_random(self) -> bool:
        return True


class Kept(SpanProcessor):
    """Every ended span, as the SDK hands it to processors."""

    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def on_end(self, span: ReadableSpan) -> None:
        self.spans.append(span)


class LeanKept:
    """Every ended lean span as it is (what the export queue encodes)."""

    takes_lean_spans = True

    def __init__(self) -> None:
        self.spans: list[LeanSpan] = []

    def on_end(self, span: LeanSpan) -> None:
        self.spans.append(span)


class Clock:
    """Nanoseconds that move only when asked: both tracers read the same instants."""

    def __init__(self) -> None:
        self.now = 1_764_000_000_000_000_000

    def __call__(self) -> int:
        self.now += 1_000
        return self.now


class TeeSpan(Span):
    """One span of the gateway made twice: each call goes to the lean span and to the SDK's, with explicit times."""

    def __init__(self, lean: Span, sdk: Span, clock: Clock) -> None:
        self.lean, self.sdk, self._clock = lean, sdk, clock
        assert lean.get_span_context() == sdk.get_span_context()
        self.start_time = getattr(lean, "start_time", None)

    def get_span_context(self) -> SpanContext:
        return self.lean.get_span_context()

    def is_recording(self) -> bool:
        return self.lean.is_recording()

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        self.lean.set_attribute(key, value)
        self.sdk.set_attribute(key, value)

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        self.lean.set_attributes(attributes)
        self.sdk.set_attributes(dict(attributes))

    def add_event(self, name: str, attributes: Attributes = None, timestamp: int | None = None) -> None:
        timestamp = timestamp or self._clock()
        self.lean.add_event(name, attributes, timestamp)
        self.sdk.add_event(name, dict(attributes) if attributes else attributes, timestamp)

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        self.lean.set_status(status, description)
        self.sdk.set_status(status, description)

    def update_name(self, name: str) -> None:
        self.lean.update_name(name)
        self.sdk.update_name(name)

    def record_exception(self, exception: BaseException, attributes: Attributes = None,
                         timestamp: int | None = None, escaped: bool = False) -> None:
        raise AssertionError("the gateway records no exception on a span")

    def end(self, end_time: int | None = None) -> None:
        end_time = end_time or self._clock()
        self.lean.end(end_time)
        self.sdk.end(end_time)


class Tee:
    """The gateway's tracer, made of both implementations (see the module's docstring)."""

    def __init__(self, tracing: Tracing) -> None:
        self.clock = Clock()
        self.lean_kept, self.sdk_kept = LeanKept(), Kept()
        self.lean = make_tracer("lean", tracing.resource, tracing.sampler, SeededIds(7), self.lean_kept)  # type: ignore[arg-type]
        self.sdk = make_tracer("sdk", tracing.resource, tracing.sampler, SeededIds(7), self.sdk_kept)

    def start_span(self, name: str, kind: SpanKind, attributes: dict[str, AttributeValue],
                   parent: SpanContext | None, start_time: int | None = None,
                   start: StartAttributes | None = None) -> Span:
        start_time = start_time or self.clock()
        return TeeSpan(self.lean.start_span(name, kind, dict(attributes), parent, start_time, start),
                       self.sdk.start_span(name, kind, dict(attributes), parent, start_time, start), self.clock)

    def same_spans(self, *names: str) -> list[ReadableSpan]:
        """Assert that both exported the same spans (and that they are the ones expected); return the SDK's."""
        lean = [span.readable() for span in self.lean_kept.spans]
        sdk = self.sdk_kept.spans
        assert [span.name for span in sdk] == list(names)
        official = official_encode_spans(sdk)
        assert official_encode_spans(lean) == official
        tracing_resource = sdk[0].resource
        sent = encode_request(tracing_resource, SCOPE, [encode_span_field(s) for s in self.lean_kept.spans])
        assert ExportTraceServiceRequest.FromString(sent) == official  # what the lean path puts on the wire
        return sdk


@pytest.fixture
def teed(in_memory: Any) -> Iterator[Any]:
    def make(env: dict[str, str] | None = None, **kwargs: Any) -> tuple[MemoryGateway, Tee]:
        gateway = in_memory({"INFERENCE_OBSERVABILITY_TRACING_EXPORTER": "none", **(env or {})}, **kwargs)
        tracing = gateway.gateway.telemetry.tracing
        tee = Tee(tracing)
        tracing.tracer = tee
        return gateway, tee
    yield make


def chat(content: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 50,
            "temperature": 0.2, "stop": ["\n\n"], **extra}


def test_a_chat_and_a_stream_continuing_a_callers_trace(teed: Any, fake: FakeLMStudio) -> None:
    gateway, tee = teed()
    caller = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
              "tracestate": "vendor=opaque,other=x", "User-Agent": "equality-test"}
    assert gateway.post_chat(chat(), caller).status == 200
    assert gateway.post_chat(chat(stream=True, stream_options={"include_usage": True})).status == 200
    spans = tee.same_spans(f"chat {MODEL}", "POST /v1/chat/completions", f"chat {MODEL}",
                           "POST /v1/chat/completions")
    assert spans[1].parent is not None and spans[1].parent.is_remote  # the caller's span
    assert [event.name for event in spans[2].events] == ["first_token"]
    sent = [r for r in fake.received if r.path == "/v1/chat/completions"]
    assert sent[0].headers["traceparent"] == traceparent(tee.lean_kept.spans[0])["traceparent"]
    assert sent[0].headers["tracestate"] == "vendor=opaque,other=x"


def test_failures_a_queue_and_a_client_that_leaves(teed: Any, fake: FakeLMStudio) -> None:
    gateway, tee = teed({"INFERENCE_INFERENCE_MAX_CONCURRENT_REQUESTS": "1"})
    fake.chat.mode = "error_object"
    assert gateway.post_chat(chat()).status == 500
    fake.chat.mode = "normal"
    fake.chat.stream = "error_event"
    gateway.post_chat(chat(stream=True))
    fake.chat.stream = "normal"
    fake.chat.mode = "hang"
    first = gateway.send("POST", "/v1/chat/completions", chat("first"))
    gateway.settle()
    second = gateway.send("POST", "/v1/chat/completions", chat("second"))  # waits for the one slot
    gateway.advance(0.25)
    fake.chat.mode = "normal"
    fake.release()
    gateway.settle()
    assert gateway.result(first).status == 200 and gateway.result(second).status == 200
    client, send = gateway.raw()  # a stream whose client leaves after the first words
    fake.chat.stream = "stall"
    body = json.dumps(chat("leaving", stream=True)).encode()
    send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    gateway.settle()
    client.transport.loseConnection()  # type: ignore[union-attr]
    gateway.settle()
    spans = tee.same_spans(*[f"chat {MODEL}", "POST /v1/chat/completions"] * 5)
    assert spans[0].status.status_code is StatusCode.ERROR and spans[1].status.status_code is StatusCode.ERROR
    assert "queued" in [event.name for span in spans for event in span.events]
    assert "client_disconnected" in [event.name for event in spans[-1].events]


def test_a_fleets_failover_a_translation_content_and_a_tenant(teed: Any, tmp_path: Path) -> None:
    hosts = {f"http://host{i}.test:1234": FakeLMStudio([MODEL]) for i in range(2)}
    for host in hosts.values():
        host.chat_only = True  # /v1/messages goes through chat
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"tenants:\n  - name: team\n    keys: ['{key_hash(b'sk-team-key')}']\n")
    config = tmp_path / "fleet.yaml"
    config.write_text(f"server:\n  api_keys_file: {keys}\ninference:\n  upstreams:\n" + "".join(
        f'    - {{name: h{i}, base_url: "{url}"}}\n' for i, url in enumerate(hosts)))
    gateway, tee = teed({"INFERENCE_OBSERVABILITY_TRACING_CAPTURE_CONTENT": "true"}, upstreams=hosts,
                        config_path=str(config))
    key = {"Authorization": "Bearer sk-team-key"}
    assert gateway.call("GET", "/v1/models", headers=key).status == 200  # the fleet learns who serves the model
    for host in hosts.values():  # one host fails: whichever was tried first, the call fails over to the other
        host.chat.mode, host.chat.status = "error_object", 500
        assert gateway.post_chat(chat(), key).status == 200
        host.chat.mode = "normal"
    messages = {"model": MODEL, "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}],
                "top_k": 5, "metadata": {"user_id": "u1"}}
    assert gateway.call("POST", "/v1/messages", messages, {"x-api-key": "sk-team-key"}).status == 200
    spans = tee.same_spans("GET /v1/models", *[f"chat {MODEL}", "POST /v1/chat/completions"] * 2,
                           f"chat {MODEL}", "POST /v1/messages")
    assert any(event.name == "failover" for span in spans for event in span.events)
    assert spans[-2].attributes["inference.api.translated"] is True
    assert spans[-1].attributes["inference.tenant"] == "team" and "gen_ai.input.messages" in spans[1].attributes


def test_requests_alike_on_one_connection_start_from_one_shared_start(teed: Any, fake: FakeLMStudio) -> None:
    gateway, tee = teed()
    client, send = gateway.raw()
    body = json.dumps(chat()).encode()
    for agent in (b"agent/1", b"agent/1", b"agent/2"):  # keep-alive: one connection, the agent changes last
        send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nUser-Agent: %s\r\n"
             b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (agent, len(body), body))
        gateway.settle()
    assert client.data.count(b"HTTP/1.1 200 OK") == 3
    spans = tee.same_spans(*[f"chat {MODEL}", "POST /v1/chat/completions"] * 3)
    assert [span.attributes["user_agent.original"] for span in spans[1::2]] == ["agent/1", "agent/1", "agent/2"]
    servers, clients = tee.lean_kept.spans[1::2], tee.lean_kept.spans[0::2]
    assert servers[0].start_attributes is servers[1].start_attributes is not servers[2].start_attributes
    assert clients[0].start_attributes is clients[1].start_attributes is clients[2].start_attributes


def test_a_shared_attribute_set_again_moves_to_the_end_as_in_the_sdk(teed: Any) -> None:
    _, tee = teed()
    start = start_attributes({"url.path": "/a", "server.port": 3000, "left.out": None})
    span = tee.start_span("GET /a", SpanKind.SERVER, {**start.attributes, "own": 1}, None, start=start)
    span.set_attribute("url.path", "/b")
    span.set_attributes({"server.port": 3001, "more": 2})  # one set again, one new
    span.end()
    [sdk] = tee.same_spans("GET /a")
    assert dict(sdk.attributes or {}) == {"own": 1, "url.path": "/b", "server.port": 3001, "more": 2}
    assert list(sdk.attributes or {}) == ["own", "url.path", "server.port", "more"]
