"""Calls served through chat completions: an operation's request translated to chat, and the answer (or each
event of the stream) translated back, by the operation's :class:`~inference.translation.Translation`."""

from __future__ import annotations

import dataclasses
from typing import Any

from twisted.internet.defer import Deferred

from .. import jsonio
from ..errors import GatewayError, UpstreamError
from ..operations import CHAT, OPENAI_STREAM, Operation
from ..sse import DONE, encode
from ..translation import Translation
from ..translation.chat import ChatStreamReader, Event
from .base import ChatStream, Completion, EventConsumer, Provider, WrappedStream


def _translation(operation: Operation) -> Translation:
    if operation.translation is None:
        raise ValueError(f"{operation.name} has no translation to chat completions")
    return operation.translation


async def call_translated(provider: Provider, operation: Operation, body: dict[str, Any],
                          headers: dict[str, str] | None = None) -> Completion:
    """``operation``'s call, made as a chat completion."""
    translation = _translation(operation)
    answer = await provider.call(CHAT, translation.chat_request(body, provider.reject_unsupported_tools), headers)
    data = translation.translate_answer(answer.data, body)
    return Completion(data, jsonio.dumps(data), dataclasses.replace(answer.served, translated=True))


async def open_translated(provider: Provider, operation: Operation, body: dict[str, Any],
                          headers: dict[str, str] | None = None) -> ChatStream:
    """``operation``'s stream, opened as a chat completion stream."""
    translation = _translation(operation)
    chat = await provider.open_stream(CHAT, translation.chat_request(body, provider.reject_unsupported_tools),
                                      headers)
    return TranslatedStream(chat, translation.stream_reader(body))


class TranslatedStream(WrappedStream):
    """A chat completion stream whose events are delivered as another API's.

    A failure after the 200 (an upstream error event, a broken event, a cut connection) fails the stream; its
    ending is then the API's own failure events from the reader, which knows the blocks it opened."""

    def __init__(self, chat: ChatStream, reader: ChatStreamReader) -> None:
        super().__init__(chat)
        self.served = dataclasses.replace(chat.served, translated=True)
        self._reader = reader

    def failure_events(self, error: GatewayError) -> bytes | None:
        return b"".join(encode(jsonio.dumps(data), name.encode()) for data, name in self._reader.broken(error))

    def begin(self, consumer: EventConsumer) -> Deferred[None]:
        ended = super().begin(consumer)
        ended.addCallback(lambda _: self._send(self._reader.end()))
        return ended

    def event(self, payload: bytes, name: bytes | None = None, parsed: dict[str, Any] | None = None) -> None:
        """One chat event, delivered as the events it translates to."""
        if payload == DONE:
            return self._send(self._reader.done())
        try:
            chunk = parsed if parsed is not None else jsonio.loads(payload)
        except ValueError:
            return self.fail(UpstreamError("upstream sent an event that is not JSON"))
        if not isinstance(chunk, dict):
            return self.fail(UpstreamError("upstream sent an event that is not a JSON object"))
        failure = OPENAI_STREAM.failure(chunk, payload)
        if failure is not None:
            return self.fail(failure)
        self._send(self._reader.chunk(chunk))

    def _send(self, events: list[Event]) -> None:
        for data, name in events:
            super().event(jsonio.dumps(data), name.encode(), data)  # (the relay reads the object, not the bytes)
