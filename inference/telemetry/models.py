"""What placement does to the fleet's models, recorded: a span per load and unload (``load {model}``,
``unload {model}``), ``inference_model_loads_total{upstream, outcome}`` and ``inference_model_instances{upstream,
model}`` (its model label bounded by the models the hosts list)."""

from __future__ import annotations

from collections.abc import Callable

from opentelemetry.trace import Status, StatusCode

from .metrics import Metrics
from .tracing import Tracing

_FAILED = ("load_failed", "unload_failed")


class ModelTelemetry:
    """The fleet placement's :class:`~inference.providers.placement.ModelEvents`, as spans and metrics."""

    def __init__(self, metrics: Metrics, tracing: Tracing) -> None:
        self._metrics = metrics
        self._tracing = tracing
        self._instances: dict[str, set[str]] = {}  # the models each host had loaded at its last list

    def begin(self, action: str, host: str, model: str) -> Callable[[str, float | None], None]:
        span = self._tracing.start_client_span(f"{action} {model}", None, {
            "inference.upstream.name": host, "gen_ai.request.model": model, "inference.model.action": action})

        def ended(outcome: str, seconds: float | None) -> None:
            self._metrics.child(self._metrics.model_loads, host, outcome).inc()
            if span is None:
                return
            span.set_attribute("inference.model.outcome", outcome)
            if seconds is not None:
                span.set_attribute("inference.model.load_time_seconds", seconds)
            if outcome in _FAILED:
                span.set_status(Status(StatusCode.ERROR, outcome))
            span.end()

        return ended

    def instances(self, host: str, counts: dict[str, int]) -> None:
        gauge = self._metrics.model_instances
        for model in self._instances.get(host, set()) - counts.keys():  # no longer listed: nothing loaded
            self._metrics.child(gauge, host, model).set(0)
        for model, count in counts.items():
            self._metrics.child(gauge, host, model).set(count)
        self._instances[host] = set(counts)
