"""Span export off the reactor: a bounded queue drained in batches by one thread, and the exporter's health.

The SDK's ``BatchSpanProcessor`` logs a warning for every span it drops once its queue is full; with no collector
listening (the default endpoint on a machine without one) that is a log record built per span, which its own
duplicate filter then throws away: 7-9% of the gateway's CPU in the benchmark. Here a full queue drops the span,
counts it (``inference_spans_dropped_total``) and says so once; export failing and recovering are one line each.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import TraceFlags

from .otlp import MAX_EXPORT_BYTES, EncodedBatch, LeanGrpcSpanExporter, encode_request, encode_span_field, pieces
from .spans import LeanSpan

Report = Callable[..., None]
"""``report(level, format, **fields)``: a log line, handed to the reactor thread."""

Dropped = Callable[[str, int], None]
"""``dropped(reason, count)``: spans lost (``queue_full``, ``export_failed``); called from either thread."""


class ExportStatus:
    """How export is going, for ``/health``; the exporter thread writes it, the reactor reads it."""

    def __init__(self) -> None:
        self.ok: bool | None = None  # None until the first batch was sent
        self.exported_spans = 0
        self.failed_spans = 0
        self.dropped_spans = 0  # never queued: the queue was full
        self.last_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "exported_spans": self.exported_spans, "failed_spans": self.failed_spans,
                "dropped_spans": self.dropped_spans, "last_error": self.last_error}


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


Item = TypeVar("Item")


AnySpan = ReadableSpan | LeanSpan
"""An ended span: the SDK's (``tracing.implementation: sdk``), or a lean one."""


class Sender(Protocol[Item]):
    """How queued spans reach the collector: what is kept of a span as it ends, and how a batch of those is sent."""

    size: Callable[[Item], int]
    """What an item adds to an export request, in bytes (0: not weighed). A plain function, as ``len`` is: the
    queue calls it for every span, twice."""

    def prepare(self, span: AnySpan) -> Item:
        """On the reactor thread, as the span ends."""
        ...

    def send(self, batch: list[Item]) -> SpanExportResult:
        """On the export thread; blocks until the collector answered or the exporter gave up."""
        ...

    def shutdown(self) -> None: ...


class SpanSender:
    """Any SDK exporter (OTLP/HTTP, the console, or any span the SDK made): the queue keeps the spans themselves."""

    def __init__(self, exporter: SpanExporter) -> None:
        self._exporter = exporter
        self.size: Callable[[ReadableSpan], int] = _weighed

    def prepare(self, span: AnySpan) -> ReadableSpan:
        return span.readable() if isinstance(span, LeanSpan) else span

    def send(self, batch: list[ReadableSpan]) -> SpanExportResult:
        return self._exporter.export(batch)

    def shutdown(self) -> None:
        self._exporter.shutdown()


class EncodedSender:
    """OTLP/gRPC for lean spans, which share one resource and scope: each span is encoded as it ends, while its
    data is still in the CPU's cache, and the export thread only joins bytes and hands them to gRPC's C core, so
    it hardly holds the GIL the reactor needs (encoding 64 spans there held it for a millisecond)."""

    def __init__(self, exporter: LeanGrpcSpanExporter, resource: Resource, scope: InstrumentationScope) -> None:
        self._exporter = exporter
        self._resource = resource
        self._scope = scope
        self.size: Callable[[bytes], int] = len

    def prepare(self, span: AnySpan) -> bytes:
        return encode_span_field(span)

    def send(self, batch: list[bytes]) -> SpanExportResult:
        request = encode_request(self._resource, self._scope, batch)
        return self._exporter.export_encoded(EncodedBatch(request, len(batch)))

    def shutdown(self) -> None:
        self._exporter.shutdown()


MAX_QUEUE = 2048
"""Spans held for export at most (the SDK's default, ``OTEL_BSP_MAX_QUEUE_SIZE``): about half a second of a busy
gateway's spans."""

SCHEDULE_DELAY_MS = 5000
"""Milliseconds between exports of a batch not yet full (the SDK's default, ``OTEL_BSP_SCHEDULE_DELAY``)."""

MAX_QUEUE_BYTES = 64 * 1024 * 1024
"""Bytes of spans held for export at most (encoded spans by their length, the SDK's by :func:`_weighed`), whatever
their count: 2,048 spans that carry whole prompts (``capture_content``) could otherwise hold gigabytes while the
collector is slow."""


_SPAN_BYTES = 512  # a span without its strings, encoded or held


def _weighed(span: ReadableSpan) -> int:
    """About what one of the SDK's spans holds and adds to an export: the length of its strings (the prompts and
    answers ``capture_content`` puts in attributes, an exception's stack in an event) and a fixed part for the rest.
    Measured exactly it would be encoded twice; this is enough for the queue's bound and to cut batches near the
    limit (the exporter cuts them exactly). About 3 µs a span of the SDK's (its attributes are read through their
    locked mapping), on a path that is not the default."""
    size = _SPAN_BYTES
    for attributes in (span.attributes, *(event.attributes for event in span.events)):
        for value in (attributes or {}).values():
            if isinstance(value, str):
                size += len(value)
    return size


class ExportQueue(SpanProcessor, Generic[Item]):
    """Ended spans waiting for export, sent ``batch_size`` at a time by one thread of its own.

    ``on_end`` runs on the reactor thread: a length check, the sender's ``prepare``, an append, and at a full batch
    a wake-up. It takes the SDK's spans and lean ones alike (``takes_lean_spans``). A full queue drops the span
    and counts it: no log record per span. One warning says spans are being dropped (unless export is already known
    to fail, which said so) and one line when the queue drained; one line when export starts failing and one when
    it works again.
    """

    def __init__(self, sender: Sender[Item], destination: str, batch_size: int, status: ExportStatus,
                 report: Report, dropped: Dropped, max_queue: int = MAX_QUEUE,
                 delay: float = SCHEDULE_DELAY_MS / 1000, max_bytes: int = MAX_EXPORT_BYTES,
                 max_queue_bytes: int = MAX_QUEUE_BYTES) -> None:
        self._sender = sender
        self._destination = destination
        self._batch_size = batch_size
        self._status = status
        self._report = report
        self._dropped = dropped
        self._max_queue = max_queue
        self._delay = delay
        self._max_bytes = max_bytes
        self._max_queue_bytes = max_queue_bytes
        self._queue: deque[Item] = deque()
        # Bytes queued, as two counts each written by one side (no lock on the reactor's path): what the reactor
        # added, and what the exporter took (one exporter at a time: ``_exporting``).
        self._bytes_added = 0
        self._bytes_taken = 0
        self._wake = threading.Event()
        self._exporting = threading.Lock()  # the worker and a flush never export at once
        self._overflowing = False
        self._stopping = False
        self._worker = threading.Thread(target=self._run, name="inference-trace-export", daemon=True)
        self._worker.start()

    # -- the reactor's side --------------------------------------------------------------------------------------

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    takes_lean_spans = True

    def on_end(self, span: AnySpan) -> None:
        context = span.get_span_context()
        if context is None or not context[3] & TraceFlags.SAMPLED or self._stopping:  # (the flags, not a property call)
            return
        queue = self._queue
        if len(queue) < self._max_queue:
            item = self._sender.prepare(span)
            size = self._sender.size(item)
            if self._bytes_added + size - self._bytes_taken <= self._max_queue_bytes:
                queue.append(item)
                self._bytes_added += size
                if len(queue) >= self._batch_size and not self._wake.is_set():
                    self._wake.set()
                return
        self._status.dropped_spans += 1
        self._dropped("queue_full", 1)
        if not self._overflowing:
            self._overflowing = True
            if self._status.ok is not False:  # a failing export said so already
                self._report("warn", "trace export cannot keep up: {count} spans wait; new spans are dropped "
                             "(inference_spans_dropped_total) until it catches up", count=len(queue))

    # -- the export thread's side --------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            full = self._wake.wait(self._delay)  # woken by a full batch, or the delay passed
            self._wake.clear()
            stopping = self._stopping  # set by shutdown(), which woke this thread: what is queued goes out below
            self._export_all(whole_batches=full and not stopping)
            if stopping:
                return

    def _export_all(self, whole_batches: bool = False) -> None:
        """Send what is queued, ``batch_size`` at a time; with ``whole_batches``, only whole batches.

        Woken by a full batch, the thread sends whole batches and leaves the rest for the next one: spans keep
        ending while a batch is sent, and sending them at once made exports of a few dozen spans (54 a second at
        one client instead of 5, each a gRPC call and wake-ups of gRPC's threads on the reactor's core). The rest
        go out with the next batch, oldest first, or when the delay passes, on a flush, at shutdown."""
        queue, count, limit, size = self._queue, self._batch_size, self._max_bytes, self._sender.size
        least = count if whole_batches else 1
        with self._exporting:
            while len(queue) >= least:
                batch = [queue.popleft() for _ in range(min(count, len(queue)))]
                weight = sum(map(size, batch))
                self._bytes_taken += weight
                for piece in pieces(batch, size, limit) if weight > limit else (batch,):
                    self._send(piece)
            if self._overflowing and len(queue) < least:
                self._overflowing = False
                if self._status.ok:
                    self._report("info", "trace export caught up; {count} spans were dropped in all",
                                 count=self._status.dropped_spans)

    def _send(self, batch: list[Item]) -> None:
        """Send a batch, and say once when export starts failing and once when it works again."""
        _EXPORTER_MESSAGES.take()
        try:
            result = self._sender.send(batch)
            error = _EXPORTER_MESSAGES.take()
        except Exception as e:  # an exporter must not kill the export thread
            result, error = SpanExportResult.FAILURE, str(e) or type(e).__name__
        status = self._status
        if result is SpanExportResult.SUCCESS:
            status.exported_spans += len(batch)
            if status.ok is False:
                self._report("info", "trace export to {destination} works again", destination=self._destination)
            status.ok = True
            return
        status.failed_spans += len(batch)
        self._dropped("export_failed", len(batch))
        status.last_error = error or "export failed"
        if status.ok is not False:
            self._report("warn", "trace export to {destination} is failing ({error}); spans are dropped until the "
                         "collector answers, requests are not affected", destination=self._destination,
                         error=status.last_error)
        status.ok = False

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export everything queued now, in the caller's thread (blocking: never the reactor's)."""
        self._export_all()
        return True

    def shutdown(self) -> None:
        """Stop taking spans, export what is queued, then stop the exporter (the caller bounds the wait)."""
        self._stopping = True
        self._wake.set()
        self._worker.join()
        self._sender.shutdown()
