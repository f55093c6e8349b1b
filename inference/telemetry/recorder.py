"""What the gateway records per HTTP request and per upstream chat call, as metrics and spans at once.

Timings come from ``time.perf_counter`` (monotonic). The per-event path of a stream records nothing here: the
relay counts chunks and notes the first token, and everything is observed once, when the call ends.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from time import perf_counter, time_ns
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.trace import Span, Status, StatusCode
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.web.server import Request

from ..config import ObservabilityConfig
from ..errors import GatewayError
from ..operations import CHAT, Facts, Operation, StreamStats
from ..providers.base import NOT_SAID, Route
from ..reactor import IGatewayReactor
from ..record import CallRecord
from ..tenants import Caller
from ..usage import UsageLedger, UsageRow
from .metrics import Metrics, method_label
from .spans import StartAttributes, start_attributes
from .tracing import Tracing

log = Logger()

# Request parameters recorded on the CLIENT span, as GenAI semantic-convention attributes.
_REQUEST_ATTRIBUTES = {"max_tokens": "gen_ai.request.max_tokens", "max_output_tokens": "gen_ai.request.max_tokens",
                       "temperature": "gen_ai.request.temperature",
                       "top_p": "gen_ai.request.top_p", "top_k": "gen_ai.request.top_k",
                       "frequency_penalty": "gen_ai.request.frequency_penalty",
                       "presence_penalty": "gen_ai.request.presence_penalty", "seed": "gen_ai.request.seed",
                       "n": "gen_ai.request.choice.count"}
_NUMBERS = frozenset({int, float})


class RequestState(Request):
    """A twisted.web request carrying its :class:`~inference.record.CallRecord` (the site's request class,
    ``request.GatewayRequest``, is one)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.record = CallRecord()


_KEPT_BYTES = 512
"""A path and user agent, or a model's name, longer than this are not kept to start later spans with: what is kept
per connection and per model stays small whatever clients send."""

_KEPT_MODELS = 256  # models whose CLIENT span start is kept at most; emptied when full


def _server_start(request: RequestState, route: str) -> tuple[str, StartAttributes]:
    """The SERVER span's name and first attributes: the same for a connection's requests to one path with one user
    agent, so made at the first and kept on the channel (``GatewayChannel.span_start``) for the next alike."""
    channel = request.channel
    agent = request.getHeader(b"user-agent")
    key = (request.method, request.path, request.clientproto, agent, route)
    kept: tuple[tuple[Any, ...], str, StartAttributes] | None = getattr(channel, "span_start", None)
    if kept is not None and kept[0] == key:
        return kept[1], kept[2]
    method = method_label(request.method.decode("latin-1"))
    host = request.getHost()
    attributes = {"http.request.method": method, "url.path": request.path.decode("latin-1"),
                  "url.scheme": "https" if request.isSecure() else "http",
                  "server.address": getattr(host, "host", ""), "server.port": getattr(host, "port", 0)}
    client = request.getClientAddress()
    if getattr(client, "host", None):
        attributes["client.address"] = client.host
    attributes["network.protocol.version"] = request.clientproto.decode("latin-1").partition("/")[2]
    if agent:
        attributes["user_agent.original"] = agent.decode("latin-1")
    name = method
    if route != "other":
        attributes["http.route"] = route
        name += " " + route
    start = start_attributes(attributes)
    if hasattr(channel, "span_start") and len(request.path) + len(agent or b"") <= _KEPT_BYTES:
        channel.span_start = (key, name, start)
    return name, start


class Telemetry:
    """Metrics and tracing for one gateway."""

    def __init__(self, config: ObservabilityConfig, provider_name: str, base_url: str,
                 environ: Mapping[str, str], reactor: IGatewayReactor) -> None:
        self.metrics = Metrics(provider_name)
        self.tracing = Tracing(config.tracing, environ, reactor, self.metrics.drop_spans)
        self._clock = reactor
        self.ledger: UsageLedger | None = None  # where each API call's row goes (inference.usage.store)
        self.provider = provider_name
        self.upstream = "fleet"  # the one host's name; a fleet's calls say which host served them (their Route)
        self.metrics_path: bytes | None = config.metrics.path.encode() if config.metrics.enabled else None
        self.metrics_route = config.metrics.path
        self._config = config
        # Probes and scrapes every few seconds would bury the traces that matter.
        self._untraced = {self.metrics_route, "/health/live", "/health/ready"}
        upstream = urlsplit(base_url)
        self.server_attributes: dict[str, Any] = {}
        if upstream.scheme in ("http", "https") and upstream.hostname:
            self.server_attributes = {"server.address": upstream.hostname,
                                       "server.port": upstream.port or (443 if upstream.scheme == "https" else 80)}
        self._client_starts: dict[tuple[str, str, bool], StartAttributes] = {}

    # -- HTTP requests -------------------------------------------------------------------------------------------

    def request_started(self, request: RequestState, route: str) -> None:
        record = request.record
        record.started = perf_counter()
        record.route = route
        if self.tracing.tracer is None or route in self._untraced:
            return
        name, start = _server_start(request, route)
        span = record.span = self.tracing.start_server_span(name, request.requestHeaders, dict(start.attributes),
                                                            start)
        if span is not None:
            record.trace_id, record.exemplar = self.tracing.ids(span)

    def refused(self, method: bytes | None, route: str, status: int) -> None:
        """A request the connection answered itself, before routing (malformed, oversized, too slow)."""
        label = method_label(method.decode("latin-1")) if method else "_OTHER"
        self.metrics.child(self.metrics.http_requests, label, route, str(status)).inc()

    def request_ended(self, request: RequestState, code: int | None) -> None:
        """The response's last byte is out (``code``), or the client left first (``code`` None: logged as 499)."""
        record = request.record
        if record.recorded:
            return
        record.recorded = True
        now = perf_counter()
        metrics = self.metrics
        method = method_label(request.method.decode("latin-1"))
        label = str(code) if code is not None else "499"
        span, exemplar = record.span, record.exemplar
        metrics.child(metrics.http_requests, method, record.route, label).inc()
        record.duration = now - record.started
        metrics.child(metrics.http_duration, method, record.route, label).observe(record.duration, exemplar)
        if record.answered_at is not None and code is not None:
            metrics.child(metrics.overhead, record.route).observe(
                record.overhead_before + now - record.answered_at, exemplar)
        caller = record.caller
        if caller is not None and record.operation is not None:
            self._tenant_usage(record, caller, label)
        if span is None:
            return
        if caller is not None and caller.key_id is not None:  # the tenant and which of its keys; never the key
            span.set_attributes({"inference.tenant": caller.tenant.name, "inference.key_id": caller.key_id})
        if code is not None:
            span.set_attribute("http.response.status_code", code)
        if (code is not None and code >= 500) or record.stream_failed:
            span.set_attribute("error.type", record.error_code or label)
            span.set_status(Status(StatusCode.ERROR))
        elif code is None:
            span.add_event("client_disconnected")
        span.end()

    def _tenant_usage(self, record: CallRecord, caller: Caller, status: str) -> None:
        """The tenant's call and tokens (the tenant label is bounded: the key file's tenants), and its ledger row."""
        metrics, tenant, model = self.metrics, caller.tenant.name, record.model or "none"
        operation = record.operation or "none"
        metrics.child(metrics.tenant_requests, tenant, model, operation, status).inc()
        if record.input_tokens:
            metrics.child(metrics.tenant_tokens, tenant, model, "input").inc(record.input_tokens)
        if record.output_tokens:
            metrics.child(metrics.tenant_tokens, tenant, model, "output").inc(record.output_tokens)
        if self.ledger is not None:
            ttft = record.time_to_first_token
            self.ledger.record(UsageRow(
                self._clock.seconds(), tenant, caller.key_id, record.model, record.upstream or self.upstream,
                operation, int(status), record.input_tokens, record.output_tokens,
                round(ttft * 1000, 2) if ttft is not None else None, round(record.duration * 1000, 2)))

    # -- upstream calls ------------------------------------------------------------------------------------------

    def upstream_call(self, request: RequestState, operation: Operation, body: dict[str, Any], stream: bool,
                      slot: Any) -> UpstreamCall:
        """Start recording an upstream call, made with the admission ``slot`` it waited for."""
        span = request.record.span
        if slot.queued and span is not None:
            span.set_attribute("inference.queue.wait_seconds", slot.waited)
            span.add_event("queued", {"inference.queue.wait_seconds": slot.waited},
                           timestamp=time_ns() - int(slot.waited * 1e9))
        return UpstreamCall(self, request, operation, body, stream, slot.waited)

    def client_start(self, operation: Operation, model: str, stream: bool) -> StartAttributes:
        """The CLIENT span's first attributes: the same for every call of an operation to a model, so made once."""
        key = (operation.name, model, stream)
        start = self._client_starts.get(key)
        if start is None:
            start = start_attributes({"gen_ai.operation.name": operation.gen_ai_name,
                                      "gen_ai.provider.name": self.provider, "gen_ai.request.model": model,
                                      "gen_ai.request.stream": stream, **self.server_attributes,
                                      **dict(operation.span_attributes)})
            if len(model) <= _KEPT_BYTES:
                if len(self._client_starts) >= _KEPT_MODELS:
                    self._client_starts.clear()
                self._client_starts[key] = start
        return start

    def set_upstream_up(self, up: bool) -> None:
        self.metrics.set_upstream_up(up)

    def describe(self) -> dict[str, Any]:
        metrics = self._config.metrics
        return {"metrics": {"enabled": metrics.enabled, "path": metrics.path if metrics.enabled else None},
                "tracing": self.tracing.describe()}

    def close(self) -> Deferred[Any]:
        return self.tracing.shutdown()


class UpstreamCall:
    """One upstream call of any operation, from the call out to its end, whichever way it ends (once)."""

    def __init__(self, telemetry: Telemetry, request: RequestState, operation: Operation, body: dict[str, Any],
                 stream: bool, queued: float) -> None:
        self.started = perf_counter()
        # The same moment by the wall clock: the span starts then, and its events are placed from it. Read apart,
        # a thread descheduled between the two reads put a stream's first token after its span's end.
        self._started_ns = time_ns()
        self._telemetry = telemetry
        self._request = request
        self._operation = operation
        self._body = body
        self._model = body["model"]
        self._stream = stream
        self._ended = False
        self.served = NOT_SAID  # how the provider served it (translated, the fleet's route, a model load)
        request.record.overhead_before = self.started - request.record.started - queued
        tracing = telemetry.tracing
        self.capture_content = tracing.capture_content
        self.span: Span | None = None
        self.headers: dict[str, str] = {}
        if tracing.tracer is not None:
            start = telemetry.client_start(operation, self._model, stream)
            self.span = tracing.start_client_span(f"{operation.gen_ai_name} {self._model}", request.record.span,
                                                  self._span_attributes(start), self._started_ns, start)
            self.headers = tracing.trace_headers(self.span)

    def _span_attributes(self, start: StartAttributes) -> dict[str, Any]:
        """The call's own attributes after the ones it shares (``start``): its parameters, and its prompt if kept."""
        body, operation = self._body, self._operation
        attributes: dict[str, Any] = dict(start.attributes)
        for key in body:  # (a body has a few keys; the parameters recorded are nine)
            name = _REQUEST_ATTRIBUTES.get(key)
            if name is not None and body[key].__class__ in _NUMBERS:  # JSON's numbers; not booleans
                attributes[name] = body[key]
        stop = body.get("stop")
        if stop:
            attributes["gen_ai.request.stop_sequences"] = [stop] if isinstance(stop, str) else \
                [s for s in stop if isinstance(s, str)]
        if self.capture_content:
            attributes["gen_ai.input.messages"] = json.dumps(body.get(operation.input_field), ensure_ascii=False)
        return attributes

    # -- endings -------------------------------------------------------------------------------------------------

    def __enter__(self) -> UpstreamCall:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: Any) -> None:
        """Whatever escapes the call ends it: a cancel (the client left), a gateway error, or a bug."""
        if error is None:
            return
        if isinstance(error, CancelledError):
            self.abandoned()
        elif isinstance(error, GatewayError):
            self.failed(error)
        else:
            self.failed(GatewayError("internal gateway error"))

    def answered(self, answer: dict[str, Any]) -> None:
        """A non-streaming answer arrived whole."""
        self._end("success", self._operation.read_answer(answer, self.capture_content))

    def streamed(self, stats: StreamStats) -> None:
        """A stream ended: completed, failed (an error event was sent) or abandoned by the client."""
        if stats.client_gone:
            return self.abandoned(stats)
        if stats.error is not None:
            self._request.record.stream_failed = True
            self._request.record.error_code = stats.error.code
        self._end("error" if stats.error is not None else "success", _facts_of(stats),
                  first_token_at=stats.first_token_at, chunks=stats.content_chunks, error=stats.error)

    def failed(self, error: GatewayError) -> None:
        self._request.record.error_code = error.code
        self._end("error", Facts(), error=error)

    def abandoned(self, stats: StreamStats | None = None) -> None:
        """The client left before the answer ended (the upstream call was cancelled).

        What a stream generated until then still counts as tokens (the upstream did that work).
        """
        if not self._ended:
            self._telemetry.metrics.client_disconnects_child.inc()
        if stats is None:
            self._end("disconnected", Facts())
        else:
            self._end("disconnected", _facts_of(stats), chunks=stats.content_chunks)

    def _end(self, outcome: str, facts: Facts, *, first_token_at: float | None = None, chunks: int | None = None,
             error: GatewayError | None = None) -> None:
        """Record the call once: on the request's record (the access log), as metrics, on the span. ``chunks`` is
        how many content deltas a stream relayed (None: not a stream that started): the output token count when
        the upstream sent no usage, as llama.cpp's Python server and older LM Studio do. The prompt's count is
        never guessed."""
        if self._ended:
            return
        self._ended = True
        output_tokens, usage_source = facts.output_tokens, "upstream" if facts.output_tokens is not None else None
        if output_tokens is None and chunks is not None:
            output_tokens, usage_source = chunks, "counted"
        served = self.served
        ended = _Ended(outcome, facts, perf_counter(), first_token_at, output_tokens, usage_source, error,
                       served.route if error is None else (error.route or served.route),
                       served.model_load if error is None else (error.model_load or served.model_load))
        self._fill_record(ended)
        self._observe(ended)
        if self.span is not None:
            self._trace(self.span, ended)

    def _fill_record(self, ended: _Ended) -> None:
        """What the access line says of the call."""
        record = self._request.record
        record.answered_at = ended.at
        record.model, record.input_tokens, record.output_tokens = \
            self._model, ended.facts.input_tokens, ended.output_tokens
        if self.served.translated:
            record.via = CHAT.path
        if ended.first_token_at is not None:
            record.time_to_first_token = ended.first_token_at - record.started
        if ended.route is not None:
            record.upstream = ended.route.host

    def _observe(self, ended: _Ended) -> None:
        """The call's metrics: duration, tokens, first token and speed, routing, upstream errors and health."""
        telemetry, record, error = self._telemetry, self._request.record, ended.error
        metrics, exemplar = telemetry.metrics, record.exemplar
        operation, provider, model = self._operation.name, telemetry.provider, self._model
        stream = "true" if self._stream else "false"
        metrics.child(metrics.request_duration, operation, provider, model, stream, ended.outcome).observe(
            ended.at - record.started, exemplar)
        if ended.facts.input_tokens is not None:
            metrics.child(metrics.tokens, operation, provider, model, "input").inc(ended.facts.input_tokens)
        if ended.output_tokens is not None:
            metrics.child(metrics.tokens, operation, provider, model, "output").inc(ended.output_tokens)
        generated = ended.output_tokens or 0
        if ended.first_token_at is not None:
            metrics.child(metrics.time_to_first_token, operation, provider, model).observe(
                ended.first_token_at - record.started, exemplar)
            self._observe_speed(generated - 1, ended.at - ended.first_token_at, exemplar)  # decoding after the 1st
        elif not self._stream and ended.outcome == "success":
            self._observe_speed(generated, ended.at - self.started, exemplar)
        route = ended.route
        upstream = route.host if route is not None else telemetry.upstream
        if route is not None:
            metrics.child(metrics.routing_decisions, route.host, route.reason).inc()
            for failed, kind in route.failed:  # the hosts tried before, each its own failure
                metrics.child(metrics.upstream_errors, provider, failed, kind).inc()
        if error is not None and error.kind is not None:
            metrics.child(metrics.upstream_errors, provider, upstream, error.kind).inc()
        if error is not None and error.kind == "unreachable":
            metrics.set_upstream_up(False)
        elif ended.outcome == "success" or (error is not None and error.kind in ("rejected", "server_error")):
            metrics.set_upstream_up(True)

    def _trace(self, span: Span, ended: _Ended) -> None:
        """The CLIENT span's closing attributes, events and status."""
        attributes: dict[str, Any] = {**ended.facts.attributes, **_answer_attributes(ended),
                                      **self._served_attributes(span, ended)}
        if ended.first_token_at is not None:
            attributes["gen_ai.response.time_to_first_chunk"] = ended.first_token_at - self.started
            span.add_event("first_token",
                           timestamp=self._started_ns + int((ended.first_token_at - self.started) * 1e9))
        if ended.outcome == "disconnected":
            attributes["error.type"] = "cancelled"
            span.set_status(Status(StatusCode.ERROR, "the client disconnected"))
        elif ended.error is not None:
            attributes["error.type"] = ended.error.code or type(ended.error).__name__
            span.set_status(Status(StatusCode.ERROR, ended.error.message))
        span.set_attributes(attributes)
        span.end()

    def _served_attributes(self, span: Span, ended: _Ended) -> dict[str, Any]:
        """How the call was served: the fleet's routing (and a ``failover`` event per host passed over), a model
        load, a translation and what it left out."""
        attributes: dict[str, Any] = {}
        route = ended.route
        if route is not None:
            attributes["inference.upstream.name"] = route.host
            attributes["inference.routing.reason"] = route.reason
            if route.step:
                attributes["inference.routing.step"] = route.step
            if route.key_source is not None:
                attributes["inference.routing.key_source"] = route.key_source
            for failed, kind in route.failed:
                span.add_event("failover", {"inference.upstream.name": failed, "error.type": kind})
        if ended.model_load is not None:  # the call began with the host loading the model
            span.add_event("model_load", {"inference.load_timeout_secs": ended.model_load},
                           timestamp=self._started_ns)
        translation = self._operation.translation
        if translation is not None:
            attributes["inference.api.translated"] = self.served.translated
            dropped = translation.dropped(self._body) if self.served.translated else []
            if dropped:
                attributes["inference.translation.dropped"] = dropped
                log.debug("{route} served through {via}, which has no words for {dropped}: left out",
                          route=self._operation.path, via=CHAT.path, dropped=", ".join(dropped))
        return attributes

    def _observe_speed(self, tokens: int, seconds: float, exemplar: dict[str, str] | None) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        metrics, labels = self._telemetry.metrics, (self._operation.name, self._telemetry.provider, self._model)
        metrics.child(metrics.time_per_output_token, *labels).observe(seconds / tokens, exemplar)
        metrics.child(metrics.tokens_per_second, *labels).observe(tokens / seconds, exemplar)


@dataclass(frozen=True)
class _Ended:
    """How an upstream call ended, worked out once for the record, the metrics and the span."""

    outcome: str  # success, error or disconnected
    facts: Facts
    at: float  # perf_counter()
    first_token_at: float | None
    output_tokens: int | None  # the upstream's count, else the content deltas a stream relayed
    usage_source: str | None  # upstream, counted
    error: GatewayError | None
    route: Route | None
    model_load: float | None


def _answer_attributes(ended: _Ended) -> dict[str, Any]:
    """What the answer said of itself, as GenAI attributes (its content only when it was kept)."""
    facts = ended.facts
    attributes: dict[str, Any] = {}
    if facts.response_id is not None:
        attributes["gen_ai.response.id"] = facts.response_id
    if facts.response_model is not None:
        attributes["gen_ai.response.model"] = facts.response_model
    if facts.finish_reasons:
        attributes["gen_ai.response.finish_reasons"] = list(facts.finish_reasons)
    if facts.input_tokens is not None:
        attributes["gen_ai.usage.input_tokens"] = facts.input_tokens
    if ended.output_tokens is not None:
        attributes["gen_ai.usage.output_tokens"] = ended.output_tokens
        attributes["inference.usage.source"] = ended.usage_source
    if facts.output is not None:
        attributes["gen_ai.output.messages"] = json.dumps(
            [{"role": "assistant", "content": content} for content in facts.output], ensure_ascii=False)
    return attributes


def _facts_of(stats: StreamStats) -> Facts:
    """What a stream told about its answer, as a non-streaming answer would have (the text joined, if kept)."""
    if stats.text is not None:
        stats.facts.output = ["".join(stats.text)]
    return stats.facts
