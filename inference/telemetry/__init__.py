"""Observability: Prometheus metrics and OpenTelemetry traces, recorded together per request."""

from .metrics import Metrics
from .recorder import ChatCall, RequestState, Telemetry
from .tracing import Tracing

__all__ = ["ChatCall", "Metrics", "RequestState", "Telemetry", "Tracing"]
