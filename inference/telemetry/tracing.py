"""OpenTelemetry tracing: a tracer provider per gateway, OTLP export off the reactor, W3C propagation.

Spans are passed around explicitly (on the request, on the upstream call), never through the "current" span:
Twisted runs protocol callbacks and timers in the reactor's root context, so contextvars cannot be trusted
across them (docs/twisted.md, "Context across Deferreds"). Export runs in the batch processor's own thread, so
a slow or absent collector never holds the reactor; its failures are reported once, not once per batch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Tracer, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from .. import __version__
from ..config import ConfigError, TracingConfig
from ..reactor import IGatewayReactor

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


class ExportStatus:
    """How export is going, for ``/health``; the exporter thread writes it, the reactor reads it."""

    def __init__(self) -> None:
        self.ok: bool | None = None  # None until the first batch was sent
        self.exported_spans = 0
        self.failed_spans = 0
        self.last_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "exported_spans": self.exported_spans, "failed_spans": self.failed_spans,
                "last_error": self.last_error}


class _FirstMessage(logging.Handler):
    """Keeps the OTLP exporter's first complaint of an export (the cause; later ones are about its retries)
    instead of letting it print one line per retry."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self.local, "message", None) is None:
            self.local.message = record.getMessage()

    def take(self) -> str | None:
        message = getattr(self.local, "message", None)
        self.local.message = None
        return message


_EXPORTER_MESSAGES = _FirstMessage()
_exporter_logger = logging.getLogger("opentelemetry.exporter.otlp")
_exporter_logger.addHandler(_EXPORTER_MESSAGES)
_exporter_logger.propagate = False


class ReportingExporter(SpanExporter):
    """Wraps an exporter: logs one line when export starts failing and one when it recovers."""

    def __init__(self, inner: SpanExporter, destination: str, status: ExportStatus,
                 report: Callable[..., None]) -> None:
        self._inner = inner
        self._destination = destination
        self._status = status
        self._report = report

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        _EXPORTER_MESSAGES.take()
        try:
            result = self._inner.export(spans)
            error = _EXPORTER_MESSAGES.take()
        except Exception as e:  # an exporter must not kill the batch thread
            result, error = SpanExportResult.FAILURE, str(e) or type(e).__name__
        status = self._status
        if result is SpanExportResult.SUCCESS:
            status.exported_spans += len(spans)
            if status.ok is False:
                self._report("info", "trace export to {destination} works again", destination=self._destination)
            status.ok = True
        else:
            status.failed_spans += len(spans)
            status.last_error = error or "export failed"
            if status.ok is not False:
                self._report("warn", "trace export to {destination} is failing ({error}); spans are dropped "
                             "until the collector answers, requests are not affected",
                             destination=self._destination, error=status.last_error)
            status.ok = False
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


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


EXPORT_BATCH_SIZE = 64
"""Spans per export. The SDK's 512 makes its thread encode for tens of milliseconds while holding the GIL, which
the reactor felt as a 20 ms p99; 64 keeps each pause near a millisecond at the same total cost."""


def _batch_size(environ: Mapping[str, str]) -> int:
    """``OTEL_BSP_MAX_EXPORT_BATCH_SIZE`` when set, else :data:`EXPORT_BATCH_SIZE`."""
    value = environ.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "")
    if not value:
        return EXPORT_BATCH_SIZE
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise ConfigError(f"OTEL_BSP_MAX_EXPORT_BATCH_SIZE = {value!r}: expected a whole number >= 1")
    return size


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
        from .otlp import LeanGrpcSpanExporter
        return LeanGrpcSpanExporter(endpoint=endpoint, timeout=seconds)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
    return HttpExporter(endpoint=endpoint, timeout=seconds)


class Tracing:
    """Spans for one gateway; with tracing off every method is a cheap no-op returning None."""

    def __init__(self, config: TracingConfig, environ: Mapping[str, str], reactor: IGatewayReactor) -> None:
        self.config = config
        self._reactor = reactor
        self.status = ExportStatus()
        self.protocol: str | None = None
        self.endpoint: str | None = None
        self.enabled = config.enabled and environ.get("OTEL_SDK_DISABLED", "").lower() != "true"
        self.capture_content = self.enabled and config.capture_content
        self.tracer: Tracer | None = None
        self.provider: TracerProvider | None = None
        self._exporter: SpanExporter | None = None
        if not self.enabled:
            return
        resource = Resource.create({"service.name": environ.get("OTEL_SERVICE_NAME") or "inference",
                                    "service.version": __version__})
        self.provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)))
        self._exporter = self._make_exporter(environ)
        if self._exporter is not None:
            self.provider.add_span_processor(BatchSpanProcessor(self._exporter,
                                                                max_export_batch_size=_batch_size(environ)))
        self.tracer = self.provider.get_tracer("inference", __version__)

    def _make_exporter(self, environ: Mapping[str, str]) -> SpanExporter | None:
        kind = self.config.exporter
        if kind == "none":
            return None
        if kind == "console":
            self.endpoint = "stdout"
            return ReportingExporter(ConsoleSpanExporter(), "stdout", self.status, self._report)
        self.protocol, endpoint = resolve_destination(self.config, environ)
        self.endpoint = _without_credentials(endpoint)
        return ReportingExporter(_otlp_exporter(self.protocol, endpoint, environ), self.endpoint, self.status,
                                 self._report)

    def _report(self, level: str, format: str, **fields: Any) -> None:
        """Log from the exporter thread by handing the event to the reactor thread."""
        self._reactor.callFromThread(getattr(log, level), format, **fields)

    # -- spans ---------------------------------------------------------------------------------------------------

    def start_server_span(self, name: str, headers: Headers, attributes: dict[str, Any]) -> Span | None:
        """A SERVER span continuing the caller's ``traceparent`` when it sent one."""
        if self.tracer is None:
            return None
        context = _PROPAGATOR.extract(headers, getter=_HEADERS) if headers.hasHeader(b"traceparent") else None
        return self.tracer.start_span(name, context=context, kind=SpanKind.SERVER, attributes=attributes)

    def start_client_span(self, name: str, parent: Span | None, attributes: dict[str, Any]) -> Span | None:
        if self.tracer is None:
            return None
        context = set_span_in_context(parent) if parent is not None else Context()
        return self.tracer.start_span(name, context=context, kind=SpanKind.CLIENT, attributes=attributes)

    @staticmethod
    def trace_headers(span: Span | None) -> dict[str, str]:
        """The ``traceparent`` that makes the upstream's work part of this trace."""
        headers: dict[str, str] = {}
        if span is not None:
            _PROPAGATOR.inject(headers, context=set_span_in_context(span))
        return headers

    @staticmethod
    def ids(span: Span) -> tuple[str | None, dict[str, str] | None]:
        """The span's trace id (32 hex digits) and the ``trace_id`` exemplar for histograms, which only a sampled
        trace gets (else there is no trace to see); found once per request."""
        context = span.get_span_context()
        if not context.is_valid:
            return None, None
        trace_id = format(context.trace_id, "032x")
        return trace_id, {"trace_id": trace_id} if context.trace_flags.sampled else None

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """Where traces go and whether they get there, for ``/health``."""
        if not self.enabled:
            return {"enabled": False}
        return {"enabled": True, "exporter": self.config.exporter, "protocol": self.protocol,
                "endpoint": self.endpoint, "sample_ratio": self.config.sample_ratio,
                "capture_content": self.capture_content, "export": self.status.as_dict()}

    def flush(self) -> Deferred[Any]:
        """Export what is queued now, in a thread (the batch processor's flush blocks)."""
        provider = self.provider
        if provider is None:
            return succeed(None)
        return self._in_thread(lambda: provider.force_flush(5000))

    def shutdown(self) -> Deferred[Any]:
        """Flush and stop the exporter without waiting out the exporter's retries (10 s and more).

        A collector that took the last batch gets 3 s for the final one; one never reached yet gets 1 s, and
        one known to be failing a moment: stopping must not hang on a collector that is down.
        """
        provider, exporter = self.provider, self._exporter
        self.provider = self.tracer = self._exporter = None
        if provider is None:
            return succeed(None)
        timeout = {True: 3.0, None: 1.0, False: 0.2}[self.status.ok]

        def stop() -> None:
            flushing = threading.Thread(target=provider.shutdown, name="inference-trace-shutdown", daemon=True)
            flushing.start()
            flushing.join(timeout)
            if flushing.is_alive() and exporter is not None:
                exporter.shutdown()  # ends the exporter's retry wait at once
                flushing.join(1.0)

        return self._in_thread(stop)

    def _in_thread(self, work: Callable[[], Any]) -> Deferred[Any]:
        """Run blocking SDK work in a daemon thread of its own: the reactor's pool would make stop wait for it."""
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
