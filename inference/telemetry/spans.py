"""Making the gateway's spans: lean (the default) or through the OpenTelemetry SDK's tracer (``implementation: sdk``).

Both make the same spans: same ids from the same id generator, same sampling, so what a collector receives is
identical (``tests/test_span_equality.py`` checks it byte for byte). The SDK's span does more than the gateway
needs on every call: a lock around each change, an attribute object that validates and copies every value, a
context built to find the parent, a processor chain and the SDK's own span metrics. The lean span is a plain
object the reactor thread alone touches (the gateway passes spans explicitly and never shares one between
threads), whose values the gateway builds well-typed; it reads as a ``ReadableSpan`` does, so the export queue
encodes it as it ends, and makes one of it (:meth:`LeanSpan.readable`) only for other exporters.
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping
from functools import partial
from time import time_ns
from typing import NamedTuple, Protocol, TypeGuard

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)
from opentelemetry.trace.span import DEFAULT_TRACE_STATE
from opentelemetry.util.types import Attributes, AttributeValue

from .. import __version__
from .otlp import UNSET_STATUS, encode_attributes

SCOPE = InstrumentationScope("inference", __version__)
_RANDOM_TRACE_ID = getattr(TraceFlags, "RANDOM_TRACE_ID", 0)  # W3C level 2's flag, set by SDKs from 1.39
_FLAGS = [TraceFlags(value) for value in range(256)]  # made once: a span's flags are one of these
_FLAGS_HEX = [f"{value:02x}" for value in range(256)]
_TRACE_ID_LIMIT = TraceIdRatioBased.TRACE_ID_LIMIT
_valid_context = partial(tuple.__new__, SpanContext)
"""A ``SpanContext`` from its six fields, without its Python ``__new__`` checking ids the id generator made (a valid
parent's trace id, a span id never 0); the last field says it is valid."""


class StartAttributes(NamedTuple):
    """Attributes that many spans start with, and their OTLP encoding, made once for all of them: a route's on one
    connection (method, path, addresses, user agent), a model's calls (operation, provider, model, upstream).

    A span given one starts with a copy of ``attributes`` followed by its own, and the lean encoder writes
    ``encoded`` for those first ones instead of encoding each again: a span's attributes were a third of the
    instructions tracing adds to a call, and most of them are the same from call to call.
    """

    attributes: Mapping[str, AttributeValue]  # never changed: each span copies it
    encoded: bytes


def start_attributes(attributes: Mapping[str, AttributeValue]) -> StartAttributes:
    """Attributes to start spans with (without the None values a span would leave out)."""
    kept = {key: value for key, value in attributes.items() if value is not None}
    return StartAttributes(kept, encode_attributes(kept))


class SpanMaker(Protocol):
    """What the gateway asks of a tracer: a span, its parent given explicitly (never the "current" span). The span
    may keep ``attributes`` as its own: each span gets a dict made for it. With ``start``, ``attributes`` begins
    with a copy of ``start.attributes`` (its own follow), which the tracer may use as encoded already."""

    def start_span(self, name: str, kind: SpanKind, attributes: dict[str, AttributeValue],
                   parent: SpanContext | None, start_time: int | None = None,
                   start: StartAttributes | None = None) -> Span: ...


def _cleaned(attributes: Mapping[str, AttributeValue] | None) -> dict[str, AttributeValue]:
    """Without the None values the SDK would refuse (the gateway's values are otherwise well-typed): the dict itself
    when it has none (the gateway builds a new one for each span and event, and leaves it to the span), else a
    copy."""
    if not attributes:
        return {}
    if None not in attributes.values() and isinstance(attributes, dict):
        return attributes
    return {key: value for key, value in attributes.items() if value is not None}


class LeanSpan(Span):
    """A recording span the reactor thread alone changes. It reads as a ``ReadableSpan`` does (``name``,
    ``attributes``, ``events``, ``status`` ...), so the OTLP encoder takes it as it is; other exporters get
    :meth:`readable`.

    Where the SDK's behaviour is visible on the wire it is kept: a key set again moves to the end of the attributes,
    an OK status is final, a second ``end()`` changes nothing.
    """

    __slots__ = ("name", "start_time", "end_time", "parent", "kind", "attributes", "start_attributes", "events",
                 "status", "_tracer", "_context")
    links: tuple[Link, ...] = ()
    dropped_attributes = dropped_events = dropped_links = 0  # the gateway's spans stay far below the SDK's limits

    def __init__(self, tracer: LeanTracer, name: str, context: SpanContext, parent: SpanContext | None,
                 kind: SpanKind, attributes: dict[str, AttributeValue], start_time: int,
                 start: StartAttributes | None = None) -> None:
        self.name = name
        self.start_time = start_time
        self.end_time: int | None = None
        self.parent = parent
        self.kind = kind
        self.attributes = attributes
        self.start_attributes = start  # what ``attributes`` begins with, encoded already (until one of them is set)
        self.events: list[Event] = []
        self.status = UNSET_STATUS
        self._tracer = tracer
        self._context = context

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return self.end_time is None

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if value is None or self.end_time is not None:
            return
        attributes = self.attributes
        if key in attributes:
            del attributes[key]
            self.start_attributes = None  # (the shared start may have held it)
        attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        """What ``set_attribute`` does for each; in one update when no key is set already and no value is None (the
        gateway's every call)."""
        if self.end_time is not None:
            return
        own = self.attributes
        if own.keys().isdisjoint(attributes) and None not in attributes.values():
            own.update(attributes)
            return
        for key, value in attributes.items():
            if value is not None:
                if key in own:
                    del own[key]
                    self.start_attributes = None
                own[key] = value

    def add_event(self, name: str, attributes: Attributes = None, timestamp: int | None = None) -> None:
        if self.end_time is None:
            self.events.append(Event(name, _cleaned(attributes), timestamp or time_ns()))

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self.end_time is not None or self.status.status_code is StatusCode.OK:
            return
        self.status = status if isinstance(status, Status) else Status(status, description)

    def update_name(self, name: str) -> None:
        if self.end_time is None:
            self.name = name

    def record_exception(self, exception: BaseException, attributes: Attributes = None,
                         timestamp: int | None = None, escaped: bool = False) -> None:
        stack = "".join(traceback.format_exception(type(exception), exception, exception.__traceback__))
        self.add_event("exception", {"exception.type": type(exception).__name__,
                                     "exception.message": str(exception), "exception.stacktrace": stack,
                                     "exception.escaped": str(escaped), **(attributes or {})}, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self.end_time is not None:
            return
        self.end_time = end_time or time_ns()
        sink = self._tracer.sink
        if sink is not None:
            sink.on_end(self)

    def readable(self) -> ReadableSpan:
        """The SDK's readable span of it, for any SDK processor or exporter."""
        tracer = self._tracer
        return ReadableSpan(self.name, self._context, self.parent, tracer.resource, self.attributes, self.events,
                            (), self.kind, None, self.status, self.start_time, self.end_time, tracer.scope)


class LeanSink(Protocol):
    """Where ended lean spans go: the export queue (``export.ExportQueue``), or any SDK processor through
    :class:`Readable`."""

    def on_end(self, span: LeanSpan) -> None: ...


class Readable:
    """An SDK span processor fed lean spans, as the SDK's readable spans."""

    def __init__(self, processor: SpanProcessor) -> None:
        self._processor = processor

    def on_end(self, span: LeanSpan) -> None:
        self._processor.on_end(span.readable())


class LeanTracer:
    """Lean spans, sampled as ``ParentBased(root)`` decides, the gateway's sampler.

    A span with a parent follows the parent's decision (what ``ParentBased`` does with its default delegates,
    without building a context to find the parent); a root span is sampled when its trace id falls under the
    ratio's bound (what ``TraceIdRatioBased`` does, without building its result).
    """

    def __init__(self, resource: Resource, root: TraceIdRatioBased, id_generator: IdGenerator,
                 sink: LeanSink | None) -> None:
        self.resource = resource
        self.scope = SCOPE
        self.sink = sink
        self._bound = root.bound
        self._ids = id_generator
        self._random_flag = _RANDOM_TRACE_ID if id_generator.is_trace_id_random() else 0

    def start_span(self, name: str, kind: SpanKind, attributes: dict[str, AttributeValue],
                   parent: SpanContext | None, start_time: int | None = None,
                   start: StartAttributes | None = None) -> Span:
        ids = self._ids
        trace_state: TraceState | None
        if parent is not None and parent[5]:  # (contexts are read as the tuples they are: their properties are calls)
            trace_id, _, _, parent_flags, trace_state, _ = parent
            sampled, random_flag = parent_flags & TraceFlags.SAMPLED, parent_flags & _RANDOM_TRACE_ID
        else:
            parent, trace_id, trace_state = None, ids.generate_trace_id(), None
            sampled, random_flag = trace_id & _TRACE_ID_LIMIT < self._bound, self._random_flag
        flags = _FLAGS[(TraceFlags.SAMPLED if sampled else 0) | random_flag]
        context = _valid_context((trace_id, ids.generate_span_id(), False, flags,
                                  DEFAULT_TRACE_STATE if trace_state is None else trace_state, True))
        if not sampled:
            return NonRecordingSpan(context)
        return LeanSpan(self, name, context, parent, kind, _cleaned(attributes), start_time or time_ns(), start)


class SdkTracer:
    """The OpenTelemetry SDK's own tracer and spans (``tracing.implementation: sdk``), given the parent as a
    context, as any instrumentation does."""

    def __init__(self, provider: TracerProvider) -> None:
        self._tracer = provider.get_tracer(SCOPE.name, SCOPE.version)

    def start_span(self, name: str, kind: SpanKind, attributes: dict[str, AttributeValue],
                   parent: SpanContext | None, start_time: int | None = None,
                   start: StartAttributes | None = None) -> Span:
        context = set_span_in_context(NonRecordingSpan(parent)) if parent is not None else Context()
        return self._tracer.start_span(name, context=context, kind=kind, attributes=attributes,
                                       start_time=start_time)


def make_tracer(implementation: str, resource: Resource, root: TraceIdRatioBased, id_generator: IdGenerator,
                processor: SpanProcessor | None) -> SpanMaker:
    """The tracer ``observability.tracing.implementation`` names, sampling as ``ParentBased(root)`` (a caller's
    decision is kept, new traces are sampled at the root's ratio) and ending its spans in ``processor``."""
    if implementation == "sdk":
        provider = TracerProvider(resource=resource, sampler=ParentBased(root), id_generator=id_generator)
        if processor is not None:
            provider.add_span_processor(processor)
        return SdkTracer(provider)
    sink = None if processor is None else processor if _takes_lean_spans(processor) else Readable(processor)
    return LeanTracer(resource, root, id_generator, sink)


def _takes_lean_spans(processor: SpanProcessor) -> TypeGuard[LeanSink]:
    """The export queue takes lean spans as they are (it encodes them, or asks for their readable form itself)."""
    return getattr(processor, "takes_lean_spans", False) is True


def trace_hex(trace_id: int) -> str:
    """A trace id as W3C and the logs write it, 32 hex digits (the hex of its bytes: a format spec such as ``032x``
    is parsed on every use)."""
    return trace_id.to_bytes(16, "big").hex()


def traceparent(span: Span) -> dict[str, str]:
    """The W3C headers that make a call part of ``span``'s trace (what ``TraceContextTextMapPropagator.inject``
    writes, without building a context to find the span)."""
    trace_id, span_id, _, flags, trace_state, valid = span.get_span_context()
    if not valid:
        return {}
    headers = {"traceparent": f"00-{trace_hex(trace_id)}-{span_id.to_bytes(8, 'big').hex()}-{_FLAGS_HEX[flags]}"}
    if trace_state is not DEFAULT_TRACE_STATE and trace_state:
        headers["tracestate"] = trace_state.to_header()
    return headers
