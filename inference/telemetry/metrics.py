"""The Prometheus instruments of docs/design.md's table, on a registry each gateway owns (no global state).

Labels stay low-cardinality on purpose: ``model`` is only ever a model id the catalog resolved, HTTP methods
outside the standard set are folded into ``_OTHER`` and unknown paths into one route.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import choose_encoder
from prometheus_client.samples import Exemplar
from prometheus_client.values import MutexValue

from .. import __version__

if TYPE_CHECKING:
    from ..routing.picker import HostView

# ``*_created`` series would double the series count for a timestamp no dashboard or alert here uses.
disable_created_metrics()

# OpenTelemetry's GenAI semantic-convention buckets (gen_ai.client.operation.duration), plus 5 minutes.
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92, 300.0)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                30.0, 60.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
TOKENS_PER_SECOND_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
QUEUE_WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"})


class Metrics:
    """Every ``inference_*`` metric, registered on ``self.registry``."""

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter(
            "inference_http_requests", "HTTP requests answered, by route and status code",
            ["method", "route", "code"], registry=registry)
        self.http_duration = Histogram(
            "inference_http_request_duration_seconds", "Time from a request's arrival to its last byte",
            ["method", "route", "code"], buckets=HTTP_BUCKETS, registry=registry)
        self.request_duration = Histogram(
            "inference_request_duration_seconds", "Upstream calls: time from arrival to the end of the answer",
            ["operation", "provider", "model", "stream", "outcome"], buckets=DURATION_BUCKETS, registry=registry)
        self.time_to_first_token = Histogram(
            "inference_time_to_first_token_seconds", "Streams: time from arrival to the first generated token",
            ["operation", "provider", "model"], buckets=TTFT_BUCKETS, registry=registry)
        self.time_per_output_token = Histogram(
            "inference_time_per_output_token_seconds", "Time per generated token (after the first, for streams)",
            ["operation", "provider", "model"], buckets=TPOT_BUCKETS, registry=registry)
        self.tokens_per_second = Histogram(
            "inference_output_tokens_per_second", "Generation speed of one completion",
            ["operation", "provider", "model"], buckets=TOKENS_PER_SECOND_BUCKETS, registry=registry)
        self.tokens = Counter(
            "inference_tokens", "Tokens by type (input or output): the upstream's usage, or for a stream without "
            "usage the content deltas the gateway relayed (output only)",
            ["operation", "provider", "model", "type"], registry=registry)
        self.in_flight = Gauge(
            "inference_requests_in_flight", "Chat completions being served by the upstream now",
            ["provider"], registry=registry)
        self.queue_length = Gauge(
            "inference_queue_length", "Chat completions waiting for an upstream slot",
            ["provider"], registry=registry)
        self.queue_wait = Histogram(
            "inference_queue_wait_seconds", "Chat completions: time waited for an upstream slot (0 when one was "
            "free), including requests given up while queued", ["provider"], buckets=QUEUE_WAIT_BUCKETS,
            registry=registry)
        self.upstream_errors = Counter(
            "inference_upstream_errors", "Upstream failures by kind (unreachable, timeout, rejected, "
            "server_error, bad_response, interrupted), on which host", ["provider", "upstream", "kind"],
            registry=registry)
        self.routing_decisions = Counter(
            "inference_routing_decisions", "Hosts picked for calls, by host and why: affinity (the host holding "
            "the conversation's prefix, or its rendezvous pick), least_loaded, failover, only_choice",
            ["upstream", "reason"], registry=registry)
        self.upstream_in_flight = Gauge(
            "inference_upstream_in_flight", "Calls in flight on each host of a fleet", ["upstream"],
            registry=registry)
        self.upstream_host_up = Gauge(
            "inference_upstream_host_up", "1 while a host of a fleet is routed to (it answered its last model "
            "list and is not ejected), 0 while it is not", ["upstream"], registry=registry)
        self.upstream_ejections = Counter(
            "inference_upstream_ejections", "Times a host of a fleet was left out after failures in a row",
            ["upstream"], registry=registry)
        self.model_loads = Counter(
            "inference_model_loads", "Model loads and unloads placement asked of each host, by outcome (loaded, "
            "load_failed, unloaded, unload_failed)", ["upstream", "outcome"], registry=registry)
        self.model_instances = Gauge(
            "inference_model_instances", "Loaded instances of each model on each host of a fleet, as the host "
            "last listed them (LM Studio 0.4)", ["upstream", "model"], registry=registry)
        self.upstream_waiting = Gauge(
            "inference_upstream_waiting", "Calls waiting for a host of the fleet to free a slot", ["provider"],
            registry=registry)
        self.client_disconnects = Counter(
            "inference_client_disconnects", "Chat completions whose client left before the answer ended",
            ["provider"], registry=registry)
        self.overhead = Histogram(
            "inference_gateway_overhead_seconds", "Time the gateway itself spent on a request: arrival to "
            "upstream call, and upstream answer to the client", ["route"], buckets=OVERHEAD_BUCKETS,
            registry=registry)
        self.upstream_up = Gauge(
            "inference_upstream_up", "1 when the upstream answered its last probe or call, 0 when unreachable",
            ["provider"], registry=registry)
        self.limits_store_up = Gauge(
            "inference_limits_store_up", "1 while tenants' limits are counted in their store (Redis), 0 while each "
            "process counts alone (the store cannot be reached)", ["store"], registry=registry)
        self.tenant_requests = Counter(
            "inference_tenant_requests", "API calls by tenant, model, operation and HTTP status",
            ["tenant", "model", "operation", "status"], registry=registry)
        self.tenant_tokens = Counter(
            "inference_tenant_tokens", "Tokens by tenant, model and type (input or output)",
            ["tenant", "model", "type"], registry=registry)
        self.usage_rows_dropped = Counter(
            "inference_usage_rows_dropped", "Usage ledger rows dropped: the store could not take them and the buffer "
            "was full", registry=registry)
        self.spans_dropped = Counter(
            "inference_spans_dropped", "Spans that never reached the collector: queue_full (export could not keep "
            "up) or export_failed (the collector refused or could not be reached)", ["reason"], registry=registry)
        for reason in ("queue_full", "export_failed"):
            self.spans_dropped.labels(reason)  # present from the start, at 0
        self.build_info = Gauge("inference_build_info", "Always 1; the version is the label", ["version"],
                                registry=registry)
        self.build_info.labels(__version__).set(1)
        # Children that never change labels are bound once, off the per-request path.
        self.client_disconnects_child = self.client_disconnects.labels(provider)
        self.upstream_up_child = self.upstream_up.labels(provider)
        self.queue_wait_child = Observed.of(self.queue_wait.labels(provider))

    def child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, looked up once per label set: prometheus_client validates and locks on
        every call, and a completion touches eight of them. The label sets are few by design (see above)."""
        key = (metric, values)
        found = self._children.get(key)
        if found is None:
            found = metric.labels(*values)
            if isinstance(metric, Histogram):
                found = Observed.of(found)
            self._children[key] = found
        return found

    def track_load(self, in_flight: Callable[[], int], queued: Callable[[], int]) -> None:
        """Read the gauges of load from the admission control at scrape time (nothing to do per request)."""
        self.in_flight.labels(self.provider).set_function(in_flight)
        self.queue_length.labels(self.provider).set_function(queued)

    def track_hosts(self, views: list[HostView], waiting: Callable[[], int]) -> None:
        """Read each host's load and health, and the calls waiting for one, at scrape time."""
        for view in views:
            self.upstream_in_flight.labels(view.name).set_function(partial(getattr, view, "outstanding"))
            self.upstream_host_up.labels(view.name).set_function(partial(_routed_to, view))
            self.upstream_ejections.labels(view.name)  # present from the start, at 0
        self.upstream_waiting.labels(self.provider).set_function(waiting)

    def drop_spans(self, reason: str, count: int) -> None:
        """Spans lost on their way to the collector (called from the export thread too: counters lock)."""
        self.spans_dropped.labels(reason).inc(count)

    def set_upstream_up(self, up: bool) -> None:
        self.upstream_up_child.set(1 if up else 0)

    def render(self, accept: str) -> tuple[bytes, str]:
        """The exposition for an ``Accept`` header: OpenMetrics (with exemplars) when asked, else text 0.0.4."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


def method_label(method: str) -> str:
    """A client can send any method name; the label keeps the standard ones only (OTel's ``_OTHER`` rule)."""
    return method if method in KNOWN_METHODS else "_OTHER"


def _routed_to(view: HostView) -> int:
    return 1 if view.routed else 0


class TraceExemplar(dict[str, str]):
    """The one exemplar the gateway attaches to its observations, ``TraceExemplar(trace_id=<32 hex digits>)``: valid
    as made, so :class:`Observed` stores it without prometheus_client's checks of its label names and length."""


_exemplar = partial(tuple.__new__, Exemplar)  # ``Exemplar(labels, value, time)`` without its Python ``__new__``


class Observed:
    """A histogram's child, observed the way prometheus_client does it, less its per-call work: it checks the child
    is observable, walks the buckets one by one and validates the exemplar's label names on every call (six
    observations a request: 4% of a short call's time under cProfile, 1% of its instructions under callgrind).
    Here the bucket is found by bisection, and the gateway's own exemplar (a :class:`TraceExemplar`) is stored as it
    is, straight into a single-process bucket (``set_exemplar`` only assigns it under a lock: one assignment is
    atomic already); any other is validated as prometheus_client would. A child without the attributes this reads
    (another version's) is observed as is."""

    __slots__ = ("_child", "_sum", "_bounds", "_buckets", "_assign")

    def __init__(self, child: Any) -> None:
        self._child = child
        self._sum, self._bounds, self._buckets = child._sum, list(child._upper_bounds), child._buckets
        self._assign = all(bucket.__class__ is MutexValue for bucket in self._buckets)

    @classmethod
    def of(cls, child: Any) -> Any:
        if all(hasattr(child, name) for name in ("_sum", "_upper_bounds", "_buckets")):
            return cls(child)
        return child

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        if amount != amount or (exemplar is not None and exemplar.__class__ is not TraceExemplar):
            self._child.observe(amount, exemplar)  # NaN, or an exemplar to validate
            return
        self._sum.inc(amount)
        bucket = self._buckets[bisect_left(self._bounds, amount)]  # the first bound >= amount (the last is +Inf)
        bucket.inc(1)
        if exemplar is not None:
            marked = _exemplar((exemplar, amount, time.time()))
            if self._assign:
                bucket._exemplar = marked
            else:
                bucket.set_exemplar(marked)
