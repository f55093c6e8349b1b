"""The HTTP API (Klein routes). Thin on purpose: parse, resolve, call the provider, answer."""

from __future__ import annotations

from typing import Any, cast

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import Request
from werkzeug.exceptions import MethodNotAllowed as RouteMethodNotAllowed
from werkzeug.exceptions import NotFound as RouteNotFoundError

from . import __version__, jsonio
from .admission import Admission
from .auth import ApiKeys
from .catalog import ModelCatalog
from .config import DEFAULT_MAX_OUTPUT_TOKENS, Config
from .drain import InFlight, Job
from .errors import (
    ContextLengthExceeded,
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    PermissionDenied,
    RouteNotFound,
    UpstreamTimeout,
    UpstreamUnreachable,
    reason_phrase,
)
from .fairness import Shares
from .monitor import UpstreamMonitor
from .openapi import openapi_bytes
from .operations import CHAT, COMPLETIONS, EMBEDDINGS, MESSAGES, RESPONSES, Operation
from .providers import Provider
from .quota import Lease, Quota, quota_store
from .reactor import IGatewayReactor
from .relay import StreamRelay
from .request import GatewayRequest
from .routing.demand import CHARS_PER_TOKEN, Demand
from .telemetry import RequestState, Telemetry
from .tenants import ANONYMOUS, Caller
from .usage import MAX_GROUPS, iso, parse_group_by, parse_when

log = Logger()

JSON = b"application/json"

OPERATIONS = (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, MESSAGES)

_POST_ROUTES = ", ".join(f"POST {op.path}" for op in OPERATIONS)
_ROUTES = {path.encode(): path for path in
           (*(op.path for op in OPERATIONS), "/v1/models", "/v1/usage", "/health", "/health/live", "/health/ready",
            "/openapi.json")}


def route_of(path: bytes) -> str:
    """The route a path is served by, as a metric label: a fixed set, whatever clients send."""
    route = _ROUTES.get(path)
    if route is not None:
        return route
    if path.startswith(b"/v1/models/"):
        return "/v1/models/{model}"
    return "other"


def write_json(request: IRequest, payload: Any, status: int = 200) -> bytes:
    """Set the status, content type and length and return the encoded body (Klein writes it and finishes)."""
    return write_body(request, jsonio.dumps(payload), status)


def write_body(request: IRequest, body: bytes, status: int = 200) -> bytes:
    """A JSON body already encoded. With its length known the answer goes out in one piece, not chunked."""
    request.setResponseCode(status, reason_phrase(status))
    request.setHeader(b"Content-Type", JSON)
    request.setHeader(b"Content-Length", b"%d" % len(body))
    return body


def write_error(request: IRequest, error: GatewayError) -> bytes:
    """The error's status, headers and body, in the shape of the API the request is for (OpenAI's, or Anthropic's
    on ``/v1/messages``); the code is kept for the access log and spans."""
    anthropic = False
    if isinstance(request, RequestState):
        request.record.error_code = error.code
        anthropic = request.record.error_style == "anthropic"
    for name, value in error.headers.items():
        request.setHeader(name, value)
    if anthropic:  # Anthropic's errors name the request they answer
        body = {**error.anthropic_body(), "request_id": getattr(request, "request_id", None)}
        return write_json(request, body, error.status)
    return write_json(request, error.body(), error.status)


class Gateway:
    """The application: one per process, holding the provider and everything a request needs."""

    app = Klein()

    def __init__(self, config: Config, provider: Provider, reactor: IGatewayReactor, telemetry: Telemetry) -> None:
        self.config = config
        self.provider = provider
        self.reactor = reactor
        self.telemetry = telemetry
        inference = config.inference
        self.catalog = ModelCatalog(provider, reactor, inference.models_cache_secs, inference.allowed_models,
                                    inference.default_model)
        self.shares = provider.fair_shares() or Shares()  # the tenants' use, which orders every queue of calls
        self.admission = Admission(inference.max_concurrent_requests, inference.max_queue,
                                   telemetry.metrics.queue_wait_child.observe, self.shares, inference.shed_above)
        self.quota = Quota(quota_store(inference.limits, reactor, telemetry.metrics), reactor)
        self.inflight = InFlight(reactor)
        self.monitor = UpstreamMonitor(self.probe_upstream, reactor, inference.health_check_secs,
                                       provider.base_url)
        telemetry.metrics.track_load(lambda: self.admission.active, lambda: self.admission.queued)
        self.keys = ApiKeys(config.server.api_keys, config.server.api_keys_file)
        self._protect_operator_routes = config.server.protect_metrics
        self._openapi = openapi_bytes(config)

    def start(self) -> None:
        """Begin watching the upstream, and writing usage (the daemon calls it once it runs)."""
        self.monitor.start()
        if self.telemetry.ledger is not None:
            self.telemetry.ledger.start()

    async def close(self) -> None:
        """Release upstream connections and flush telemetry (at shutdown)."""
        self.monitor.stop()
        await self.quota.store.close()
        if self.telemetry.ledger is not None:
            await self.telemetry.ledger.close()
        await self.provider.close()
        await self.telemetry.close()

    # -- OpenAI API ----------------------------------------------------------------------------------------------

    @app.route("/", methods=["GET", "HEAD"])
    def root(self, request: GatewayRequest) -> bytes:
        """What this server is, in a few words: clients (Claude Code) check that the base URL answers."""
        return write_json(request, {"name": "inference", "version": __version__,
                                    "description": "OpenAI- and Anthropic-compatible inference gateway",
                                    "routes": [f"POST {op.path}" for op in OPERATIONS] + ["GET /v1/models"],
                                    "docs": "/openapi.json", "health": "/health"})

    @app.route(CHAT.path, methods=["POST"])
    async def chat_completions(self, request: GatewayRequest) -> bytes | None:
        return await self._serve(request, CHAT)

    @app.route(COMPLETIONS.path, methods=["POST"])
    async def completions(self, request: GatewayRequest) -> bytes | None:
        return await self._serve(request, COMPLETIONS)

    @app.route(EMBEDDINGS.path, methods=["POST"])
    async def embeddings(self, request: GatewayRequest) -> bytes | None:
        return await self._serve(request, EMBEDDINGS)

    @app.route(RESPONSES.path, methods=["POST"])
    async def responses(self, request: GatewayRequest) -> bytes | None:
        return await self._serve(request, RESPONSES)

    @app.route(MESSAGES.path, methods=["POST"])
    async def messages(self, request: GatewayRequest) -> bytes | None:
        return await self._serve(request, MESSAGES)

    async def _serve(self, request: GatewayRequest, operation: Operation) -> bytes | None:
        """Every API call's steps: auth, parse, resolve the model, admission, deadline, the upstream call, the
        answer or the relayed stream, and the record of it all."""
        record = request.record
        record.error_style, record.operation = operation.error_style, operation.name
        anthropic = operation.error_style == "anthropic"
        if anthropic:  # Anthropic's clients read the request's id from this header
            request.setHeader(b"request-id", request.request_id)
        caller = record.caller = self._authorize(request, operation)
        server = self.config.server
        raw = self._body(request)
        parsed = operation.parse(raw, self.config)
        self.monitor.require_up()
        with self.inflight.track(server.request_timeout_secs) as job:
            # The common case (a model in the cached list, no limit, a free slot) is answered without a Deferred.
            kind, tenant = operation.model_kind, caller.tenant
            model = self.catalog.cached(parsed.model, kind, tenant) or \
                await job.run(self.catalog.resolve(parsed.model, kind, tenant))
            parsed.body["model"] = record.model = model
            if operation.output_limits:
                context = self.catalog.context_length(parsed.body["model"])  # (where the upstream says it)
                if context is not None:
                    self._check_context(operation, parsed.body, context)
                operation.limit_output(parsed.body, self.config.inference.limits.max_output_tokens or context
                                       or DEFAULT_MAX_OUTPUT_TOKENS)
            lease = await job.run(self.quota.admit(caller, anthropic)) if tenant.limits.any else None
            try:
                return await self._call(request, operation, parsed.body, parsed.stream, caller, lease, len(raw),
                                        job)
            finally:
                self._used(caller, lease, request)

    async def _call(self, request: GatewayRequest, operation: Operation, body: dict[str, Any], stream_asked: bool,
                    caller: Caller, lease: Lease | None, size: int, job: Job) -> bytes | None:
        """The upstream call, once the call may be made: its slot, the answer or the relayed stream."""
        if lease is not None:  # every answer of a limited tenant says where it stands
            for header, said in lease.headers.items():
                request.setHeader(header, said)
        cost = size / CHARS_PER_TOKEN  # the prompt's tokens, roughly: its share of the slots
        slot = self.admission.try_acquire(caller, cost)
        if slot is None:
            slot = await job.run(self.admission.acquire(caller, cost))
        with slot, self.telemetry.upstream_call(request, operation, body, stream_asked, slot) as call:
            headers = call.headers
            for name in operation.forward_headers:
                value = request.getHeader(name)
                if value is not None:
                    headers = {**headers, name.decode("latin-1"): value.decode("latin-1")}
            if not stream_asked or operation.read_event is None:
                answer = await job.run(self.provider.call(operation, body, headers, caller))
                call.served = answer.served
                call.answered(answer.data)
                return write_body(request, answer.raw)
            stream = await job.run(self.provider.open_stream(operation, body, headers, caller))
            call.served = stream.served
            job.clear_deadline()
            relay = StreamRelay(request, stream, operation.read_event, operation.stream_format,
                                call.capture_content)
            job.on_interrupt(relay.interrupt)
            try:
                await relay.run()
            finally:  # also when the client left: what was generated until then is counted
                call.streamed(relay.stats)
            return None  # the relay wrote everything; Klein finishes the response

    @app.route("/v1/models", methods=["GET"])
    async def list_models(self, request: GatewayRequest) -> bytes:
        tenant = self._authorize(request).tenant  # (a key first: an unknown client learns nothing of the upstream)
        self.monitor.require_up()
        return write_json(request, {"object": "list", "data": await self.catalog.models(tenant=tenant)})

    @app.route("/v1/models/<path:model_id>", methods=["GET"])
    async def get_model(self, request: GatewayRequest, model_id: str) -> bytes:
        tenant = self._authorize(request).tenant
        return write_json(request, await self.catalog.get(model_id, tenant))

    @app.route("/v1/usage", methods=["GET"])
    async def usage(self, request: GatewayRequest) -> bytes:
        """Calls and tokens per tenant, model, day ... from the usage ledger (operators' keys only)."""
        self.authorize_operator(request, always=True)
        ledger = self.telemetry.ledger
        if ledger is None:
            raise RouteNotFound("No usage ledger: set inference.usage.store (sqlite:///path or postgresql://...).")
        now = self.reactor.seconds()
        since = self._query_time(request, "from", now - 7 * 86400, now)
        until = self._query_time(request, "to", now + 1, now)
        try:
            asked = self._query(request, "group_by")
            group_by = parse_group_by("tenant,model" if asked is None else asked)
        except ValueError as e:
            raise InvalidRequest(str(e), param="group_by") from None
        rows = await ledger.summary(since, until, group_by) if until > since else []  # (an empty span: no rows)
        return write_json(request, {"object": "usage", "from": iso(since), "to": iso(until), "group_by": group_by,
                                    "data": rows, "truncated": len(rows) >= MAX_GROUPS})

    @app.route("/openapi.json", methods=["GET"])
    def openapi(self, request: GatewayRequest) -> bytes:
        return write_body(request, self._openapi)

    # -- health --------------------------------------------------------------------------------------------------

    @app.route("/health", methods=["GET"])
    async def health(self, request: GatewayRequest) -> bytes:
        self.authorize_operator(request)
        upstream = await self.probe_upstream()
        http = self.config.inference.http
        payload = {
            "status": "healthy" if upstream["reachable"] else "unhealthy",
            "version": __version__,
            "provider": self.provider.name,
            "base_url": self.provider.base_url,
            "http_config": {
                "timeout_secs": http.timeout_secs,
                "connect_timeout_secs": http.connect_timeout_secs,
                "keep_alive_secs": http.keep_alive_secs,
                "max_idle_connections": http.max_idle_connections,
            },
            "upstream": upstream,
            "observability": self.telemetry.describe(),
        }
        return write_json(request, payload, 200 if upstream["reachable"] else 503)

    @app.route("/health/live", methods=["GET"])
    def live(self, request: GatewayRequest) -> bytes:
        self.authorize_operator(request)
        return write_json(request, {"status": "ok"})

    @app.route("/health/ready", methods=["GET"])
    async def ready(self, request: GatewayRequest) -> bytes:
        self.authorize_operator(request)
        if self.inflight.draining:  # a load balancer should send nothing more here
            return write_json(request, {"status": "not ready", "error": "shutting down"}, 503)
        if self.monitor.enabled and self.monitor.up is not None:  # the background probe's answer: no upstream call
            reachable, error = self.monitor.up, self.monitor.error
        else:
            upstream = await self.probe_upstream()
            reachable, error = upstream["reachable"], upstream["error"]
        hosts = self.provider.host_status()
        if hosts:  # a fleet: ready while one host serves (answers, and is not left out after failures)
            states = {host["name"]: host["state"] for host in hosts}
            if reachable and "serving" in states.values():
                return write_json(request, {"status": "ready", "hosts": states})
            error = error or "no host serves: each is down or left out after failures"
            return write_json(request, {"status": "not ready", "error": error, "hosts": states}, 503)
        if reachable:
            return write_json(request, {"status": "ready"})
        return write_json(request, {"status": "not ready", "error": error}, 503)

    async def probe_upstream(self) -> dict[str, Any]:
        """Ask the upstream for its models, waiting no longer than a connect would (a probe must be quick).

        A probe that times out while calls are in flight means busy, not down: llama.cpp's Python server, and LM
        Studio with one parallel slot, answer their model list only after the running generation. Down is a
        refused or reset connection, or a probe that times out with no call in flight. The answer also sets
        ``inference_upstream_up``.
        """
        timeout = self.config.inference.http.connect_timeout_secs
        try:
            models = await self.provider.list_models(timeout=timeout)
        except UpstreamTimeout:
            if self.admission.active:  # busy, not down: a one-slot server answers its list after the generation
                self.telemetry.set_upstream_up(True)
                return {"reachable": True, "busy": True, "error": None, "models": self.monitor.models}
            self.telemetry.set_upstream_up(False)
            return {"reachable": False, "error": f"upstream did not answer within {timeout:g}s", "models": []}
        except GatewayError as e:
            self.telemetry.set_upstream_up(False)
            return {"reachable": False, "error": e.message, "models": []}
        self.telemetry.set_upstream_up(True)
        answer = {"reachable": True, "error": None, "models": [m["id"] for m in models]}
        hosts = self.provider.host_status()
        if hosts:  # a fleet: reachable while one host answers; each host says how it is
            answer["hosts"] = hosts
        return answer

    # -- errors --------------------------------------------------------------------------------------------------

    @app.handle_errors(GatewayError)
    def gateway_error(self, request: IRequest, failure: Failure) -> bytes:
        return self._error(request, cast(GatewayError, failure.value))  # what this handler is registered for

    @app.handle_errors(RouteNotFoundError)
    def not_found(self, request: IRequest, failure: Failure) -> bytes:
        path = request.path.decode("utf-8", "replace")
        return self._error(request, RouteNotFound(f"No route {path}. See GET /v1/models, {_POST_ROUTES}, GET /health."))

    @app.handle_errors(RouteMethodNotAllowed)
    def method_not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        allowed = sorted(cast(RouteMethodNotAllowed, failure.value).valid_methods or [])
        error = MethodNotAllowed(f"Method {request.method.decode()} is not allowed on "
                                 f"{request.path.decode('utf-8', 'replace')}; use {', '.join(allowed)}",
                                 headers={"Allow": ", ".join(allowed)})
        return self._error(request, error)

    @app.handle_errors(Exception)
    def unexpected(self, request: IRequest, failure: Failure) -> bytes:
        log.failure("unexpected error answering {method} {path}", failure, method=request.method.decode(),
                    path=request.path.decode("utf-8", "replace"), request_id=getattr(request, "request_id", None),
                    trace_id=request.record.trace_id if isinstance(request, RequestState) else None)
        return self._error(request, GatewayError("internal gateway error; see the gateway log"))

    def _error(self, request: IRequest, error: GatewayError) -> bytes:
        if isinstance(error, UpstreamUnreachable):
            self.monitor.suspect()  # so the next requests fail fast, not after their own connect attempts
        return write_error(request, error)

    # -- helpers -------------------------------------------------------------------------------------------------

    @staticmethod
    def _check_context(operation: Operation, body: dict[str, Any], context: int) -> None:
        """A prompt longer than ``context`` (the largest the model is loaded with) is refused before any upstream
        call. Its output limit is not counted: it is lowered to fit rather than refused, as agents ask for more
        output (Claude Code 32,000 tokens) than a local context holds."""
        demand = Demand.of(body, operation.output_limits)
        if not demand.fits_prompt(context):
            raise ContextLengthExceeded(
                f"prompt is too long: about {demand.prompt_tokens} tokens > {context} maximum. This model's maximum "
                f"context length is {context} tokens, as loaded; the prompt comes to about {demand.prompt_tokens} "
                f"tokens ({CHARS_PER_TOKEN} characters a token). Shorten it, or load the model with a larger "
                "context length.", param=operation.input_field)

    def _authorize(self, request: GatewayRequest, operation: Operation | None = None) -> Caller:
        """Whose call it is, from the gateway key in ``Authorization: Bearer`` (Anthropic's clients send it as
        ``x-api-key``)."""
        authorization = request.getHeader(b"authorization")
        if authorization is None and operation is not None and operation.error_style == "anthropic":
            api_key = request.getHeader(b"x-api-key")
            authorization = b"Bearer " + api_key if api_key is not None else None
        return self.keys.check(authorization)

    def authorize_operator(self, request: Request, always: bool = False) -> None:
        """Metrics and health need an operator's key only when ``server.protect_metrics`` says so (probes stay
        simple); ``always`` for what only operators may read (usage)."""
        if self._protect_operator_routes or always:
            caller = self.keys.check(request.getHeader(b"authorization"))
            if not caller.tenant.operator:
                raise PermissionDenied(f"Tenant '{caller.tenant.name}' is not an operator: this route is for keys "
                                       "of a tenant with operator: true.")

    def _used(self, caller: Caller, lease: Lease | None, request: GatewayRequest) -> None:
        """A call ended: its tokens count against its tenant's limits and in its share of the slots."""
        if caller is ANONYMOUS:
            return
        record = request.record
        if lease is not None:
            lease.end((record.input_tokens or 0) + (record.output_tokens or 0))
        self.shares.used(caller, record.output_tokens or 0)

    @staticmethod
    def _query(request: GatewayRequest, name: str) -> str | None:
        values = request.args.get(name.encode())
        return values[0].decode("utf-8", "replace") if values else None

    def _query_time(self, request: GatewayRequest, name: str, default: float, now: float) -> float:
        value = self._query(request, name)
        if value is None:
            return default
        try:
            return parse_when(value, now)
        except ValueError:
            raise InvalidRequest(f"'{name}' must be a date (2026-12-01), an ISO time, Unix seconds, or an age like "
                                 f"7d, 24h or 30m; not {value[:40]!r}", param=name) from None

    @staticmethod
    def _body(request: GatewayRequest) -> bytes:
        return request.content.read() if request.content is not None else b""
