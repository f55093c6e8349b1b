"""CORS: off unless ``server.cors_origins`` lists origins, so browser pages (``fetch``, the OpenAI JS SDK) of those
origins, and only those, can call the gateway.

A preflight (``OPTIONS`` with ``Access-Control-Request-Method``) is answered here, before routing: 204 with the
allowed methods and the headers the page asked to send (the OpenAI SDKs send their own ``x-stainless-*``
headers, so a fixed list would break them), or 403 naming the setting when the origin is not listed.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import GatewayError
from .telemetry import RequestState

ALLOWED_METHODS = b"GET, POST, OPTIONS"
EXPOSED_HEADERS = b"X-Request-ID, Retry-After"  # readable by the page: the id to quote, when to retry
PREFLIGHT_MAX_AGE = b"600"


class OriginNotAllowed(GatewayError):
    status, type, code = 403, "invalid_request_error", "origin_not_allowed"


def normalise_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


class Cors:
    """The origins allowed to call from a browser (``*`` for any)."""

    def __init__(self, origins: Sequence[str]) -> None:
        self._any = "*" in origins
        self._origins = frozenset(normalise_origin(o).encode("latin-1") for o in origins if o != "*")

    def allows(self, origin: bytes) -> bool:
        return self._any or origin.rstrip(b"/").lower() in self._origins

    def apply(self, request: RequestState) -> bool:
        """Add the CORS headers ``request`` needs; True when it was a preflight, now answered in full."""
        origin = request.getHeader(b"origin")
        if origin is None:
            return False
        preflight = request.method == b"OPTIONS" and request.getHeader(b"access-control-request-method")
        request.setHeader(b"Vary", b"Origin")
        if not self.allows(origin):
            if not preflight:
                return False  # the browser will refuse to show the page this answer; other clients do not care
            error = OriginNotAllowed(f"Origin {origin.decode('latin-1')} may not call this gateway; "
                                     "add it to server.cors_origins")
            request.record.error_code = error.code
            request.setResponseCode(error.status)
            request.setHeader(b"Content-Type", b"application/json")
            request.write(error.to_bytes())
            return True
        request.setHeader(b"Access-Control-Allow-Origin", b"*" if self._any else origin)
        if not preflight:
            request.setHeader(b"Access-Control-Expose-Headers", EXPOSED_HEADERS)
            return False
        request.setResponseCode(204)
        request.setHeader(b"Access-Control-Allow-Methods", ALLOWED_METHODS)
        asked = request.getHeader(b"access-control-request-headers")
        if asked:
            request.setHeader(b"Access-Control-Allow-Headers", asked)
        request.setHeader(b"Access-Control-Max-Age", PREFLIGHT_MAX_AGE)
        return True
