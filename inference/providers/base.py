"""What the gateway needs from a model server, whatever it is."""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from ..errors import GatewayError
from ..fairness import Shares
from ..operations import Operation
from ..tenants import ANONYMOUS, Caller


@dataclass(frozen=True)
class Route:
    """Which host of a fleet served a call, why it was picked, and the hosts that failed before it (name, and how:
    the error's kind, as ``inference_upstream_errors_total`` counts it)."""

    host: str
    reason: str  # affinity, least_loaded, failover or only_choice
    failed: tuple[tuple[str, str], ...] = ()
    key_source: str | None = None  # what the conversation's key was made from: prompt_cache_key, session, first_turn
    step: str = ""  # the picker's step that decided (routing.picker.STEPS)


@dataclass(frozen=True)
class Served:
    """How a provider served a call, in one value for the telemetry: through chat completions (the upstream lacks
    the operation's own API), by which host of a fleet and why (``route``), and whether the host loaded the model
    first (``model_load``: the first-byte deadline it was given)."""

    translated: bool = False
    route: Route | None = None
    model_load: float | None = None


NOT_SAID = Served()


@dataclass(frozen=True)
class Completion:
    """A non-streaming answer: ``data`` for the gateway to look at, ``raw`` (the same JSON) for the client.

    The client gets the server's own bytes, so nothing is lost or reordered and nothing is encoded twice.
    """

    data: dict[str, Any]
    raw: bytes
    served: Served = NOT_SAID


class EventConsumer(Protocol):
    def event(self, payload: bytes, name: bytes | None = None, parsed: dict[str, Any] | None = None) -> None:
        """One SSE event: its ``data`` payload (an OpenAI chunk's JSON bytes, or ``[DONE]``) and ``event:`` name;
        ``parsed``, the payload as an object, when whoever made the event has it (a translator), so that it is
        not parsed again."""


@implementer(IPushProducer)
class ChatStream(abc.ABC):
    """A completion arriving as events, and the push producer a client connection throttles.

    ``begin`` starts delivery to a consumer and returns a Deferred that fires when the server's stream ends
    (or fails; cancelling it stops the stream). ``pauseProducing``/``resumeProducing`` hold the server back
    while the client is slow, ``stopProducing`` abandons the stream (the client left) and ``fail`` ends it
    with an error (the relay found the events unusable).
    """

    served: Served = NOT_SAID  # how (streams that wrap another take its value, and add to it)

    @abc.abstractmethod
    def begin(self, consumer: EventConsumer) -> Deferred[None]:
        """Deliver events to ``consumer`` until the stream ends."""

    @abc.abstractmethod
    def fail(self, error: Exception) -> None:
        """Stop the stream and make ``begin``'s Deferred fail with ``error``."""

    def failure_events(self, error: GatewayError) -> bytes | None:
        """The events that end this stream when it fails with ``error`` after its 200 (None: the operation's
        usual error event). A translated stream knows what it sent, so it can close that properly."""
        return None

    @abc.abstractmethod
    def pauseProducing(self) -> None: ...

    @abc.abstractmethod
    def resumeProducing(self) -> None: ...

    @abc.abstractmethod
    def stopProducing(self) -> None: ...


class WrappedStream(ChatStream):
    """A stream that hands another's events on (``event`` may change them), with flow control and failure passed
    straight through to the stream underneath."""

    def __init__(self, inner: ChatStream) -> None:
        self._inner = inner
        self._consumer: EventConsumer | None = None
        self.served = inner.served

    def begin(self, consumer: EventConsumer) -> Deferred[None]:
        self._consumer = consumer
        return self._inner.begin(self)

    def event(self, payload: bytes, name: bytes | None = None, parsed: dict[str, Any] | None = None) -> None:
        assert self._consumer is not None  # begin() set it
        self._consumer.event(payload, name, parsed)

    def fail(self, error: Exception) -> None:
        self._inner.fail(error)

    def failure_events(self, error: GatewayError) -> bytes | None:
        return self._inner.failure_events(error)

    def pauseProducing(self) -> None:
        self._inner.pauseProducing()

    def resumeProducing(self) -> None:
        self._inner.resumeProducing()

    def stopProducing(self) -> None:
        self._inner.stopProducing()


class Provider(abc.ABC):
    """A model server: lists models and answers the operations of :mod:`inference.operations`.

    Bodies are OpenAI-shaped dicts in and out; a provider absorbs its server's quirks so that nothing above
    it needs to know which server answered. ``prepare`` shapes a body the same way for both kinds of call.
    """

    name: str = "provider"
    base_url: str = ""
    # A call served through chat completions that offers hosted tools: a 400 (True), or the tools left out.
    reject_unsupported_tools: bool = False

    @abc.abstractmethod
    async def list_models(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """The models the server serves now, as OpenAI model objects (each with an ``id``)."""

    @abc.abstractmethod
    async def call(self, operation: Operation, body: dict[str, Any], headers: dict[str, str] | None = None,
                   caller: Caller = ANONYMOUS) -> Completion:
        """One non-streaming call; raise a :class:`~inference.errors.GatewayError` on failure.

        ``headers`` are sent with the upstream request (the trace context that continues the client's trace);
        ``caller`` is whose call it is, for a provider that makes calls wait (a fleet's fair order).
        """

    @abc.abstractmethod
    async def open_stream(self, operation: Operation, body: dict[str, Any], headers: dict[str, str] | None = None,
                          caller: Caller = ANONYMOUS) -> ChatStream:
        """Start a streaming call; return once the server accepted it (errors before that are raised)."""

    def fair_shares(self) -> Shares | None:
        """The tenants' shares that order the calls this provider makes wait (a fleet's); None: it makes none
        wait."""
        return None

    def watch_models(self, changed: Callable[[], None]) -> None:  # noqa: B027 (a hook: most servers need none)
        """Have ``changed`` called when the gateway itself changed what the server has loaded (a fleet's
        placement): the catalog's cached list is then out of date."""

    def host_status(self) -> list[dict[str, Any]]:
        """Each host's state, for ``/health`` (a fleet's hosts; one server says nothing more than its probe)."""
        return []

    def prepare(self, operation: Operation, body: dict[str, Any]) -> dict[str, Any]:
        """Shape a validated request body for this server (hook for quirks); the default sends it as is."""
        return body

    async def close(self) -> None:  # noqa: B027 (a hook: most providers hold nothing to release)
        """Release connections and timers at shutdown."""
