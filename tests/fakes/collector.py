"""An OpenTelemetry collector's receiving end: OTLP traces over gRPC and over HTTP/protobuf.

Built on opentelemetry-proto's own service definitions, so what the gateway's exporter sends is decoded
exactly as a real collector would decode it. Spans are kept as plain records; tests wait for them with
Deferreds (the gRPC server's threads hand every batch to the reactor).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto
from opentelemetry.proto.trace.v1.trace_pb2 import Status
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import Site


@dataclass
class Event:
    name: str
    time: int
    attributes: dict[str, Any]


@dataclass
class ReceivedSpan:
    name: str
    kind: str  # SERVER, CLIENT, ...
    trace_id: str
    span_id: str
    parent_span_id: str
    start: int
    end: int
    attributes: dict[str, Any]
    events: list[Event]
    status: str  # UNSET, OK, ERROR
    status_message: str
    resource: dict[str, Any] = field(default_factory=dict)

    def event(self, name: str) -> Event | None:
        return next((e for e in self.events if e.name == name), None)


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs}


def decode(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    spans = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(ReceivedSpan(
                    name=span.name, kind=SpanProto.SpanKind.Name(span.kind).replace("SPAN_KIND_", ""),
                    trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex(), start=span.start_time_unix_nano,
                    end=span.end_time_unix_nano, attributes=_attributes(span.attributes),
                    events=[Event(e.name, e.time_unix_nano, _attributes(e.attributes)) for e in span.events],
                    status=Status.StatusCode.Name(span.status.code).replace("STATUS_CODE_", ""),
                    status_message=span.status.message, resource=resource))
    return spans


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """Receives spans on a gRPC port (``grpc_endpoint``) and an HTTP port (``http_endpoint``)."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.batches = 0
        self._waiting: list[tuple[Callable[[list[ReceivedSpan]], bool], Deferred[list[ReceivedSpan]]]] = []
        self._grpc: Any = None
        self._http: Any = None
        self.grpc_endpoint = ""
        self.http_endpoint = ""
        self.max_http_bytes = 20 * 1024 * 1024  # the OpenTelemetry Collector's max_request_body_size by default
        self.refused = 0  # HTTP requests over it, answered 413

    # -- what tests use ------------------------------------------------------------------------------------------

    def wait_for(self, predicate: Callable[[list[ReceivedSpan]], bool]) -> Deferred[list[ReceivedSpan]]:
        """Fires with all spans so far once ``predicate(spans)`` holds."""
        d: Deferred[list[ReceivedSpan]] = Deferred()
        self._waiting.append((predicate, d))
        self._check()
        return d

    def named(self, name: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.name == name]

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id]

    # -- receiving -----------------------------------------------------------------------------------------------

    def Export(self, request: Any, context: Any) -> Any:  # gRPC, in a server thread
        reactor.callFromThread(self._received, decode(request))
        return trace_service_pb2.ExportTraceServiceResponse()

    def _received(self, spans: list[ReceivedSpan]) -> None:
        self.batches += 1
        self.spans += spans
        self._check()

    def _check(self) -> None:
        for predicate, d in list(self._waiting):
            if predicate(self.spans):
                self._waiting.remove((predicate, d))
                d.callback(self.spans)

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._grpc)
        port = self._grpc.add_insecure_port("127.0.0.1:0")
        self._grpc.start()
        self.grpc_endpoint = f"http://127.0.0.1:{port}"
        self.listen_http()

    def listen_http(self, port: int = 0) -> None:
        self._http = reactor.listenTCP(port, Site(_HttpReceiver(self)), interface="127.0.0.1")
        self.http_endpoint = f"http://127.0.0.1:{self._http.getHost().port}"

    def stop_http(self) -> Deferred[None]:
        return self._http.stopListening()

    def stop(self) -> Deferred[None]:
        if self._grpc is not None:
            self._grpc.stop(None)
        return self.stop_http()


class _HttpReceiver(Resource):
    """``POST /v1/traces`` with an OTLP protobuf body, as the OTLP/HTTP exporter sends it."""

    isLeaf = True

    def __init__(self, collector: Collector) -> None:
        super().__init__()
        self._collector = collector

    def render_POST(self, request: Any) -> bytes:
        if request.path != b"/v1/traces":
            request.setResponseCode(404)
            return b""
        body = request.content.read()
        if len(body) > self._collector.max_http_bytes:
            self._collector.refused += 1
            request.setResponseCode(413)
            return b""
        message = trace_service_pb2.ExportTraceServiceRequest()
        message.ParseFromString(body)
        self._collector._received(decode(message))
        request.setHeader(b"Content-Type", b"application/x-protobuf")
        return trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
