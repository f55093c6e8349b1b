"""OpenTelemetry tracing: a tracer per gateway, OTLP export off the reactor, W3C propagation.

Spans are passed around explicitly (on the request, on the upstream call), never through the "current" span:
Twisted runs protocol callbacks and timers in the reactor's root context, so contextvars cannot be trusted
across them (docs/twisted.md, "Context across Deferreds"). Spans are made lean (``spans.py``) unless
``observability.tracing.implementation`` is ``sdk``. Export runs in a thread of its own (``export.py``), so a
slow or absent collector never holds the reactor; its failures are reported once, not once per batch or span.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, TraceFlags, get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from .. import __version__
from ..config import ConfigError, TracingConfig
from ..reactor import IGatewayReactor
from .export import MAX_QUEUE, SCHEDULE_DELAY_MS, Dropped, EncodedSender, ExportQueue, ExportStatus, Sender, SpanSender
from .metrics import TraceExemplar
from .otlp import LeanGrpcSpanExporter
from .spans import SCOPE, SpanMaker, StartAttributes, make_tracer, trace_hex, traceparent

log = Logger()

PROTOCOLS = ("grpc", "http/protobuf")
DEFAULT_ENDPOINTS = {"grpc": "http://localhost:4317", "http/protobuf": "http://localhost:4318"}


class _HeaderGetter(Getter[Headers]):
    """Reads W3C trace headers straight from twisted.web's ``Headers``."""

    def get(self, carrier: Headers, key: str) -> list[str] | None:
        values = carrier.getRawHeaders(key.encode("latin-1"))
        return [v.decode("latin-1") for v in values] if values else None

    def keys(self, carrier: Headers) -> list[str]:
        return [name.decode("latin-1") for name, _ in carrier.getAllRawHeaders()]


_HEADERS = _HeaderGetter()
_PROPAGATOR = TraceContextTextMapPropagator()


def resolve_destination(config: TracingConfig, environ: Mapping[str, str]) -> tuple[str, str]:
    """The OTLP protocol and URL: the gateway's config first, then the standard ``OTEL_*`` variables."""
    protocol = config.protocol or "grpc"
    for variable in ("OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"):
        if not config.protocol and environ.get(variable):
            protocol = environ[variable]
            if protocol not in PROTOCOLS:
                raise ConfigError(f"{variable} = {protocol!r}: expected one of {', '.join(PROTOCOLS)} "
                                  "(or set observability.tracing.protocol)")
    signal_endpoint = None if config.endpoint else environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if signal_endpoint:  # the signal's own URL is used exactly as given (OTel's rule)
        return protocol, _with_scheme(signal_endpoint)
    endpoint = _with_scheme(config.endpoint or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                            or DEFAULT_ENDPOINTS[protocol])
    if protocol == "http/protobuf" and not endpoint.rstrip("/").endswith("/v1/traces"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    return protocol, endpoint


EXPORT_BATCH_SIZE = 512
"""Spans per export (the SDK's default) when lean spans are encoded as they end: the export thread only joins
bytes, so a big batch costs the reactor nothing and sends a tenth of the calls."""

SDK_EXPORT_BATCH_SIZE = 64
"""Spans per export when the export thread encodes them (``implementation: sdk``, or an exporter other than
OTLP/gRPC): encoding 512 there holds the GIL for tens of milliseconds, which the reactor felt as a 20 ms p99; 64
keeps each pause near a millisecond at the same total cost."""


def _bsp_setting(environ: Mapping[str, str], name: str, default: int) -> int:
    """One of the standard ``OTEL_BSP_*`` settings of the batch span processor (a whole number >= 1)."""
    value = environ.get(name, "")
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ConfigError(f"{name} = {value!r}: expected a whole number >= 1")
    return number


def _with_scheme(endpoint: str) -> str:
    return endpoint if "://" in endpoint else "http://" + endpoint


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=(parts.hostname or "") + (f":{parts.port}" if parts.port else "")))


def _otlp_exporter(protocol: str, endpoint: str, environ: Mapping[str, str]) -> SpanExporter:
    timeout = environ.get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") or environ.get("OTEL_EXPORTER_OTLP_TIMEOUT") or "10"
    try:
        seconds = float(timeout)
    except ValueError:
        raise ConfigError(f"OTEL_EXPORTER_OTLP_TIMEOUT = {timeout!r}: expected a number of seconds") from None
    if protocol == "grpc":
        return LeanGrpcSpanExporter(endpoint=endpoint, timeout=seconds)
    from .otlp_http import SizedHttpSpanExporter
    return SizedHttpSpanExporter(endpoint=endpoint, timeout=seconds)


class Tracing:
    """Spans for one gateway; with tracing off every method is a cheap no-op returning None."""

    def __init__(self, config: TracingConfig, environ: Mapping[str, str], reactor: IGatewayReactor,
                 dropped: Dropped = lambda reason, count: None) -> None:
        self.config = config
        self._reactor = reactor
        self.status = ExportStatus()
        self.protocol: str | None = None
        self.endpoint: str | None = None
        self.enabled = config.enabled and environ.get("OTEL_SDK_DISABLED", "").lower() != "true"
        self.capture_content = self.enabled and config.capture_content
        self.tracer: SpanMaker | None = None
        self.queue: ExportQueue[Any] | None = None
        self._exporter: SpanExporter | None = None
        if not self.enabled:
            return
        self.resource = Resource.create({"service.name": environ.get("OTEL_SERVICE_NAME") or "inference",
                                         "service.version": __version__})
        self.sampler = TraceIdRatioBased(config.sample_ratio)  # of new traces: ParentBased keeps a caller's decision
        self._exporter = self._make_exporter(environ)
        if self._exporter is not None:
            sender = self._sender(self._exporter)
            batch = _bsp_setting(environ, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
                                 EXPORT_BATCH_SIZE if isinstance(sender, EncodedSender) else SDK_EXPORT_BATCH_SIZE)
            self.queue = ExportQueue(sender, self.endpoint or "", batch, self.status, self._report, dropped,
                                     _bsp_setting(environ, "OTEL_BSP_MAX_QUEUE_SIZE", MAX_QUEUE),
                                     _bsp_setting(environ, "OTEL_BSP_SCHEDULE_DELAY", SCHEDULE_DELAY_MS) / 1000)
        self.tracer = make_tracer(config.implementation, self.resource, self.sampler, RandomIdGenerator(),
                                  self.queue)

    def _make_exporter(self, environ: Mapping[str, str]) -> SpanExporter | None:
        kind = self.config.exporter
        if kind == "none":
            return None
        if kind == "console":
            self.endpoint = "stdout"
            return ConsoleSpanExporter(out=sys.stdout)  # (its default is the stdout of when the SDK was imported)
        self.protocol, endpoint = resolve_destination(self.config, environ)
        self.endpoint = _without_credentials(endpoint)
        return _otlp_exporter(self.protocol, endpoint, environ)

    def _sender(self, exporter: SpanExporter) -> Sender[Any]:
        """Lean spans to OTLP/gRPC are encoded as they end; anything else is queued as the SDK's spans."""
        if self.config.implementation == "lean" and isinstance(exporter, LeanGrpcSpanExporter):
            return EncodedSender(exporter, self.resource, SCOPE)
        return SpanSender(exporter)

    def _report(self, level: str, format: str, **fields: Any) -> None:
        """Log from the exporter thread by handing the event to the reactor thread."""
        self._reactor.callFromThread(getattr(log, level), format, **fields)

    # -- spans ---------------------------------------------------------------------------------------------------

    def start_server_span(self, name: str, headers: Headers, attributes: dict[str, Any],
                          start: StartAttributes | None = None) -> Span | None:
        """A SERVER span continuing the caller's ``traceparent`` when it sent one (``attributes`` begin with a copy of
        ``start``'s, when given: see :class:`~.spans.StartAttributes`)."""
        if self.tracer is None:
            return None
        parent = None
        if headers.hasHeader(b"traceparent"):
            parent = get_current_span(_PROPAGATOR.extract(headers, getter=_HEADERS)).get_span_context()
        return self.tracer.start_span(name, SpanKind.SERVER, attributes, parent, None, start)

    def start_client_span(self, name: str, parent: Span | None, attributes: dict[str, Any],
                          start_time: int | None = None, start: StartAttributes | None = None) -> Span | None:
        if self.tracer is None:
            return None
        return self.tracer.start_span(name, SpanKind.CLIENT, attributes,
                                      parent.get_span_context() if parent is not None else None, start_time, start)

    @staticmethod
    def trace_headers(span: Span | None) -> dict[str, str]:
        """The ``traceparent`` that makes the upstream's work part of this trace."""
        return traceparent(span) if span is not None else {}

    @staticmethod
    def ids(span: Span) -> tuple[str | None, dict[str, str] | None]:
        """The span's trace id (32 hex digits) and the ``trace_id`` exemplar for histograms, which only a sampled
        trace gets (else there is no trace to see); found once per request."""
        trace, _, _, flags, _, valid = span.get_span_context()  # (the tuple's fields: its properties are calls)
        if not valid:
            return None, None
        trace_id = trace_hex(trace)
        return trace_id, TraceExemplar(trace_id=trace_id) if flags & TraceFlags.SAMPLED else None

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """Where traces go and whether they get there, for ``/health``."""
        if not self.enabled:
            return {"enabled": False}
        return {"enabled": True, "implementation": self.config.implementation, "exporter": self.config.exporter,
                "protocol": self.protocol, "endpoint": self.endpoint, "sample_ratio": self.config.sample_ratio,
                "capture_content": self.capture_content, "export": self.status.as_dict()}

    def flush(self) -> Deferred[Any]:
        """Export what is queued now, in a thread (exporting blocks)."""
        queue = self.queue
        if queue is None:
            return succeed(None)
        return self._in_thread(queue.force_flush)

    def shutdown(self) -> Deferred[Any]:
        """Flush and stop the exporter without waiting out the exporter's retries (10 s and more).

        A collector that took the last batch gets 3 s for the final one; one never reached yet gets 1 s, and
        one known to be failing a moment: stopping must not hang on a collector that is down.
        """
        queue, exporter = self.queue, self._exporter
        self.queue = self.tracer = self._exporter = None
        if queue is None:
            return succeed(None)
        timeout = {True: 3.0, None: 1.0, False: 0.2}[self.status.ok]

        def stop() -> None:
            flushing = threading.Thread(target=queue.shutdown, name="inference-trace-shutdown", daemon=True)
            flushing.start()
            flushing.join(timeout)
            if flushing.is_alive() and exporter is not None:
                exporter.shutdown()  # ends the exporter's retry wait at once
                flushing.join(1.0)

        return self._in_thread(stop)

    def _in_thread(self, work: Callable[[], Any]) -> Deferred[Any]:
        """Run blocking export work in a daemon thread of its own: the reactor's pool would make stop wait for it."""
        done: Deferred[Any] = Deferred()

        def run() -> None:
            try:
                result = work()
            except Exception as e:
                self._reactor.callFromThread(log.warn, "tracing: flushing spans failed: {error}", error=e)
                result = None
            self._reactor.callFromThread(done.callback, result)

        threading.Thread(target=run, name="inference-trace-flush", daemon=True).start()
        return done
