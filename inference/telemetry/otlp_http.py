"""OTLP/HTTP span export in requests a collector takes.

The SDK's OTLP/HTTP exporter sends each batch as one request: 64 spans that carry prompts and answers
(``capture_content``) can pass what a collector accepts (the OpenTelemetry Collector's HTTP receiver refuses a body
over its ``max_request_body_size``, 20 MiB by default, often set lower), and the whole batch is lost. Here a batch is
cut like the gRPC exporter's, under :data:`~inference.telemetry.otlp.MAX_EXPORT_BYTES`, each piece sent by the SDK's
own exporter. Imported only when this protocol is chosen: the SDK's HTTP exporter brings ``requests``.
"""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult

from .otlp import encode_span_field, export_in_pieces


class SizedHttpSpanExporter(OTLPSpanExporter):
    """The SDK's OTLP/HTTP exporter, a batch sent in pieces under the size limit (order kept)."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Each span is weighed by encoding it (what the SDK's encoder writes, byte for byte: ``test_otlp.py``), in
        the export thread, about 5 µs a span."""
        return export_in_pieces(list(spans), lambda span: len(encode_span_field(span)), super().export)
