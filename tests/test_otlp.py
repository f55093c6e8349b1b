"""The lean OTLP encoder writes exactly what the official OpenTelemetry encoder builds, for every kind of span."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common._internal import _encode_attributes, _encode_value
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as official_encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValueList
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)

from inference.telemetry.otlp import _ENCODED, _any_value, _attributes, encode_spans


class Keep(SpanExporter):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Any) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


def tracer_for(kept: Keep, resource: Resource, limits: SpanLimits | None = None, **scope: Any) -> Any:
    provider = TracerProvider(resource=resource, span_limits=limits)
    provider.add_span_processor(SimpleSpanProcessor(kept))
    return provider.get_tracer(scope.get("name", "inference"), scope.get("version"), scope.get("schema_url"),
                               scope.get("attributes"))


def same_as_official(spans: list[ReadableSpan]) -> None:
    ours = ExportTraceServiceRequest.FromString(encode_spans(spans))
    assert ours == official_encode_spans(spans)


REMOTE = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, is_remote=True,
                     trace_flags=TraceFlags(1), trace_state=TraceState([("vendor", "opaque"), ("other", "x")]))
LOCAL = SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, is_remote=False,
                    trace_flags=TraceFlags(1))


def test_the_gateways_spans_encode_as_the_official_encoder_does() -> None:
    kept = Keep()
    tracer = tracer_for(kept, Resource.create({"service.name": "inference", "service.version": "0.1.0"}),
                        version="0.1.0", schema_url="https://opentelemetry.io/schemas/1.26.0",
                        attributes={"scope.attribute": "yes"})
    server = tracer.start_span("POST /v1/chat/completions", context=set_span_in_context(NonRecordingSpan(REMOTE)),
                               kind=SpanKind.SERVER, attributes={"http.request.method": "POST", "server.port": 3000,
                                                                 "url.scheme": "http"})
    client = tracer.start_span("chat qwen", context=set_span_in_context(server), kind=SpanKind.CLIENT,
                               attributes={"gen_ai.request.temperature": 0.7, "gen_ai.request.stream": True,
                                           "gen_ai.request.stop_sequences": ["\n\n", "END"]})
    client.add_event("first_token", timestamp=client.start_time + 1_000_000)
    client.add_event("queued", {"inference.queue.wait_seconds": 0.25, "ids": [1, -2, 3]})
    client.set_attributes({"gen_ai.response.finish_reasons": ["stop"], "gen_ai.usage.output_tokens": 12,
                           "big": -(1 << 62), "flags": [True, False], "ratios": [0.5, 1.5], "empty": [],
                           "text": "déjà vu 🚀"})
    client.set_status(Status(StatusCode.ERROR, "upstream timed out"))
    client.end()
    server.set_status(Status(StatusCode.OK))
    server.end()
    tracer.start_span("", kind=SpanKind.INTERNAL, links=[Link(LOCAL, {"link.kind": "follows"}), Link(REMOTE)]).end()
    tracer.start_span("produce", kind=SpanKind.PRODUCER, context=set_span_in_context(NonRecordingSpan(LOCAL))).end()
    tracer.start_span("consume", kind=SpanKind.CONSUMER).end()
    same_as_official(kept.spans)


def test_dropped_counts_and_several_resources_and_scopes() -> None:
    kept = Keep()
    limits = SpanLimits(max_span_attributes=2, max_events=1, max_links=1, max_event_attributes=1,
                        max_link_attributes=1)
    first = tracer_for(kept, Resource({"service.name": "a"}, schema_url="https://example.com/schema"), limits)
    second = tracer_for(kept, Resource({"service.name": "b", "host.id": 7}), limits, name="other")
    span = first.start_span("limited", attributes={"a": 1, "b": 2, "c": 3},
                            links=[Link(LOCAL, {"x": 1, "y": 2}), Link(REMOTE)])
    span.add_event("one", {"p": 1, "q": 2})
    span.add_event("two")
    span.end()
    second.start_span("elsewhere").end()
    first.start_span("again").end()
    same_as_official(kept.spans)


def test_an_unfinished_batch_of_nothing_is_empty() -> None:
    assert encode_spans([]) == b"" and official_encode_spans([]).SerializeToString() == b""


scalars = st.one_of(st.none(), st.booleans(), st.text(), st.integers(-(1 << 63), (1 << 63) - 1),
                    st.floats(allow_nan=False), st.binary())
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(), inner, max_size=4)),
                      max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(values)
def test_any_attribute_value_encodes_as_the_official_encoder_does(value: Any) -> None:
    assert AnyValue.FromString(_any_value(value)) == _encode_value(value)


# Values equal to one another (True == 1 == 1.0, a list and a tuple) that encode differently, or alike.
LOOKALIKES: list[Any] = [True, 1, 1.0, False, 0, "1", "", ["1"], ("1",), [True], [1], [], (), ["a", "b"], ["a"],
                         "a", ["1", 1], [["1"]], b"1", -1, 2**63 - 1, 0.0, -0.0, 0.7, 0]


def test_attributes_encoded_once_are_told_apart_from_lookalikes() -> None:
    """The attribute cache hands each value its own bytes, however often and in whatever order equal-looking values
    come (each is encoded three times, under the same key, between the others)."""
    for _ in range(3):
        for value in LOOKALIKES + LOOKALIKES[::-1]:
            attributes = {"k": value, "gen_ai.response.finish_reasons": value}
            ours = KeyValueList.FromString(_attributes(b"\x0a", attributes))
            assert list(ours.values) == _encode_attributes(attributes), value
            # (byte for byte: messages compare 0.0 and -0.0 equal)
            assert [kv.SerializeToString() for kv in ours.values] == \
                [kv.SerializeToString() for kv in _encode_attributes(attributes)], value


def test_values_unique_to_a_call_are_encoded_each_time_not_kept() -> None:
    """A response id differs on every call and a captured prompt can be megabytes: kept, the first emptied the cache
    of the values that repeat every 4,096 calls, and the second pinned its text until then. Both still encode right."""
    _ENCODED.clear()
    for number in range(50):
        attributes = {"gen_ai.response.id": f"chatcmpl-{number}", "gen_ai.input.messages": f"[{number}]" + "x" * 64,
                      "any.text": f"{number}" + "y" * 10_000, "gen_ai.response.model": "m",
                      "gen_ai.response.time_to_first_chunk": number / 7, "gen_ai.request.temperature": 0.7}
        ours = KeyValueList.FromString(_attributes(b"\x0a", attributes))
        assert list(ours.values) == _encode_attributes(attributes)
    assert sorted(key[1] for key in _ENCODED) == ["gen_ai.request.temperature", "gen_ai.response.model"]
