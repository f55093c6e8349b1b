"""Observability: Prometheus metrics and OpenTelemetry traces, recorded together per request."""

from .metrics import Metrics
from .recorder import RequestState, Telemetry, UpstreamCall
from .tracing import Tracing

__all__ = ["Metrics", "RequestState", "Telemetry", "Tracing", "UpstreamCall"]
