"""Answers that are already known, played to a client as a stream: the mock's, and a whole chat answer asked for
without streaming because the upstream cannot stream it (a tool call on llama.cpp's Python server)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from .. import jsonio
from ..sse import DONE
from .base import ChatStream, EventConsumer, WrappedStream
from .upstream import UpstreamEventStream

Events = list[tuple[bytes, bytes | None]]


def answer_events(answer: dict[str, Any]) -> Events:
    """A whole chat completion as the chunks its stream would have had: the role, reasoning, text, each tool
    call whole, the finish reason, the usage, ``[DONE]``."""
    head = {"id": answer.get("id") or "chatcmpl-replayed", "object": "chat.completion.chunk",
            "created": answer.get("created") or 0, "model": answer.get("model") or ""}
    choice: dict[str, Any] = next((c for c in answer.get("choices") or () if isinstance(c, dict)), {})
    message: dict[str, Any] = choice["message"] if isinstance(choice.get("message"), dict) else {}
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
    deltas += [{key: message[key]} for key in ("reasoning_content", "reasoning", "content", "refusal")
               if isinstance(message.get(key), str) and message[key]]
    deltas += [{"tool_calls": [{**call, "index": i}]} for i, call in enumerate(message.get("tool_calls") or ())
               if isinstance(call, dict)]

    def chunk(delta: dict[str, Any], finish: Any = None) -> bytes:
        return jsonio.dumps({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    events = [chunk(delta) for delta in deltas] + [chunk({}, choice.get("finish_reason") or "stop")]
    if isinstance(answer.get("usage"), dict):
        events.append(jsonio.dumps({**head, "choices": [], "usage": answer["usage"]}))
    return [(event, None) for event in [*events, DONE]]


class PreparedStream(ChatStream):
    """Plays prepared events (payload and ``event:`` name): the first after ``latency``, each content word
    ``token_delay`` after the last (the mock's answers, and answers asked for whole and streamed to the client)."""

    def __init__(self, reactor: IReactorTime, events: Events, latency: float, token_delay: float) -> None:
        self._reactor = reactor
        self._events = events
        self._next = 0
        self._latency = latency
        self._token_delay = token_delay
        self._paused = False
        self._timer: IDelayedCall | None = None
        self._consumer: EventConsumer | None = None
        self.done: Deferred[None] = Deferred(lambda _: self.stopProducing())

    def begin(self, consumer: EventConsumer) -> Deferred[None]:
        self._consumer = consumer
        self._timer = self._reactor.callLater(self._latency, self._play)
        return self.done

    def _play(self) -> None:
        self._timer = None
        consumer = self._consumer
        assert consumer is not None  # begin() set it
        while not self._paused and not self.done.called and self._next < len(self._events):
            consumer.event(*self._events[self._next])
            self._next += 1
            if self._token_delay and 1 < self._next < len(self._events) - 2:  # between content words
                self._timer = self._reactor.callLater(self._token_delay, self._play)
                return
        if self._next == len(self._events) and not self.done.called:
            self.done.callback(None)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._timer is None and not self.done.called:
            self._timer = self._reactor.callLater(0, self._play)

    def stopProducing(self) -> None:
        # The client is gone: stop playing. ``done`` is left to the canceller (Klein cancels the handler).
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._next = len(self._events)

    def fail(self, error: Exception) -> None:
        self.stopProducing()
        if not self.done.called:
            self.done.errback(error)


class AnsweredIfEmpty(WrappedStream):
    """A chat stream that, if it ends before its first event, is answered by ``ask_whole`` instead: the same call
    made without streaming, its answer played as the stream's events, or its error (the upstream's reason, such
    as a prompt too long for the context) failing the stream. ``also_if_cut``: a connection cut before the first
    event is answered so too (llama.cpp's Python server may drop a streamed tool call that way).

    Events go from the upstream stream to the consumer directly (no layer per event): whether any came is the
    upstream stream's own count."""

    def __init__(self, inner: UpstreamEventStream, ask_whole: Callable[[], Coroutine[Any, Any, Events]],
                 also_if_cut: bool, clock: IReactorTime) -> None:
        super().__init__(inner)
        self._upstream = inner
        self._ask_whole = ask_whole
        self._also_if_cut = also_if_cut
        self._clock = clock
        self._stopped = False  # failed or abandoned from outside: nothing more is asked
        self._asking: Deferred[Events] | None = None
        self.done: Deferred[None] = Deferred(self._cancel)

    def begin(self, consumer: EventConsumer) -> Deferred[None]:
        self._consumer = consumer
        self._upstream.begin(consumer).addCallbacks(self._ended, self._broke)
        return self.done

    @property
    def _events(self) -> int:
        return self._upstream.delivered

    def _ended(self, _: None) -> None:
        if self._events or self._stopped or self.done.called:
            self._settle(None)
        else:
            self._answer_whole()

    def _broke(self, failure: Failure) -> None:
        if self._events or self._stopped or self.done.called or not self._also_if_cut or \
                failure.check(CancelledError):
            self._settle(failure)
        else:
            self._answer_whole()

    def _answer_whole(self) -> None:
        self._asking = Deferred.fromCoroutine(self._ask_whole())
        self._asking.addCallbacks(self._play, self._settle)

    def _play(self, events: Events) -> None:
        self._asking = None
        if self.done.called:
            return
        replay = PreparedStream(self._clock, events, 0.0, 0.0)
        self._inner = replay
        assert self._consumer is not None  # begin() set it
        replay.begin(self._consumer).addBoth(self._settle)

    def _settle(self, result: Any) -> None:
        if not self.done.called:
            if isinstance(result, Failure):
                self.done.errback(result)
            else:
                self.done.callback(None)

    def _cancel(self, _: Deferred[None]) -> None:
        self._stopped = True
        if self._asking is not None:
            self._asking.cancel()
        self.stopProducing()

    def fail(self, error: Exception) -> None:
        self._stopped = True
        if self._asking is not None:
            self._asking.cancel()
        super().fail(error)
        self._settle(Failure(error))
