"""Every failure the gateway reports, as one hierarchy mapped to an HTTP status and OpenAI's error shape.

Code anywhere raises a :class:`GatewayError`; the HTTP layer alone turns it into a response, so the table in
docs/design.md lives here and nowhere else.
"""

from __future__ import annotations

import json
import re
from typing import Any

from twisted.web.http import RESPONSES


class GatewayError(Exception):
    """A failure the client is told about: ``status`` plus ``{"error": {message, type, param, code}}``."""

    status = 500
    type = "api_error"
    code: str | None = "internal_error"
    kind: str | None = None
    """How the upstream failed, for ``inference_upstream_errors_total``; None when the upstream is not to blame."""
    route: Any = None  # the fleet's Route to the host that failed last (providers.base.Route)
    model_load: float | None = None  # the host was loading the model: the first-byte deadline it was given

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        if kind is not None:
            self.kind = kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_bytes(self) -> bytes:
        return json.dumps(self.body()).encode("utf-8")

    def responses_error(self) -> dict[str, Any]:
        """The Responses API's ``error`` stream event's own fields (its type and sequence number are the stream's)."""
        return {"code": self.code, "message": self.message, "param": self.param}

    def response_failure(self) -> dict[str, Any]:
        """A failed response's ``error`` object: a stream that failed after its 200 failed on the server's side
        (the spec's response error codes are its own list, which ``server_error`` is on)."""
        return {"code": "server_error", "message": self.message}

    def anthropic_body(self) -> dict[str, Any]:
        """The same failure in the shape of Anthropic's Messages API (its ``error.type`` follows the status)."""
        return {"type": "error", "error": {"type": ANTHROPIC_TYPES.get(self.status, "api_error"),
                                           "message": self.message}}


_MISSING_REASONS = {429: b"Too Many Requests", 431: b"Request Header Fields Too Large"}


def reason_phrase(status: int) -> bytes:
    """The status line's reason phrase: Twisted's own, and those it lacks (it would say ``429 Unknown Status``)."""
    return _MISSING_REASONS.get(status) or RESPONSES.get(status, b"Error")


ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
                   413: "request_too_large", 414: "invalid_request_error", 429: "rate_limit_error",
                   431: "invalid_request_error", 503: "overloaded_error", 504: "timeout_error"}


class InvalidRequest(GatewayError):
    status, type, code = 400, "invalid_request_error", "invalid_parameter"


class InvalidJSON(InvalidRequest):
    code = "invalid_json"


class AmbiguousModel(InvalidRequest):
    code = "ambiguous_model"


class ContextLengthExceeded(InvalidRequest):
    """OpenAI's code for a prompt the model cannot hold (agents compact their history on it); the message starts
    as Anthropic's does ("prompt is too long"), which Claude Code reads the same way."""

    code = "context_length_exceeded"


class AuthenticationFailed(GatewayError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class PermissionDenied(GatewayError):
    status, type, code = 403, "permission_error", "permission_denied"


class ModelNotFound(GatewayError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class RouteNotFound(GatewayError):
    status, type, code = 404, "invalid_request_error", "not_found"


class MethodNotAllowed(GatewayError):
    status, type, code = 405, "invalid_request_error", "method_not_allowed"


class RequestTooLarge(GatewayError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class BadHTTPRequest(GatewayError):
    """The bytes received are not a valid HTTP/1.1 request (answered by the connection, before routing)."""

    status, type, code = 400, "invalid_request_error", "bad_request"


class RequestReadTimeout(GatewayError):
    status, type, code = 408, "invalid_request_error", "request_read_timeout"


class URLTooLong(GatewayError):
    status, type, code = 414, "invalid_request_error", "url_too_long"


class HeadersTooLarge(GatewayError):
    status, type, code = 431, "invalid_request_error", "headers_too_large"


class Overloaded(GatewayError):
    status, type, code = 429, "rate_limit_error", "overloaded"


class RateLimited(GatewayError):
    """A tenant's limit is reached (its key file's ``limits``): 429 with ``Retry-After`` and the limits' headers."""

    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"


class ShuttingDown(GatewayError):
    status, type, code = 503, "api_error", "shutting_down"


class RequestTimeout(GatewayError):
    """The gateway's own deadline for an answer (``server.request_timeout_secs``) passed: queue wait included."""

    status, type, code = 504, "timeout_error", "request_timeout"


class UpstreamClientError(GatewayError):
    """The upstream refused the request (4xx): its status is kept, its error normalised."""

    type = "invalid_request_error"
    code = None
    kind = "rejected"


class UpstreamError(GatewayError):
    """The upstream failed (5xx) or answered something that is not a valid response."""

    status, type, code = 500, "api_error", "upstream_error"
    kind = "bad_response"


class UpstreamUnauthorized(UpstreamError):
    """The upstream refused the gateway's own credentials (401/403): the operator's to fix, not the client's."""

    status, type, code = 502, "api_error", "upstream_unauthorized"
    kind = "unauthorized"


class UpstreamUnreachable(GatewayError):
    status, type, code = 502, "api_error", "upstream_unreachable"
    kind = "unreachable"


class UpstreamTimeout(GatewayError):
    status, type, code = 504, "timeout_error", "upstream_timeout"
    kind = "timeout"


# How LM Studio, llama.cpp's server and llama.cpp's Python server say that a prompt does not fit the context.
_CONTEXT_OVERFLOW = re.compile(r"context (length|window|size)|exceeds? the available context|n_ctx", re.IGNORECASE)


def from_upstream(status: int, body: bytes, data: Any = None) -> GatewayError:
    """Normalise an upstream error answer, whose ``error`` may be a string or an object (LM Studio sends both);
    ``data``: the body already parsed (an error in a 200, an error event), so that it is not parsed again."""
    if status in (401, 403):  # (its message is left out: OpenAI's quotes part of the key)
        return UpstreamUnauthorized(f"the upstream refused the gateway's credentials (HTTP {status}): it wants an "
                                    "API token; set the host's api_key, or inference.api_key")
    message, error_type, code, param = _read_error(_parsed(body) if data is None else data)
    if message is None:
        text = body.decode("utf-8", "replace").strip()[:500]
        message = text or f"upstream answered HTTP {status}"
    if 400 <= status < 500:
        if code is None and status == 404 and "model" in message.lower():
            code = "model_not_found"
        if code is None and _CONTEXT_OVERFLOW.search(message):  # OpenAI's code: agents compact their history on it
            code = "context_length_exceeded"
        return UpstreamClientError(message, status=status, type=error_type or "invalid_request_error",
                                   code=code, param=param)
    return UpstreamError(f"upstream error (HTTP {status}): {message}", kind="server_error")


def _parsed(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _read_error(data: Any) -> tuple[str | None, str | None, str | None, str | None]:
    """(message, type, code, param) of an error answer's JSON."""
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, str):
        return error, None, None, None
    if isinstance(error, dict):
        def text(key: str) -> str | None:
            value = error.get(key)
            return str(value) if value is not None else None
        return text("message") or json.dumps(error), text("type"), text("code"), text("param")
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        return data["message"], None, None, None
    return None, None, None, None
