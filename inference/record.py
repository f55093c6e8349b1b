"""What the gateway records of one HTTP request, in one place: a :class:`CallRecord` made when the request arrives,
carried by it, filled by the pipeline (the API's error shape, the error the client was told), by telemetry
(timings, spans) and by the upstream call (model, tokens, the host that served it), and read by the access log,
the metrics and the spans. Nothing else is hung on the request."""

from __future__ import annotations

from dataclasses import dataclass

from opentelemetry.trace import Span

from .tenants import Caller


@dataclass(slots=True)
class CallRecord:
    started: float = 0.0  # perf_counter() at arrival
    route: str = "other"  # the route's label (``/v1/chat/completions``; unknown paths are ``other``)
    span: Span | None = None  # the request's SERVER span, when traced
    trace_id: str | None = None  # the span's, as 32 hex digits (logs and exemplars)
    exemplar: dict[str, str] | None = None  # ``{"trace_id": ...}`` for histograms, when the trace is sampled
    recorded: bool = False  # its end was recorded (once, however it ended)
    error_style: str = "openai"  # the shape errors are answered in (``anthropic`` on /v1/messages)
    error_code: str | None = None  # the error the client was told about (a status or an SSE error event)
    stream_failed: bool = False  # a stream that ended with an error event after its 200
    overhead_before: float = 0.0  # gateway time from arrival to the upstream call
    answered_at: float | None = None  # when the upstream's answer was complete
    duration: float = 0.0  # arrival to the last byte (or to the client leaving)
    model: str | None = None  # what the upstream call measured, for the access log
    time_to_first_token: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    via: str | None = None  # the upstream route that served a translated call (``/v1/chat/completions``)
    upstream: str | None = None  # the host of a fleet that served the call
    caller: Caller | None = None  # whose key the request came with (None: refused before, or not an API route)
    operation: str | None = None  # the API called (``chat``, ``messages`` ...), once the route is known
