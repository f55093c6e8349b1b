"""OTLP export of spans, encoded lean: protobuf wire bytes written directly, not built as message objects.

The OpenTelemetry exporter builds a protobuf message object per span, per attribute and per value, and hashes the
resource (by JSON-encoding its attributes) once per span: about 40 µs of the export thread's CPU per span, which
was a seventh of the gateway's CPU per request in the benchmark. This encoder writes the same
``ExportTraceServiceRequest`` as bytes in about a third of that time; a test checks that what it writes parses to
exactly the message the official encoder builds, for every kind of span, event, link, status and attribute.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import islice
from typing import Any, NamedTuple, Protocol, TypeVar, cast

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.span import DEFAULT_TRACE_STATE

_INT64 = (-(1 << 63), (1 << 63) - 1)
_FLAGS_HAS_IS_REMOTE, _FLAGS_IS_REMOTE = 0x100, 0x200  # SpanFlags: the parent's remoteness is known / remote
_pack_double = struct.Struct("<d").pack
_pack_fixed64 = struct.Struct("<Q").pack
_pack_fixed32 = struct.Struct("<I").pack


def _make_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


_SMALL = [_make_varint(n) for n in range(1 << 14)]  # lengths and small numbers: looked up, not computed


def _varint(value: int) -> bytes:
    return _SMALL[value] if 0 <= value < 16384 else _make_varint(value & 0xFFFFFFFFFFFFFFFF)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes or message); ``tag`` is the field's key, already encoded."""
    return tag + _varint(len(payload)) + payload


def _text(tag: bytes, text: str) -> bytes:
    return _field(tag, text.encode("utf-8"))


def _any_value(value: Any) -> bytes:
    """An ``AnyValue`` message's bytes."""
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _text(b"\x0a", value)
    if isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            raise ValueError(f"{value} does not fit in an int64")
        return b"\x18" + _varint(value)
    if isinstance(value, float):
        return b"\x21" + _pack_double(value)
    if isinstance(value, bytes):
        return _field(b"\x3a", value)
    if isinstance(value, Sequence):
        return _field(b"\x2a", b"".join(_field(b"\x0a", _any_value(item)) for item in value))
    if isinstance(value, Mapping):
        return _field(b"\x32", _attributes(b"\x0a", value, strict=True))
    raise ValueError(f"cannot export a {type(value).__name__} attribute")


_ENCODED: dict[tuple[Any, ...], bytes] = {}
"""Attribute fields already encoded: a gateway's spans repeat most of theirs (the method, the route, the model, the
host, token counts, finish reasons), so most are looked up rather than encoded. Strings, numbers, booleans and
lists of strings only; types are part of the key where equal values encode differently (``True == 1``), and a list
is keyed by its items (it encodes as an array whichever sequence holds it). Emptied when full, so unusual values
cannot make it grow without bound. The reactor thread (lean spans as they end) and the export thread (a batch's
resource) share it: each lookup, insertion and clearing is one atomic dict operation."""

_ENCODED_MAX = 4096

_UNIQUE_KEYS = frozenset({"gen_ai.response.id", "gen_ai.input.messages", "gen_ai.output.messages",
                          "exception.message", "exception.stacktrace", "gen_ai.response.time_to_first_chunk",
                          "inference.queue.wait_seconds", "inference.model.load_time_seconds"})
"""Attributes whose values differ from call to call: never kept. Kept, a response id per call filled the cache in
4,096 calls and emptied it of the values that do repeat, over and over, churning a megabyte of objects through the
core's cache (callgrind with a 1 MiB last level: 4,257 -> 4,106 misses a call)."""

_CACHED_LENGTH = 256
"""Longer strings are encoded each time, not kept: a prompt kept by ``capture_content`` under a key not known
above must not pin its text (twice: the value and its encoding) until the cache is next emptied."""


def _attributes(tag: bytes, attributes: Mapping[str, Any] | None, strict: bool = False, skip: int = 0) -> bytes:
    """``KeyValue`` fields under ``tag`` (all but the first ``skip`` attributes). An attribute that cannot be encoded
    is left out, as the official encoder does; inside a map value (``strict``) it fails the whole value instead, as
    there."""
    if not attributes or skip >= len(attributes):
        return b""
    out = []
    encoded = _ENCODED
    for key, value in islice(attributes.items(), skip, None) if skip else attributes.items():
        kind = value.__class__  # the key, inline: a call per attribute would cost what the cache saves
        if kind is str:
            cache_key: tuple[Any, ...] | None = (tag, key, value)
        elif kind is int or kind is bool:
            cache_key = (tag, key, kind, value)
        elif kind is float:  # by its bytes: -0.0 == 0.0, and NaN equals nothing
            cache_key = (tag, key, _pack_double(value))
        elif (kind is list or kind is tuple) and all(item.__class__ is str for item in value):
            cache_key = (tag, key, tuple, *value)
        else:
            cache_key = None
        if cache_key is not None:
            found = encoded.get(cache_key)
            if found is not None:
                out.append(found)
                continue
        try:
            field = _field(tag, _text(b"\x0a", str(key)) + _field(b"\x12", _any_value(value)))
        except ValueError:
            if strict:
                raise
            continue
        if cache_key is not None and key not in _UNIQUE_KEYS and (kind is not str or len(value) <= _CACHED_LENGTH):
            if len(encoded) >= _ENCODED_MAX:
                encoded.clear()
            encoded[cache_key] = field
        out.append(field)
    return b"".join(out)


def encode_attributes(attributes: Mapping[str, Any]) -> bytes:
    """A span's ``attributes`` fields, as :func:`encode_span` writes them."""
    return _attributes(b"\x4a", attributes)


def _flags(parent: SpanContext | None) -> bytes:
    flags = _FLAGS_HAS_IS_REMOTE | (_FLAGS_IS_REMOTE if parent is not None and parent.is_remote else 0)
    return _pack_fixed32(flags)


_LOCAL_PARENT = b"\x85\x01" + _flags(None)  # the span's flags field: its parent is local (or there is none)
_REMOTE_PARENT = b"\x85\x01" + _pack_fixed32(_FLAGS_HAS_IS_REMOTE | _FLAGS_IS_REMOTE)


def _count(tag: bytes, value: int) -> bytes:
    return tag + _varint(value) if value else b""


class EncodableSpan(Protocol):
    """What the encoder reads of a span: the SDK's ``ReadableSpan``, or a lean span read directly."""

    @property
    def name(self) -> str: ...
    @property
    def parent(self) -> SpanContext | None: ...
    @property
    def kind(self) -> SpanKind: ...
    @property
    def start_time(self) -> int | None: ...
    @property
    def end_time(self) -> int | None: ...
    @property
    def attributes(self) -> Mapping[str, Any] | None: ...
    @property
    def dropped_attributes(self) -> int: ...
    @property
    def events(self) -> Sequence[Event]: ...
    @property
    def dropped_events(self) -> int: ...
    @property
    def links(self) -> Sequence[Link]: ...
    @property
    def dropped_links(self) -> int: ...
    @property
    def status(self) -> Status: ...

    def get_span_context(self) -> SpanContext | None: ...


_KINDS = {kind._value_: b"\x30" + _varint(kind._value_ + 1) for kind in SpanKind}  # OTLP's kinds count from 1
UNSET_STATUS = Status(StatusCode.UNSET)  # lean spans' status until one is set: encoded without reading it
_UNSET = b"\x7a\x00"  # a Status message with neither code nor description
_NAMES: dict[str, bytes] = {}  # a span's name field: the gateway's repeat (routes, "chat {model}")


def encode_span(span: EncodableSpan) -> bytes:
    """A ``Span`` message's bytes, fields in number order.

    Read the cheap way: a span context unpacked as the tuple it is, enums by their ``_value_``, the empty trace state
    by identity. Their properties, an enum's hash and ``TraceState.__len__`` are each a Python call, and a span read
    them about ten times (a sixth of its encoding)."""
    context = span.get_span_context()
    assert context is not None  # a recorded span has one
    trace_id, span_id, _, _, trace_state, _ = context
    parent = span.parent
    out = [b"\x0a\x10" + trace_id.to_bytes(16, "big") + b"\x12\x08" + span_id.to_bytes(8, "big")]
    if trace_state is not DEFAULT_TRACE_STATE and trace_state:
        out.append(_text(b"\x1a", ",".join(f"{key}={value}" for key, value in trace_state.items())))
    if parent is not None:
        out.append(b"\x22\x08" + parent[1].to_bytes(8, "big"))
    name = span.name
    if name:
        encoded = _NAMES.get(name)
        if encoded is None:
            if len(_NAMES) >= _ENCODED_MAX:
                _NAMES.clear()
            encoded = _NAMES[name] = _text(b"\x2a", name)
        out.append(encoded)
    out.append(_KINDS[span.kind._value_])
    if span.start_time:
        out.append(b"\x39" + _pack_fixed64(span.start_time))
    if span.end_time:
        out.append(b"\x41" + _pack_fixed64(span.end_time))
    start = getattr(span, "start_attributes", None)  # a lean span's shared first attributes, encoded already
    if start is None:
        out.append(_attributes(b"\x4a", span.attributes))
    else:
        out += (start.encoded, _attributes(b"\x4a", span.attributes, skip=len(start.attributes)))
    if span.dropped_attributes:
        out.append(_count(b"\x50", span.dropped_attributes))
    for event in span.events:
        body = b"\x09" + _pack_fixed64(event.timestamp) if event.timestamp else b""
        if event.name:
            body += _text(b"\x12", event.name)
        body += _attributes(b"\x1a", event.attributes) + _count(b"\x20", event.dropped_attributes)
        out.append(_field(b"\x5a", body))
    if span.dropped_events:
        out.append(_count(b"\x60", span.dropped_events))
    for link in span.links:
        body = (b"\x0a\x10" + link.context.trace_id.to_bytes(16, "big")
                + b"\x12\x08" + link.context.span_id.to_bytes(8, "big")
                + _attributes(b"\x22", link.attributes) + _count(b"\x28", link.dropped_attributes)
                + b"\x35" + _flags(link.context))
        out.append(_field(b"\x6a", body))
    if span.dropped_links:
        out.append(_count(b"\x70", span.dropped_links))
    status = span.status
    code, description = (0, None) if status is UNSET_STATUS else (status.status_code._value_, status.description)
    if code or description:
        out.append(_field(b"\x7a", (_text(b"\x12", description) if description else b"")
                          + (b"\x18" + _varint(code) if code else b"")))
    else:
        out.append(_UNSET)
    out.append(_REMOTE_PARENT if parent is not None and parent[2] else _LOCAL_PARENT)
    return b"".join(out)


def encode_span_field(span: EncodableSpan) -> bytes:
    """The span as a field of ``ScopeSpans``: what :func:`encode_request` joins."""
    body = encode_span(span)
    return b"\x12" + _varint(len(body)) + body


def encode_spans(spans: Sequence[ReadableSpan], fields: Sequence[bytes] | None = None) -> bytes:
    """An ``ExportTraceServiceRequest``'s bytes: spans grouped by resource, then by instrumentation scope (``fields``:
    the spans' own :func:`encode_span_field`, when they were encoded already).

    Groups are told apart by identity: a tracer provider hands every span the same resource and scope objects.
    """
    resources: dict[int, tuple[Resource, dict[int, tuple[InstrumentationScope | None, list[bytes]]]]] = {}
    for n, span in enumerate(spans):
        resource, scope = span.resource, span.instrumentation_scope
        scopes = resources.setdefault(id(resource), (resource, {}))[1]
        scopes.setdefault(id(scope), (scope, []))[1].append(encode_span_field(span) if fields is None else fields[n])
    return b"".join([piece for resource, scopes in resources.values()
                     for piece in _resource_spans(resource, scopes.values())])


MAX_EXPORT_BYTES = 4 * 1024 * 1024 - 64 * 1024
"""Encoded spans sent in one export at most: collectors refuse a gRPC message over 4 MiB by default (grpc-go's
limit, the OpenTelemetry Collector's ``max_recv_msg_size_mib``), and 512 spans that carry prompts and answers
(``capture_content``) pass it easily; the whole batch would be lost. A span bigger than this goes on its own."""

T = TypeVar("T")


def pieces(items: list[T], size_of: Callable[[T], int], limit: int = MAX_EXPORT_BYTES) -> Iterator[list[T]]:
    """``items`` in order, cut where the next would take a piece's size past ``limit`` (each piece has one at least)."""
    piece: list[T] = []
    used = 0
    for item in items:
        size = size_of(item)
        if piece and used + size > limit:
            yield piece
            piece, used = [], 0
        piece.append(item)
        used += size
    if piece:
        yield piece


def export_in_pieces(items: list[T], size_of: Callable[[T], int],
                     send: Callable[[list[T]], SpanExportResult]) -> SpanExportResult:
    """Each of ``items``' :func:`pieces` sent in order: a failure if any piece failed (the others still go)."""
    failed = [piece for piece in pieces(items, size_of) if send(piece) is not SpanExportResult.SUCCESS]
    return SpanExportResult.FAILURE if failed else SpanExportResult.SUCCESS


def encode_request(resource: Resource, scope: InstrumentationScope, fields: Sequence[bytes]) -> bytes:
    """An ``ExportTraceServiceRequest``'s bytes for spans of one resource and scope, each encoded already
    (:func:`encode_span_field`, on the reactor thread as each span ended): joining is all that is left."""
    return b"".join(_resource_spans(resource, [(scope, fields)]))


def _resource_spans(resource: Resource,
                    scopes: Iterable[tuple[InstrumentationScope | None, Sequence[bytes]]]) -> list[bytes]:
    """A ``ResourceSpans`` field, as pieces to join once: its spans are nearly all of it, and wrapping each level's
    bytes in the next copied a batch's spans four times more (hundreds of kilobytes, in fresh pages each time)."""
    body = [_field(b"\x0a", _attributes(b"\x0a", resource.attributes))]
    for scope, encoded in scopes:
        scope_body = b""
        if scope is not None:
            scope_body = (_text(b"\x0a", scope.name) if scope.name else b"") \
                + (_text(b"\x12", scope.version) if scope.version else b"") \
                + _attributes(b"\x1a", scope.attributes)
        head = _field(b"\x0a", scope_body)
        schema = _text(b"\x1a", scope.schema_url) if scope is not None and scope.schema_url else b""
        body += [b"\x12" + _varint(len(head) + sum(map(len, encoded)) + len(schema)), head, *encoded, schema]
    if resource.schema_url:
        body.append(_text(b"\x1a", resource.schema_url))
    return [b"\x0a" + _varint(sum(map(len, body))), *body]


_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


class _Channel(Protocol):
    """The part of a ``grpc.Channel`` used here (grpc ships no type information)."""

    def unary_unary(self, method: str, request_serializer: None = None,
                    response_deserializer: Callable[[bytes], Any] | None = None) -> Callable[..., Any]: ...


class _RawTraceService:
    """TraceService's ``Export`` taking the request as bytes, as they were encoded (no message object built)."""

    def __init__(self, channel: _Channel) -> None:
        self.Export = channel.unary_unary(_EXPORT, request_serializer=None,
                                          response_deserializer=ExportTraceServiceResponse.FromString)


class EncodedBatch(NamedTuple):
    """An export request already encoded, and how many spans it holds."""

    request: bytes
    spans: int


class LeanGrpcSpanExporter(OTLPSpanExporter):
    """The OTLP/gRPC span exporter sending requests already encoded (an :class:`EncodedBatch`; the SDK's spans are
    encoded by :meth:`export`), with the official exporter's channel, credentials, headers, compression, retries
    and reconnection.

    The official stub would serialize a message object; the exporter's client is swapped for one whose ``Export``
    takes bytes, whenever the exporter makes one (it makes a new one to reconnect).
    """

    @property  # type: ignore[override]
    def _client(self) -> _RawTraceService | None:
        return self.__client

    @_client.setter
    def _client(self, stub: object | None) -> None:
        self.__client = None if stub is None else _RawTraceService(cast(_Channel, self._channel))

    def export_encoded(self, batch: EncodedBatch) -> SpanExportResult:
        result: SpanExportResult = self._export(batch)  # type: ignore[arg-type]
        return result

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """The SDK's spans (``implementation: sdk``), in requests under :data:`MAX_EXPORT_BYTES` each."""
        def send(piece: list[tuple[ReadableSpan, bytes]]) -> SpanExportResult:
            request = encode_spans([span for span, _ in piece], [field for _, field in piece])
            return self.export_encoded(EncodedBatch(request, len(piece)))

        return export_in_pieces([(span, encode_span_field(span)) for span in spans], lambda pair: len(pair[1]), send)

    def _translate_data(self, data: EncodedBatch) -> bytes:  # type: ignore[override]
        return data.request  # (every export reaches _export as an EncodedBatch: export() encodes the SDK's spans)

    def _count_data(self, data: EncodedBatch) -> int:  # type: ignore[override]
        return data.spans
